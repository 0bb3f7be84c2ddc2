"""How updates-to-target scale with the batch: the study's central numbers.

Pure functions from run records (`accumulate.paper.study_records`) to the
numbers the report states; nothing here reads files or formats text. The
terms:

* a `Point` is one window's best learning rate (one optimizer, one dataset);
* **scaling efficiency** of a doubling of the batch from B1 to B2:
  log(U1 / U2) / log(B2 / B1), 1 for perfect scaling (updates halve), 0 for
  no gain; the **bend** is the first step whose efficiency is below 0.5;
* **B_crit**: McCandlish et al.'s critical batch, fitted to the best
  updates-to-target S(B) = S_min (1 + B_crit / B) (least squares in log S);
* **B_simple**, the simple noise scale, summarised along the best runs and
  set against the bend and B_crit (`noise_summary`, `noise_comparisons`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from accumulate.paper.study_plan import window_order
from accumulate.paper.study_records import (
    Record,
    best_run,
    closest_run,
    effective_batch,
    interpolated_updates,
    median,
    noise_history,
    peak_accuracy,
    select,
)

__all__ = [
    "EFFICIENCY_BEND",
    "NoiseComparison",
    "NoiseSummary",
    "Point",
    "Scaling",
    "bend",
    "fit_critical_batch",
    "noise_comparisons",
    "noise_summary",
    "points",
    "scaling",
    "scaling_efficiencies",
]

EFFICIENCY_BEND = 0.5
# B_crit this far outside the batches measured is only a rough extrapolation.
_EXTRAPOLATION_FACTOR = 4


@dataclass(frozen=True)
class Point:
    """The best learning rate of one window (one optimizer, one dataset)."""

    window: Any
    batch: float  # effective batch, samples per update
    rates: tuple[float, ...]  # every rate tried
    best: Record | None  # its run, or None if no rate reached the target
    closest: Record  # the run with the highest validation accuracy

    @property
    def reached(self) -> bool:
        return self.best is not None

    @property
    def record(self) -> Record:
        """The best run, or where no rate reached the target, the closest."""
        return self.best or self.closest

    @property
    def rate(self) -> float | None:
        return self.best["spec"]["learning_rate"] if self.best else None

    @property
    def at_edge(self) -> bool:
        return self.best is not None and self.rate in (self.rates[0], self.rates[-1])

    def measure(self, key: str) -> Any:
        """``to_target[key]`` of the best run (epochs, updates, seconds...)."""
        return self.best["to_target"][key] if self.best else None

    def per_epoch(self, key: str) -> float:
        """What one epoch adds to ``key`` (epochs, updates or seconds)."""
        measured = self.measure(key)
        epochs = self.measure("epochs")
        return measured / epochs if measured is not None and epochs else 0.0

    @property
    def interpolated_updates(self) -> float | None:
        return interpolated_updates(self.best) if self.best else None

    @property
    def closest_accuracy(self) -> float:
        return peak_accuracy(self.closest)

    @property
    def budget_epochs(self) -> int:
        return self.closest["spec"]["epochs"]

    @property
    def budget_updates(self) -> int:
        """Updates in the whole epoch budget: a lower bound when not reached."""
        samples = self.closest["data"]["train_samples"]
        return round(self.budget_epochs * samples / self.batch)


def points(records: Sequence[Record], dataset: str, optimizer: str) -> list[Point]:
    """One `Point` per fixed window, in increasing window order."""
    groups: dict[Any, list[Record]] = {}
    for record in select(records, dataset=dataset, optimizer=optimizer, arm="grid"):
        groups.setdefault(record["spec"]["window"], []).append(record)
    return [
        Point(
            window=window,
            batch=float(np.nanmedian([effective_batch(r) for r in groups[window]])),
            rates=tuple(sorted(r["spec"]["learning_rate"] for r in groups[window])),
            best=best_run(groups[window]),
            closest=closest_run(groups[window]),
        )
        for window in sorted(groups, key=window_order)
    ]


# -- Scaling -----------------------------------------------------------------------


def scaling_efficiencies(
    batches: Sequence[float], updates: Sequence[float | None]
) -> list[float | None]:
    """Efficiency of each step between consecutive batches (see module).

    ``None`` where either side did not reach the target.

    Example:
        >>> [round(e, 3) for e in scaling_efficiencies([512, 1024, 2048],
        ...                                           [400, 200, 180])]
        [1.0, 0.152]
    """
    result: list[float | None] = []
    for index in range(len(batches) - 1):
        first, second = updates[index], updates[index + 1]
        if first is None or second is None or first <= 0 or second <= 0:
            result.append(None)
            continue
        ratio = math.log(batches[index + 1] / batches[index])
        result.append(math.log(first / second) / ratio if ratio else None)
    return result


def bend(
    batches: Sequence[float], updates: Sequence[float | None]
) -> tuple[int | None, list[float | None]]:
    """Index of the first step whose efficiency is below 0.5, and all of them.

    A step into a window that did not reach the target counts as a bend too
    (more batch bought nothing within the budget). ``None``: no bend in the
    grid.

    Example:
        >>> bend([512, 1024, 2048, 4096], [400, 200, 100, 90])[0]
        2
    """
    efficiencies = scaling_efficiencies(batches, updates)
    for index, efficiency in enumerate(efficiencies):
        if updates[index] is None:
            continue
        if efficiency is None or efficiency < EFFICIENCY_BEND:
            return index, efficiencies
    return None, efficiencies


def fit_critical_batch(
    batches: Sequence[float], updates: Sequence[float]
) -> tuple[float, float] | None:
    """``(B_crit, S_min)`` of S(B) = S_min (1 + B_crit / B), or ``None``.

    Least squares on log S over a fine log grid of B_crit (S_min then has a
    closed form); needs 3 points. B_crit at the end of the search range
    means the data does not pin it down (returned as is; the report says).

    Example:
        >>> batches = [512.0, 1024.0, 2048.0, 4096.0, 8192.0]
        >>> updates = [300 * (1 + 2000 / b) for b in batches]
        >>> b_crit, s_min = fit_critical_batch(batches, updates)
        >>> round(b_crit, -1), round(s_min)
        (2000.0, 300)
    """
    if len(batches) < 3:
        return None
    batches_array = np.asarray(batches, dtype=float)
    log_updates = np.log(np.asarray(updates, dtype=float))
    candidates = np.geomspace(
        batches_array.min() / 100, batches_array.max() * 100, 4001
    )
    best: tuple[float, float, float] | None = None
    for candidate in candidates:
        shape = np.log1p(candidate / batches_array)
        log_s_min = float(np.mean(log_updates - shape))
        error = float(np.sum((log_updates - shape - log_s_min) ** 2))
        if best is None or error < best[0]:
            best = (error, float(candidate), math.exp(log_s_min))
    assert best is not None
    return best[1], best[2]


@dataclass(frozen=True)
class Scaling:
    """Where doubling the batch stops paying, for one optimizer's windows."""

    series: list[Point]
    reached: list[tuple[float, float]]  # (batch, interpolated updates)
    efficiencies: list[float | None]  # one per step between windows
    bend_index: int | None  # the first step below EFFICIENCY_BEND
    b_crit: float | None
    s_min: float | None

    @property
    def batch_factor(self) -> float:
        """Samples per update, largest window reaching the target over smallest."""
        return self.reached[-1][0] / self.reached[0][0]

    @property
    def update_factor(self) -> float:
        """How many times fewer updates the largest window needed."""
        return self.reached[0][1] / self.reached[-1][1]

    @property
    def bend_step(self) -> tuple[Point, Point] | None:
        """The two windows either side of the bend."""
        if self.bend_index is None:
            return None
        return self.series[self.bend_index], self.series[self.bend_index + 1]

    @property
    def bend_batch(self) -> float | None:
        step = self.bend_step
        return step[0].batch if step else None

    @property
    def efficiencies_before_bend(self) -> list[float]:
        return [e for e in self.efficiencies[: self.bend_index] if e is not None]

    @property
    def b_crit_extrapolated(self) -> bool:
        """B_crit lies well outside the batches that reached the target."""
        lowest, highest = self.reached[0][0], self.reached[-1][0]
        assert self.b_crit is not None
        return not (
            lowest / _EXTRAPOLATION_FACTOR
            <= self.b_crit
            <= highest * _EXTRAPOLATION_FACTOR
        )


