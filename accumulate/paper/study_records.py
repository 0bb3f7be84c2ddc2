"""Reading the study's run records: when a run reached its target, which run is best.

A record is the JSON `accumulate.paper.study_run.run_one` returns and the
runner writes to ``runs/<dataset>/<optimizer>/<name>.json``. These functions
read one record or a group of them and compute nothing from anything else;
both the runner (to extend a grid) and the analysis use them.

* **updates-to-target** etc.: `to_target`. Validation runs once per epoch, so
  the analysis also uses an *interpolated* count (`crossing`), without which
  two windows that reach the target in the same epoch would show perfect
  scaling by construction;
* **effective batch**: training samples per optimizer update, measured
  (60,000 / updates per epoch), so a window that does not divide the epoch's
  118 micro-batches counts its smaller last window too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "accuracy_after",
    "best_run",
    "closest_run",
    "crossing",
    "edge_extension",
    "effective_batch",
    "interpolated_updates",
    "invocations",
    "load_runs",
    "median",
    "noise_history",
    "peak_accuracy",
    "select",
    "steady_epoch_seconds",
    "to_target",
    "window_schedule",
]

Record = dict[str, Any]


def load_runs(out: str | os.PathLike[str]) -> list[Record]:
    """Every run record under ``<out>/runs``, sorted by path."""
    root = Path(out) / "runs"
    return [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(root.glob("*/*/*.json"))
    ]


def select(records: Iterable[Record], **spec: Any) -> list[Record]:
    """The records whose spec has every given value.

    Example:
        >>> runs = [{"spec": {"arm": "grid", "window": 4}},
        ...         {"spec": {"arm": "paper", "window": 4}}]
        >>> select(runs, arm="paper", window=4) == runs[1:]
        True
    """
    return [r for r in records if all(r["spec"][k] == v for k, v in spec.items())]


# -- To target ---------------------------------------------------------------------


def to_target(
    val_accuracy: Sequence[float],
    cumulative_updates: Sequence[int],
    epoch_seconds: Sequence[float],
    target: float,
) -> Record | None:
    """When a run first reached ``target``; ``None`` if it never did.

    Validation runs after every epoch, so the answer is the first epoch whose
    validation accuracy is at least ``target``, the updates applied by the end
    of that epoch, and the wall time of the epochs up to it. That wall time
    includes the first epoch's tracing and XLA compilation, a one-off cost of
    a few seconds, so ``seconds_excluding_compile`` also gives it with the
    first epoch counted at the run's median epoch time.

    Example:
        >>> to_target([0.5, 0.9, 0.96, 0.97], [10, 20, 30, 40],
        ...           [3.0, 1.0, 1.0, 1.0], 0.95)["updates"]
        30
    """
    if not len(val_accuracy) == len(cumulative_updates) == len(epoch_seconds):
        raise ValueError(
            "val_accuracy, cumulative_updates and epoch_seconds must have one "
            f"entry per epoch; got {len(val_accuracy)}, {len(cumulative_updates)} "
            f"and {len(epoch_seconds)}"
        )
    for index, accuracy in enumerate(val_accuracy):
        if accuracy is not None and accuracy >= target:
            epochs = index + 1
            seconds = float(sum(epoch_seconds[:epochs]))
            typical = median(epoch_seconds[1:])
            excluding = (
                seconds
                if typical is None
                else seconds - epoch_seconds[0] + min(typical, epoch_seconds[0])
            )
            return {
                "epochs": epochs,
                "updates": int(cumulative_updates[index]),
                "seconds": seconds,
                "seconds_excluding_compile": float(excluding),
            }
    return None


def crossing(
    val_accuracy: Sequence[float | None],
    cumulative_updates: Sequence[int],
    target: float,
    initial_accuracy: float = 0.1,
) -> float | None:
    """Updates at which validation accuracy crossed ``target``, interpolated.

    Linear in accuracy between the epoch before the target and the epoch that
    reached it (before the first epoch: ``initial_accuracy``, chance for ten
    classes, at 0 updates). ``None`` if the target was never reached.

    Example:
        >>> round(crossing([0.5, 0.9, 0.97], [100, 200, 300], 0.95), 3)
        271.429
    """
    previous_accuracy, previous_updates = initial_accuracy, 0.0
    for accuracy, updates in zip(val_accuracy, cumulative_updates, strict=True):
        if accuracy is None:
            continue
        if accuracy >= target:
            if accuracy <= previous_accuracy:
                return float(updates)
            fraction = (target - previous_accuracy) / (accuracy - previous_accuracy)
            fraction = min(max(fraction, 0.0), 1.0)
            return previous_updates + fraction * (updates - previous_updates)
        previous_accuracy, previous_updates = accuracy, float(updates)
    return None


def interpolated_updates(record: Record) -> float | None:
    """`crossing` for one run record, from the accuracy before training."""
    history = record["history"]
    return crossing(
        history.get("val_accuracy", []),
        history["cumulative_updates"],
        record["spec"]["target"],
        record.get("initial_val_accuracy") or 0.1,
    )


def best_run(records: Iterable[Record]) -> Record | None:
    """The run reaching the target in the fewest updates.

    Runs reaching it in the same epoch (and so the same count of updates)
    are told apart by where their accuracy crossed the target within that
    epoch (`interpolated_updates`). Among runs that never reach it, none is
    best: ``None``.
    """
    reached = [record for record in records if record.get("to_target")]
    if not reached:
        return None
    return min(
        reached,
        key=lambda record: (
            record["to_target"]["updates"],
            interpolated_updates(record),
        ),
    )


def closest_run(records: Sequence[Record]) -> Record:
    """The run that came closest to the target: best validation accuracy."""

    def peak(record: Record) -> float:
        accuracy = peak_accuracy(record)
        return accuracy if math.isfinite(accuracy) else -math.inf

    return max(records, key=peak)


def edge_extension(
    records: Sequence[Record], extensions_done: int, max_extensions: int = 1
) -> float | None:
    """A rate to add beyond the grid's edge when its best rate lies there.

    The best rate is the fewest updates to target or, where no rate reached
    it, the highest validation accuracy. Returns ``None`` when the best is
    inside the grid or ``max_extensions`` were already made. A diverged run
    at the top of the grid means the grid's top is already too large.
    """
    if extensions_done >= max_extensions or len(records) < 2:
        return None
    rates = sorted(record["spec"]["learning_rate"] for record in records)
    best = best_run(records) or closest_run(records)
    rate = best["spec"]["learning_rate"]
    if rate == rates[-1]:
        return rate * 2
    if rate == rates[0]:
        return rate / 2
    return None


# -- One record ------------------------------------------------------------------------


def peak_accuracy(record: Record) -> float:
    """The best validation accuracy of a run (NaN if it has none)."""
    values = [v for v in record["history"].get("val_accuracy", []) if v is not None]
    return max(values, default=math.nan)


def effective_batch(record: Record) -> float:
    """Training samples per update, measured over the run's epochs."""
    updates = record["history"]["cumulative_updates"]
    epochs = len(updates)
    if not epochs or not updates[-1]:
        return math.nan
    return record["data"]["train_samples"] * epochs / updates[-1]


