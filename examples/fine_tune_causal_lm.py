"""Fine-tune a KerasHub causal LM with LoRA and gradient accumulation.

The batch you want (64 sequences of 256 tokens) as 8 micro-batches of 8, one
exact update per window, on a `keras_hub.models.GPT2CausalLM` as it is::

    lm = keras_hub.models.GPT2CausalLM.from_preset("gpt2_base_en")  # yours
    lm.backbone.enable_lora(rank=4)
    lm = accumulate.enable_accumulation(lm, accumulation_steps=8)
    lm.compile(loss=SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"))
    lm.fit(texts, batch_size=8)

No preset can be downloaded everywhere, so this script builds a small GPT-2
from config (random weights), with a byte-pair tokenizer learnt from a text
that ships with Python (the Zen of Python, module ``this``). Its sequences
have different lengths and are padded; the loss averages over real tokens only
(``mean_with_sample_weight``, the padding mask being the sample weight).
It prints:

1. the accumulated window against one plain Keras step on the 64 sequences,
2. Keras's built-in accumulation (``gradient_accumulation_steps=8``) against
   the same step: it averages the 8 micro-batch means, which weighs a token
   of a short micro-batch more,
3. the peak memory that one epoch adds, each variant in its own process.

Run: ``python examples/fine_tune_causal_lm.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import ast
import codecs
import collections
import importlib.util
import itertools
import json
import subprocess
import sys
import threading
import time

import keras
import keras_hub
import numpy as np

from accumulate import enable_accumulation

SEQUENCE_LENGTH = 256
BATCH = 64
MICRO_BATCHES = 8
MICRO_BATCH = BATCH // MICRO_BATCHES
VARIANTS = {
    "plain fit, batch 64": "plain",
    "ours, 8 x 8": "ours",
    "Keras built-in, 8 x 8": "builtin",
}


def corpus() -> str:
    """The Zen of Python, which the module `this` keeps ROT13-encoded.

    Read from its source: importing `this` would print it.
    """
    with open(importlib.util.find_spec("this").origin) as source:
        tree = ast.parse(source.read())
    encoded = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "s"
    )
    return " ".join(codecs.decode(encoded, "rot13").split())


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """The ``count`` most frequent adjacent-pair merges (byte-pair encoding)."""
    split = collections.Counter(tuple(word) for word in words)
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for symbols, frequency in split.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += frequency
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged = collections.Counter()
        for symbols, frequency in split.items():
            out, index = [], 0
            while index < len(symbols):
                if symbols[index : index + 2] == best:
                    out.append(best[0] + best[1])
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            merged[tuple(out)] += frequency
        split = merged
    return merges


def tokenizer() -> keras_hub.models.GPT2Tokenizer:
    # GPT-2's byte-level BPE writes a leading space as "Ġ".
    words = ["Ġ" + word for word in corpus().split()]
    merges = _learn_merges(words, 48)
    pieces = sorted({*"".join(words), *(a + b for a, b in merges)})
    vocabulary = {"<|endoftext|>": 0, **{p: i + 1 for i, p in enumerate(pieces)}}
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=[f"{a} {b}" for a, b in merges]
    )


def causal_lm(seed: int = 0) -> keras_hub.models.GPT2CausalLM:
    """A 2-layer GPT-2 from config, random weights, LoRA (rank 4) on."""
    keras.utils.set_random_seed(seed)
    words = tokenizer()
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=words.vocabulary_size(),
        num_layers=2,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=256,
        max_sequence_length=SEQUENCE_LENGTH,
        dropout=0.0,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        words, sequence_length=SEQUENCE_LENGTH
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    lm.backbone.enable_lora(rank=4)
    return lm


def texts(seed: int = 0) -> list[str]:
    """64 spans of the corpus, 5 to 60 words long: padded unequally."""
    rng = np.random.default_rng(seed)
    words = corpus().split()
    spans = []
    for _ in range(BATCH):
        length = int(rng.integers(5, 61))
        start = int(rng.integers(0, len(words) - length))
        spans.append(" ".join(words[start : start + length]))
    return spans


def compiled(lm: keras.Model, accumulation: int | None = None) -> keras.Model:
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=accumulation),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    return lm


def variant(name: str) -> keras.Model:
    """The model of a variant, compiled, with the same starting weights."""
    if name == "ours":
        return compiled(enable_accumulation(causal_lm(), MICRO_BATCHES))
    if name == "builtin":
        return compiled(causal_lm(), accumulation=MICRO_BATCHES)
    return compiled(causal_lm())


def train_one_window(name: str, data: list[str]) -> keras.Model:
    model = variant(name)
    batch = BATCH if name == "plain" else MICRO_BATCH
    model.fit(data, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return model


def update_error(model: keras.Model, reference: keras.Model, before: list) -> float:
    """``|w - w_ref| / |w_ref - w_0|`` over the trainable weights."""

    def norm(first, second) -> float:
        return float(
            np.sqrt(
                sum(
                    np.sum(np.square(np.asarray(a, "float64") - np.asarray(b)))
                    for a, b in zip(first, second, strict=True)
                )
            )
        )

    after = [v.numpy() for v in reference.trainable_variables]
    ours = [v.numpy() for v in model.trainable_variables]
    return norm(ours, after) / norm(after, before)


def _resident_mb() -> float:
    # Linux: pages in /proc/self/statm (psutil is not a dependency).
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def peak_memory_mb(name: str) -> float:
    """Peak resident memory that one epoch adds, in a fresh process.

    Sampled every 2 ms while the epoch runs, over what the process held just
    before it (the model built, its train function traced on one batch).
    """
    data = texts()
    model = variant(name)
    batch = BATCH if name == "plain" else MICRO_BATCH
    # One micro-batch trains first so that tracing is not measured; for the
    # accumulating variants it leaves the window open, which is harmless here.
    model.train_on_batch(data[:batch])
    start = _resident_mb()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model.fit(data, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    done.set()
    sampler.join()
    return peak[0] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=sorted(VARIANTS.values()))
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-process memory"
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"peak_mb": peak_memory_mb(args.measure)}))
        return

    data = texts()
    reference = variant("plain")
    before = [v.numpy() for v in reference.trainable_variables]
    reference.train_on_batch(data)  # one plain step on the whole window
    lm = causal_lm()
    print(
        f"GPT-2 from config: {lm.count_params():,} parameters, "
        f"{sum(int(np.prod(v.shape)) for v in lm.trainable_variables):,} "
        f"trainable with LoRA; {BATCH} sequences of up to {SEQUENCE_LENGTH} "
        "tokens, padded."
    )
    print("Relative error of one window against one plain step on all 64:")
    for label, name in list(VARIANTS.items())[1:]:
        model = train_one_window(name, data)
        print(f"  {label:<24} {update_error(model, reference, before):.2e}")
    print(f"  generate(): {train_one_window('ours', data).generate('Beautiful')!r}")
    if args.no_memory:
        return
    print("Peak memory one epoch adds (each in its own process):")
    for label, name in VARIANTS.items():
        output = subprocess.run(
            [sys.executable, __file__, "--measure", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peak = json.loads(output.strip().splitlines()[-1])["peak_mb"]
        print(f"  {label:<24} {peak:8.0f} MB")


if __name__ == "__main__":
    main()
