"""Conformance: state that must survive resume, saving and recompiling.

Part of the conformance suite (`tests/test_conformance.py` holds its models,
data and oracle). Every case runs on every backend unless marked; the oracle
is plain Keras or, where plain Keras has no such state, the same run without
the interruption. Cases:

* a window size set by a callback survives `BackupAndRestore`;
* a `.keras` round trip keeps the window in effect and the schedule's epoch;
* the noise scale's epoch sums survive a mid-epoch resume;
* after ``trainable`` changed and a recompile, the remedy the error names
  (`apply_accumulated_gradients`) applies the window to its variables;
* an empty micro-batch in mid-stream counts for nothing;
* a misspelt option raises, on every construction route;
* mixed precision (float16 and bfloat16) with schedules, "epoch" and
  carried windows.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from accumulate import AccumulatingModel
from tests.conftest import BACKEND
from tests.oracle import max_difference
from tests.test_conformance import (
    ATOL,
    LOSS,
    OPTIMIZERS,
    CrashAt,
    SimulatedCrashError,
    assert_conforms,
    build,
    data,
    micro_batches,
    train_windows,
    twins,
)

# -- A window size set by a callback --------------------------------------------


class SetStepsAtEpochEnd(keras.callbacks.Callback):
    """Calls ``set_accumulation_steps(steps)`` at the end of ``epoch``."""

    def __init__(self, epoch, steps):
        super().__init__()
        self.epoch, self.steps = epoch, steps

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.set_accumulation_steps(self.steps)


def test_a_window_size_set_by_a_callback_survives_backup_and_restore(tmp_path):
    """N=2, a callback sets 3 after epoch 0, a crash mid-epoch 1, a resume.

    The callback does not run again in the resumed `fit` (epoch 0 is over),
    so the 3 must come back with the backup, as a learning rate set by a
    callback does (it lives in an optimizer variable). Oracle: plain Keras
    with batches of 2 and then 3 micro-batches.
    """
    x, y, _ = data(27, seed=21)
    oracle, uninterrupted = twins(2, "adam")

    def callbacks(with_crash=False):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=2)
        crash = [CrashAt(1, 4)] if with_crash else []
        return [backup, SetStepsAtEpochEnd(0, 3), *crash]

    common = {"batch_size": 4, "epochs": 3, "shuffle": False, "verbose": 0}
    uninterrupted.fit(x, y, callbacks=[SetStepsAtEpochEnd(0, 3)], **common)
    oracle.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
    assert_conforms(oracle, uninterrupted, updates=4 + 3 + 3)

    crashed = twins(2, "adam")[1]
    with pytest.raises(SimulatedCrashError):
        crashed.fit(x, y, callbacks=callbacks(with_crash=True), **common)
    resumed = twins(2, "adam")[1]
    resumed.fit(x, y, callbacks=callbacks(), **common)
    assert resumed.accumulation_steps == 3
    assert_conforms(oracle, resumed, updates=10)


# -- A .keras round trip -------------------------------------------------------


def test_a_keras_file_keeps_the_window_in_effect_and_the_epoch(tmp_path):
    """Schedule {0: 2, 2: "epoch"}, 3 epochs: the loaded model is in "epoch"."""
    _, original = twins({0: 2, 2: "epoch"}, "adam")
    x, y, _ = data(16, seed=22)
    original.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    assert original.current_accumulation_steps == "epoch"
    path = tmp_path / "scheduled.keras"
    original.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.current_accumulation_steps == "epoch"
    for model in (original, loaded):
        model.train_on_batch(x[:4], y[:4])
        model.train_on_batch(x[4:8], y[4:8])
    assert int(loaded.optimizer.iterations) == int(original.optimizer.iterations)
    assert loaded.steps_accumulated == original.steps_accumulated == 2
    assert max_difference(original, loaded) == 0.0
    # And the next fit goes on from epoch 3 of the schedule: still "epoch".
    for model in (original, loaded):
        model.fit(x, y, batch_size=4, epochs=4, initial_epoch=3, verbose=0)
    assert max_difference(original, loaded) <= ATOL


def test_a_weights_file_carries_a_schedule_set_after_construction(tmp_path):
    """`set_accumulation_steps` then `save_weights`: a fresh model loads it."""
    _, first = twins(2, "sgd")
    x, y, _ = data(16, seed=23)
    first.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    first.set_accumulation_steps({0: 2, 1: 4})
    path = tmp_path / "scheduled.weights.h5"
    first.save_weights(path)
    second = twins(2, "sgd")[1]
    second.optimizer.build(second.trainable_variables)
    second.load_weights(path)
    assert second.accumulation_steps == {0: 2, 1: 4}
    assert second.current_accumulation_steps == 2  # epoch 0 is where it was


def test_a_saved_schedule_this_model_cannot_run_is_refused(tmp_path):
    """ "epoch" needs the flush: loading it into a flush=False model raises."""
    _, first = twins("epoch", "sgd")
    x, y, _ = data(8, seed=23)
    first.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "epoch.weights.h5"
    first.save_weights(path)
    carrying = twins(2, "sgd", flush=False)[1]
    carrying.optimizer.build(carrying.trainable_variables)
    with pytest.raises(ValueError, match="flush_at_epoch_end=False"):
        carrying.load_weights(path)


# -- The noise scale's epoch sums ----------------------------------------------


def _measuring_twin():
    template = build(hidden=True)()
    keras.utils.set_random_seed(3)
    model = AccumulatingModel(
        template.inputs, template.outputs, accumulation_steps=2,
        measure_noise_scale=True,
    )  # fmt: skip
    model.compile(optimizer=OPTIMIZERS["sgd"](), loss=LOSS)
    return model


def test_noise_scale_logs_of_a_resumed_epoch_equal_the_uninterrupted_ones(tmp_path):
    """BackupAndRestore(save_freq=5), a crash mid-epoch 1, then resume."""
    x, y, _ = data(40, seed=24)
    common = {"batch_size": 4, "epochs": 3, "shuffle": False, "verbose": 0}
    initial = _measuring_twin().get_weights()

    def fresh():
        model = _measuring_twin()
        model.set_weights(initial)
        return model

    uninterrupted = fresh()
    expected = uninterrupted.fit(x, y, **common).history

    def backup():
        return keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=5)

    with pytest.raises(SimulatedCrashError):
        fresh().fit(x, y, callbacks=[backup(), CrashAt(1, 7)], **common)
    resumed = fresh()
    history = resumed.fit(x, y, callbacks=[backup()], **common).history
    assert max_difference(resumed, uninterrupted) <= ATOL
    for key in ("gradient_sq_norm", "gradient_variance", "gradient_noise_scale"):
        np.testing.assert_allclose(history[key], expected[key][1:], rtol=1e-4)


# -- The remedy after trainable changed ----------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_after_freezing_and_recompiling_the_named_remedy_applies_the_window(
    optimizer,
):
    """An open window, a layer frozen, a recompile: fit refuses; the remedy works.

    The window is applied with the new optimizer to the variables it was
    accumulated for (both layers): the oracle is a plain model compiled with
    the same fresh optimizer taking one step on the window's samples.
    """
    plain, ours = twins(3, optimizer, flush=False, hidden=True)
    x, y, _ = data(24, seed=25)
    ours.fit(x[:8], y[:8], batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert ours.steps_accumulated == 2
    ours.get_layer("hidden").trainable = False
    ours.compile(optimizer=OPTIMIZERS[optimizer](), loss=LOSS)
    with pytest.raises(ValueError, match="trainable variables changed") as error:
        ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert "apply_accumulated_gradients()" in str(error.value)

    ours.apply_accumulated_gradients()
    plain.compile(optimizer=OPTIMIZERS[optimizer](), loss=LOSS)
    plain.train_on_batch(x[:8], y[:8])
    assert_conforms(plain, ours, updates=1)
    assert ours.steps_accumulated == 0

    # Training goes on with the hidden layer frozen. On JAX, Keras's
    # stateless optimizer needs a compile after `trainable` changed (a plain
    # model too), and then both start from a fresh optimizer.
    if BACKEND == "jax":
        ours.compile(optimizer=OPTIMIZERS[optimizer](), loss=LOSS)
    hidden_before = [w.copy() for w in ours.get_layer("hidden").get_weights()]
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for before, now in zip(
        hidden_before, ours.get_layer("hidden").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(before, now)
    assert all(np.isfinite(w).all() for w in ours.get_weights())


# -- An empty micro-batch in mid-stream ----------------------------------------


def _with_an_empty_batch(x, y, batch, empty_after):
    """The micro-batches of ``batch``, with a 0-sample one after ``empty_after``."""
    batches = micro_batches(x, y, batch)
    empty = (x[:0], y[:0])
    return [*batches[:empty_after], empty, *batches[empty_after:]]


@pytest.mark.parametrize("steps", [1, 2, "epoch"], ids=["N1", "N2", "epoch"])
def test_an_empty_micro_batch_in_mid_stream_counts_for_nothing(steps):
    """A generator yields a 0-sample batch between real ones (Adam).

    It adds nothing, is not one of the window's N, and the oracle is plain
    Keras on the same stream without it.
    """
    oracle, ours = twins(steps, "adam")
    x, y, _ = data(20, seed=26)
    stream = _with_an_empty_batch(x, y, 4, empty_after=1)
    ours.fit((batch for batch in stream), epochs=1, verbose=0)
    if steps == "epoch":
        oracle.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0)
    else:
        train_windows(oracle, micro_batches(x, y, 4), steps)
    expected = {1: 5, 2: 3, "epoch": 1}[steps]
    assert_conforms(oracle, ours, updates=expected)


# -- A misspelt option ---------------------------------------------------------


class _Subclassed(AccumulatingModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs)


@pytest.mark.parametrize(
    ("typo", "closest"),
    [
        ("accumulaton_steps", "accumulation_steps"),
        ("accumulation_step", "accumulation_steps"),
        ("flush_at_epoch", "flush_at_epoch_end"),
        ("measure_noise", "measure_noise_scale"),
    ],
)
@pytest.mark.parametrize("route", ["functional", "functional_keywords", "subclass"])
def test_a_misspelt_option_raises_and_names_the_closest(route, typo, closest):
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(inputs)
    with pytest.raises(ValueError) as error:
        if route == "functional":
            AccumulatingModel(inputs, outputs, **{typo: 8})
        elif route == "functional_keywords":
            AccumulatingModel(inputs=inputs, outputs=outputs, **{typo: 8})
        else:
            _Subclassed(**{typo: 8})
    message = str(error.value)
    assert repr(typo) in message and repr(closest) in message


def test_an_unknown_functional_keyword_raises_instead_of_being_dropped():
    """Keras's functional constructor drops unknown keywords; ours does not."""
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(inputs)
    with pytest.raises(ValueError, match="'colour'"):
        AccumulatingModel(inputs, outputs, accumulation_steps=2, colour="red")
    # What Keras does take still works.
    model = AccumulatingModel(
        inputs, outputs, accumulation_steps=2, name="fine", trainable=True
    )
    assert (model.name, model.accumulation_steps) == ("fine", 2)


