"""``micro_batch_size``: a batch split into slices inside the train step.

The oracle, as everywhere: a real plain Keras model's step on the whole
batch. One `fit` step of a model with ``micro_batch_size=m`` must make the
update that plain `fit` makes with the same ``batch_size``, whatever ``m``
(ragged last slices, slices bigger than the batch), for every loss
reduction, with sample weights that empty whole slices, under a Keras mask
with slices of padding only, with ``accumulation_steps``, schedules, the
noise scale and mixed precision; and Keras must count updates.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import accumulate.model as model_module
from accumulate import AccumulatingModel, enable_accumulation, micro_batches
from tests.conftest import BACKEND
from tests.oracle import max_difference, random_data, update_error

FEATURES, CLASSES = 5, 3
REDUCTIONS = ("sum_over_batch_size", "mean_with_sample_weight", "sum")
# Float32 sums of slices in another order than one batch's: a few ulps.
TOLERANCE = 2e-6


def _layers(regularised: bool = True) -> tuple:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((FEATURES,))
    regulariser = keras.regularizers.L2(1e-2) if regularised else None
    hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=regulariser)
    return inputs, keras.layers.Dense(CLASSES)(hidden(inputs))


def _compile(
    model: keras.Model, reduction: str, optimizer: str = "adam", **options
) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.get(
            {"class_name": optimizer, "config": {"learning_rate": 0.02}}
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction
        ),
        metrics=["accuracy"],
        **options,
    )
    return model


def _twins(reduction: str, **accumulation) -> tuple[keras.Model, keras.Model]:
    """A plain model and an accumulating one with the same weights."""
    regularised = reduction != "sum"  # sum refuses regularisers (tested elsewhere)
    plain = _compile(keras.Model(*_layers(regularised)), reduction)
    ours = AccumulatingModel(*_layers(regularised), **accumulation)
    _compile(ours, reduction)
    ours.set_weights(plain.get_weights())
    return plain, ours


def _fit(model: keras.Model, data: tuple, batch: int, **kwargs) -> dict:
    x, y, weights = data
    history = model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=batch,
        epochs=kwargs.pop("epochs", 2),
        shuffle=False,
        verbose=0,
        **kwargs,
    )
    return history.history


@given(
    batch=st.integers(2, 24),
    slice_size=st.integers(1, 28),
    reduction=st.sampled_from(REDUCTIONS),
    empty=st.floats(0.0, 1.0, exclude_max=True),
)
def test_one_step_is_the_plain_step_on_the_whole_batch(
    batch, slice_size, reduction, empty
):
    x, y, weights = random_data(2 * batch + batch // 2, FEATURES, CLASSES, seed=batch)
    # Zero weights that empty whole slices of the first batch, never all of
    # it: a batch that weighs nothing is no update of ours (design.md), where
    # plain Keras steps on its regularisation alone.
    weights[: int(empty * batch)] = 0.0
    plain, ours = _twins(reduction, micro_batch_size=slice_size)
    expected = _fit(plain, (x, y, weights), batch)
    logged = _fit(ours, (x, y, weights), batch)
    assert max_difference(plain, ours) < TOLERANCE
    # One update per fit step, and the batch's loss and metrics, as logged.
    assert int(ours.optimizer.iterations) == int(plain.optimizer.iterations)
    np.testing.assert_allclose(logged["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(logged["accuracy"], expected["accuracy"], rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_jit_compiled_steps_are_exact(jit_compile):
    if BACKEND == "torch" and jit_compile:
        pytest.skip("torch.compile of Keras's torch step is tested in conformance")
    x, y, weights = random_data(70, FEATURES, CLASSES)
    plain, ours = _twins("sum_over_batch_size", micro_batch_size=8)
    for model in (plain, ours):
        _compile(model, "sum_over_batch_size", jit_compile=jit_compile)
    _fit(plain, (x, y, weights), 30)
    _fit(ours, (x, y, weights), 30)
    assert max_difference(plain, ours) < TOLERANCE


def test_windows_of_split_batches_are_one_big_batch():
    # accumulation_steps=3 of batches of 12, each in slices of 5: one update
    # per 36 samples, as plain fit at batch 36.
    x, y, weights = random_data(36 * 3 + 10, FEATURES, CLASSES)
    plain, ours = _twins(
        "mean_with_sample_weight", micro_batch_size=5, accumulation_steps=3
    )
    _fit(plain, (x, y, weights), 36)
    _fit(ours, (x, y, weights), 12)
    assert max_difference(plain, ours) < TOLERANCE
    assert int(ours.optimizer.iterations) == int(plain.optimizer.iterations) == 8


def test_schedules_count_split_batches():
    # Epoch 0 updates every batch, epoch 1 every 2 batches.
    x, y, weights = random_data(48, FEATURES, CLASSES)
    plain, ours = _twins(
        "sum_over_batch_size", micro_batch_size=4, accumulation_steps={0: 1, 1: 2}
    )
    _fit(plain, (x, y, weights), 12, epochs=1)
    _fit(plain, (x, y, weights), 24, epochs=1)
    _fit(ours, (x, y, weights), 12)
    assert max_difference(plain, ours) < TOLERANCE
    assert int(ours.optimizer.iterations) == 4 + 2


def test_masked_tokens_with_slices_of_padding_only():
    # Padded sequences under a Keras mask: the loss divides by real tokens.
    # The second batch's first slice is all padding.
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=(32, 6))
    tokens[:, 4:] = 0
    tokens[8:12] = 0
    targets = rng.integers(0, CLASSES, size=(32, 6))

    def layers():
        keras.utils.set_random_seed(5)
        inputs = keras.Input((6,), dtype="int32")
        embedded = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
        return inputs, keras.layers.Dense(CLASSES)(embedded)

    # SGD: TensorFlow's Adam steps on an Embedding's sparse gradient row by
    # row, a different step from Adam's on the dense sum (design.md).
    plain = _compile(keras.Model(*layers()), "sum_over_batch_size", "sgd")
    ours = _compile(
        AccumulatingModel(*layers(), micro_batch_size=4), "sum_over_batch_size", "sgd"
    )
    ours.set_weights(plain.get_weights())
    expected = _fit(plain, (tokens, targets, None), 8)
    logged = _fit(ours, (tokens, targets, None), 8)
    assert max_difference(plain, ours) < TOLERANCE
    assert np.all(np.isfinite(logged["loss"]))
    np.testing.assert_allclose(logged["loss"], expected["loss"], rtol=1e-5)


def test_callbacks_and_progress_count_updates():
    seen = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((batch, int(self.model.optimizer.iterations)))

    x, y, weights = random_data(64, FEATURES, CLASSES)
    _, ours = _twins("sum_over_batch_size", micro_batch_size=4)
    _fit(ours, (x, y, weights), 32, epochs=1, callbacks=[Steps()])
    assert seen == [(0, 1), (1, 2)]


def test_noise_scale_reads_slices_as_micro_batches():
    # A batch of 24 in slices of 6, one window per batch, measures what
    # windows of 4 micro-batches of 6 measure: the same gradients.
    x, y, weights = random_data(96, FEATURES, CLASSES)
    _, sliced = _twins(
        "sum_over_batch_size", micro_batch_size=6, measure_noise_scale=True
    )
    _, windows = _twins(
        "sum_over_batch_size", accumulation_steps=4, measure_noise_scale=True
    )
    measured = _fit(sliced, (x, y, weights), 24)
    expected = _fit(windows, (x, y, weights), 6)
    assert max_difference(sliced, windows) < TOLERANCE
    for key in ("gradient_sq_norm", "gradient_variance", "gradient_noise_scale"):
        np.testing.assert_allclose(measured[key], expected[key], rtol=1e-4)


def test_mixed_precision_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y, weights = random_data(60, FEATURES, CLASSES)
        plain, ours = _twins("sum_over_batch_size", micro_batch_size=7)
        before = plain.get_weights()
        _fit(plain, (x, y, weights), 20)
        _fit(ours, (x, y, weights), 20)
        assert type(ours.optimizer).__name__ == "LossScaleOptimizer"
        # float16 forward passes of slices round differently from one
        # batch's: the gap is float16's (2**-11 relative), not a step's.
        assert update_error(ours, plain, before) < 1e-2
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_enabled_models_split_and_keep_the_option(tmp_path):
    x, y, weights = random_data(40, FEATURES, CLASSES)
    plain = _compile(keras.Model(*_layers()), "sum_over_batch_size")
    model = enable_accumulation(
        _compile(keras.Model(*_layers()), "sum_over_batch_size"), micro_batch_size=6
    )
    model.set_weights(plain.get_weights())
    _fit(plain, (x, y, weights), 20)
    _fit(model, (x, y, weights), 20)
    assert max_difference(plain, model) < TOLERANCE
    path = tmp_path / "model.keras"
    model.save(path)
    assert keras.models.load_model(path).micro_batch_size == 6
    assert keras.models.clone_model(model).micro_batch_size == 6
    functional = AccumulatingModel(*_layers(), micro_batch_size="auto")
    assert keras.models.clone_model(functional).micro_batch_size == "auto"
    assert AccumulatingModel.from_config(functional.get_config()).micro_batch_size == (
        "auto"
    )


def test_backup_and_restore_counts_updates_and_resumes_exactly(tmp_path):
    # save_freq counts fit steps, which are whole split batches; the crash
    # lands inside a window of 2 batches, which resumes where it was.
    from tests.test_conformance import CrashAt, SimulatedCrashError

    x, y, weights = random_data(72, FEATURES, CLASSES)
    options = {"micro_batch_size": 5, "accumulation_steps": 2}
    _, uninterrupted = _twins("sum_over_batch_size", **options)
    initial = uninterrupted.get_weights()
    _fit(uninterrupted, (x, y, weights), 12, epochs=3)

    def fresh():
        model = _twins("sum_over_batch_size", **options)[1]
        model.set_weights(initial)
        return model

    def backup():
        return keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=3)

    with pytest.raises(SimulatedCrashError):
        _fit(
            fresh(), (x, y, weights), 12, epochs=3, callbacks=[backup(), CrashAt(1, 3)]
        )
    resumed = fresh()
    _fit(resumed, (x, y, weights), 12, epochs=3, callbacks=[backup()])
    assert max_difference(resumed, uninterrupted) < TOLERANCE
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations)


@pytest.mark.parametrize("value", [0, -4, 2.5, True, "big", "Auto"])
def test_bad_sizes_are_refused_by_name(value):
    with pytest.raises(
        ValueError, match=r"micro_batch_size.*received micro_batch_size"
    ):
        AccumulatingModel(*_layers(), micro_batch_size=value)


def test_a_slice_that_does_not_divide_over_replicas_names_one_that_does():
    with pytest.raises(ValueError, match="multiple of 4: use micro_batch_size=8"):
        micro_batches.share(10, 4, "devices")
    assert micro_batches.share(8, 4, "devices") == 2
    with pytest.raises(ValueError, match="use micro_batch_size=4"):
        micro_batches.share(3, 4, "replicas")


def test_auto_on_cpu_says_to_give_an_int_and_that_works():
    x, y, weights = random_data(32, FEATURES, CLASSES)
    _, ours = _twins("sum_over_batch_size", micro_batch_size="auto")
    with pytest.raises(ValueError, match="Give micro_batch_size an int"):
        _fit(ours, (x, y, weights), 16)
    assert int(ours.optimizer.iterations) == 0
    plain, ours = _twins("sum_over_batch_size", micro_batch_size=4)
    _fit(plain, (x, y, weights), 16)
    _fit(ours, (x, y, weights), 16)
    assert max_difference(plain, ours) < TOLERANCE


def _out_of_memory() -> BaseException:
    """The error the backend raises when an allocation fails."""
    message = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate"
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.errors.ResourceExhaustedError(None, None, message)
    if BACKEND == "torch":
        import torch

        return torch.OutOfMemoryError(message)
    import jax

    return jax.errors.JaxRuntimeError(message)


def _pretend_accelerator(monkeypatch, fits_up_to: int, tried: list) -> None:
    """A device where slices above ``fits_up_to`` samples run out of memory;
    smaller ones run the backend's real trial step."""
    backend = model_module._backend
    real_probe = backend.probe

    def probe(model, x, y, sample_weight):
        size = int(backend.batch_size(x))
        tried.append(size)
        if size > fits_up_to:
            raise _out_of_memory()
        real_probe(model, x, y, sample_weight)

    monkeypatch.setattr(backend, "accelerator", lambda: "a pretend accelerator")
    monkeypatch.setattr(backend, "probe", probe)


