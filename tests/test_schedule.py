"""Accumulation schedules against real big-batch Keras steps.

The oracle is a plain `keras.Model` taking one `train_on_batch` per window on
the window's concatenated samples; the windows follow from the schedule and
from `fit`'s batches (shuffle off), so a change that leaked into the middle of
a window, or an epoch that used the wrong size, moves the weights apart.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from accumulate import AccumulatingModel
from accumulate.schedule import AccumulationSchedule

BATCH, BATCHES = 4, 10  # 40 samples, 10 micro-batches per epoch
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(BATCH * BATCHES, 6)).astype("float32")
    return x, rng.integers(0, 3, size=len(x))


def _twins(accumulation_steps, optimizer="adam", **options):
    keras.utils.set_random_seed(9)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    standard = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    accumulating = AccumulatingModel(
        inputs,
        keras.layers.Dense(3)(hidden),
        accumulation_steps=accumulation_steps,
        **options,
    )
    accumulating.set_weights(standard.get_weights())
    for model in (standard, accumulating):
        model.compile(optimizer=keras.optimizers.get(optimizer), loss=LOSS)
    return standard, accumulating


def _big_steps(model, x, y, sizes_per_epoch):
    """One real step per window; windows of ``size`` micro-batches, flushed."""
    for size in sizes_per_epoch:
        samples = len(x) if size == "epoch" else size * BATCH
        for start in range(0, len(x), samples):
            model.train_on_batch(x[start : start + samples], y[start : start + samples])


def _assert_same(standard, accumulating):
    assert int(standard.optimizer.iterations) == int(accumulating.optimizer.iterations)
    for a, b in zip(standard.get_weights(), accumulating.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_a_schedule_changes_the_window_at_epoch_boundaries():
    x, y = _data()
    standard, accumulating = _twins({1: 3, 2: "epoch", 3: 4})
    accumulating.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0)
    # Epoch 0 uses 1 (before the first key); 3 leaves a flushed window of 1.
    _big_steps(standard, x, y, [1, 3, "epoch", 4])
    assert int(standard.optimizer.iterations) == 10 + 4 + 1 + 3
    _assert_same(standard, accumulating)


class _SetMidEpoch(keras.callbacks.Callback):
    """Asks for a new window size after the first batch end of ``epoch``.

    With 10 micro-batches an epoch and windows of 4 that is mid-window,
    whatever ``steps_per_execution`` (keras 3.10 and 3.11+ number batch ends
    differently, so the batch index is not used).
    """

    def __init__(self, epoch, value):
        super().__init__()
        self.when, self.value = epoch, value
        self.epoch = 0
        self.asked = False
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.seen.append(self.model.current_accumulation_steps)

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.when and not self.asked:
            self.asked = True
            assert self.model.steps_accumulated > 0  # a window is open
            self.model.set_accumulation_steps(self.value)
            # Still the old size until the epoch ends.
            assert self.model.current_accumulation_steps != self.value


def test_a_window_carried_into_n1_is_completed_not_skipped():
    """N=4 carried (no flush) into N=1: the carried 2 micro-batches and the
    next one are one update; after it, every micro-batch is its own update."""
    x, y = _data()
    standard, accumulating = _twins({0: 4, 1: 1}, flush_at_epoch_end=False)
    accumulating.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    window = 4 * BATCH
    standard.train_on_batch(x[:window], y[:window])
    standard.train_on_batch(x[window : 2 * window], y[window : 2 * window])
    carried = np.concatenate([x[2 * window :], x[:BATCH]])
    standard.train_on_batch(carried, np.concatenate([y[2 * window :], y[:BATCH]]))
    for start in range(BATCH, len(x), BATCH):
        standard.train_on_batch(x[start : start + BATCH], y[start : start + BATCH])
    assert int(standard.optimizer.iterations) == 2 + 1 + (BATCHES - 1)
    _assert_same(standard, accumulating)
    assert accumulating.steps_accumulated == 0


@pytest.mark.parametrize("steps_per_execution", [1, 5])
def test_set_accumulation_steps_waits_for_the_next_epoch(steps_per_execution):
    x, y = _data()
    standard, accumulating = _twins(4)
    accumulating.compile(
        optimizer="adam", loss=LOSS, steps_per_execution=steps_per_execution
    )
    callback = _SetMidEpoch(epoch=1, value=3)
    accumulating.fit(
        x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[callback]
    )
    assert callback.seen == [4, 4, 3]
    _big_steps(standard, x, y, [4, 4, 3])
    _assert_same(standard, accumulating)


def test_set_accumulation_steps_outside_fit_is_immediate():
    x, y = _data()
    standard, accumulating = _twins(1, optimizer="sgd")
    accumulating.set_accumulation_steps(5)
    assert accumulating.current_accumulation_steps == 5
    for start in range(0, 5 * BATCH, BATCH):
        accumulating.train_on_batch(x[start : start + BATCH], y[start : start + BATCH])
    standard.train_on_batch(x[: 5 * BATCH], y[: 5 * BATCH])
    _assert_same(standard, accumulating)


def test_the_schedule_survives_a_keras_file(tmp_path):
    _, accumulating = _twins({0: 2, 3: "epoch"})
    accumulating.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.accumulation_steps == {0: 2, 3: "epoch"}
    clone = keras.models.clone_model(accumulating)
    assert clone.accumulation_steps == {0: 2, 3: "epoch"}


@pytest.mark.parametrize(
    "value, message",
    [
        ({}, "at least one entry"),
        ({-1: 2}, "non-negative integers"),
        ({"first": 2}, "non-negative integers"),
        ({0: 0}, "positive integer"),
        ({0: "epochs"}, "positive integer"),
    ],
)
def test_invalid_schedules_name_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        AccumulationSchedule(value)


def test_epoch_in_a_schedule_needs_the_flush():
    inputs = keras.Input((2,))
    with pytest.raises(ValueError, match="flush_at_epoch_end=True"):
        AccumulatingModel(
            inputs,
            keras.layers.Dense(1)(inputs),
            accumulation_steps={0: 2, 4: "epoch"},
            flush_at_epoch_end=False,
        )
