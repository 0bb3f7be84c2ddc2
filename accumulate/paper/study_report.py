"""The study's analysis, figures and ``report.md``, from its run files.

Everything the report says is computed here from the JSON that
`accumulate.paper.study` wrote; no number is typed in by hand. The terms:

* **effective batch** of a window: training samples per optimizer update,
  measured (60,000 / updates per epoch), so a window that does not divide
  the epoch's 118 micro-batches counts its smaller last window too;
* **updates-to-target** etc.: see `accumulate.paper.study.to_target`. Since
  validation runs once per epoch, the scaling analysis also uses an
  *interpolated* count (`accumulate.paper.study.crossing`), without which
  two windows that reach the target in the same epoch would show perfect
  scaling by construction;
* **scaling efficiency** of a doubling of the batch from B1 to B2:
  log(U1 / U2) / log(B2 / B1), 1 for perfect scaling (updates halve), 0 for
  no gain; the **bend** is the first step whose efficiency is below 0.5;
* **B_crit**: McCandlish et al.'s critical batch, fitted to the best
  updates-to-target S(B) = S_min (1 + B_crit / B) (least squares in log S).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from accumulate.paper.study import (
    ADAPTIVE,
    DATASET_TITLES,
    EPOCH,
    PAPER_LEARNING_RATE,
    best_run,
    interpolated_updates,
)

__all__ = [
    "Point",
    "bend",
    "build_study_report",
    "fit_critical_batch",
    "load_runs",
    "scaling_efficiencies",
]

_EFFICIENCY_BEND = 0.5
_OPTIMIZER_TITLES = {"sgd": "SGD", "momentum": "SGD + momentum 0.9"}
_COLOURS = {"sgd": "tab:blue", "momentum": "tab:orange", ADAPTIVE: "tab:green"}


# -- Loading -------------------------------------------------------------------


def load_runs(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every run record under ``<out>/runs``, sorted by path."""
    root = Path(out) / "runs"
    return [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(root.glob("*/*/*.json"))
    ]


def _window_key(window: Any) -> float:
    return math.inf if window == EPOCH else float(window)


def _effective_batch(record: dict[str, Any]) -> float:
    """Training samples per update, measured over the run's epochs."""
    updates = record["history"]["cumulative_updates"]
    epochs = len(updates)
    if not epochs or not updates[-1]:
        return math.nan
    return record["data"]["train_samples"] * epochs / updates[-1]


# -- The analysis --------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """The best learning rate of one window (one optimizer, one dataset)."""

    window: Any
    batch: float  # effective batch, samples per update
    rates: tuple[float, ...]  # every rate tried
    best: dict[str, Any] | None  # its run, or None if no rate reached the target
    closest: dict[str, Any]  # the run with the highest validation accuracy

    @property
    def reached(self) -> bool:
        return self.best is not None

    @property
    def rate(self) -> float | None:
        return self.best["spec"]["learning_rate"] if self.best else None

    @property
    def at_edge(self) -> bool:
        return self.best is not None and self.rate in (self.rates[0], self.rates[-1])

    def measure(self, key: str) -> float | None:
        return self.best["to_target"][key] if self.best else None

    @property
    def interpolated_updates(self) -> float | None:
        return interpolated_updates(self.best) if self.best else None

    @property
    def budget_updates(self) -> int:
        """Updates in the whole epoch budget: a lower bound when not reached."""
        spec, data = self.closest["spec"], self.closest["data"]
        return round(spec["epochs"] * data["train_samples"] / self.batch)


def _peak_accuracy(record: dict[str, Any]) -> float:
    values = [v for v in record["history"].get("val_accuracy", []) if v is not None]
    return max(values, default=math.nan)


