"""The numbers behind the report's answers, one dataset at a time.

`analyse` gathers, for one dataset, everything the report's questions need:
is one step per epoch ever better (`OneStepPerEpoch`), what the adaptive arm
buys (`AdaptiveArm`), whether momentum changes the picture
(`MomentumEffect`), and what an epoch costs per window (`EpochCost`), on top
of the scaling analysis of `accumulate.paper.study_analysis`. Every verdict
is decided here, as a word the text looks up; nothing here formats text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from accumulate.paper.study_analysis import (
    NoiseComparison,
    NoiseSummary,
    Point,
    Scaling,
    noise_comparisons,
    noise_summary,
    points,
    scaling,
)
from accumulate.paper.study_plan import ADAPTIVE, EPOCH, window_order
from accumulate.paper.study_records import (
    Record,
    accuracy_after,
    best_run,
    closest_run,
    peak_accuracy,
    select,
    steady_epoch_seconds,
    window_schedule,
)

__all__ = [
    "AdaptiveArm",
    "DatasetAnswers",
    "EpochCost",
    "EpochTimes",
    "MomentumEffect",
    "OneStepPerEpoch",
    "analyse",
    "epoch_times",
]

# Windows whose epochs differ in cost by less than this ratio cost the same.
_UNIFORM_EPOCH_COST = 1.25
_KEYS = ("epochs", "updates", "seconds_excluding_compile")


def fewest(series: Sequence[Point], key: str) -> Point | None:
    """The window that reached the target with the least ``key``."""
    return min(
        (p for p in series if p.reached), key=lambda p: p.measure(key), default=None
    )


# -- Is one step per epoch ever better? ----------------------------------------


@dataclass(frozen=True)
class Contest:
    """One update per epoch against the best other window, on one count."""

    key: str  # "epochs", "updates" or "seconds_excluding_compile"
    mine: float
    theirs: float
    rival: Point
    resolution: float  # what one epoch adds to the count, for either run
    verdict: str  # "level" (within one epoch), "better" or "worse"


@dataclass(frozen=True)
class EqualUpdates:
    """Accuracies after as many updates as one update per epoch made."""

    updates: int
    own: float  # one update per epoch's best accuracy
    accuracy: float  # the best other window's best within as many updates
    epoch: int  # the epoch at which that window had it
    rival: Point
    two_errors: float  # two binomial standard errors of a test-set accuracy
    verdict: str  # "level", "ahead" or "behind"


@dataclass(frozen=True)
class OneStepPerEpoch:
    """One update per epoch against the windows that reached the target."""

    full: Point
    others: list[Point]  # the other windows that reached the target
    epochs: int  # the budget
    fewest_epochs: Point | None  # of ``others``
    fewest_updates: Point | None
    # Another window reached the target within the updates the budget gave
    # one update per epoch.
    fewer_updates_elsewhere: bool
    contests: list[Contest]  # where both reached the target
    equal_updates: EqualUpdates | None  # where the target cannot decide
    paper: Record | None  # one update per epoch at the paper's rate
    paper_accuracy: float | None
    paper_epochs: int | None  # epochs it ran
    standard: Record | None  # the standard twin at the paper's rate
    standard_accuracy: float | None


def one_step_per_epoch(
    series: list[Point],
    paper: Record | None,
    standard: Record | None,
    epochs: int,
) -> OneStepPerEpoch | None:
    """``None`` when the grid has no one-step-per-epoch window."""
    full = next((p for p in series if p.window == EPOCH), None)
    if full is None:
        return None
    others = [p for p in series if p.window != EPOCH and p.reached]
    contests = []
    if full.reached:
        for key in _KEYS if others else ():
            rival = fewest(others, key)
            mine, theirs = full.measure(key), rival.measure(key)
            # Counts are only known to one epoch (validation runs once per
            # epoch): a difference within one epoch of either run is a tie.
            resolution = max(full.per_epoch(key), rival.per_epoch(key))
            verdict = (
                "level"
                if abs(mine - theirs) <= resolution
                else "better"
                if mine < theirs
                else "worse"
            )
            contests.append(Contest(key, mine, theirs, rival, resolution, verdict))
    fewest_updates = fewest(others, "updates")
    fewer_elsewhere = fewest_updates is not None and (
        fewest_updates.measure("updates") <= full.budget_updates
    )
    # Where the others reached the target only after more updates than the
    # budget gave one update per epoch, the target cannot decide per update.
    undecided = not full.reached and fewest_updates is not None and not fewer_elsewhere
    return OneStepPerEpoch(
        full=full,
        others=others,
        epochs=epochs,
        fewest_epochs=fewest(others, "epochs"),
        fewest_updates=fewest_updates,
        fewer_updates_elsewhere=fewer_elsewhere,
        contests=contests,
        equal_updates=_at_equal_updates(full, series) if undecided else None,
        paper=paper,
        paper_accuracy=peak_accuracy(paper) if paper else None,
        paper_epochs=len(paper["history"]["epoch_seconds"]) if paper else None,
        standard=standard,
        standard_accuracy=peak_accuracy(standard) if standard else None,
    )


def _at_equal_updates(full: Point, series: list[Point]) -> EqualUpdates | None:
    record = full.closest
    updates = record["history"]["cumulative_updates"][-1]
    own = peak_accuracy(record)
    rivals = []
    for point in series:
        if point.window == EPOCH:
            continue
        after = accuracy_after(point.record, updates)
        if after is not None:
            rivals.append((after[0], after[1], point))
    if not rivals:
        return None
    accuracy, epoch, rival = max(rivals, key=lambda item: item[0])
    # An accuracy measured on n test images has a binomial standard error of
    # sqrt(p (1 - p) / n): differences within two of them are not resolved.
    test_samples = record["data"].get("test_samples") or 10_000
    two_errors = 2 * math.sqrt(own * (1 - own) / test_samples)
    if abs(own - accuracy) <= two_errors:
        verdict = "level"
    else:
        verdict = "ahead" if own > accuracy else "behind"
    return EqualUpdates(updates, own, accuracy, epoch, rival, two_errors, verdict)


# -- What the adaptive arm buys --------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveArm:
    """The adaptive arm of one optimizer against the fixed windows."""

    optimizer: str
    runs: list[tuple[Record, float]]  # every rate's run and its best accuracy
    best: Record | None  # the run reaching the target in the fewest updates
    closest: Record | None  # the best run or, if none reached it, the closest
    closest_accuracy: float | None
    schedule: list[tuple[Any, int]]  # the windows ``closest`` used, run-length
    dominating: list[Point]  # fixed windows as good on updates and epochs
    fewest_epochs: Point | None  # the fixed window with the fewest epochs
    # The window it kept throughout, when it never changed, and the largest
    # B_simple it measured.
    constant_window: str | None
    peak_noise: float | None


def adaptive_arm(
    records: Sequence[Record], dataset: str, optimizer: str, series: list[Point]
) -> AdaptiveArm:
    tried = select(records, dataset=dataset, optimizer=optimizer, arm=ADAPTIVE)
    best = best_run(tried)
    closest = best or (closest_run(tried) if tried else None)
    dominating, constant_window, peak_noise = [], None, None
    if best is not None:
        updates, epochs = best["to_target"]["updates"], best["to_target"]["epochs"]
        dominating = [
            p
            for p in series
            if p.reached
            and p.measure("updates") <= updates
            and p.measure("epochs") <= epochs
        ]
        windows = set(map(str, best["history"].get("accumulation_steps", [])))
        if len(windows) == 1:
            (constant_window,) = windows
            noise = [v for v in best["history"].get("gradient_noise_scale", []) if v]
            peak_noise = max(noise) if noise else None
    return AdaptiveArm(
        optimizer=optimizer,
        runs=[
            (r, peak_accuracy(r))
            for r in sorted(tried, key=lambda r: r["spec"]["learning_rate"])
        ],
        best=best,
        closest=closest,
        closest_accuracy=peak_accuracy(closest) if closest else None,
        schedule=window_schedule(closest) if closest else [],
        dominating=dominating,
        fewest_epochs=fewest(series, "epochs"),
        constant_window=constant_window,
        peak_noise=peak_noise,
    )


# -- Does momentum change the picture? ------------------------------------------------


@dataclass(frozen=True)
class MomentumEffect:
    """Momentum's updates-to-target against plain SGD's, window by window."""

    ratios: list[tuple[Any, float]]  # (window, momentum / SGD interpolated)
    median_ratio: float | None
    only_momentum: list[Any]  # windows only momentum brought to the target
    sgd: Scaling | None
    momentum: Scaling | None


def momentum_effect(
    series: dict[str, list[Point]], scalings: dict[str, Scaling]
) -> MomentumEffect | None:
    """``None`` when the study has no momentum runs."""
    momentum = series.get("momentum", [])
    if not momentum:
        return None
    by_window = {p.window: p for p in series.get("sgd", [])}
    ratios = [
        (p.window, p.interpolated_updates / by_window[p.window].interpolated_updates)
        for p in momentum
        if p.window in by_window and by_window[p.window].reached and p.reached
    ]
    only_momentum = [
        p.window
        for p in momentum
        if p.reached and not (p.window in by_window and by_window[p.window].reached)
    ]
    return MomentumEffect(
        ratios=ratios,
        median_ratio=float(np.median([r for _, r in ratios])) if ratios else None,
        only_momentum=only_momentum,
        sgd=scalings.get("sgd"),
        momentum=scalings.get("momentum"),
    )


# -- What an epoch costs ---------------------------------------------------------------


@dataclass(frozen=True)
class WindowTimes:
    """Steady epoch times pooled over every run of one window."""

    window: str
    epochs: int
    median: float
    low: float  # 10th percentile
    high: float  # 90th percentile


@dataclass(frozen=True)
class EpochTimes:
    windows: list[WindowTimes]
    first_epoch: float | None  # median over runs of the first epoch
    first_epoch_runs: int


def epoch_times(records: Sequence[Record]) -> EpochTimes:
    """Epoch wall times per window over every run (see `steady_epoch_seconds`)."""
    by_window: dict[str, list[float]] = {}
    first: list[float] = []
    for record in records:
        spec = record["spec"]
        window = ADAPTIVE if spec["arm"] == ADAPTIVE else str(spec["window"])
        by_window.setdefault(window, []).extend(steady_epoch_seconds(record))
        if record["history"]["epoch_seconds"]:
            first.append(record["history"]["epoch_seconds"][0])
    windows = []
    for window in sorted(by_window, key=window_order):
        values = by_window[window]
        if values:
            low, high = np.percentile(values, [10, 90])
            windows.append(
                WindowTimes(window, len(values), float(np.median(values)), low, high)
            )
    return EpochTimes(windows, float(np.median(first)) if first else None, len(first))


@dataclass(frozen=True)
class EpochCost:
    """The cheapest and the dearest window per epoch, on one dataset's grid."""

    cheapest: Any
    cheapest_seconds: float
    dearest: Any
    dearest_seconds: float

    @property
    def ratio(self) -> float:
        return self.dearest_seconds / self.cheapest_seconds

    @property
    def uniform(self) -> bool:
        """An epoch costs about the same whatever the window."""
        return self.ratio < _UNIFORM_EPOCH_COST


