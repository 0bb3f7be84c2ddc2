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
