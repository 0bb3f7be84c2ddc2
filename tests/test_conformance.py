"""Conformance suite: `AccumulatingModel` against plain Keras, everywhere.

Every case is differential. The ORACLE is a plain `keras.Model` with the same
initial weights and the same optimizer configuration that takes ONE real
Keras step per window on that window's concatenated samples: plain `fit` with
``batch_size = N * b`` and ``shuffle=False`` (whose batches are exactly the
windows), or explicit `train_on_batch` per window. The accumulation formula is
never re-implemented here. Weights are compared at float32 tolerance
(``rtol=1e-5, atol=2e-6``) and ``optimizer.iterations`` exactly.

Groups:

* input paths x accumulation steps x ``steps_per_execution`` x ``jit_compile``
  (an explicit list that runs every path with N=1, a non-dividing N and
  "epoch" over two epochs, plus a hypothesis search of the cross product);
* life cycle: repeated `fit`, evaluate/predict in between, `train_on_batch`
  mixed with `fit`, recompiling and toggling ``trainable`` mid-window,
  saving and loading mid-window, `clone_model`, SavedModel export;
* callbacks: `ModelCheckpoint`, `BackupAndRestore` crash and resume,
  `EarlyStopping`, `ReduceLROnPlateau`, `TerminateOnNaN`;
* empty micro-batches (end-of-data steps, all-padding batches);
* sparse (``IndexedSlices``) gradients of an `Embedding`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from accumulate import AccumulatingModel, make_twins
from tests.conftest import BACKEND, STEPS_PER_EXECUTION
from tests.oracle import max_difference, random_data

FEATURES, CLASSES = 4, 3
LOSS = "sparse_categorical_crossentropy"
RTOL, ATOL = 1e-5, 2e-6
EVERYTHING = 10**6  # a batch size larger than any epoch here: one batch per epoch

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.5),
    "plain_sgd": lambda: keras.optimizers.SGD(learning_rate=0.2),
    "adam": lambda: keras.optimizers.Adam(learning_rate=0.05),
}


# -- Models, data and comparisons ----------------------------------------------


def build(hidden: bool = False):
    """The tiny model: Dense 4 -> 3 softmax (optionally a tanh layer first)."""

    def make() -> keras.Model:
        inputs = keras.Input((FEATURES,))
        x = inputs
        if hidden:
            x = keras.layers.Dense(5, activation="tanh", name="hidden")(x)
        outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(x)
        return keras.Model(inputs, outputs)

    return make


def twins(
    steps=1,
    optimizer="sgd",
    flush=True,
    seed=0,
    hidden=False,
    compile_kwargs=None,
    plain_compile_kwargs=None,
):
    """(plain oracle, ours), same initial weights, same optimizer config."""
    plain, ours = make_twins(seed, steps, build=build(hidden), flush_at_epoch_end=flush)
    plain.compile(
        optimizer=OPTIMIZERS[optimizer](), loss=LOSS, **(plain_compile_kwargs or {})
    )
    ours.compile(optimizer=OPTIMIZERS[optimizer](), loss=LOSS, **(compile_kwargs or {}))
    return plain, ours


def data(samples: int, seed: int = 0):
    return random_data(samples, FEATURES, CLASSES, seed)


def assert_conforms(oracle: keras.Model, ours: keras.Model, updates=None) -> None:
    """Same weights (float32 tolerance), finite, and the same update count."""
    for a, b in zip(oracle.get_weights(), ours.get_weights(), strict=True):
        assert np.all(np.isfinite(b)), "AccumulatingModel's weights are not finite"
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    assert int(ours.optimizer.iterations) == int(oracle.optimizer.iterations)
    if updates is not None:
        assert int(ours.optimizer.iterations) == updates


def micro_batches(x, y, batch):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def train_windows(oracle: keras.Model, batches, steps: int) -> None:
    """One real `train_on_batch` per window of ``steps`` consecutive batches."""
    for start in range(0, len(batches), steps):
        window = batches[start : start + steps]
        oracle.train_on_batch(
            np.concatenate([x for x, _ in window]),
            np.concatenate([y for _, y in window]),
        )


def window_size(steps, batch):
    return EVERYTHING if steps == "epoch" else steps * batch


# -- Input paths ---------------------------------------------------------------


class ArrayBatches(keras.utils.PyDataset):
    """A PyDataset of fixed batches (ragged last), in order."""

    def __init__(self, x, y, batch, workers):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return math.ceil(len(self.x) / self.batch)

    def __getitem__(self, index):
        window = slice(index * self.batch, (index + 1) * self.batch)
        return self.x[window], self.y[window]


def _signature():
    return (
        tf.TensorSpec((None, FEATURES), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )


def _cycling_generator(x, y, batch):
    # A Python generator has no length: it cycles forever and steps_per_epoch
    # tells Keras where an epoch ends.
    while True:
        yield from micro_batches(x, y, batch)


def fit_path(path, model, x, y, weights, batch, epochs, **kwargs):
    """Trains ``model`` for ``epochs`` through input path ``path``.

    Every path yields the same micro-batches in the same order (the samples
    in order, ``batch`` at a time, the last one ragged), so the plain oracle
    fitted on numpy arrays with ``batch_size = N * batch`` sees the windows.
    Returns the History.
    """
    batches = math.ceil(len(x) / batch)
    # shuffle=False everywhere but the "shuffle" path: fit's default would
    # reorder a PyDataset's batches.
    common = {"epochs": epochs, "verbose": 0, "shuffle": False, **kwargs}
    slices = tf.data.Dataset.from_tensor_slices((x, y))
    if path == "numpy":
        return model.fit(x, y, batch_size=batch, **common)
    if path == "tf_data":
        dataset = slices.batch(batch)
        assert int(dataset.cardinality()) == batches
        return model.fit(dataset, **common)
    if path == "tf_data_filter":
        dataset = slices.filter(lambda *_: True).batch(batch)
        assert int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY
        return model.fit(dataset, **common)
    if path == "tf_data_from_generator":
        dataset = tf.data.Dataset.from_generator(
            lambda: iter(micro_batches(x, y, batch)), output_signature=_signature()
        )
        assert int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY
        return model.fit(dataset, **common)
    if path == "python_generator":
        return model.fit(
            _cycling_generator(x, y, batch), steps_per_epoch=batches, **common
        )
    if path == "py_dataset_workers_0":
        return model.fit(ArrayBatches(x, y, batch, workers=0), **common)
    if path == "py_dataset_workers_2":
        return model.fit(ArrayBatches(x, y, batch, workers=2), **common)
    if path == "repeat":
        return model.fit(
            slices.batch(batch).repeat(), steps_per_epoch=batches, **common
        )
    if path == "validation_split":
        return model.fit(x, y, batch_size=batch, validation_split=0.25, **common)
    if path == "class_weight":
        return model.fit(
            x,
            y,
            batch_size=batch,
            class_weight={0: 1.0, 1: 2.5, 2: 0.4},
            **common,
        )
    if path == "sample_weight":
        return model.fit(x, y, sample_weight=weights, batch_size=batch, **common)
    if path == "shuffle":
        # Checked by test_shuffled_permutation_does_not_depend_on_batch_size:
        # with the same seed before fit, Keras's permutation of the samples is
        # the same for batch sizes b and N*b, so the oracle shuffles too.
        keras.utils.set_random_seed(1234)
        return model.fit(x, y, batch_size=batch, **{**common, "shuffle": True})
    raise AssertionError(path)


def fit_oracle(path, oracle, x, y, weights, window, epochs):
    """The oracle: plain `fit` whose batches are the windows (``window`` samples)."""
    common = {"batch_size": window, "epochs": epochs, "verbose": 0}
    if path == "validation_split":
        return oracle.fit(x, y, shuffle=False, validation_split=0.25, **common)
    if path == "class_weight":
        return oracle.fit(
            x, y, shuffle=False, class_weight={0: 1.0, 1: 2.5, 2: 0.4}, **common
        )
    if path == "sample_weight":
        return oracle.fit(x, y, sample_weight=weights, shuffle=False, **common)
    if path == "shuffle":
        keras.utils.set_random_seed(1234)
        return oracle.fit(x, y, shuffle=True, **common)
    return oracle.fit(x, y, shuffle=False, **common)


# Plain Keras `fit` through a PyDataset with worker threads gives other
# weights than through numpy arrays on JAX and PyTorch (measured: 0.028 after
# two epochs, same batches, shuffle=False), so there is no plain oracle for
# that path off TensorFlow.
_NO_ORACLE_OFF_TENSORFLOW = ("py_dataset_workers_2",)

PATHS = (
    "numpy",
    "tf_data",
    "tf_data_filter",
    "tf_data_from_generator",
    "python_generator",
    "py_dataset_workers_0",
    "py_dataset_workers_2",
    "repeat",
    "validation_split",
    "class_weight",
    "sample_weight",
    "shuffle",
)
PATHS = tuple(
    path
    for path in PATHS
    if BACKEND == "tensorflow" or path not in _NO_ORACLE_OFF_TENSORFLOW
)


def expected_updates(path, samples, batch, steps, epochs):
    if path == "validation_split":
        samples = int(samples * 0.75)  # Keras trains on the first 75%, rounded down
    batches = math.ceil(samples / batch)
    per_epoch = 1 if steps == "epoch" else math.ceil(batches / steps)
    return per_epoch * epochs


def check_path(
    path, steps, samples, batch, epochs=2, spe=1, jit=False, optimizer="sgd", seed=0
):
    compile_kwargs = {"steps_per_execution": spe, "jit_compile": jit}
    oracle, ours = twins(steps, optimizer, seed=seed, compile_kwargs=compile_kwargs)
    x, y, weights = data(samples, seed)
    history = fit_path(path, ours, x, y, weights, batch, epochs)
    oracle_history = fit_oracle(
        path, oracle, x, y, weights, window_size(steps, batch), epochs
    )
    assert_conforms(oracle, ours, expected_updates(path, samples, batch, steps, epochs))
    assert ours.steps_accumulated == 0  # every window was applied (flush)
    if path == "validation_split":
        # Validation ran after the epoch's last (flushed) window.
        np.testing.assert_allclose(
            history.history["val_loss"], oracle_history.history["val_loss"], rtol=1e-5
        )


# 22 samples in batches of 4: six micro-batches per epoch, the last one of 2.
# N=4 does not divide 6 (windows of 16 and 6 samples); N=3 does.
@pytest.mark.parametrize("steps", [1, 4, "epoch"], ids=["N1", "N4", "epoch"])
@pytest.mark.parametrize("path", PATHS)
def test_every_input_path_over_two_epochs(path, steps):
    """Every input path, N=1 / non-dividing N / "epoch", across an epoch boundary."""
    check_path(path, steps, samples=22, batch=4)


@pytest.mark.parametrize(
    ("path", "steps", "spe", "jit"),
    [
        ("numpy", 3, 1, True),
        ("numpy", 4, 3, False),
        ("tf_data_filter", 4, 3, True),
        ("tf_data_filter", "epoch", 4, False),
        ("python_generator", "epoch", 2, True),
        ("py_dataset_workers_2", 3, 2, False),
    ],
)
def test_steps_per_execution_and_jit_compile(path, steps, spe, jit):
    """Compiled execution settings of ours do not change the updates."""
    if path not in PATHS:
        pytest.skip(f"no plain-Keras oracle for {path} on {BACKEND}")
    check_path(path, steps, samples=22, batch=4, spe=spe, jit=jit)


def _dividing(batches: int) -> int:
    return next(k for k in range(2, batches + 1) if batches % k == 0)


def _non_dividing(batches: int) -> int:
    return next(k for k in range(2, batches + 2) if batches % k)


@given(
    path=st.sampled_from(PATHS),
    steps_kind=st.sampled_from(["one", "dividing", "non_dividing", "epoch"]),
    spe=st.sampled_from(STEPS_PER_EXECUTION),
    jit=st.booleans(),
    batches=st.integers(2, 6),
    batch=st.integers(2, 5),
    last=st.integers(1, 5),
    optimizer=st.sampled_from(["sgd", "adam"]),
)
def test_cross_product_sample(
    path, steps_kind, spe, jit, batches, batch, last, optimizer
):
    """A bounded hypothesis walk over paths x N x steps_per_execution x jit x sizes."""
    last = min(last, batch)  # the ragged last micro-batch
    samples = (batches - 1) * batch + last
    if path == "validation_split":
        batches = math.ceil(int(samples * 0.75) / batch)
    steps = {
        "one": 1,
        "dividing": _dividing(batches) if batches > 1 else 1,
        "non_dividing": _non_dividing(batches),
        "epoch": "epoch",
    }[steps_kind]
    check_path(
        path, steps, samples, batch, spe=spe, jit=jit, optimizer=optimizer, seed=batch
    )


class OrderRecorder(keras.Model):
    """Records the samples its (eager) train steps see, in order."""

    seen: list

    def train_step(self, data):
        self.seen.extend(np.asarray(data[0]).ravel().tolist())
        return {"samples": tf.constant(float(len(self.seen)))}


@pytest.mark.tensorflow_only  # OrderRecorder's train_step has TF's signature
def test_shuffled_permutation_does_not_depend_on_batch_size():
    """Why the "shuffle" path may use a shuffled plain fit as its oracle.

    A model that records the order in which it sees samples, fitted with
    ``shuffle=True`` after the same `set_random_seed`, sees the same
    permutation with batch sizes 4 and 12 (so "epoch" mode is not needed).
    """
    x = np.arange(22, dtype="float32").reshape(-1, 1)
    orders = []
    for batch in (4, 12):
        inputs = keras.Input((1,))
        model = OrderRecorder(inputs, keras.layers.Dense(1)(inputs))
        model.seen = []
        model.compile(loss="mse", run_eagerly=True)
        keras.utils.set_random_seed(1234)
        model.fit(x, x, batch_size=batch, epochs=2, shuffle=True, verbose=0)
        orders.append(model.seen)
    assert sorted(orders[0][:22]) == list(range(22))
    assert orders[0] == orders[1]
    assert orders[0][:22] != list(range(22))  # it did shuffle


# -- Life cycle ----------------------------------------------------------------


def test_fit_then_fit_flushes_each_fit_like_one_fit_per_epoch():
    """Two `fit` calls of one epoch each equal two epochs (each epoch flushed)."""
    oracle, ours = twins(4, "adam")
    x, y, _ = data(22, seed=1)
    for _ in range(2):
        ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_conforms(oracle, ours, updates=4)


def test_carried_window_survives_fit_evaluate_predict_fit():
    """flush_at_epoch_end=False: a window open across fit, evaluate, predict, fit."""
    oracle, ours = twins(4, "sgd", flush=False)
    x, y, _ = data(22, seed=2)
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert ours.steps_accumulated == 2  # 6 micro-batches: one window, 2 pending
    evaluated = ours.evaluate(x, y, verbose=0)
    predicted = ours.predict(x, verbose=0)
    assert ours.steps_accumulated == 2  # inference neither applies nor drops it
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    ours.apply_accumulated_gradients()  # the last 0 or more pending micro-batches

    stream = micro_batches(x, y, 4) * 2  # 12 micro-batches: windows 4, 4, 4
    train_windows(oracle, stream[:4], 4)
    # Inference in between saw the weights after the first window.
    assert evaluated == pytest.approx(oracle.evaluate(x, y, verbose=0), rel=1e-5)
    np.testing.assert_allclose(predicted, oracle.predict(x, verbose=0), atol=1e-6)
    train_windows(oracle, stream[4:], 4)
    assert_conforms(oracle, ours, updates=3)


def test_train_on_batch_mixed_with_fit_carries_the_window():
    """train_on_batch micro-batches open a window that `fit` continues."""
    oracle, ours = twins(3, "adam", flush=False)
    x, y, _ = data(30, seed=3)
    ours.train_on_batch(x[:4], y[:4])
    ours.train_on_batch(x[4:8], y[4:8])
    ours.fit(x[8:], y[8:], batch_size=4, epochs=2, shuffle=False, verbose=0)
    ours.train_on_batch(x[:5], y[:5])
    stream = [
        (x[:4], y[:4]),
        (x[4:8], y[4:8]),
        *micro_batches(x[8:], y[8:], 4) * 2,
        (x[:5], y[:5]),
    ]  # 15 micro-batches: five complete windows of 3
    train_windows(oracle, stream, 3)
    assert ours.steps_accumulated == 0
    assert_conforms(oracle, ours, updates=5)


def _sgd_window_then_compile_adam(flush=True):
    """Ours opens a window under SGD, then is recompiled with Adam.

    A first window is applied by hand under SGD, so that the apply function
    has been traced with the old optimizer before the recompile (the pre-fix
    code kept using that traced function).
    """
    _, ours = twins(4, "plain_sgd", flush=flush)
    x, y, _ = data(20, seed=4)
    ours.train_on_batch(x[16:], y[16:])
    ours.apply_accumulated_gradients()
    assert int(ours.optimizer.iterations) == 1
    ours.train_on_batch(x[:4], y[:4])
    ours.train_on_batch(x[4:8], y[4:8])
    ours.compile(optimizer=OPTIMIZERS["adam"](), loss=LOSS)
    # The oracle: a plain model compiled with the NEW optimizer, with ours's
    # weights (the pending window is not applied yet).
    oracle = build()()
    oracle.set_weights(ours.get_weights())
    oracle.compile(optimizer=OPTIMIZERS["adam"](), loss=LOSS)
    return oracle, ours, x[:16], y[:16]


def test_recompile_mid_window_the_epoch_end_flush_uses_the_new_optimizer():
    """Defect 3: the pending window is applied by the new optimizer at epoch end."""
    oracle, ours, x, y = _sgd_window_then_compile_adam()
    # One more micro-batch, then the epoch ends: the window of 3 is flushed.
    ours.fit(x[8:12], y[8:12], batch_size=4, epochs=1, shuffle=False, verbose=0)
    oracle.train_on_batch(x[:12], y[:12])
    assert_conforms(oracle, ours, updates=1)


def test_recompile_mid_window_completing_the_window_uses_the_new_optimizer():
    oracle, ours, x, y = _sgd_window_then_compile_adam()
    ours.fit(x[8:], y[8:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    oracle.train_on_batch(x, y)
    assert_conforms(oracle, ours, updates=1)


def test_recompile_mid_window_apply_accumulated_gradients_uses_the_new_optimizer():
    """Defect 3: apply_accumulated_gradients() after compile uses the new optimizer."""
    oracle, ours, x, y = _sgd_window_then_compile_adam(flush=False)
    ours.apply_accumulated_gradients()
    oracle.train_on_batch(x[:8], y[:8])
    assert_conforms(oracle, ours, updates=1)


def _frozen_oracle(ours):
    """A plain model with ours's current weights, its hidden layer frozen."""
    oracle = build(hidden=True)()
    oracle.set_weights(ours.get_weights())
    oracle.get_layer("hidden").trainable = False
    oracle.compile(optimizer=OPTIMIZERS["plain_sgd"](), loss=LOSS)
    return oracle