def scaling(series: list[Point]) -> Scaling:
    """The bend and B_crit of one optimizer's windows (interpolated counts)."""
    batches = [p.batch for p in series]
    updates = [p.interpolated_updates for p in series]
    index, efficiencies = bend(batches, updates)
    reached = [(p.batch, u) for p, u in zip(series, updates, strict=True) if u]
    fit = fit_critical_batch([b for b, _ in reached], [u for _, u in reached])
    b_crit, s_min = fit if fit is not None else (None, None)
    return Scaling(series, reached, efficiencies, index, b_crit, s_min)


# -- The noise scale -------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSummary:
    """B_simple along the best runs of the windows that measure it."""

    first_epoch: float | None  # median over runs of the first epoch's value
    median: float | None  # median over runs of each run's median to the target
    at_target: float | None  # median over runs of the value at the target epoch
    runs: int

    @property
    def grew(self) -> bool | None:
        """Whether B_simple rose from the first epoch to the target."""
        if self.first_epoch is None or self.at_target is None:
            return None
        return self.at_target > self.first_epoch


def noise_summary(series: Sequence[Point]) -> NoiseSummary:
    """B_simple of each window N >= 2's best (or closest) run, summarised."""
    first, values, last = [], [], []
    runs = 0
    for point in series:
        if point.window == 1:
            continue
        history = noise_history(point.record, until_target=True)
        if not history:
            continue
        runs += 1
        raw = point.record["history"].get("gradient_noise_scale", [])
        if raw and raw[0] is not None and raw[0] > 0:
            first.append(raw[0])
        values.append(float(np.median(history)))
        if point.best is not None:  # only a run that reached it has a target epoch
            last.append(history[-1])
    return NoiseSummary(median(first), median(values), median(last), runs)


@dataclass(frozen=True)
class NoiseComparison:
    """A batch size (the bend or B_crit) set against the measured B_simple."""

    label: str
    value: float
    # "inside", "below" or "above" the range B_simple spans during
    # training; None when that range is not known.
    position: str | None
    factor: float  # the larger of value and median B_simple over the smaller
    # "close" (within 2), "factor" (within 10) or "far".
    closeness: str


def noise_comparisons(
    noise: NoiseSummary, bend_batch: float | None, b_crit: float | None
) -> list[NoiseComparison]:
    """The bend and B_crit against ``noise`` (none without a median B_simple)."""
    if noise.median is None:
        return []
    span = [v for v in (noise.first_epoch, noise.at_target) if v is not None]
    comparisons = []
    for label, value in (("bend", bend_batch), ("fitted B_crit", b_crit)):
        if value is None:
            continue
        position = None
        if len(span) == 2:
            low, high = min(span), max(span)
            position = "inside" if low <= value <= high else None
            position = position or ("below" if value < low else "above")
        factor = max(value, noise.median) / min(value, noise.median)
        closeness = "close" if factor <= 2 else "factor" if factor <= 10 else "far"
        comparisons.append(NoiseComparison(label, value, position, factor, closeness))
    return comparisons
