"""Mixed precision: float32 accumulators, loss scaling, non-finite windows, XLA.

Tolerances are stated relative to the update (how far one window moves the
weights): the forward and backward passes of a float16 (bfloat16) model round
every activation and activation gradient to 11 (8) significant bits, unit
roundoff u = 2**-11 (2**-8). The weight gradients are float32 sums of such
terms, so each carries a relative error of a few u at most; a gap of 4u of
the update's largest entry is allowed against the float32 big batch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from accumulate import AccumulatingModel

FLOAT16_U = 2.0**-11
BFLOAT16_U = 2.0**-8
WINDOW = 4
MICRO_BATCH = 16


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test and always restores float32."""
    previous = keras.mixed_precision.global_policy()

    def set_policy(name: str) -> None:
        keras.mixed_precision.set_global_policy(name)

    yield set_policy
    keras.mixed_precision.set_global_policy(previous)


def _data(samples: int = WINDOW * MICRO_BATCH - 5):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(samples, 12)).astype("float32")
    y = rng.integers(0, 5, size=samples)
    return x, y


def _layers(inputs):
    hidden = keras.layers.Dense(32, activation="tanh")(inputs)
    hidden = keras.layers.Dense(32, activation="tanh")(hidden)
    # Logits in float32, as Keras recommends for mixed precision.
    return keras.layers.Dense(5, dtype="float32")(hidden)


def _accumulating(steps=WINDOW, **compile_kwargs) -> AccumulatingModel:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((12,))
    model = AccumulatingModel(
        inputs, _layers(inputs), accumulation_steps=steps, name="mixed"
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def _float32_big_batch_update(initial_weights, x, y):
    """One SGD step of a float32 keras.Model on the whole window as one batch."""
    keras.mixed_precision.set_global_policy("float32")
    inputs = keras.Input((12,))
    model = keras.Model(inputs, _layers(inputs))
    model.set_weights(initial_weights)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.train_on_batch(x, y)
    return model.get_weights()


def _one_window(model, x, y):
    for start in range(0, len(x), MICRO_BATCH):
        model.train_on_batch(
            x[start : start + MICRO_BATCH], y[start : start + MICRO_BATCH]
        )


def _gap_and_update(initial, accumulated, reference):
    gap = max(
        float(np.max(np.abs(a - r)))
        for a, r in zip(accumulated, reference, strict=True)
    )
    update = max(
        float(np.max(np.abs(r - i))) for r, i in zip(reference, initial, strict=True)
    )
    return gap, update


@pytest.mark.parametrize(
    ("name", "unit_roundoff"),
    [("mixed_float16", FLOAT16_U), ("mixed_bfloat16", BFLOAT16_U)],
)
def test_accumulated_update_matches_float32_big_batch(policy, name, unit_roundoff):
    policy(name)
    model = _accumulating()
    assert model.layers[1].compute_dtype == name.split("_")[1]
    # The loss-scaling wrapper only for float16, as Keras's compile does.
    is_scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_scaled == (name == "mixed_float16")
    x, y = _data()
    initial = model.get_weights()
    _one_window(model, x, y)
    assert int(model.optimizer.iterations.numpy()) == 1
    assert model.steps_accumulated == 0
    sums = model._accumulation.gradient_sums
    assert {keras.backend.standardize_dtype(s.dtype) for s in sums} == {"float32"}

    reference = _float32_big_batch_update(initial, x, y)
    gap, update = _gap_and_update(initial, model.get_weights(), reference)
    print(
        f"{name}: max |accumulated - float32 big batch| = {gap:.3g}, "
        f"max |update| = {update:.3g}, ratio = {gap / update:.3g} "
        f"(u = {unit_roundoff:.3g})"
    )
    assert gap <= 4 * unit_roundoff * update


def test_non_finite_window_is_skipped_and_the_loss_scale_lowered(policy):
    policy("mixed_float16")
    model = _accumulating()
    x, y = _data(WINDOW * MICRO_BATCH * 3)
    initial = model.get_weights()
    model.train_on_batch(x[:1], y[:1])  # builds the optimizer
    model.reset_accumulated_gradients()
    scale = float(model.optimizer.dynamic_scale.numpy())

    # Window 1: one micro-batch's loss is infinite (an infinite sample weight).
    for index in range(WINDOW):
        batch = slice(index * MICRO_BATCH, (index + 1) * MICRO_BATCH)
        weight = np.ones(MICRO_BATCH, "float32")
        if index == 2:
            weight[3] = np.inf
        model.train_on_batch(x[batch], y[batch], sample_weight=weight)
    # Skipped: no update, scale halved, the window emptied.
    assert int(model.optimizer.iterations.numpy()) == 0
    assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2
    assert model.steps_accumulated == 0 and model.samples_accumulated == 0
    for weight, start in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(weight, start)

    # The next windows are finite and train.
    history = model.fit(
        x, y, batch_size=MICRO_BATCH, epochs=4, shuffle=False, verbose=0
    )
    assert int(model.optimizer.iterations.numpy()) == 4 * 3
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_too_high_loss_scale_recovers_by_halving(policy):
    """A loss scale that overflows float16 skips windows until it fits."""
    policy("mixed_float16")
    keras.utils.set_random_seed(5)
    inputs = keras.Input((12,))
    model = AccumulatingModel(inputs, _layers(inputs), accumulation_steps=2, name="hi")
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.5), initial_scale=2.0**40
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(MICRO_BATCH * 40)
    model.fit(x, y, batch_size=MICRO_BATCH, epochs=1, shuffle=False, verbose=0)
    scale = float(model.optimizer.dynamic_scale.numpy())
    updates = int(model.optimizer.iterations.numpy())
    assert scale < 2.0**40  # lowered once per skipped window
    skipped = round(float(np.log2(2.0**40 / scale)))
    assert skipped >= 1 and updates == 20 - skipped
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_jit_compile_with_mixed_precision(policy):
    policy("mixed_float16")
    x, y = _data()
    eager_graph = _accumulating()
    xla = _accumulating(jit_compile=True)
    assert xla.jit_compile
    _one_window(eager_graph, x, y)
    _one_window(xla, x, y)
    assert int(xla.optimizer.iterations.numpy()) == 1
    gap = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(xla.get_weights(), eager_graph.get_weights(), strict=True)
    )
    # XLA fuses the float16 ops differently: float16 rounding, not an error.
    assert gap <= 4 * FLOAT16_U * 0.5