@pytest.mark.parametrize("remedy", ["apply", "reset"])
@pytest.mark.skipif(
    BACKEND == "jax",
    reason="On JAX a plain Keras model cannot fit after `trainable` changes "
    "without compile(): its stateless optimizer applies to the variables it "
    "was built with (the same ValueError as ours)",
)
def test_trainable_toggled_mid_window_both_remedies_work(remedy):
    """Defect 7: the error's remedies work, and the next fit trains.

    SGD without momentum: the optimizer has no per-variable state, so a fresh
    plain model can be the oracle of the fit after the toggle.
    """
    plain, ours = twins(3, "plain_sgd", hidden=True)
    x, y, _ = data(16, seed=5)
    ours.train_on_batch(x[:4], y[:4])
    ours.get_layer("hidden").trainable = False
    with pytest.raises(ValueError, match="trainable variables changed") as error:
        ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert "apply_accumulated_gradients()" in str(error.value)
    assert "reset_accumulated_gradients()" in str(error.value)

    if remedy == "apply":
        ours.apply_accumulated_gradients()
        # Applied to the variables it was accumulated for: both layers.
        plain.train_on_batch(x[:4], y[:4])
        assert_conforms(plain, ours, updates=1)
    else:
        ours.reset_accumulated_gradients()
        assert max_difference(plain, ours) == 0.0
    assert ours.steps_accumulated == 0
    hidden_before = [w.copy() for w in ours.get_layer("hidden").get_weights()]
    updates_before = int(ours.optimizer.iterations)

    oracle = _frozen_oracle(ours)
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    assert int(ours.optimizer.iterations) == updates_before + 2
    for a, b in zip(oracle.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    for before, now in zip(
        hidden_before, ours.get_layer("hidden").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(before, now)


def _fresh_ours(steps, optimizer, flush=True):
    return twins(steps, optimizer, flush=flush)[1]


@pytest.mark.parametrize("file_format", ["keras", "weights.h5"])
def test_save_and_load_mid_window_then_continue_equals_uninterrupted(
    tmp_path, file_format
):
    """A `.keras` / `.weights.h5` file taken mid-window continues exactly."""
    x, y, _ = data(22, seed=6)
    uninterrupted = _fresh_ours(4, "adam", flush=False)
    uninterrupted.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)

    first = _fresh_ours(4, "adam", flush=False)
    first.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert first.steps_accumulated == 2
    path = tmp_path / f"mid_window.{file_format}"
    if file_format == "keras":
        first.save(path)
        resumed = keras.models.load_model(path)
    else:
        first.save_weights(path)
        resumed = _fresh_ours(4, "adam", flush=False)
        resumed.optimizer.build(resumed.trainable_variables)
        resumed.load_weights(path)
    assert (resumed.accumulation_steps, resumed.flush_at_epoch_end) == (4, False)
    assert resumed.steps_accumulated == 2
    resumed.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations)
    assert resumed.steps_accumulated == uninterrupted.steps_accumulated
    assert max_difference(resumed, uninterrupted) <= ATOL