def steady_epoch_seconds(record: Record) -> list[float]:
    """Epoch times without the first two epochs where the run has more.

    The first epoch traces and compiles; the second often still pays for
    one-off work (up to seconds), which would dominate runs that stop early.
    """
    seconds = record["history"]["epoch_seconds"]
    return seconds[2:] if len(seconds) > 3 else seconds[1:]


def accuracy_after(record: Record, updates: int) -> tuple[float, int] | None:
    """Best validation accuracy (and its epoch) within ``updates`` updates."""
    history = record["history"]
    result = None
    for epoch, (count, accuracy) in enumerate(
        zip(history["cumulative_updates"], history["val_accuracy"], strict=True),
        start=1,
    ):
        if count > updates:
            break
        if accuracy is not None and (result is None or accuracy > result[0]):
            result = (accuracy, epoch)
    return result


def window_schedule(record: Record) -> list[tuple[Any, int]]:
    """The windows a run used, run-length encoded: ``[(2, 1), (4, 3)]``."""
    schedule: list[tuple[Any, int]] = []
    for window in record["history"].get("accumulation_steps", []):
        if schedule and schedule[-1][0] == window:
            schedule[-1] = (window, schedule[-1][1] + 1)
        else:
            schedule.append((window, 1))
    return schedule


def noise_history(record: Record, until_target: bool) -> list[float]:
    """The run's positive B_simple per epoch, up to its target epoch if asked."""
    history = record["history"]
    values = history.get("gradient_noise_scale", [])
    if until_target and record.get("to_target"):
        values = values[: record["to_target"]["epochs"]]
    return [v for v in values if v is not None and v > 0]


def median(values: Sequence[float]) -> float | None:
    """The median, or ``None`` of nothing."""
    return float(np.median(values)) if len(values) else None


def invocations(summary: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The invocations that wrote a study's ``study.json``, and their seconds.

    A study cut by ``--max-minutes`` and continued lists one invocation per
    command; an older ``study.json`` without the list is one invocation.
    """
    listed = summary.get("invocations") or [summary]
    return listed, sum(invocation["wall_seconds"] for invocation in listed)
