"""The README's Use section runs as written on this process's Keras backend.

The section's code is taken from README.md and executed with small synthetic
MNIST-shaped arrays standing in for ``x_train`` and friends; `make test`,
`make test-jax` and `make test-torch` run it on each backend.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def section_code(title: str) -> str:
    """The first Python block of the README's section ``title``."""
    section = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def use_section_code() -> str:
    return section_code("Use")


def test_the_use_section_runs_unchanged():
    rng = np.random.default_rng(0)
    namespace = {
        "x_train": rng.uniform(size=(1024, 28, 28)).astype("float32"),
        "y_train": rng.integers(0, 10, 1024),
        "x_test": rng.uniform(size=(256, 28, 28)).astype("float32"),
        "y_test": rng.integers(0, 10, 256),
    }
    exec(compile(use_section_code(), str(README), "exec"), namespace)

    # Two micro-batches of 512 per epoch, N=8: each epoch's open window is
    # flushed at its end, one update per epoch.
    model = namespace["model"]
    assert int(model.optimizer.iterations) == 5
    standard, accumulating = namespace["standard"], namespace["accumulating"]
    for a, b in zip(standard.get_weights(), accumulating.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    subclassed = namespace["MyNet"]()
    subclassed.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x_train, y_train = namespace["x_train"], namespace["y_train"]
    subclassed.fit(x_train, y_train, batch_size=256, verbose=0)
    assert int(subclassed.optimizer.iterations) == 1  # "epoch": one per epoch


def test_the_two_ways_make_the_same_updates():
    import accumulate

    def build_model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((20,))
        hidden = keras.layers.Dense(16, activation="tanh")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    rng = np.random.default_rng(0)
    namespace = {
        "accumulate": accumulate,
        "build_model": build_model,
        "x": rng.normal(size=(1024, 20)).astype("float32"),
        "y": rng.integers(0, 10, 1024),
    }
    code = section_code("Two ways to ask for a big batch")
    exec(compile(code, str(README), "exec"), namespace)
    counting, splitting = namespace["counting"], namespace["splitting"]
    assert int(counting.optimizer.iterations) == int(splitting.optimizer.iterations)
    assert int(splitting.optimizer.iterations) == 2
    for a, b in zip(counting.get_weights(), splitting.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)