def test_clone_model_keeps_the_options_and_trains_with_them():
    """Defect 5: keras.models.clone_model keeps every option (steps, flush, noise)."""
    oracle, ours = twins(4, "sgd", flush=False)
    clone = keras.models.clone_model(ours)
    assert isinstance(clone, AccumulatingModel)
    assert clone.accumulation_steps == 4
    assert clone.flush_at_epoch_end is False
    clone.set_weights(ours.get_weights())
    clone.compile(optimizer=OPTIMIZERS["sgd"](), loss=LOSS)
    x, y, _ = data(22, seed=7)
    clone.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    # 12 micro-batches carried across the epoch boundary: windows 4, 4, 4.
    train_windows(oracle, micro_batches(x, y, 4) * 2, 4)
    assert_conforms(oracle, clone, updates=3)

    epoch_clone = keras.models.clone_model(_fresh_ours("epoch", "sgd"))
    assert epoch_clone.accumulation_steps == "epoch"

    inputs = keras.Input((3,))
    measuring = AccumulatingModel(
        inputs, keras.layers.Dense(2)(inputs), accumulation_steps=2,
        measure_noise_scale=True,
    )  # fmt: skip
    assert keras.models.clone_model(measuring).measure_noise_scale is True


@pytest.mark.tensorflow_only
def test_saved_model_and_export_after_updates_serve_the_predictions(tmp_path):
    """Defect 6: tf.saved_model.save and model.export work after an apply."""
    _, ours = twins(2, "adam", flush=False)
    x, y, _ = data(22, seed=8)
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    ours.apply_accumulated_gradients()  # the manual apply function exists too
    assert int(ours.optimizer.iterations) == 3
    expected = ours.predict(x, verbose=0)

    tf.saved_model.save(ours, str(tmp_path / "saved_model"))
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    serving = loaded.signatures["serving_default"]
    (input_name,) = serving.structured_input_signature[1]  # keyword-only
    served = serving(**{input_name: tf.constant(x)})
    np.testing.assert_allclose(
        next(iter(served.values())).numpy(), expected, rtol=1e-5, atol=1e-6
    )

    ours.export(str(tmp_path / "export"), verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(
        exported.serve([tf.constant(x)]).numpy(), expected, rtol=1e-5, atol=1e-6
    )
    # Training goes on after saving.
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(ours.optimizer.iterations) == 6


# -- Callbacks -----------------------------------------------------------------


@pytest.mark.parametrize("weights_only", [True, False], ids=["weights", "keras"])
def test_model_checkpoint_mid_window_then_resume_equals_uninterrupted(
    tmp_path, weights_only
):
    """ModelCheckpoint(save_freq=5) lands mid-window; resuming from it is exact.

    Seven micro-batches of 4, N=3: the checkpoint after micro-batch 5 holds
    one applied window and two pending micro-batches. A fresh model loaded
    from it and fitted on the last two micro-batches completes that window
    and flushes the last one, as the uninterrupted epoch did.
    """
    x, y, _ = data(27, seed=9)
    oracle, uninterrupted = twins(3, "adam")
    path = tmp_path / ("ckpt.weights.h5" if weights_only else "ckpt.keras")
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(path), save_freq=5, save_weights_only=weights_only
    )
    uninterrupted.fit(
        x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[checkpoint]
    )
    oracle.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    assert_conforms(oracle, uninterrupted, updates=3)

    if weights_only:
        resumed = _fresh_ours(3, "adam")
        resumed.optimizer.build(resumed.trainable_variables)
        resumed.load_weights(path)
    else:
        resumed = keras.models.load_model(path)
    assert (resumed.steps_accumulated, int(resumed.optimizer.iterations)) == (2, 1)
    resumed.fit(x[20:], y[20:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert_conforms(oracle, resumed, updates=3)


class SimulatedCrashError(Exception):
    pass


class CrashAt(keras.callbacks.Callback):
    """Simulates a crash: raises after the given (epoch, batch) ran."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise SimulatedCrashError


@pytest.mark.parametrize(
    ("steps", "save_freq"),
    [(3, "epoch"), ("epoch", "epoch"), (3, 4), ("epoch", 4)],
)
def test_backup_and_restore_after_a_crash_equals_uninterrupted(
    tmp_path, steps, save_freq
):
    """Defect 4 (save_freq="epoch"), and mid-epoch integer save_freq.

    Seven micro-batches per epoch, three epochs, a crash after micro-batch 4
    of epoch 1 (0-based); `fit` is re-run with the same backup directory on
    a fresh model (same initial weights). Weights and the update count equal
    an uninterrupted run, and the plain oracle.
    """
    x, y, _ = data(27, seed=10)
    oracle, uninterrupted = twins(steps, "adam")
    uninterrupted.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    fit_oracle("numpy", oracle, x, y, None, window_size(steps, 4), epochs=3)
    assert_conforms(oracle, uninterrupted)

    def backup():
        return keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=save_freq)

    crashed = _fresh_ours(steps, "adam")
    with pytest.raises(SimulatedCrashError):
        crashed.fit(
            x,
            y,
            batch_size=4,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[backup(), CrashAt(1, 4)],
        )
    resumed = _fresh_ours(steps, "adam")
    resumed.fit(
        x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[backup()]
    )
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations)
    assert max_difference(resumed, uninterrupted) <= ATOL
    assert_conforms(oracle, resumed)


def test_early_stopping_restores_the_best_weights_like_keras():
    """EarlyStopping(restore_best_weights=True) behaves as on the plain oracle.

    ``min_delta=1`` makes every epoch after the first "no improvement", so
    both stop after epoch 1 and restore the weights of epoch 0; the loss
    `fit` reports per epoch is the sample-weighted mean of the same per-sample
    losses for both, so they see the same values.
    """
    oracle, ours = twins(4, "adam")
    x, y, _ = data(22, seed=11)
    histories = []
    for model, batch in ((ours, 4), (oracle, 16)):
        stopper = keras.callbacks.EarlyStopping(
            monitor="loss", min_delta=1.0, patience=1, restore_best_weights=True
        )
        history = model.fit(
            x,
            y,
            batch_size=batch,
            epochs=5,
            shuffle=False,
            verbose=0,
            callbacks=[stopper],
        )
        histories.append(history.history["loss"])
        assert stopper.stopped_epoch == 1
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)
    assert_conforms(oracle, ours, updates=4)  # two epochs of two windows ran


def test_reduce_lr_on_plateau_changes_the_rate_of_the_next_updates():
    """ReduceLROnPlateau halves the rate after every epoch (min_delta=10)."""
    oracle, ours = twins(4, "adam")
    x, y, _ = data(22, seed=12)
    for model, batch in ((ours, 4), (oracle, 16)):
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras.callbacks.ReduceLROnPlateau(
                    monitor="loss", factor=0.5, patience=0, min_delta=10.0
                )
            ],
        )
    assert float(ours.optimizer.learning_rate) == pytest.approx(0.05 / 4)
    assert float(oracle.optimizer.learning_rate) == pytest.approx(0.05 / 4)
    assert_conforms(oracle, ours, updates=6)


def test_terminate_on_nan_keeps_the_last_complete_update():
    """A NaN micro-batch opening a window: training stops, the window is dropped.

    N=3, micro-batches of 4, a NaN sample in micro-batch 3: the first window
    is applied, TerminateOnNaN stops after micro-batch 3 and the window it
    opened is discarded, so the weights are the oracle's after one step.
    """
    oracle, ours = twins(3, "sgd")
    x, y, _ = data(24, seed=13)
    x[13, 0] = np.nan
    with pytest.warns(UserWarning, match="non-finite"):
        ours.fit(
            x,
            y,
            batch_size=4,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.TerminateOnNaN()],
        )
    oracle.train_on_batch(x[:12], y[:12])
    assert_conforms(oracle, ours, updates=1)
    assert ours.steps_accumulated == 0


# -- Empty micro-batches -------------------------------------------------------


class CountMicroBatches(keras.callbacks.Callback):
    """Reads ``micro_batches_this_epoch`` when fit's validation begins.

    That is after the epoch's last step (and Keras's data-less end-of-data
    step on data of unknown length) and before the epoch-end reset of the
    count, which `EpochBoundaries` does in ``on_epoch_end``.
    """

    def __init__(self):
        super().__init__()
        self.counts = []

    def on_test_begin(self, logs=None):
        # The state is internal; the count is what a resumed run relies on.
        state = self.model._accumulation
        self.counts.append(int(state.micro_batches_this_epoch.numpy()))


def _finite_generator(x, y, batch):
    yield from micro_batches(x, y, batch)


@pytest.mark.parametrize("steps", [1, "epoch"], ids=["N1", "epoch"])
@pytest.mark.parametrize("source", ["python_generator", "tf_data_filter"])
def test_end_of_data_step_counts_for_nothing(source, steps):
    """Defect 1: data of unknown length, steps_per_execution=1.

    Keras runs one more, data-less, step at the end of such data: it must
    neither produce NaN nor count as an update or as a micro-batch. (A
    finite Python generator feeds one epoch only.)
    """
    oracle, ours = twins(steps, "adam", compile_kwargs={"steps_per_execution": 1})
    x, y, _ = data(22, seed=14)
    epochs = 1 if source == "python_generator" else 2
    if source == "python_generator":
        inputs = _finite_generator(x, y, 4)
    else:
        inputs = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True)
        inputs = inputs.batch(4)
    counter = CountMicroBatches()
    ours.fit(
        inputs,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        validation_data=(x[:4], y[:4]),
        callbacks=[counter],
    )
    fit_oracle("numpy", oracle, x, y, None, window_size(steps, 4), epochs)
    assert_conforms(oracle, ours, updates=(6 if steps == 1 else 1) * epochs)
    assert counter.counts == [6] * epochs


def _sequence_twins(steps):
    def make():
        inputs = keras.Input((5,), dtype="int32")
        embedded = keras.layers.Embedding(6, 4, mask_zero=True)(inputs)
        # Per-timestep probabilities: the output carries the padding mask.
        outputs = keras.layers.Dense(CLASSES, activation="softmax")(embedded)
        return keras.Model(inputs, outputs)

    plain, ours = make_twins(3, steps, build=make)
    for model in (plain, ours):
        model.compile(optimizer=OPTIMIZERS["sgd"](), loss=LOSS)
    return plain, ours


def test_all_padding_micro_batch_counts_for_nothing():
    """Defect 2: N=1 and a micro-batch that is all padding: no NaN, no update.

    The oracle is plain Keras on the same data without that batch.
    """
    oracle, ours = _sequence_twins(1)
    rng = np.random.default_rng(15)
    tokens = rng.integers(0, 6, size=(12, 5)).astype("int32")
    tokens[:, 0] = rng.integers(1, 6, size=12)  # every other row has a token
    tokens[6:9] = 0  # micro-batch 2 (of 4, batches of 3) is all padding
    labels = rng.integers(0, CLASSES, size=(12, 5)).astype("int32")
    counter = CountMicroBatches()
    ours.fit(
        tokens,
        labels,
        batch_size=3,
        epochs=2,
        shuffle=False,
        verbose=0,
        validation_data=(tokens[:3], labels[:3]),
        callbacks=[counter],
    )
    keep = np.r_[0:6, 9:12]
    oracle.fit(
        tokens[keep], labels[keep], batch_size=3, epochs=2, shuffle=False, verbose=0
    )
    assert_conforms(oracle, ours, updates=6)
    assert counter.counts == [4, 4]  # the padding batch was drawn: it is counted


# -- Sparse gradients ----------------------------------------------------------


class DensifiedGradients(keras.Model):
    """Plain Keras, except that gradients are made dense before the optimizer."""

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(
            [tf.convert_to_tensor(g) for g in gradients], self.trainable_variables
        )
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _bag_of_tokens(model_class, **kwargs):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(8, 3)(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(pooled)
    return model_class(inputs, outputs, **kwargs)


@pytest.mark.tensorflow_only
def test_sparse_embedding_gradients_with_duplicate_rows():
    """IndexedSlices with repeated tokens: ours equals densified plain Keras.

    Our accumulator densifies the embedding's IndexedSlices (duplicate rows
    summed). The oracle is plain Keras with dense gradients; a completely
    plain Keras model hands Adam the IndexedSlices and updates differently
    for repeated rows, and the difference is measured and printed.
    """
    rng = np.random.default_rng(16)
    tokens = rng.integers(1, 4, size=(16, 6)).astype("int32")  # many repeats
    labels = rng.integers(0, CLASSES, size=16).astype("int32")
    template = _bag_of_tokens(keras.Model)
    models = {}
    for name, model_class, kwargs in (
        ("plain", keras.Model, {}),
        ("densified", DensifiedGradients, {}),
        ("ours", AccumulatingModel, {"accumulation_steps": 2}),
    ):
        model = _bag_of_tokens(model_class, **kwargs)
        model.set_weights(template.get_weights())
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss=LOSS)
        models[name] = model
    models["ours"].fit(tokens, labels, batch_size=4, epochs=2, shuffle=False, verbose=0)
    for name in ("plain", "densified"):
        models[name].fit(
            tokens, labels, batch_size=8, epochs=2, shuffle=False, verbose=0
        )
    assert_conforms(models["densified"], models["ours"], updates=4)
    gap = max_difference(models["plain"], models["ours"])
    print(f"max |ours - plain Keras (sparse Adam)| = {gap:.4g}")