def points(
    records: Sequence[dict[str, Any]], dataset: str, optimizer: str
) -> list[Point]:
    """One `Point` per fixed window, in increasing window order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        spec = record["spec"]
        if (
            spec["dataset"] == dataset
            and spec["optimizer"] == optimizer
            and spec["arm"] == "grid"
        ):
            groups.setdefault(spec["window"], []).append(record)
    result = []
    for window in sorted(groups, key=_window_key):
        runs = groups[window]
        result.append(
            Point(
                window=window,
                batch=float(np.nanmedian([_effective_batch(r) for r in runs])),
                rates=tuple(sorted(r["spec"]["learning_rate"] for r in runs)),
                best=best_run(runs),
                closest=max(runs, key=_peak_accuracy),
            )
        )
    return result


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
        if efficiency is None or efficiency < _EFFICIENCY_BEND:
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


def _noise_history(record: dict[str, Any], until_target: bool) -> list[float]:
    history = record["history"]
    values = history.get("gradient_noise_scale", [])
    if until_target and record.get("to_target"):
        values = values[: record["to_target"]["epochs"]]
    return [v for v in values if v is not None and v > 0]


@dataclass(frozen=True)
class NoiseSummary:
    """B_simple along the best runs of the windows that measure it."""

    first_epoch: float | None  # median over runs of the first epoch's value
    median: float | None  # median over runs of each run's median to the target
    at_target: float | None  # median over runs of the value at the target epoch
    runs: int


def noise_summary(series: Sequence[Point]) -> NoiseSummary:
    first, values, last = [], [], []
    runs = 0
    for point in series:
        # The best run, or where no rate reached the target, the closest one.
        record = point.best or point.closest
        if point.window == 1:
            continue
        history = _noise_history(record, until_target=True)
        if not history:
            continue
        runs += 1
        raw = record["history"].get("gradient_noise_scale", [])
        if raw and raw[0] is not None and raw[0] > 0:
            first.append(raw[0])
        values.append(float(np.median(history)))
        if point.best is not None:  # only a run that reached it has a target epoch
            last.append(history[-1])

    def median(items: list[float]) -> float | None:
        return float(np.median(items)) if items else None

    return NoiseSummary(median(first), median(values), median(last), runs)


# -- Figures ---------------------------------------------------------------------------


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _window_label(window: Any) -> str:
    return "N=epoch" if window == EPOCH else f"N={window}"


def _settings_line(summary: dict[str, Any], dataset: str) -> str:
    settings = summary["settings"]
    return (
        f"{DATASET_TITLES.get(dataset, dataset)}, MLP 784-128-64-32-10 tanh, "
        f"micro-batch 512, target val acc {settings['targets'][dataset]}, "
        f"budget {settings['epochs']} epochs, seed {settings['seed']}"
    )


def plot_to_target(
    series: dict[str, list[Point]],
    adaptive: dict[str, dict[str, Any] | None],
    key: str,
    path: Path,
    title: str,
) -> Path:
    """Updates- or epochs-to-target against effective batch, log-log.

    Filled markers: the best rate reached the target; open triangles at the
    top: no rate did within the budget (a lower bound). The dotted line is
    perfect scaling from the smallest batch: updates halve as the batch
    doubles (for epochs: stay flat).
    """
    figure = Figure(figsize=(8, 5.5))
    axis = figure.subplots()
    for optimizer, group in series.items():
        colour = _COLOURS.get(optimizer, "tab:grey")
        xs = [p.batch for p in group if p.reached]
        ys = [p.measure(key) for p in group if p.reached]
        axis.plot(
            xs, ys, marker="o", color=colour, label=_OPTIMIZER_TITLES.get(optimizer)
        )
        for point in group:
            if point.reached:
                axis.annotate(
                    f"{_window_label(point.window)}\nlr {point.rate:g}",
                    (point.batch, point.measure(key)),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                    color=colour,
                )
            else:
                bound = (
                    point.budget_updates
                    if key == "updates"
                    else point.closest["spec"]["epochs"]
                )
                axis.plot(
                    point.batch,
                    bound,
                    marker="^",
                    markerfacecolor="none",
                    color=colour,
                    linestyle="none",
                )
                # Right-aligned and staggered: the last windows sit close.
                stagger = -10 - 9 * (group.index(point) % 2)
                axis.annotate(
                    f"{_window_label(point.window)}: not reached",
                    (point.batch, bound),
                    textcoords="offset points",
                    xytext=(-4, stagger),
                    ha="right",
                    fontsize="x-small",
                    color=colour,
                )
        if xs:
            base_x, base_y = xs[0], ys[0]
            line_x = np.geomspace(base_x, max(p.batch for p in group), 50)
            line_y = (
                base_y * base_x / line_x if key == "updates" else 0 * line_x + base_y
            )
            axis.plot(
                line_x,
                line_y,
                linestyle=":",
                color=colour,
                linewidth=1,
                label=f"perfect scaling ({_OPTIMIZER_TITLES.get(optimizer)})",
            )
        record = adaptive.get(optimizer)
        if record and record.get("to_target"):
            axis.plot(
                _effective_batch(record),
                record["to_target"][key],
                marker="*",
                markersize=12,
                color=colour,
                linestyle="none",
                label=f"adaptive N ({_OPTIMIZER_TITLES.get(optimizer)}), "
                "at its mean batch",
            )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("Effective batch size (samples per update, log)")
    axis.set_ylabel(
        "Updates to target (log)" if key == "updates" else "Epochs to target (log)"
    )
    axis.set_title(title, fontsize="medium")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small")
    return _save(figure, path)


def plot_noise_scale(
    series: list[Point],
    adaptive: dict[str, Any] | None,
    path: Path,
    title: str,
) -> Path:
    """B_simple per epoch along the best run of every window that measures it."""
    figure = Figure(figsize=(9, 5.5))
    axis = figure.subplots()
    colours = iter(
        [
            "tab:blue",
            "tab:orange",
            "tab:red",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:olive",
            "tab:cyan",
        ]
    )
    for point in series:
        record = point.best or point.closest
        values = record["history"].get("gradient_noise_scale")
        if point.window == 1 or not values:
            continue
        colour = next(colours, "tab:grey")
        epochs = np.arange(1, len(values) + 1)
        ys = np.array([math.nan if v is None or v <= 0 else v for v in values])
        axis.plot(
            epochs,
            ys,
            marker=".",
            color=colour,
            label=f"{_window_label(point.window)}, lr "
            f"{record['spec']['learning_rate']:g}"
            + ("" if point.best else " (target not reached)"),
        )
        axis.axhline(point.batch, color=colour, linestyle="--", linewidth=0.8)
    if adaptive is not None:
        values = adaptive["history"].get("gradient_noise_scale", [])
        ys = np.array([math.nan if v is None or v <= 0 else v for v in values])
        axis.plot(
            np.arange(1, len(ys) + 1),
            ys,
            color="tab:green",
            linewidth=2,
            label=f"adaptive N, lr {adaptive['spec']['learning_rate']:g}",
        )
    smallest = series[0].batch if series else 512
    axis.axhline(
        smallest,
        color="black",
        linestyle="--",
        linewidth=0.8,
        label="dashed: effective batch of each window (same colour)",
    )
    axis.set_yscale("log")
    axis.set_xlabel("Epoch")
    axis.set_ylabel("B_simple = tr(Σ) / |G|² (samples, log)")
    axis.set_title(title, fontsize="medium")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="x-small", ncol=2)
    return _save(figure, path)


def plot_paper_twin(
    tuned: dict[str, Any] | None,
    paper: dict[str, Any] | None,
    standard: dict[str, Any] | None,
    path: Path,
    title: str,
    target: float,
    tuned_momentum: dict[str, Any] | None = None,
) -> Path:
    """The one-step-per-epoch twin at its tuned rate and at the paper's 0.01.

    ``tuned`` is plain SGD, the paper's optimizer; ``tuned_momentum``, if
    given, the same window tuned with momentum 0.9.
    """
    figure = Figure(figsize=(8, 5.5))
    axis = figure.subplots()
    for record, colour, label in (
        (tuned, "tab:red", "N=epoch, SGD, tuned lr {lr:g}"),
        (tuned_momentum, "tab:orange", "N=epoch, momentum 0.9, tuned lr {lr:g}"),
        (paper, "tab:grey", "N=epoch, paper's lr {lr:g}"),
        (standard, "tab:blue", "N=1 (standard twin), paper's lr {lr:g}"),
    ):
        if record is None:
            continue
        values = record["history"]["val_accuracy"]
        axis.plot(
            np.arange(1, len(values) + 1),
            [math.nan if v is None else v for v in values],
            color=colour,
            label=label.format(lr=record["spec"]["learning_rate"]),
        )
    axis.axhline(target, color="black", linestyle=":", linewidth=1, label="target")
    axis.set_xlabel("Epoch")
    axis.set_ylabel("Validation accuracy")
    axis.set_title(title, fontsize="medium")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, path)


# -- The report ------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for prose: ``—`` for missing, else ``digits`` significant."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _adaptive_best(
    records: Sequence[dict[str, Any]], dataset: str, optimizer: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    runs = [
        r
        for r in records
        if r["spec"]["dataset"] == dataset
        and r["spec"]["optimizer"] == optimizer
        and r["spec"]["arm"] == ADAPTIVE
    ]
    return best_run(runs), runs


def _paper_run(
    records: Sequence[dict[str, Any]], dataset: str, window: Any
) -> dict[str, Any] | None:
    for record in records:
        spec = record["spec"]
        if (
            spec["dataset"] == dataset
            and spec["arm"] == "paper"
            and spec["window"] == window
        ):
            return record
    return None


def _schedule(record: dict[str, Any]) -> str:
    """The windows an adaptive run used, run-length encoded: ``2 (x1), 4 (x3)``."""
    windows = record["history"].get("accumulation_steps", [])
    parts: list[str] = []
    previous, count = None, 0
    for window in [*windows, None]:
        if window == previous:
            count += 1
            continue
        if previous is not None:
            parts.append(f"{previous} (x{count})")
        previous, count = window, 1
    return ", ".join(parts) or "—"


def _steady_epoch_seconds(record: dict[str, Any]) -> list[float]:
    """Epoch times without the first two epochs where the run has more.

    The first epoch traces and compiles; the second often still pays for
    one-off work (up to seconds), which would dominate runs that stop early.
    """
    seconds = record["history"]["epoch_seconds"]
    return seconds[2:] if len(seconds) > 3 else seconds[1:]


def _median_epoch_seconds(record: dict[str, Any]) -> float | None:
    seconds = _steady_epoch_seconds(record)
    return float(np.median(seconds)) if seconds else None


def _timing_section(records: Sequence[dict[str, Any]]) -> list[str]:
    by_window: dict[str, list[float]] = {}
    first: list[float] = []
    for record in records:
        window = (
            "adaptive"
            if record["spec"]["arm"] == ADAPTIVE
            else str(record["spec"]["window"])
        )
        by_window.setdefault(window, []).extend(_steady_epoch_seconds(record))
        if record["history"]["epoch_seconds"]:
            first.append(record["history"]["epoch_seconds"][0])
    lines = [
        "## Time per epoch",
        "",
        "Epoch wall time (training and validation) pooled over every run of a "
        "window, without each run's first two epochs (tracing, compilation and "
        "other one-off work), one TensorFlow thread per run:",
        "",
        "| window | epochs | seconds per epoch (median) | 10th-90th percentile |",
        "|---|---|---|---|",
    ]
    order = sorted(by_window, key=_window_key_text)
    for window in order:
        values = by_window[window]
        if not values:
            continue
        low, high = np.percentile(values, [10, 90])
        lines.append(
            f"| {window} | {len(values)} | {np.median(values):.3f} | "
            f"{low:.3f}-{high:.3f} |"
        )
    if first:
        lines += [
            "",
            f"The first epoch, which includes tracing and XLA compilation, took "
            f"{np.median(first):.2f} s (median over {len(first)} runs). "
            "Seconds-to-target below count it at the run's median epoch time "
            "(`seconds_excluding_compile` in the JSON; the raw sum is there too).",
        ]
    return [*lines, ""]


def _epoch_cost_text(records: Sequence[dict[str, Any]], dataset: str) -> str:
    """Whether an epoch costs the same whatever the window: seconds vs epochs."""
    by_window: dict[Any, list[float]] = {}
    for record in records:
        spec = record["spec"]
        if spec["dataset"] == dataset and spec["arm"] == "grid":
            by_window.setdefault(spec["window"], []).extend(
                _steady_epoch_seconds(record)
            )
    by_window = {w: v for w, v in by_window.items() if v}
    medians = {w: float(np.median(v)) for w, v in by_window.items()}
    if len(medians) < 2:
        return ""
    cheapest = min(medians, key=medians.get)
    dearest = max(medians, key=medians.get)
    ratio = medians[dearest] / medians[cheapest]
    text = (
        f"The median epoch time per window ranges from {medians[cheapest]:.2f} s "
        f"({_window_label(cheapest)}) to {medians[dearest]:.2f} s "
        f"({_window_label(dearest)}), a ratio of {ratio:.2f}"
    )
    if ratio < 1.25:
        return (
            text + ": on one device an epoch costs about the same for every "
            "window, so seconds-to-target follow epochs-to-target, and fewer "
            "updates only pay where an update, not a sample, is the cost "
            "(communication between devices, or memory for a batch)."
        )
    return text + ": the windows differ in cost per epoch on this machine."


def _window_key_text(window: str) -> float:
    if window == ADAPTIVE:
        return math.inf
    return 1e9 if window == EPOCH else float(window)


def _table(series: list[Point], efficiencies: list[float | None]) -> list[str]:
    lines = [
        "| window | effective batch | rates tried | best rate | updates | "
        "updates (interpolated) | epochs | seconds | efficiency to next window |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index, point in enumerate(series):
        efficiency = efficiencies[index] if index < len(efficiencies) else None
        rates = ", ".join(f"{rate:g}" for rate in point.rates)
        if point.reached:
            edge = " (grid edge)" if point.at_edge else ""
            lines.append(
                f"| {_window_label(point.window)} | {point.batch:,.0f} | {rates} | "
                f"{point.rate:g}{edge} | {point.measure('updates'):,} | "
                f"{_fmt(point.interpolated_updates)} | {point.measure('epochs')} | "
                f"{point.measure('seconds_excluding_compile'):.1f} | "
                f"{_fmt(efficiency, 2)} |"
            )
        else:
            lines.append(
                f"| {_window_label(point.window)} | {point.batch:,.0f} | {rates} | "
                f"not reached (best val acc {_peak_accuracy(point.closest):.4f} at "
                f"lr {point.closest['spec']['learning_rate']:g}) | "
                f"> {point.budget_updates:,} | — | > {point.closest['spec']['epochs']} "
                "| — | — |"
            )
    return lines


def _where_it_stops(series: list[Point], optimizer: str) -> tuple[list[str], dict]:
    """The bend and B_crit for one optimizer; the sentences and the numbers."""
    batches = [p.batch for p in series]
    updates = [p.interpolated_updates for p in series]
    index, efficiencies = bend(batches, updates)
    reached = [(p.batch, u) for p, u in zip(series, updates, strict=True) if u]
    fit = fit_critical_batch([b for b, _ in reached], [u for _, u in reached])
    name = _OPTIMIZER_TITLES.get(optimizer, optimizer)
    text: list[str] = [f"*{name}:*"]
    if len(reached) >= 2:
        (b0, u0), (b1, u1) = reached[0], reached[-1]
        text.append(
            f"From an effective batch of {b0:,.0f} to {b1:,.0f} "
            f"(x{b1 / b0:.0f} samples per update) the interpolated "
            f"updates-to-target fall from {_fmt(u0)} to {_fmt(u1)} "
            f"(x{u0 / u1:.1f} fewer; perfect scaling would give x{b1 / b0:.0f})."
        )
    bend_batch = None
    if index is None and len(reached) < 2:
        text.append(
            f"Only {len(reached)} window(s) reached the target: too few to "
            "locate a bend."
        )
    elif index is None:
        text.append(
            "No doubling in the grid had a scaling efficiency below "
            f"{_EFFICIENCY_BEND}: no bend within the windows that reached the "
            "target."
        )
    else:
        first, second = series[index], series[index + 1]
        bend_batch = first.batch
        efficiency = efficiencies[index]
        detail = (
            f"has a scaling efficiency of {efficiency:.2f}"
            if efficiency is not None
            else "gains nothing within the budget: "
            f"{_window_label(second.window)} did not reach the target"
        )
        before = [e for e in efficiencies[:index] if e is not None]
        run_up = (
            f" (the steps before it: {', '.join(f'{e:.2f}' for e in before)})"
            if before
            else " (it is the first step: no near-perfect scaling is visible above "
            f"{first.batch:,.0f})"
        )
        text.append(
            f"Updates-to-target stop halving after {_window_label(first.window)}: "
            f"the step to {_window_label(second.window)} (batch {first.batch:,.0f} → "
            f"{second.batch:,.0f}) {detail}{run_up}. The bend is at an "
            f"effective batch of about {first.batch:,.0f}."
        )
    b_crit = None
    if fit is not None:
        b_crit, s_min = fit
        lowest, highest = reached[0][0], reached[-1][0]
        outside = (
            " (outside the batches measured, so only a rough extrapolation)"
            if not lowest / 4 <= b_crit <= highest * 4
            else ""
        )
        text.append(
            f"Fitting S(B) = S_min (1 + B_crit / B) to the {len(reached)} windows "
            f"that reached the target gives B_crit ≈ {b_crit:,.0f} samples and "
            f"S_min ≈ {s_min:,.0f} updates{outside}."
        )
    return text, {
        "bend_batch": bend_batch,
        "bend_index": index,
        "b_crit": b_crit,
        "efficiencies": efficiencies,
    }


def _per_epoch(point: Point, key: str) -> float:
    """What one epoch adds to ``key`` (epochs, updates or seconds) for a run."""
    measured = point.measure(key)
    epochs = point.measure("epochs")
    return measured / epochs if measured is not None and epochs else 0.0


def _one_step_per_epoch(
    series: list[Point],
    paper: dict[str, Any] | None,
    standard_paper: dict[str, Any] | None,
    epochs: int,
) -> list[str]:
    epoch_points = [p for p in series if p.window == EPOCH]
    others = [p for p in series if p.window != EPOCH and p.reached]
    if not epoch_points:
        return ["The grid has no one-step-per-epoch window."]
    full = epoch_points[0]
    text: list[str] = []
    if not full.reached:
        budget_updates = full.budget_updates
        text.append(
            "No rate tried for one update per epoch ("
            + ", ".join(f"{r:g}" for r in full.rates)
            + f") reached the target within {epochs} epochs (= {budget_updates:,} "
            f"updates); its best validation accuracy was "
            f"{_peak_accuracy(full.closest):.4f} "
            f"(lr {full.closest['spec']['learning_rate']:g})."
        )
        if others:
            fewest_epochs = min(others, key=lambda p: p.measure("epochs"))
            fewest_updates = min(others, key=lambda p: p.measure("updates"))
            text.append(
                "So it is worse per epoch and per second than every window that "
                "reached the target ("
                + ", ".join(_window_label(p.window) for p in others)
                + f"; the fewest epochs: {fewest_epochs.measure('epochs')} with "
                f"{_window_label(fewest_epochs.window)})."
            )
            fewest = fewest_updates.measure("updates")
            if fewest <= budget_updates:
                text.append(
                    f"Per update too: {_window_label(fewest_updates.window)} "
                    f"reached the target in {fewest:,} updates, fewer than the "
                    f"{budget_updates:,} that one update per epoch used without "
                    "reaching it."
                )
            else:
                text.append(
                    "Per update the target cannot decide: the fewest updates to "
                    f"target were {fewest:,} ({_window_label(fewest_updates.window)}), "
                    f"more than the {budget_updates:,} the budget allowed one "
                    "update per epoch."
                )
                text.append(_at_equal_updates(full, series))
    else:
        text.append(
            f"One update per epoch reached the target at lr {full.rate:g} in "
            f"{full.measure('epochs')} epochs (= {full.measure('updates'):,} updates, "
            f"{full.measure('seconds_excluding_compile'):.1f} s)."
        )
        if not others:
            text.append("No other window reached it to compare with.")
    if full.reached and others:
        for key, label in (
            ("epochs", "per epoch"),
            ("updates", "per update"),
            ("seconds_excluding_compile", "per second"),
        ):
            rival = min(others, key=lambda p: p.measure(key))
            mine, theirs = full.measure(key), rival.measure(key)
            # Counts are only known to one epoch (validation runs once per
            # epoch): a difference within one epoch of either run is a tie.
            resolution = max(_per_epoch(full, key), _per_epoch(rival, key))
            if abs(mine - theirs) <= resolution:
                verdict = f"level within one epoch's resolution ({_fmt(resolution)})"
            else:
                verdict = "better" if mine < theirs else "worse"
            text.append(
                f"{label.capitalize()}: one update per epoch needs {_fmt(mine)} "
                f"({key.replace('_excluding_compile', '')}) against {_fmt(theirs)} "
                f"for the best other window ({_window_label(rival.window)}): {verdict}."
            )
    if paper is not None:
        paper_peak = _peak_accuracy(paper)
        reached = paper.get("to_target")
        text.append(
            f"At the paper's rate {PAPER_LEARNING_RATE:g} the one-step-per-epoch twin "
            + (
                f"reached the target after {reached['epochs']} epochs"
                if reached
                else f"reached {paper_peak:.4f} validation accuracy after "
                f"{len(paper['history']['epoch_seconds'])} epochs"
            )
            + (
                f"; at its tuned rate {full.rate:g} it reached the target after "
                f"{full.measure('epochs')} epochs"
                if full.reached
                else "; the best tuned rate got it to "
                f"{_peak_accuracy(full.closest):.4f}"
            )
            + (
                f". The standard twin at {PAPER_LEARNING_RATE:g} "
                + (
                    f"reached the target after {standard_paper['to_target']['epochs']} "
                    "epochs."
                    if standard_paper.get("to_target")
                    else f"reached {_peak_accuracy(standard_paper):.4f}."
                )
                if standard_paper is not None
                else "."
            )
        )
    return text


def _accuracy_after(record: dict[str, Any], updates: int) -> tuple[float, int] | None:
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


def _at_equal_updates(full: Point, series: list[Point]) -> str:
    """Accuracy after as many updates as one-update-per-epoch made: per update."""
    record = full.closest
    updates = record["history"]["cumulative_updates"][-1]
    own = _peak_accuracy(record)
    rivals = []
    for point in series:
        if point.window == EPOCH:
            continue
        # The window's best run, or the closest where none reached the target.
        after = _accuracy_after(point.best or point.closest, updates)
        if after is not None:
            rivals.append((after[0], after[1], point))
    if not rivals:
        return ""
    accuracy, epoch, rival = max(rivals, key=lambda item: item[0])
    # An accuracy measured on n test images has a binomial standard error of
    # sqrt(p (1 - p) / n): differences within two of them are not resolved.
    test_samples = record["data"].get("test_samples") or 10_000
    error = math.sqrt(own * (1 - own) / test_samples)
    if abs(own - accuracy) <= 2 * error:
        verdict = (
            "so per update the two were level (within two standard errors of "
            f"a test-set accuracy, {2 * error:.4f})"
        )
    elif own > accuracy:
        verdict = "so per update one step per epoch was ahead"
    else:
        verdict = "so per update it was behind"
    return (
        f"Compared at equal updates instead: after {updates:,} updates one update "
        f"per epoch had reached {own:.4f} (its best), the best other window "
        f"{accuracy:.4f} ({_window_label(rival.window)} after epoch {epoch}), "
        f"{verdict}."
    )


def _noise_verdict(
    noise: NoiseSummary, bend_batch: float | None, b_crit: float | None
) -> list[str]:
    if noise.median is None:
        return [
            "No noise-scale measurement is available (the study ran without "
            "`measure_noise_scale`)."
        ]
    text = [
        "Measured along the best run of each window N ≥ 2 up to its target "
        "(or, where no rate reached it, the run that came closest; "
        f"{noise.runs} runs), B_simple was {_fmt(noise.first_epoch)} samples in "
        f"the first epoch, {_fmt(noise.median)} over training (median of each "
        f"run's median) and {_fmt(noise.at_target)} at the epoch that reached the "
        "target (medians over runs)"
        + (
            ""
            if noise.first_epoch is None or noise.at_target is None
            else ": it grew during training."
            if noise.at_target > noise.first_epoch
            else ": it did not grow during training."
        )
        + ("" if noise.first_epoch and noise.at_target else ".")
    ]
    span = [v for v in (noise.first_epoch, noise.at_target) if v is not None]
    for label, value in (("bend", bend_batch), ("fitted B_crit", b_crit)):
        if value is None:
            continue
        position = ""
        if len(span) == 2:
            low, high = min(span), max(span)
            position = (
                "inside the range B_simple spans during training"
                if low <= value <= high
                else "below the range B_simple spans during training"
                if value < low
                else "above the range B_simple spans during training"
            )
        factor = max(value, noise.median) / min(value, noise.median)
        if factor <= 2:
            verdict = "within a factor of 2 of"
        elif factor <= 10:
            verdict = f"a factor of {factor:.1f} from"
        else:
            verdict = f"a factor of {factor:.0f} from (so not located by)"
        text.append(
            f"The {label} ({value:,.0f}) is {position + ', and ' if position else ''}"
            f"{verdict} the median B_simple ({noise.median:,.0f})."
        )
    return text


def _adaptive_text(
    adaptive: dict[str, Any] | None,
    tried: list[dict[str, Any]],
    series: list[Point],
    optimizer: str,
) -> list[str]:
    name = _OPTIMIZER_TITLES.get(optimizer, optimizer)
    if not tried:
        return [f"The adaptive arm did not run with {name}."]
    rates = ", ".join(f"{r['spec']['learning_rate']:g}" for r in tried)
    if adaptive is None:
        closest = max(tried, key=_peak_accuracy)
        return [
            f"With {name} the adaptive arm (rates {rates}) did not reach the "
            f"target; best validation accuracy {_peak_accuracy(closest):.4f}; "
            f"windows used: {_schedule(closest)}."
        ]
    reached = adaptive["to_target"]
    mine = (reached["updates"], reached["epochs"])
    dominating = [
        p
        for p in series
        if p.reached
        and p.measure("updates") <= mine[0]
        and p.measure("epochs") <= mine[1]
    ]
    fewest_epochs = min(
        (p for p in series if p.reached),
        key=lambda p: p.measure("epochs"),
        default=None,
    )
    comparison = (
        "It is matched or beaten on both counts by "
        + ", ".join(
            f"{_window_label(p.window)} ({p.measure('updates'):,} updates, "
            f"{p.measure('epochs')} epochs)"
            for p in dominating
        )
        + "."
        if dominating
        else "No fixed window reached the target in both as few updates and as "
        "few epochs."
    )
    return [
        f"With {name} the adaptive arm's best rate "
        f"({adaptive['spec']['learning_rate']:g} "
        f"of {rates}) reached the target in {reached['updates']:,} updates, "
        f"{reached['epochs']} epochs and {reached['seconds_excluding_compile']:.1f} s, "
        f"with windows {_schedule(adaptive)} (per epoch). "
        + (
            f"The fixed window with the fewest epochs, "
            f"{_window_label(fewest_epochs.window)}, needed "
            f"{fewest_epochs.measure('updates'):,} updates and "
            f"{fewest_epochs.measure('epochs')} epochs. "
            if fewest_epochs is not None
            else ""
        )
        + comparison
        + _constant_schedule_note(adaptive)
    ]


def _constant_schedule_note(record: dict[str, Any]) -> str:
    """Says so when the adaptive arm never changed its window."""
    windows = set(map(str, record["history"].get("accumulation_steps", [])))
    if len(windows) != 1:
        return ""
    (window,) = windows
    noise = [v for v in record["history"].get("gradient_noise_scale", []) if v]
    peak = f" (at most {max(noise):,.0f})" if noise else ""
    return (
        f" It kept N={window} throughout: the B_simple it measured{peak} never "
        "called for another window before the target, so here it is that fixed "
        "window."
    )


def _momentum_text(
    sgd: list[Point], momentum: list[Point], sgd_stop: dict, momentum_stop: dict
) -> list[str]:
    if not momentum:
        return ["Momentum runs are not in this study."]
    pairs = []
    by_window = {p.window: p for p in sgd}
    for point in momentum:
        other = by_window.get(point.window)
        if other and other.reached and point.reached:
            pairs.append(
                (point.window, point.interpolated_updates / other.interpolated_updates)
            )
    text = []
    if pairs:
        ratios = ", ".join(f"{_window_label(w)} x{r:.2f}" for w, r in pairs)
        text.append(
            "Updates-to-target with momentum relative to plain SGD, each at its own "
            f"best rate (interpolated counts): {ratios} (median "
            f"x{np.median([r for _, r in pairs]):.2f})."
        )
    only_momentum = [
        p.window
        for p in momentum
        if p.reached and not (by_window.get(p.window) and by_window[p.window].reached)
    ]
    if only_momentum:
        text.append(
            "Only with momentum did "
            + ", ".join(_window_label(w) for w in only_momentum)
            + " reach the target."
        )
    text.append(
        f"Bend: plain SGD at batch {_fmt(sgd_stop['bend_batch'])}, momentum at "
        f"{_fmt(momentum_stop['bend_batch'])}; fitted B_crit: plain SGD "
        f"{_fmt(sgd_stop['b_crit'])}, momentum {_fmt(momentum_stop['b_crit'])}."
    )
    return text


def _tuned_full_batch(
    series: dict[str, list[Point]], optimizer: str
) -> dict[str, Any] | None:
    """One update per epoch at its best rate (or closest run) for ``optimizer``."""
    full = [p for p in series.get(optimizer, []) if p.window == EPOCH]
    return (full[0].best or full[0].closest) if full else None


def _invocations_text(summary: dict[str, Any]) -> str:
    invocations = summary.get("invocations") or [summary]
    if len(invocations) == 1:
        only = invocations[0]
        reused = only.get("runs_reused")
        return (
            f"started {only['started_at']}, wall time "
            f"{only['wall_seconds'] / 60:.1f} minutes"
            + (
                f" ({reused} of the runs were reused, as finished by an earlier, "
                "interrupted invocation with the same run settings)."
                if reused
                else "."
            )
        )
    parts = [
        f"{i['started_at']} for {i['wall_seconds'] / 60:.1f} minutes"
        + (
            f" ({i['runs_trained']} runs trained, {i['runs_reused']} reused)"
            if "runs_trained" in i
            else ""
        )
        for i in invocations
    ]
    total = sum(i["wall_seconds"] for i in invocations)
    return (
        f"in {len(invocations)} invocations of the same command (a later one "
        "reuses the runs an earlier one finished): "
        + "; ".join(parts)
        + f"; {total / 60:.1f} minutes in all."
    )


def build_study_report(out: str | os.PathLike[str]) -> list[Path]:
    """Writes the figures and ``report.md`` into ``out``; returns the paths."""
    out = Path(out)
    summary_path = out / "study.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    records = load_runs(out)
    settings = summary["settings"]
    written: list[Path] = []
    lines = [
        "# When does one big step pay? Steps to target against batch size",
        "",
        "Issue 10, after Shallue et al. 2019 (JMLR 20: steps-to-target against "
        "batch size, the learning rate retuned for each) and McCandlish et al. "
        "2018 (arXiv 1812.06162: the bend sits near the gradient noise scale "
        "B_simple = tr(Σ)/|G|²). Every number below is computed from the run "
        "files in `runs/` by `accumulate/paper/study_report.py`.",
        "",
        f"Produced by `{summary.get('command') or 'python -m accumulate.paper.study'}` "
        f"({summary['jobs']} worker processes, one TensorFlow thread each) on "
        f"{summary['machine']['cpu_count']} cores: {len(records)} runs, "
        + _invocations_text(summary)
        + (
            " **Quick mode: a smoke test on 10% of the data, not a result.**"
            if settings.get("quick")
            else ""
        ),
        "",
    ]
    if summary.get("not_run"):
        lines += [
            f"**{len(summary['not_run'])} planned runs did not run** (time limit "
            "or failure); they are listed in `study.json`.",
            "",
        ]
    setup: list[str] = [
        "## Set-up",
        "",
        "* Model and data: the notebook's 784-128-64-32-10 tanh MLP, the same "
        f"initial weights for every run (seed {settings['seed']}), micro-batches "
        "of 512, pixels / 255, sparse categorical cross-entropy on logits. "
        "Validation accuracy is measured on the test set after every epoch, as "
        "in the notebook (there is no separate held-out set: the study counts "
        "steps to a target, it does not report a final accuracy).",
        "* The training set is reshuffled every epoch, in the same order "
        "sequence for every run and every window.",
        "* Windows N (micro-batches per update): "
        + ", ".join(str(w) for w in settings["windows"])
        + "; N = 1 is the standard twin (a plain `keras.Model`), N ≥ 2 the "
        "`AccumulatingModel` twin. A window that does not divide the epoch's "
        "micro-batches is applied at the epoch's end with what it holds, so "
        "the effective batch is measured as samples per update.",
        "* Targets (validation accuracy): "
        + ", ".join(
            f"{DATASET_TITLES.get(d, d)} {t}"
            for d, t in settings["targets"].items()
            if d in settings["datasets"]
        )
        + f"; budget {settings['epochs']} epochs; a run stops at the target, or "
        "when its epoch loss is non-finite or above 2 ln 10 (diverged).",
        "* Learning rates: per window a grid of "
        f"{settings['grid_size']} rates a factor 2 apart, centred on a guess "
        "that grows with the batch; "
        + (
            "a grid whose best rate was at its edge was extended by one rate "
            "beyond it. "
            if settings.get("extend_edges")
            else ""
        )
        + "Optimizers: plain SGD (the paper's) and SGD with momentum 0.9"
        + (
            f" (momentum for windows {settings['momentum_windows']} only)"
            if settings.get("momentum_windows")
            else ""
        )
        + ". The best rate of a window reaches the target in the fewest updates.",
        "* Adaptive arm: each epoch's window is B_simple of the previous epoch "
        "divided by 512, rounded to a power of two, clipped to [2, the epoch]; "
        f"{settings['adaptive_grid_size']} learning rates per optimizer, fixed "
        "during a run.",
        "* The noise scale is measured by `AccumulatingModel(measure_noise_scale="
        "True)` in every run with N ≥ 2 (per epoch, from the windows of that "
        "epoch). The N = 1 runs cannot measure it; figure 3 shows the N ≥ 2 runs."
        if settings.get("measure_noise_scale")
        else "* The noise scale was not measured in this study (and the adaptive "
        "arm, which needs it, did not run).",
        "",
        "Learning-rate grids as planned (extensions, if any, appear in the tables):",
        "",
        "| optimizer | window | rates |",
        "|---|---|---|",
    ]
    for optimizer, grids in summary["learning_rate_grids"].items():
        for window, rates in grids.items():
            setup.append(
                f"| {_OPTIMIZER_TITLES.get(optimizer, optimizer)} | {window} | "
                + ", ".join(f"{r:g}" for r in rates)
                + " |"
            )
    setup += ["", *_timing_section(records)]
    details: list[str] = []

    answers: list[str] = ["## Answers", ""]
    for dataset in settings["datasets"]:
        title = DATASET_TITLES.get(dataset, dataset)
        context = _settings_line(summary, dataset)
        optimizers = [o for o in settings["optimizers"] if points(records, dataset, o)]
        series = {o: points(records, dataset, o) for o in optimizers}
        if not series:
            continue
        adaptive = {o: _adaptive_best(records, dataset, o) for o in optimizers}
        for key, stem in (
            ("updates", "updates_to_target"),
            ("epochs", "epochs_to_target"),
        ):
            name = "Updates" if key == "updates" else "Epochs"
            written.append(
                plot_to_target(
                    series,
                    {o: a[0] for o, a in adaptive.items()},
                    key,
                    out / f"{stem}-{dataset}.png",
                    f"{name} to target vs effective batch, best lr per window\n"
                    + context,
                )
            )
        main = "sgd" if "sgd" in series else optimizers[0]
        adaptive_main = adaptive[main][0] or (
            max(adaptive[main][1], key=_peak_accuracy) if adaptive[main][1] else None
        )
        written.append(
            plot_noise_scale(
                series[main],
                adaptive_main,
                out / f"noise_scale-{dataset}.png",
                f"B_simple over training ({_OPTIMIZER_TITLES[main]}, best lr per "
                f"window)\n{context}",
            )
        )
        paper = _paper_run(records, dataset, EPOCH)
        standard_paper = _paper_run(records, dataset, 1)

        written.append(
            plot_paper_twin(
                _tuned_full_batch(series, "sgd"),
                paper,
                standard_paper,
                out / f"paper_twin-{dataset}.png",
                "One update per epoch: tuned lr vs the "
                f"paper's {PAPER_LEARNING_RATE:g}\n{context}",
                settings["targets"][dataset],
                tuned_momentum=_tuned_full_batch(series, "momentum"),
            )
        )

        stops = {}
        details += [f"## {title}: tables and figures", ""]
        for optimizer, group in series.items():
            _, stop = _where_it_stops(group, optimizer)
            stops[optimizer] = stop
            details += [
                f"### {_OPTIMIZER_TITLES.get(optimizer, optimizer)}",
                "",
                *_table(group, stop["efficiencies"]),
                "",
            ]
            adaptive_runs = adaptive[optimizer][1]
            if adaptive_runs:
                details += [
                    "Adaptive arm: "
                    + "; ".join(
                        f"lr {r['spec']['learning_rate']:g}: "
                        + (
                            f"{r['to_target']['updates']:,} updates, "
                            f"{r['to_target']['epochs']} epochs"
                            if r.get("to_target")
                            else f"{r['stopped']}, best val acc {_peak_accuracy(r):.4f}"
                        )
                        for r in sorted(
                            adaptive_runs, key=lambda r: r["spec"]["learning_rate"]
                        )
                    ),
                    "",
                ]
        details += [
            f"![updates to target](updates_to_target-{dataset}.png)",
            f"![epochs to target](epochs_to_target-{dataset}.png)",
            f"![noise scale](noise_scale-{dataset}.png)",
            f"![paper twin](paper_twin-{dataset}.png)",
            "",
        ]
        answers += [f"### {title}", "", "**Where accumulation stops paying.**"]
        for optimizer, group in series.items():
            answers.append(" ".join(_where_it_stops(group, optimizer)[0]))
            answers.append("")
        reached_main = [p for p in series[main] if p.reached]
        if reached_main:
            fastest = min(reached_main, key=lambda p: p.measure("epochs"))
            answers += [
                f"Per epoch: with {_OPTIMIZER_TITLES[main]} the fewest epochs to "
                "target are "
                f"{fastest.measure('epochs')} ({_window_label(fastest.window)}). "
                + _epoch_cost_text(records, dataset),
                "",
            ]
        answers += [
            "**Is one step per epoch ever better?** "
            + " ".join(
                f"*{_OPTIMIZER_TITLES.get(o, o)}:* "
                + " ".join(
                    _one_step_per_epoch(
                        series[o],
                        paper if o == "sgd" else None,
                        standard_paper if o == "sgd" else None,
                        settings["epochs"],
                    )
                )
                for o in optimizers
            ),
            "",
            "**Does the noise scale predict the bend?** "
            + " ".join(
                f"*{_OPTIMIZER_TITLES.get(o, o)}:* "
                + " ".join(
                    _noise_verdict(
                        noise_summary(series[o]),
                        stops[o]["bend_batch"],
                        stops[o]["b_crit"],
                    )
                )
                for o in optimizers
            ),
            "",
            "**What the adaptive arm buys.** "
            + " ".join(
                " ".join(_adaptive_text(adaptive[o][0], adaptive[o][1], series[o], o))
                for o in optimizers
            ),
            "",
            "**Does momentum change the picture?** "
            + " ".join(
                _momentum_text(
                    series.get("sgd", []),
                    series.get("momentum", []),
                    stops.get("sgd", {"bend_batch": None, "b_crit": None}),
                    stops.get("momentum", {"bend_batch": None, "b_crit": None}),
                )
            ),
            "",
        ]
    lines += [
        *answers,
        *details,
        *setup,
        "## Caveats",
        "",
        "* One seed and one data order: the spread over seeds is not measured "
        "here, so a difference of one epoch between windows may not be real.",
        "* Validation runs once per epoch, so counts to target are rounded up to "
        "an epoch; the scaling analysis uses the crossing interpolated linearly "
        "in accuracy within the epoch that reached the target.",
        "* Learning rates are a factor 2 apart, so a window's best count carries "
        "the error of that grid; a best rate at the grid's edge is marked.",
        "* B_simple is the *simple* noise scale (it assumes a well-conditioned "
        "Hessian); McCandlish et al. find it tracks B_crit up to a factor of a "
        "few, which is the precision the comparison above can claim.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    written.append(report)
    return written
