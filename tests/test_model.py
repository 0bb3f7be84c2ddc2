"""AccumulatingModel against real big-batch steps of a plain keras.Model.

Every exactness test trains a plain Keras twin on the concatenated
micro-batches with the same optimizer and compares weights: the reference is
Keras itself, never a re-implementation of the accumulation formula.
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from accumulate import AccumulatingModel, build_mlp, make_twins
from tests.oracle import max_difference, random_data

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
FEATURES, CLASSES = 5, 3

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(learning_rate=0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(learning_rate=0.01),
}


def small_build(regularized: bool = True):
    def build() -> keras.Model:
        inputs = keras.Input((FEATURES,))
        regularizer = keras.regularizers.L2(0.05) if regularized else None
        hidden = keras.layers.Dense(
            4, activation="tanh", kernel_regularizer=regularizer, name="hidden"
        )(inputs)
        outputs = keras.layers.Dense(CLASSES, name="logits")(hidden)
        return keras.Model(inputs, outputs)

    return build


def compiled_twins(
    optimizer="sgd", accumulation_steps=1, seed=0, compile_kwargs=None, **kwargs
):
    make_optimizer = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
    standard, accumulating = make_twins(
        seed, accumulation_steps, build=small_build(), **kwargs
    )
    for model in (standard, accumulating):
        model.compile(optimizer=make_optimizer(), loss=LOSS, **(compile_kwargs or {}))
    return standard, accumulating


def data(samples: int, seed: int = 0):
    return random_data(samples, FEATURES, CLASSES, seed)


def assert_same_weights(first: keras.Model, second: keras.Model, tolerance=2e-6):
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=tolerance)


def split(sizes):
    bounds = np.cumsum([0, *sizes])
    return list(itertools.pairwise(bounds))


# -- The exactness property ------------------------------------------------


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    data_seed=st.integers(0, 2**16),
    weighted=st.booleans(),
    optimizer=st.sampled_from(["sgd", "adam"]),
)
def test_one_window_equals_one_big_batch_step(sizes, data_seed, weighted, optimizer):
    standard, accumulating = compiled_twins(optimizer, accumulation_steps=len(sizes))
    initial = accumulating.get_weights()
    x, y, weights = data(sum(sizes), data_seed)
    sample_weight = weights if weighted else None

    for index, (start, stop) in enumerate(split(sizes)):
        accumulating.train_on_batch(
            x[start:stop],
            y[start:stop],
            sample_weight=None if sample_weight is None else sample_weight[start:stop],
        )
        window_complete = index == len(sizes) - 1
        # Nothing moves until the window is complete, then exactly one update.
        assert int(accumulating.optimizer.iterations) == int(window_complete)
        if not window_complete:
            for before, now in zip(initial, accumulating.get_weights(), strict=True):
                np.testing.assert_array_equal(before, now)
    standard.train_on_batch(x, y, sample_weight=sample_weight)

    assert int(standard.optimizer.iterations) == 1
    assert accumulating.steps_accumulated == 0
    assert accumulating.samples_accumulated == 0
    assert_same_weights(standard, accumulating)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
def test_fit_windows_with_ragged_batches_and_sample_weights(optimizer):
    # 22 samples in batches of 4: micro-batches 4,4,4,4,4,2. With N=3 the
    # epoch holds two windows of 12 and 10 samples, the second one ragged.
    standard, accumulating = compiled_twins(optimizer, accumulation_steps=3)
    x, y, weights = data(22, seed=3)
    accumulating.fit(
        x, y, sample_weight=weights, batch_size=4, epochs=2, shuffle=False, verbose=0
    )
    for _ in range(2):
        for start, stop in [(0, 12), (12, 22)]:
            standard.train_on_batch(
                x[start:stop], y[start:stop], sample_weight=weights[start:stop]
            )
    assert int(accumulating.optimizer.iterations) == 4
    assert_same_weights(standard, accumulating)


# -- "epoch" mode ----------------------------------------------------------


def test_epoch_mode_is_full_batch_descent_with_numpy_arrays():
    standard, accumulating = compiled_twins("sgd_momentum", accumulation_steps="epoch")
    x, y, _ = data(50, seed=1)
    history = accumulating.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    standard.fit(x, y, batch_size=50, epochs=3, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations) == 3
    assert len(history.history["loss"]) == 3
    assert_same_weights(standard, accumulating)


def test_epoch_mode_with_a_dataset_of_unknown_cardinality():
    standard, accumulating = compiled_twins("adam", accumulation_steps="epoch")
    x, y, _ = data(37, seed=2)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(8)
    )
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    accumulating.fit(dataset, epochs=2, verbose=0)
    standard.fit(x, y, batch_size=37, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations) == 2
    assert_same_weights(standard, accumulating)


def test_epoch_mode_applies_before_validation():
    _, accumulating = compiled_twins("sgd", accumulation_steps="epoch")
    x, y, _ = data(40, seed=4)
    history = accumulating.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, validation_data=(x, y)
    )
    # Validation ran on the updated weights: evaluating now gives the same.
    assert history.history["val_loss"][0] == pytest.approx(
        accumulating.evaluate(x, y, verbose=0), rel=1e-5
    )


def test_fit_reports_the_epoch_mean_of_micro_batch_losses_like_keras():
    _, accumulating = compiled_twins("sgd", accumulation_steps="epoch")
    x, y, _ = data(45, seed=5)
    # The weights do not move during an "epoch" window, so the loss fit shows
    # is the per-sample mean at the initial weights (regularisation included).
    expected = accumulating.evaluate(x, y, batch_size=45, verbose=0)
    history = accumulating.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)


# -- Partial windows ---------------------------------------------------------


def test_partial_window_is_flushed_at_epoch_end():
    standard, accumulating = compiled_twins("sgd_momentum", accumulation_steps=3)
    x, y, _ = data(10, seed=6)  # batches of 2: five micro-batches, windows 3 + 2
    accumulating.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    for _ in range(2):
        standard.train_on_batch(x[:6], y[:6])
        standard.train_on_batch(x[6:], y[6:])
    assert int(accumulating.optimizer.iterations) == 4
    assert accumulating.steps_accumulated == 0
    assert_same_weights(standard, accumulating)


def test_partial_window_carries_over_without_flush():
    standard, accumulating = compiled_twins(
        "sgd_momentum", accumulation_steps=3, flush_at_epoch_end=False
    )
    x, y, _ = data(10, seed=7)
    accumulating.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    # Ten micro-batches of 2 samples: windows [e1 b1-3], [e1 b4-5, e2 b1],
    # [e2 b2-4], and e2 b5 still waiting.
    epochs = np.concatenate([x, x]), np.concatenate([y, y])
    for start, stop in [(0, 6), (6, 12), (12, 18)]:
        standard.train_on_batch(epochs[0][start:stop], epochs[1][start:stop])
    assert int(accumulating.optimizer.iterations) == 3
    assert accumulating.steps_accumulated == 1
    assert accumulating.samples_accumulated == 2
    assert_same_weights(standard, accumulating)

    accumulating.apply_accumulated_gradients()
    standard.train_on_batch(epochs[0][18:], epochs[1][18:])
    assert int(accumulating.optimizer.iterations) == 4
    assert accumulating.samples_accumulated == 0
    assert_same_weights(standard, accumulating)


def test_reset_discards_the_window():
    _, accumulating = compiled_twins("sgd", accumulation_steps=5)
    x, y, _ = data(6, seed=8)
    initial = accumulating.get_weights()
    accumulating.train_on_batch(x, y)
    assert (accumulating.steps_accumulated, accumulating.samples_accumulated) == (1, 6)
    accumulating.reset_accumulated_gradients()
    accumulating.apply_accumulated_gradients()  # nothing left to apply
    assert accumulating.steps_accumulated == 0
    assert int(accumulating.optimizer.iterations) == 0
    for before, now in zip(initial, accumulating.get_weights(), strict=True):
        np.testing.assert_array_equal(before, now)


# -- Everything the optimizer does happens once per update -------------------


OPTIMIZER_FEATURES = {
    "clipnorm": lambda: keras.optimizers.SGD(0.5, clipnorm=0.05),
    "global_clipnorm": lambda: keras.optimizers.SGD(0.5, global_clipnorm=0.05),
    "weight_decay": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "ema": lambda: keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5),
    "schedule": lambda: keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    ),
}


@pytest.mark.parametrize("feature", sorted(OPTIMIZER_FEATURES))
def test_optimizer_features_count_updates_not_micro_batches(feature):
    standard, accumulating = compiled_twins(
        OPTIMIZER_FEATURES[feature], accumulation_steps=4
    )
    x, y, _ = data(24, seed=9)
    accumulating.fit(x, y, batch_size=3, epochs=2, shuffle=False, verbose=0)
    standard.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
    assert (
        int(accumulating.optimizer.iterations)
        == 4
        == int(standard.optimizer.iterations)
    )
    assert_same_weights(standard, accumulating)


def test_optimizer_with_keras_gradient_accumulation_is_refused():
    _, accumulating = make_twins(0, 4, build=small_build())
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        accumulating.compile(
            optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
            loss=LOSS,
        )


# -- Compiled execution --------------------------------------------------------


@pytest.mark.parametrize(
    ("jit_compile", "steps_per_execution"), [(True, 1), (False, 4), (True, 5)]
)
def test_jit_compile_and_steps_per_execution(jit_compile, steps_per_execution):
    settings = {"jit_compile": jit_compile, "steps_per_execution": steps_per_execution}
    standard, accumulating = compiled_twins(
        "sgd_momentum", accumulation_steps=3, compile_kwargs=settings
    )
    x, y, weights = data(26, seed=10)  # 7 micro-batches of 4: windows 3, 3, 1 (ragged)
    accumulating.fit(
        x, y, sample_weight=weights, batch_size=4, epochs=2, shuffle=False, verbose=0
    )
    for _ in range(2):
        for start, stop in [(0, 12), (12, 24), (24, 26)]:
            standard.train_on_batch(
                x[start:stop], y[start:stop], sample_weight=weights[start:stop]
            )
    assert int(accumulating.optimizer.iterations) == 6
    assert_same_weights(standard, accumulating)


@pytest.mark.several_steps_per_execution
def test_epoch_mode_with_jit_and_whole_epoch_per_execution():
    settings = {"jit_compile": True, "steps_per_execution": 100}
    standard, accumulating = compiled_twins(
        "sgd", accumulation_steps="epoch", compile_kwargs=settings
    )
    x, y, _ = data(30, seed=11)
    accumulating.fit(x, y, batch_size=7, epochs=2, shuffle=False, verbose=0)
    standard.fit(x, y, batch_size=30, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations) == 2
    assert_same_weights(standard, accumulating)


# -- Saving and restoring --------------------------------------------------------


def test_keras_file_round_trip_keeps_options_and_the_open_window(tmp_path):
    _, accumulating = compiled_twins("adam", accumulation_steps=4)
    x, y, _ = data(16, seed=12)
    accumulating.train_on_batch(x[:4], y[:4])
    accumulating.train_on_batch(x[4:9], y[4:9])
    path = tmp_path / "model.keras"
    accumulating.save(path)
    restored = keras.models.load_model(path)

    assert isinstance(restored, AccumulatingModel)
    assert restored.accumulation_steps == 4
    assert (restored.steps_accumulated, restored.samples_accumulated) == (2, 9)
    for model in (accumulating, restored):
        model.train_on_batch(x[9:12], y[9:12])
        model.train_on_batch(x[12:], y[12:])
    assert int(restored.optimizer.iterations) == 1
    assert max_difference(accumulating, restored) == 0.0


def test_weights_file_restores_the_window(tmp_path):
    _, accumulating = compiled_twins("sgd_momentum", accumulation_steps=3)
    _, other = compiled_twins("sgd_momentum", accumulation_steps=3, seed=99)
    x, y, _ = data(12, seed=13)
    accumulating.train_on_batch(x[:4], y[:4])
    path = tmp_path / "state.weights.h5"
    accumulating.save_weights(path)
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    assert (other.steps_accumulated, other.samples_accumulated) == (1, 4)
    for model in (accumulating, other):
        model.train_on_batch(x[4:8], y[4:8])
        model.train_on_batch(x[8:], y[8:])
    assert int(other.optimizer.iterations) == 1
    assert max_difference(accumulating, other) == 0.0


@pytest.mark.tensorflow_only
def test_tf_checkpoint_tracks_the_window(tmp_path):
    _, accumulating = compiled_twins("sgd", accumulation_steps=3)
    x, y, _ = data(5, seed=14)
    accumulating.train_on_batch(x, y)
    checkpoint = tf.train.Checkpoint(model=accumulating)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    accumulating.reset_accumulated_gradients()
    assert accumulating.samples_accumulated == 0
    checkpoint.read(path).assert_existing_objects_matched()
    assert accumulating.samples_accumulated == 5


def test_get_config_round_trip():
    model = AccumulatingModel(
        *_graph(), accumulation_steps="epoch", flush_at_epoch_end=True
    )
    config = model.get_config()
    assert config["accumulation_steps"] == "epoch"
    clone = AccumulatingModel.from_config(config)
    assert clone.accumulation_steps == "epoch"
    assert clone.flush_at_epoch_end is True


def _graph():
    inputs = keras.Input((FEATURES,))
    return inputs, keras.layers.Dense(CLASSES)(inputs)


# -- Twins -----------------------------------------------------------------------


def test_twins_are_identical_reproducible_and_interchangeable():
    standard, accumulating = make_twins(seed=42)
    again, _ = make_twins(seed=42)
    other_seed, _ = make_twins(seed=43)
    assert standard.count_params() == accumulating.count_params() == 111_146
    assert type(standard) is keras.Model or not isinstance(standard, AccumulatingModel)
    for a, b, c in zip(
        standard.get_weights(),
        accumulating.get_weights(),
        again.get_weights(),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert max_difference(standard, other_seed) > 0.0

    # Training state is not part of the weights: the twins stay interchangeable.
    accumulating.compile(optimizer="sgd", loss=LOSS)
    x = np.random.default_rng(0).uniform(size=(8, 28, 28)).astype("float32")
    accumulating.train_on_batch(x, np.arange(8))
    assert len(accumulating.weights) == len(standard.weights)
    standard.set_weights(accumulating.get_weights())


def test_build_mlp_is_the_papers_model():
    model = build_mlp()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [128, 64, 32, 10]
    assert [layer.activation.__name__ for layer in dense] == [
        "tanh",
        "tanh",
        "tanh",
        "linear",
    ]
    assert model.input_shape == (None, 28, 28)


def test_make_twins_rejects_a_model_without_inputs():
    class Unbuilt(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="inputs and outputs"):
        make_twins(0, build=Unbuilt)


# -- Invalid configuration ---------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "epochs", None, "3", [2]])
def test_invalid_accumulation_steps(value):
    with pytest.raises(ValueError, match="accumulation_steps") as error:
        AccumulatingModel(*_graph(), accumulation_steps=value)
    assert repr(value) in str(error.value)
    assert '"epoch"' in str(error.value)


def test_epoch_mode_needs_the_epoch_end_flush():
    with pytest.raises(ValueError, match="flush_at_epoch_end=False"):
        AccumulatingModel(
            *_graph(), accumulation_steps="epoch", flush_at_epoch_end=False
        )


def test_numpy_integers_are_accepted():
    model = AccumulatingModel(*_graph(), accumulation_steps=np.int64(8))
    assert model.accumulation_steps == 8


# -- Subclassing, BatchNormalization and Dropout --------------------------------


class SubclassedNet(AccumulatingModel):
    def __init__(self, **kwargs):
        super().__init__(accumulation_steps="epoch", **kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.head = keras.layers.Dense(CLASSES)

    def call(self, x):
        return self.head(self.hidden(x))


def test_subclassed_model_trains_once_per_epoch():
    model = SubclassedNet()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS, metrics=["accuracy"])
    x, y, _ = data(64, seed=15)
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0)
    assert int(model.optimizer.iterations) == 4
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_batch_normalization_and_dropout_still_train():
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(16)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    model = AccumulatingModel(
        inputs, keras.layers.Dense(CLASSES)(x), accumulation_steps=4
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=LOSS)
    keras.utils.set_random_seed(0)
    x_train, y_train, _ = data(256, seed=16)
    y_train = (x_train[:, 0] > 0).astype(int) + (x_train[:, 1] > 0).astype(int)
    history = model.fit(x_train, y_train, batch_size=16, epochs=8, verbose=0)
    assert int(model.optimizer.iterations) == 8 * math.ceil(256 / 16 / 4)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]


def test_subclass_of_the_functional_form_keeps_its_class():
    class Named(type(AccumulatingModel(*_graph()))):
        pass

    model = Named(*_graph(), accumulation_steps=2)
    assert type(model) is Named
    model.compile(optimizer="sgd", loss=LOSS)
    x, y, _ = data(16, seed=17)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 2


def test_subclass_given_inputs_and_outputs_is_refused():
    with pytest.raises(TypeError, match="subclasses define call"):
        SubclassedNet(*_graph())