def test_auto_halves_until_a_slice_fits_then_trains_exactly(monkeypatch, capsys):
    tried: list = []
    _pretend_accelerator(monkeypatch, fits_up_to=13, tried=tried)
    x, y, weights = random_data(96, FEATURES, CLASSES)
    plain, ours = _twins("sum_over_batch_size", micro_batch_size="auto")
    # The trial steps leave the model as it was: the first update is the
    # plain one from the same weights and moving state.
    _fit(plain, (x, y, weights), 48)
    ours.fit(x, y, sample_weight=weights, batch_size=48, epochs=2, shuffle=False)
    assert tried == [48, 24, 12]
    assert ours._found_micro_batch_size == 12
    assert (
        "slices of 12 samples fit on a pretend accelerator" in capsys.readouterr().out
    )
    assert max_difference(plain, ours) < TOLERANCE
    assert int(ours.optimizer.iterations) == 4


def test_auto_reports_when_nothing_fits_and_lets_other_errors_through(monkeypatch):
    x, y, weights = random_data(16, FEATURES, CLASSES)
    _pretend_accelerator(monkeypatch, fits_up_to=0, tried=[])
    _, ours = _twins("sum_over_batch_size", micro_batch_size="auto")
    with pytest.raises(MemoryError, match="not even one sample"):
        _fit(ours, (x, y, weights), 16)

    def broken(model, x, y, sample_weight):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(model_module._backend, "probe", broken)
    with pytest.raises(RuntimeError, match="a bug, not memory"):
        _fit(ours, (x, y, weights), 16)