def epoch_cost(records: Sequence[Record], dataset: str) -> EpochCost | None:
    """``None`` with fewer than two windows timed."""
    by_window: dict[Any, list[float]] = {}
    for record in select(records, dataset=dataset, arm="grid"):
        by_window.setdefault(record["spec"]["window"], []).extend(
            steady_epoch_seconds(record)
        )
    medians = {w: float(np.median(v)) for w, v in by_window.items() if v}
    if len(medians) < 2:
        return None
    cheapest = min(medians, key=medians.get)
    dearest = max(medians, key=medians.get)
    return EpochCost(cheapest, medians[cheapest], dearest, medians[dearest])


# -- One dataset -------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetAnswers:
    """Everything the report says about one dataset."""

    dataset: str
    series: dict[str, list[Point]]  # per optimizer, its windows' best rates
    main: str  # the optimizer the per-epoch answer and noise figure use
    scalings: dict[str, Scaling]
    noise: dict[str, NoiseSummary]
    noise_comparisons: dict[str, list[NoiseComparison]]
    adaptive: dict[str, AdaptiveArm]
    one_step: dict[str, OneStepPerEpoch | None]
    momentum: MomentumEffect | None
    epoch_cost: EpochCost | None
    fewest_epochs: Point | None  # with the main optimizer
    paper: Record | None  # one update per epoch at the paper's rate
    standard_paper: Record | None  # the standard twin at the paper's rate

    def tuned_full_batch(self, optimizer: str) -> Record | None:
        """One update per epoch at its best rate (or closest run)."""
        full = [p for p in self.series.get(optimizer, []) if p.window == EPOCH]
        return full[0].record if full else None


