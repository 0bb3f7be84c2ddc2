"""The gradient noise scale against per-example ground truth.

Softmax regression has per-example gradients in closed form: for logits
``x W + b`` and probabilities ``p``, example ``i`` contributes
``x_i ⊗ (p_i - onehot_i)`` to W and ``p_i - onehot_i`` to b. At fixed weights
(learning rate 0) the true gradient ``G`` and the per-example covariance
``Σ`` of a finite data set follow exactly. Micro-batches are drawn with
replacement, so the samples are independent as the estimator assumes, with
unequal sizes within each window.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from accumulate import AccumulatingModel, noise_scale

FEATURES, CLASSES, EXAMPLES = 5, 3, 600
SIZES = (3, 8, 5, 12)  # one window: unequal micro-batches, B = 28
WINDOWS_PER_EPOCH, EPOCHS = 60, 12


def _problem():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=EXAMPLES)
    keras.utils.set_random_seed(4)
    inputs = keras.Input((FEATURES,))
    model = AccumulatingModel(
        inputs,
        keras.layers.Dense(CLASSES, kernel_initializer="glorot_normal")(inputs),
        accumulation_steps=len(SIZES),
        measure_noise_scale=True,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return x, y, model


def _ground_truth(model, x, y):
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_weights())
    logits = x.astype(np.float64) @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    residual = p - np.eye(CLASSES)[y]
    per_example = np.concatenate(
        [(x[:, :, None] * residual[:, None, :]).reshape(len(x), -1), residual], axis=1
    )
    mean = per_example.mean(axis=0)
    sq_norm = float(mean @ mean)
    variance = float(((per_example - mean) ** 2).sum(axis=1).mean())
    return sq_norm, variance


def _batches(x, y, seed):
    rng = np.random.default_rng(seed)
    while True:
        for size in SIZES:
            index = rng.integers(0, len(x), size=size)  # with replacement
            yield x[index], y[index]


def _measure(x, y, model):
    history = model.fit(
        _batches(x, y, seed=5),
        steps_per_epoch=WINDOWS_PER_EPOCH * len(SIZES),
        epochs=EPOCHS,
        verbose=0,
    ).history
    return {key: np.asarray(history[key]) for key in noise_scale.LOG_KEYS}


def _check(measured, truth_sq_norm, truth_variance):
    """Mean over epochs within 4 standard errors (and 10%) of the truth."""
    for key, truth in (
        ("gradient_sq_norm", truth_sq_norm),
        ("gradient_variance", truth_variance),
    ):
        per_epoch = measured[key]
        standard_error = per_epoch.std(ddof=1) / math.sqrt(len(per_epoch))
        gap = abs(per_epoch.mean() - truth)
        assert gap <= 4 * standard_error, (key, per_epoch.mean(), truth)
        assert gap <= 0.1 * truth, (key, per_epoch.mean(), truth)


def test_estimates_match_the_per_example_truth():
    x, y, model = _problem()
    truth = _ground_truth(model, x, y)
    measured = _measure(x, y, model)
    assert int(model.optimizer.iterations) == EPOCHS * WINDOWS_PER_EPOCH
    _check(measured, *truth)
    noise = measured["gradient_noise_scale"]
    np.testing.assert_allclose(
        noise, measured["gradient_variance"] / measured["gradient_sq_norm"], rtol=1e-6
    )


def _biased_sq_norm(weighted_sq_norms, micro_batches, window_sq_norm, samples):
    # The window's |Ḡ|² taken for |G|², forgetting that it holds tr(Σ)/B.
    _, variance = _true_window_estimates(
        weighted_sq_norms, micro_batches, window_sq_norm, samples
    )
    return window_sq_norm, variance


def _equal_size_variance(weighted_sq_norms, micro_batches, window_sq_norm, samples):
    # Divides by n, not n - 1, as if the window's gradient were noise-free.
    variance = (weighted_sq_norms - window_sq_norm * samples) / micro_batches
    return (window_sq_norm * samples - variance) / samples, variance


_true_window_estimates = noise_scale.window_estimates


@pytest.mark.parametrize("wrong", [_biased_sq_norm, _equal_size_variance])
def test_the_check_rejects_a_plausible_wrong_estimator(monkeypatch, wrong):
    monkeypatch.setattr(noise_scale, "window_estimates", wrong)
    x, y, model = _problem()
    truth = _ground_truth(model, x, y)
    measured = _measure(x, y, model)
    with pytest.raises(AssertionError):
        _check(measured, *truth)


def test_one_step_windows_are_refused():
    inputs = keras.Input((2,))
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        AccumulatingModel(
            inputs, keras.layers.Dense(1)(inputs), measure_noise_scale=True
        )
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        AccumulatingModel(
            inputs,
            keras.layers.Dense(1)(inputs),
            accumulation_steps={3: 4},  # epochs 0-2 use 1
            measure_noise_scale=True,
        )


def test_off_by_default_and_nothing_logged():
    x, y, _ = _problem()
    inputs = keras.Input((FEATURES,))
    model = AccumulatingModel(
        inputs, keras.layers.Dense(CLASSES)(inputs), accumulation_steps=2
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=50, epochs=1, verbose=0).history
    assert not set(noise_scale.LOG_KEYS) & set(history)
    assert model._noise_scale is None


def test_mixed_precision_measures_unscaled_gradients():
    """Under a loss scale of 2**15 the estimates are those of float32."""
    x, y, _ = _problem()

    def measure(policy):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(4)
            inputs = keras.Input((FEATURES,))
            hidden = keras.layers.Dense(8, activation="tanh")(inputs)
            model = AccumulatingModel(
                inputs,
                keras.layers.Dense(CLASSES, dtype="float32")(hidden),
                accumulation_steps=4,
                measure_noise_scale=True,
            )
            model.compile(
                optimizer=keras.optimizers.SGD(0.0),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            history = model.fit(x, y, batch_size=30, epochs=1, verbose=0).history
            return {key: history[key][0] for key in noise_scale.LOG_KEYS}
        finally:
            keras.mixed_precision.set_global_policy("float32")

    full, mixed = measure("float32"), measure("mixed_float16")
    for key in noise_scale.LOG_KEYS:
        # float16 activations: a few units of 2**-11 relative.
        assert mixed[key] == pytest.approx(full[key], rel=2e-2), key
