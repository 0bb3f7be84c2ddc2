"""The accumulators' dtype: float32 keeps small bfloat16 gradients, on request bfloat16.

Under a pure ``bfloat16`` policy (weights and compute in bfloat16, as large
models are trained to fit) every micro-batch gradient is a bfloat16 number.
Summed in bfloat16 (8 bits of mantissa), each addition to a sum that is
already k micro-batches large rounds away about ``k * 2**-9`` of the
addend; summed in float32 nothing is lost. The oracle is, as everywhere, a
real plain Keras step: here the float32 model's step on the whole batch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from accumulate import AccumulatingModel, enable_accumulation
from tests.oracle import update_error

MICRO_BATCHES, MICRO_BATCH, FEATURES, CLASSES = 64, 4, 32, 10


def _data():
    # Positive features and one class: every micro-batch's gradient points
    # the same way, so the window's sum grows to 64 times each addend.
    rng = np.random.default_rng(0)
    samples = MICRO_BATCHES * MICRO_BATCH
    x = rng.uniform(0.5, 1.5, (samples, FEATURES)).astype("float32")
    return x, np.full(samples, 3, "int32")


def _layers(dtype: str) -> list:
    # Zero weights: after one SGD step at rate 1 the weights are minus the
    # applied gradient, so bfloat16 weights do not round the update away.
    return [
        keras.Input((FEATURES,)),
        keras.layers.Dense(CLASSES, kernel_initializer="zeros", dtype=dtype),
    ]


def _compiled(model: keras.Model, keras_steps: int | None = None) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.SGD(1.0, gradient_accumulation_steps=keras_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _window_errors() -> dict[str, float]:
    """Each way of summing 64 bfloat16 micro-batches, against the float32 step."""
    x, y = _data()
    plain = _compiled(keras.Sequential(_layers("float32")))
    before = plain.get_weights()
    plain.train_on_batch(x, y)  # the float32 big batch
    errors = {}
    for name in ("float32", "bfloat16"):
        ours = enable_accumulation(
            keras.Sequential(_layers("bfloat16")),
            accumulation_steps=MICRO_BATCHES,
            accumulation_dtype=name,
        )
        _compiled(ours).fit(x, y, batch_size=MICRO_BATCH, shuffle=False, verbose=0)
        assert int(ours.optimizer.iterations) == 1
        errors[f"ours, {name} sums"] = update_error(ours, plain, before)
    keras_own = _compiled(keras.Sequential(_layers("bfloat16")), MICRO_BATCHES)
    keras_own.fit(x, y, batch_size=MICRO_BATCH, shuffle=False, verbose=0)
    errors["Keras built-in (bfloat16)"] = update_error(keras_own, plain, before)
    big = _compiled(keras.Sequential(_layers("bfloat16")))
    big.train_on_batch(x, y)  # what bfloat16 compute alone costs
    errors["plain bfloat16 big batch"] = update_error(big, plain, before)
    return errors


def test_float32_sums_keep_small_bfloat16_micro_batch_gradients() -> None:
    errors = _window_errors()
    print(errors)  # the numbers docs/performance.md quotes
    ours = errors["ours, float32 sums"]
    # Within what rounding the update to bfloat16 weights costs (half a unit
    # in the last place is 2**-9 of a value). A bfloat16 big batch errs by
    # 0.2% (PyTorch, which sums matmuls in float32) to 1.7% (TensorFlow).
    assert ours < 2**-8, errors
    # Summing in bfloat16 loses what float32 keeps, ours or Keras's.
    assert errors["ours, bfloat16 sums"] > 3 * ours, errors
    assert errors["Keras built-in (bfloat16)"] > 3 * ours, errors


def test_accumulators_take_the_requested_dtype() -> None:
    model = enable_accumulation(
        keras.Sequential(_layers("float32")), 2, accumulation_dtype="bfloat16"
    )
    _compiled(model).train_on_batch(*_data())
    assert model.accumulation_dtype == "bfloat16"
    assert _sum_dtypes(model) == {"bfloat16"}
    half = enable_accumulation(keras.Sequential(_layers("bfloat16")), 2)
    _compiled(half).train_on_batch(*_data())
    assert _sum_dtypes(half) == {"float32"}


def _sum_dtypes(model: keras.Model) -> set[str]:
    return {
        keras.backend.standardize_dtype(gradient_sum.dtype)
        for gradient_sum in model._accumulation.gradient_sums
    }


def test_a_dtype_that_is_not_offered_is_refused_with_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"'float32', 'bfloat16'; received accumulation_dtype='float16'",
    ):
        enable_accumulation(
            keras.Sequential(_layers("float32")), 2, accumulation_dtype="float16"
        )
    inputs = keras.Input((2,))
    with pytest.raises(ValueError, match="accumulation_dtype"):
        AccumulatingModel(
            inputs, keras.layers.Dense(1)(inputs), accumulation_dtype="int8"
        )


def test_the_dtype_and_a_bfloat16_window_survive_saving(tmp_path) -> None:
    x, y = _data()
    inputs = keras.Input((FEATURES,))
    model = AccumulatingModel(
        inputs,
        keras.layers.Dense(CLASSES)(inputs),
        accumulation_steps=4,
        accumulation_dtype="bfloat16",
    )
    _compiled(model).train_on_batch(x[:8], y[:8])  # one micro-batch pending
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.accumulation_dtype == "bfloat16"
    assert loaded.steps_accumulated == 1
    for saved, restored in zip(
        model._accumulation.gradient_sums,
        loaded._accumulation.gradient_sums,
        strict=True,
    ):
        np.testing.assert_array_equal(
            np.asarray(saved.numpy(), "float32"),
            np.asarray(restored.numpy(), "float32"),
        )
    clone = keras.models.clone_model(model)
    assert clone.accumulation_dtype == "bfloat16"