def test_auto_reads_the_first_batch_of_datasets_not_of_generators():
    x, y, weights = random_data(20, FEATURES, CLASSES)
    batch = micro_batches.first_batch(x, y, weights, 8)
    assert [len(part) for part in batch] == [8, 8, 8]

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return x[:5], y[:5]

    first = micro_batches.first_batch(Batches(), None, None, None)
    assert len(first[0]) == 5 and first[2] is None
    generator = ((x[:4], y[:4]) for _ in range(3))
    with pytest.raises(ValueError, match="one-shot iterator"):
        micro_batches.first_batch(generator, None, None, None)


@pytest.mark.skipif(BACKEND != "torch", reason="torch slices are views")
def test_torch_slices_are_views_of_the_batch(monkeypatch):
    import torch

    x, y, weights = random_data(24, FEATURES, CLASSES)
    _, ours = _twins("sum_over_batch_size", micro_batch_size=5)
    storages = []
    real = ours._gradients

    def recording(x, y, sample_weight):
        storages.append(x.untyped_storage().data_ptr())
        return real(x, y, sample_weight)

    monkeypatch.setattr(ours, "_gradients", recording)
    batch = torch.as_tensor(x)
    ours.train_on_batch(batch, y, sample_weight=weights)
    assert len(storages) == 5
    assert set(storages) == {batch.untyped_storage().data_ptr()}


