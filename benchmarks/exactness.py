"""How far one accumulated window is from one big-batch step: ours and Keras's.

For each route (a functional model, a KerasHub GPT-2 causal LM and a BERT
classifier from raw strings, built as in the tests) and each loss reduction,
one window of 10 samples as ragged micro-batches of 4, 4 and 2 is trained:

* by `enable_accumulation(model, "epoch")` (ours),
* by Keras's built-in ``gradient_accumulation_steps=3`` (one update after the
  3 micro-batches),

and compared with one plain Keras step of the same class on the 10 samples:
the L2 distance between the weights over the size of the plain step. SGD
(Keras's Adam treats sparse embedding gradients on TensorFlow slice by slice,
see docs/design.md). Writes ``exactness-<backend>.json`` into --out and
prints a Markdown table; run once per backend (``make exactness``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny KerasHub tasks the tests build

from accumulate import enable_accumulation  # noqa: E402
from tests.hub_tasks import LABELS, TEXTS, causal_lm, text_classifier  # noqa: E402
from tests.oracle import update_error  # noqa: E402

REDUCTIONS = ("sum_over_batch_size", "mean_with_sample_weight", "sum")
SAMPLES, MICRO_BATCH, MICRO_BATCHES = 10, 4, 3


def _mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _mlp_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = rng.integers(0, 3, size=SAMPLES)
    return x, y, rng.uniform(0.1, 2.0, size=SAMPLES).astype("float32")


ROUTES = {
    "functional MLP, sample weights": (_mlp, _mlp_data),
    "GPT2CausalLM, padded strings": (causal_lm, lambda: (TEXTS[:SAMPLES], None, None)),
    "BertTextClassifier, strings + weights": (
        text_classifier,
        lambda: (
            TEXTS[:SAMPLES],
            np.array(LABELS[:SAMPLES]),
            np.linspace(0.2, 2.0, SAMPLES).astype("float32"),
        ),
    ),
}


def errors(build, data, reduction: str) -> dict[str, float]:
    """``{"ours": ..., "keras_builtin": ...}`` relative to one plain step."""
    x, y, weights = data()
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )
    models = {"plain": build(), "ours": build(), "keras_builtin": build()}
    start = models["plain"].get_weights()
    for model in models.values():
        model.set_weights(start)
    models["ours"] = enable_accumulation(models["ours"], "epoch")
    for name, model in models.items():
        steps = MICRO_BATCHES if name == "keras_builtin" else None
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=steps),
            loss=loss,
        )
    models["plain"].train_on_batch(x, y, sample_weight=weights)
    result = {}
    for name in ("ours", "keras_builtin"):
        model = models[name]
        model.fit(
            x,
            y,
            sample_weight=weights,
            batch_size=MICRO_BATCH,
            shuffle=False,
            verbose=0,
        )
        result[name] = update_error(model, models["plain"], start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    backend = keras.backend.backend()
    rows = [
        {"route": route, "reduction": reduction, **errors(*ROUTES[route], reduction)}
        for route in ROUTES
        for reduction in REDUCTIONS
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"exactness-{backend}.json"
    path.write_text(json.dumps({"backend": backend, "rows": rows}, indent=1) + "\n")
    print(f"| route | reduction | ours ({backend}) | Keras built-in ({backend}) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['route']} | {row['reduction']} | {row['ours']:.1e} | "
            f"{row['keras_builtin']:.1e} |"
        )


if __name__ == "__main__":
    main()
