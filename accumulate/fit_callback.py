"""What `AccumulatingModel.fit` does at epoch boundaries: flush and resume.

`fit` puts `EpochBoundaries` first in its callback list. It works once per
epoch (or once per `fit`), never per batch, so Keras can keep dispatching the
batch-end callbacks asynchronously and the train loop never waits on the host.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras


class EpochBoundaries(keras.callbacks.Callback):
    """`fit`'s own callback: applies open windows and resumes exactly.

    * Applies an incomplete window before validation and the other epoch-end
      callbacks (with ``flush_at_epoch_end``), so validation, checkpoints and
      `ModelCheckpoint` see the epoch's update. If training was stopped and
      the window holds a non-finite gradient (`keras.callbacks.TerminateOnNaN`),
      the window is discarded instead: the weights keep the last complete
      update.
    * Resumes mid-epoch exactly. The accumulation state counts the
      micro-batches of the current epoch and is saved with the model.
      Keras's `BackupAndRestore` restores it in ``on_train_begin`` and then
      replays the interrupted epoch from its first batch; the micro-batches
      the restored state already holds are skipped (their data is drawn and
      dropped, no step runs), so none is counted twice and none is lost. This
      needs the replayed epoch to yield the same batches in the same order
      (``shuffle=False``, or an order that depends only on the epoch).
    """

    def __init__(self, model: keras.Model):
        super().__init__()
        self._accumulating_model = model
        self._first_epoch_of_fit = True

    def on_train_begin(self, logs: Any = None) -> None:
        # Before any other callback: a restore that follows sets the count.
        self._first_epoch_of_fit = True
        state = self._accumulating_model._accumulation
        if state is not None:
            state.start_epoch()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        model = self._accumulating_model
        state = model._accumulation
        first_epoch_of_fit, self._first_epoch_of_fit = self._first_epoch_of_fit, False
        already_done = 0
        if state is not None and first_epoch_of_fit:
            already_done = int(state.micro_batches_this_epoch.numpy())
        # A restored epoch keeps what it restored: the noise meter's sums too.
        model._begin_epoch(epoch, resuming=already_done > 0)
        if already_done:
            model.train_function = _skipping(model, model.train_function, already_done)
        elif state is not None:
            state.start_epoch()

    def on_test_begin(self, logs: Any = None) -> None:
        # Only reached from fit's validation: this callback is fit's own.
        self._flush()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._flush()
        model = self._accumulating_model
        if model._noise_scale is not None and logs is not None:
            # The same dict reaches History and the progress bar after us.
            logs.update(model._noise_scale.epoch_logs())
        state = model._accumulation
        if state is not None:
            # The epoch is complete: a checkpoint taken now (BackupAndRestore
            # with save_freq="epoch") resumes at the next epoch's first batch.
            state.start_epoch()

    def _flush(self) -> None:
        model = self._accumulating_model
        state = model._accumulation
        if model.stop_training and state is not None and not state.is_finite():
            warnings.warn(
                "Training stopped and the open window of "
                f"{model.steps_accumulated} micro-batches holds a "
                "non-finite gradient: it is discarded, not applied. The "
                "weights are those of the last complete update.",
                stacklevel=2,
            )
            model.reset_accumulated_gradients()
            return
        if model.flush_at_epoch_end:
            model.apply_accumulated_gradients()


def _skipping(model: keras.Model, train_function: Any, count: int) -> Any:
    """``train_function`` that first drops ``count`` micro-batches of data.

    Called once per Keras step, like the train function: while micro-batches
    remain to skip it takes them from what it is given and returns without
    training; then it puts the real function back. Each backend's train
    function has its own signature: TensorFlow's takes an iterator, JAX's
    ``(state, iterator)`` and returns ``(logs, state)``, PyTorch's takes the
    step's data, already drawn.
    """
    remaining = count
    backend = keras.backend.backend()

    def skip_then_train(*args: Any) -> Any:
        nonlocal remaining
        if remaining <= 0:
            return train_function(*args)
        if backend == "torch":
            remaining -= 1
        else:
            iterator = args[-1]
            for _ in range(min(remaining, model.steps_per_execution)):
                if backend == "jax":
                    next(iterator)
                else:
                    iterator.get_next()
                remaining -= 1
        if remaining == 0 and model.train_function is skip_then_train:
            model.train_function = train_function
        if backend == "jax":
            # The state passes through untouched; no metric moved.
            return {}, args[0]
        if not all(getattr(metric, "built", True) for metric in model.metrics):
            # Compiled metrics are built by the first step that trains, and a
            # resumed run's skipped batches come before it.
            return {}
        return model.get_metrics_result()

    return skip_then_train


def with_epoch_boundaries(callbacks: Any, model: keras.Model) -> Any:
    """``callbacks`` with an `EpochBoundaries` for ``model`` in front."""
    boundaries = EpochBoundaries(model)
    if callbacks is None:
        return [boundaries]
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.callbacks.insert(0, boundaries)
        boundaries.set_model(model)
        return callbacks
    return [boundaries, *callbacks]