# -- Memory: the batch's step in a slice's memory ------------------------------

# Per-token Dense layers over long sequences: activations (512 KB a sample)
# dwarf the weights (66k parameters), so peak memory follows the batch.
TOKENS, WIDTH, MEMORY_BATCH, MEMORY_SLICE = 256, 512, 512, 32
_MEMORY_CHILD = """
import json, sys
import keras, numpy as np
from accumulate import AccumulatingModel
from benchmarks.memory import PeakMemory

batch, micro_batch_size = json.loads(sys.argv[1])
keras.utils.set_random_seed(0)
inputs = keras.Input(({tokens}, 64))
hidden = keras.layers.Dense({width}, activation="relu")(inputs)
hidden = keras.layers.Dense({width}, activation="relu")(hidden)
model = AccumulatingModel(
    inputs, keras.layers.Dense(8)(hidden), micro_batch_size=micro_batch_size
)
model.compile(optimizer="sgd", loss="mse")
# One batch: the whole batch, or one slice's worth.
x = np.random.default_rng(0).normal(size=(batch, {tokens}, 64)).astype("float32")
y = np.zeros((batch, {tokens}, 8), "float32")
memory = PeakMemory(keras.backend.backend())
memory.start()
model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
print(json.dumps([memory.peak_added(), int(model.optimizer.iterations)]))
"""


def _peak_added(*runs: tuple[int, int | None]) -> list[tuple[int, int]]:
    """``(peak bytes added, updates)`` of one `fit` epoch for each ``(batch,
    micro_batch_size)``, each in a process of its own, run side by side
    (each process's peak is its own)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = _MEMORY_CHILD.format(tokens=TOKENS, width=WIDTH)
    environment = {
        **os.environ,
        "PYTHONPATH": str(root),
        # glibc raises its mmap threshold as big blocks are freed, and then
        # serves slice after slice from a fragmenting heap: on PyTorch (CPU)
        # resident memory then grows by 200 MB that no tensor holds. A fixed
        # threshold returns freed blocks, so the peak measures what is alive.
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
            env=environment,
        )
        for run in runs
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(tuple(json.loads(out.strip().splitlines()[-1])))
    return results


@pytest.mark.slow
def test_a_split_batch_takes_a_slice_s_memory_not_the_batch_s():
    mb = 2**20
    (whole, whole_updates), (split, split_updates), (one_slice, _) = _peak_added(
        (MEMORY_BATCH, None), (MEMORY_BATCH, MEMORY_SLICE), (MEMORY_SLICE, None)
    )
    assert whole_updates == split_updates == 1
    # The batch's activations are 256 MB a layer; a slice's, 16 MB.
    assert whole > 600 * mb
    assert split < whole / 4
    # What plain fit at the slice's size takes, plus the batch's inputs (x
    # and y, 38 MB, held whole by the step, and copied once by the data
    # pipeline); the accumulators are 0.26 MB. The slack is the allocator's
    # and the runtime's noise between processes (up to 22 MB seen on 2
    # cores), far below a quarter of one layer of the batch's activations.
    inputs = MEMORY_BATCH * TOKENS * (64 + 8) * 4
    assert split < one_slice + 2 * inputs + 48 * mb, (split, one_slice, whole)