# -- Mixed precision -----------------------------------------------------------


@pytest.fixture
def policy():
    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


def _mixed_twins(steps, flush, optimizer):
    """(plain, ours) under the current policy, logits in float32."""

    def layers():
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(16, activation="tanh")(inputs)
        return inputs, keras.layers.Dense(3, dtype="float32")(hidden)

    keras.utils.set_random_seed(9)
    plain = keras.Model(*layers())
    ours = AccumulatingModel(
        *layers(), accumulation_steps=steps, flush_at_epoch_end=flush
    )
    ours.set_weights(plain.get_weights())
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for model in (plain, ours):
        model.compile(optimizer=OPTIMIZERS[optimizer](), loss=loss)
    return plain, ours


# The same micro-batches grouped otherwise round differently in float16
# (bfloat16): activations and their gradients carry a relative error of a
# unit roundoff u each. Allowed: 4u of the largest update (measured on the
# three backends: at most 3u, JAX with bfloat16 and Adam).
_UNIT_ROUNDOFF = {"mixed_float16": 2.0**-11, "mixed_bfloat16": 2.0**-8}


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    ("steps", "flush"),
    [({0: 3, 1: "epoch"}, True), (3, False), ("epoch", True)],
    ids=["schedule", "carried", "epoch"],
)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_mixed_precision_equals_plain_keras_on_the_windows(
    policy, name, steps, flush, optimizer
):
    """Ragged micro-batches, sample weights, two epochs, plain-Keras oracle."""
    policy(name)
    plain, ours = _mixed_twins(steps, flush, optimizer)
    initial = plain.get_weights()
    x, y, weights = data(27, seed=27)
    ours.fit(
        x, y, sample_weight=weights, batch_size=4, epochs=2, shuffle=False, verbose=0
    )
    batches = [
        (x[i : i + 4], y[i : i + 4], weights[i : i + 4]) for i in range(0, 27, 4)
    ]
    if steps == "epoch":
        windows = [batches, batches]
    elif flush:  # schedule: 3 in epoch 0 (flushed), "epoch" in epoch 1
        windows = [batches[0:3], batches[3:6], batches[6:7], batches]
    else:  # 3 carried across the boundary: 14 micro-batches, 2 left open
        windows = [(batches * 2)[i : i + 3] for i in range(0, 12, 3)]
    for window in windows:
        plain.train_on_batch(
            *(np.concatenate(part) for part in zip(*window, strict=True))
        )
    assert int(ours.optimizer.iterations) == len(windows)
    assert all(np.isfinite(w).all() for w in ours.get_weights())
    update = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(plain.get_weights(), initial, strict=True)
    )
    gap = max_difference(plain, ours)
    print(f"{name} {steps} {optimizer}: gap {gap:.3g}, update {update:.3g}")
    assert gap <= 4 * _UNIT_ROUNDOFF[name] * update
    if not flush:
        assert ours.steps_accumulated == 2