def analyse(
    records: Sequence[Record], dataset: str, optimizers: Sequence[str], epochs: int
) -> DatasetAnswers | None:
    """The answers for ``dataset``; ``None`` where no grid run trained on it."""
    series = {o: s for o in optimizers if (s := points(records, dataset, o))}
    if not series:
        return None
    main = "sgd" if "sgd" in series else next(iter(series))
    paper = next(
        iter(select(records, dataset=dataset, arm="paper", window=EPOCH)), None
    )
    standard = next(iter(select(records, dataset=dataset, arm="paper", window=1)), None)
    scalings = {o: scaling(s) for o, s in series.items()}
    noise = {o: noise_summary(s) for o, s in series.items()}
    return DatasetAnswers(
        dataset=dataset,
        series=series,
        main=main,
        scalings=scalings,
        noise=noise,
        noise_comparisons={
            o: noise_comparisons(noise[o], scalings[o].bend_batch, scalings[o].b_crit)
            for o in series
        },
        adaptive={o: adaptive_arm(records, dataset, o, s) for o, s in series.items()},
        one_step={
            o: one_step_per_epoch(
                s,
                paper if o == "sgd" else None,
                standard if o == "sgd" else None,
                epochs,
            )
            for o, s in series.items()
        },
        momentum=momentum_effect(series, scalings),
        epoch_cost=epoch_cost(records, dataset),
        fewest_epochs=fewest(series[main], "epochs"),
        paper=paper,
        standard_paper=standard,
    )
