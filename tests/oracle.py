"""What the exactness tests share: random data and weight comparisons."""

from __future__ import annotations

import keras
import numpy as np


def random_data(samples: int, features: int, classes: int, seed: int = 0):
    """``(x, y, sample_weight)``: normal features, uniform labels and weights."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = rng.integers(0, classes, size=samples).astype("int32")
    weights = rng.uniform(0.1, 2.0, size=samples).astype("float32")
    return x, y, weights


def max_difference(first: keras.Model, second: keras.Model) -> float:
    """The largest absolute difference between the two models' weights."""
    return max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(first.get_weights(), second.get_weights(), strict=True)
    )


def update_error(model: keras.Model, plain: keras.Model, before: list) -> float:
    """``|model - plain| / |plain - before|`` over all weights (L2 norms).

    ``before`` is the weights both started from: the plain step's size is
    the scale, so this is an error relative to the update.
    """

    def norm(first: list, second: list) -> float:
        return float(
            np.sqrt(
                sum(
                    np.sum(np.square(np.asarray(a, "float64") - b))
                    for a, b in zip(first, second, strict=True)
                )
            )
        )

    change = norm(plain.get_weights(), before)
    assert change > 0.0, "the plain step did not move the weights"
    return norm(model.get_weights(), plain.get_weights()) / change
