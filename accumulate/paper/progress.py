"""Per-epoch progress of a run: the event, the Keras callback, the text line.

Events are plain picklable dataclasses so that worker processes can send them
to the parent, which prints them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras

__all__ = ["EpochEnd", "EpochProgressCallback", "format_duration", "format_progress"]


@dataclass(frozen=True)
class EpochEnd:
    """One finished epoch of one twin of one run.

    Attributes:
        run: the run's label, e.g. ``mnist/seed42/sgd``.
        model: ``"standard"`` or ``"accumulating"``.
        epoch: 1-based epoch just finished.
        epochs: epochs of this twin's training.
        seconds: wall time of this epoch (validation included).
        eta_seconds: estimated time left for the whole run (both twins).
        metrics: Keras's epoch logs (``loss``, ``accuracy``, ``val_*``).
    """

    run: str
    model: str
    epoch: int
    epochs: int
    seconds: float
    eta_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


ProgressSink = Callable[[EpochEnd], None]


class EpochProgressCallback(keras.callbacks.Callback):
    """Times every epoch, counts updates, and reports each epoch's end.

    Args:
        run: the run's label for the events.
        model_name: ``"standard"`` or ``"accumulating"``.
        epochs: epochs this twin trains for.
        epochs_after: epochs still to train after this twin (the other twin's),
            so that the ETA covers the whole run.
        sink: receives an `EpochEnd` per epoch; ``None`` only records.

    After `fit`, ``epoch_seconds`` holds each epoch's wall time and
    ``cumulative_updates`` the optimizer's update count at each epoch's end.
    """

    def __init__(
        self,
        run: str,
        model_name: str,
        epochs: int,
        epochs_after: int = 0,
        sink: ProgressSink | None = None,
    ):
        super().__init__()
        self._run = run
        self._model_name = model_name
        self._epochs = epochs
        self._epochs_after = epochs_after
        self._sink = sink
        self._epoch_start = 0.0
        self.epoch_seconds: list[float] = []
        self.cumulative_updates: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self.epoch_seconds.append(seconds)
        # Read after the accumulating model's own epoch-end flush, which runs
        # before user callbacks, so this epoch's update is counted.
        self.cumulative_updates.append(int(self.model.optimizer.iterations))
        if self._sink is None:
            return
        # The median ignores the first epoch's tracing and compilation.
        typical = statistics.median(self.epoch_seconds)
        remaining = self._epochs - (epoch + 1) + self._epochs_after
        self._sink(
            EpochEnd(
                run=self._run,
                model=self._model_name,
                epoch=epoch + 1,
                epochs=self._epochs,
                seconds=seconds,
                eta_seconds=typical * remaining,
                metrics={key: float(value) for key, value in (logs or {}).items()},
            )
        )


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``'1m15s'``; ``3725`` -> ``'1h02m'``; ``4.26`` -> ``'4.3s'``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, whole_seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{whole_seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


_SHOWN_METRICS = (
    ("loss", "loss"),
    ("accuracy", "acc"),
    ("val_loss", "val_loss"),
    ("val_accuracy", "val_acc"),
)


def format_progress(event: EpochEnd) -> str:
    """One progress line, e.g. ``mnist/seed42/sgd standard epoch 3/200 ...``."""
    width = len(str(event.epochs))
    shown = "  ".join(
        f"{short} {event.metrics[key]:.4f}"
        for key, short in _SHOWN_METRICS
        if key in event.metrics
    )
    return (
        f"{event.run} {event.model:<12} epoch {event.epoch:>{width}}/{event.epochs}"
        f"  {shown}  {event.seconds:.2f}s/epoch"
        f"  ETA {format_duration(event.eta_seconds)}"
    )
