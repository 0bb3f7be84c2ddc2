"""Faults: a killed run resumed by BackupAndRestore, determinism, NaN losses.

The kill test needs a process to kill, so this file is also the training
script it runs (``python tests/test_faults.py MODE WORK_DIR``):

* ``full``: trains without interruption and writes the final weights;
* ``resumable``: the same training with ``BackupAndRestore(save_freq=3)``;
  with ``KILL_AT=epoch,batch`` in the environment it announces that batch in
  a file and then hangs until the test SIGKILLs it mid-window.

Every child process is bounded in time and always reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from accumulate import AccumulatingModel

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
CHILD_TIMEOUT = 120  # seconds

# 14 micro-batches per epoch (the last one ragged), windows of 4: the epoch
# ends mid-window and is flushed. Saves every 3 batches fall at epoch 1,
# batches 0, 3, 6, 9; the kill at batch 10 leaves the newest backup with 10
# micro-batches of the epoch, 2 of them in an unfinished window.
EPOCHS = 3
BATCH = 8
SAMPLES = BATCH * 13 + 3
STEPS = 4
SAVE_FREQ = 3
KILL_AT = (1, 10)


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = rng.integers(0, 4, size=SAMPLES)
    return x, y


def _model():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    # Its moving statistics change once per micro-batch that runs, so a
    # replayed micro-batch would show. (Not Dropout: Keras's save_weights
    # does not store a seed generator's state, so no resumed Keras model,
    # accumulating or not, draws the same masks again.)
    hidden = keras.layers.BatchNormalization()(hidden)
    outputs = keras.layers.Dense(4)(hidden)
    model = AccumulatingModel(inputs, outputs, accumulation_steps=STEPS, name="faulty")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _HangAt(keras.callbacks.Callback):
    """Announces a batch, then waits to be killed (never returns)."""

    def __init__(self, epoch: int, batch: int, marker: Path):
        super().__init__()
        self._at = (epoch, batch)
        self._marker = marker
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self._epoch, batch) == self._at:
            self._marker.write_text(str(os.getpid()))
            while True:  # the test sends SIGKILL
                time.sleep(0.1)


def _child(mode: str, work_dir: str) -> None:  # pragma: no cover - subprocess
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    work = Path(work_dir)
    model = _model()
    callbacks = []
    if mode == "resumable":
        callbacks.append(
            keras.callbacks.BackupAndRestore(str(work / "backup"), save_freq=SAVE_FREQ)
        )
        if os.environ.get("KILL_AT"):
            epoch, batch = (int(v) for v in os.environ["KILL_AT"].split(","))
            callbacks.append(_HangAt(epoch, batch, work / "killed_at"))
    x, y = _data()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    np.savez(
        work / f"{mode}.npz",
        *model.get_weights(),
        iterations=int(model.optimizer.iterations.numpy()),
    )


def _start(mode: str, work: Path, kill_at: tuple[int, int] | None = None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = f"{kill_at[0]},{kill_at[1]}"
    return subprocess.Popen(
        [sys.executable, str(HERE), mode, str(work)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / f"{mode}.stderr", "ab"),
        start_new_session=True,
    )


def _reap(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _finish(process: subprocess.Popen, work: Path, mode: str) -> dict:
    try:
        code = process.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode} run timed out")
    finally:
        _reap(process)
    assert code == 0, (work / f"{mode}.stderr").read_text()[-4000:]
    with np.load(work / f"{mode}.npz") as saved:
        return {key: saved[key] for key in saved.files}


def _weights(saved: dict) -> list[np.ndarray]:
    return [saved[f"arr_{i}"] for i in range(len(saved) - 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two uninterrupted runs in separate processes (both are needed twice)."""
    runs = []
    for index in range(2):
        work = tmp_path_factory.mktemp(f"full{index}")
        runs.append(_finish(_start("full", work), work, "full"))
    return runs


@pytest.mark.slow
def test_same_seed_and_op_determinism_give_identical_weights(uninterrupted):
    first, second = uninterrupted
    for a, b in zip(_weights(first), _weights(second), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigkill_mid_window_then_backup_and_restore_resumes_exactly(
    uninterrupted, tmp_path
):
    killed = _start("resumable", tmp_path, kill_at=KILL_AT)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        marker = tmp_path / "killed_at"
        while not marker.exists():
            assert killed.poll() is None, (tmp_path / "resumable.stderr").read_text()[
                -4000:
            ]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        os.killpg(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
    finally:
        _reap(killed)
    assert (tmp_path / "backup" / "latest.weights.h5").exists()
    assert not (tmp_path / "resumable.npz").exists()

    resumed = _finish(_start("resumable", tmp_path), tmp_path, "resumable")
    reference = uninterrupted[0]
    assert int(resumed["iterations"]) == int(reference["iterations"]) == EPOCHS * 4
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(_weights(resumed), _weights(reference), strict=True)
    )
    print(f"max |resumed - uninterrupted| = {difference:.3g}")
    assert difference <= 1e-7


def test_backup_and_restore_alone_would_double_count(tmp_path):
    """Why the skip is needed: the restored state already holds batches 0..9.

    The resume above is only exact because the replayed micro-batches are
    skipped; here the saved progress counter is checked directly.
    """
    x, y = _data()
    model = _model()
    backup = keras.callbacks.BackupAndRestore(
        str(tmp_path), save_freq=5, delete_checkpoint=False
    )

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 6:
                self.model.stop_training = True

    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[backup, Stop()],
    )
    # Saved after batch 4: 5 micro-batches of the epoch, 1 of them unapplied.
    restored = _model()
    restored.load_weights(str(tmp_path / "latest.weights.h5"))
    assert int(restored._accumulation.micro_batches_this_epoch.numpy()) == 5
    assert restored.steps_accumulated == 1


def test_terminate_on_nan_discards_the_unfinished_window():
    """A NaN loss in micro-batch 6 (window 2) stops training before it applies.

    Standard Keras applies the NaN batch's update before TerminateOnNaN sees
    the loss. Here the NaN only reaches the accumulators; the window is
    incomplete when training stops, and the epoch-end flush discards it with
    a warning instead of applying it: the weights are those of window 1.
    """
    x, y = _data()
    # (A NaN input would not do: the compiled ReLU maps NaN to 0.)
    sample_weight = np.ones(SAMPLES, "float32")
    sample_weight[5 * BATCH + 2] = np.nan
    model = _model()
    after_window_1 = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                after_window_1.extend(w.numpy() for w in self.model.trainable_weights)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=BATCH,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.TerminateOnNaN(), Record()],
        )
    assert len(history.epoch) == 1
    assert int(model.optimizer.iterations.numpy()) == 1
    assert model.steps_accumulated == 0
    assert any("non-finite gradient" in str(w.message) for w in caught)
    assert all(np.isfinite(weight).all() for weight in model.get_weights())
    # The trainable weights are window 1's (BatchNormalization's moving
    # statistics move with every forward pass, as without accumulation).
    for weight, saved in zip(model.trainable_weights, after_window_1, strict=True):
        np.testing.assert_array_equal(weight.numpy(), saved)


if __name__ == "__main__":  # pragma: no cover - the child process
    _child(sys.argv[1], sys.argv[2])
