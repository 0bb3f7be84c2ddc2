"""What Keras 3's own `gradient_accumulation_steps` does, verified.

These pin the differences the README's comparison table states, against the
installed Keras. If an upgrade changes Keras's behaviour, they fail and the
table must be revisited.
"""

from __future__ import annotations

import keras
import numpy as np

from tests.test_model import (
    LOSS,
    assert_same_weights,
    compiled_twins,
    data,
    small_build,
)


def keras_accumulating_model(optimizer: keras.optimizers.Optimizer) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = small_build()()
    model.compile(optimizer=optimizer, loss=LOSS)
    return model


def big_batch_reference(optimizer: keras.optimizers.Optimizer) -> keras.Model:
    standard, _ = compiled_twins(lambda: optimizer, accumulation_steps=1)
    return standard


def max_difference(first: keras.Model, second: keras.Model) -> float:
    return max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(first.get_weights(), second.get_weights(), strict=True)
    )


def test_keras_divides_by_steps_so_a_ragged_window_is_biased_ours_is_exact():
    x, y, _ = data(10, seed=20)  # micro-batches of 4, 4, 2
    builtin = keras_accumulating_model(
        keras.optimizers.SGD(0.5, gradient_accumulation_steps=3)
    )
    builtin.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    reference = big_batch_reference(keras.optimizers.SGD(0.5))
    reference.train_on_batch(x, y)
    _, ours = compiled_twins(lambda: keras.optimizers.SGD(0.5), accumulation_steps=3)
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)

    assert int(builtin.optimizer.iterations) == 1
    assert max_difference(builtin, reference) > 1e-4
    assert_same_weights(reference, ours)


def test_keras_learning_rate_schedules_count_micro_batches():
    def schedule():
        return keras.optimizers.schedules.ExponentialDecay(
            0.5, decay_steps=1, decay_rate=0.1
        )

    builtin = keras_accumulating_model(
        keras.optimizers.SGD(schedule(), gradient_accumulation_steps=4)
    )
    x, y, _ = data(16, seed=21)
    builtin.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    # Two updates were applied, but the schedule was evaluated at step 7.
    assert int(builtin.optimizer.iterations) == 2
    assert float(builtin.optimizer.learning_rate) < 0.5 * 0.1**2


def test_keras_carries_a_partial_window_across_epochs_silently():
    builtin = keras_accumulating_model(
        keras.optimizers.SGD(0.5, gradient_accumulation_steps=4)
    )
    x, y, _ = data(12, seed=22)  # three micro-batches per epoch
    builtin.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    # An epoch of three micro-batches never reaches a window of four:
    # no update at all, and nothing tells the user.
    assert int(builtin.optimizer.iterations) == 0


def ema_values(model: keras.Model) -> list[np.ndarray]:
    return [
        np.array(variable)
        for variable in model.optimizer._model_variables_moving_average
    ]


def test_both_update_the_ema_once_per_applied_update():
    def optimizer(**kwargs):
        return keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.5, **kwargs)

    x, y, _ = data(16, seed=23)  # two windows of two micro-batches
    builtin = keras_accumulating_model(optimizer(gradient_accumulation_steps=2))
    reference, ours = compiled_twins(optimizer, accumulation_steps=2)
    for model in (builtin, ours):
        for start in range(0, 16, 4):
            model.train_on_batch(x[start : start + 4], y[start : start + 4])
    for start in (0, 8):
        reference.train_on_batch(x[start : start + 8], y[start : start + 8])

    def ema_gap(model):
        return max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(ema_values(model), ema_values(reference), strict=True)
        )

    # Equal-sized windows: Keras's EMA matches the big-batch reference too.
    assert ema_gap(ours) < 1e-6
    assert ema_gap(builtin) < 1e-6
