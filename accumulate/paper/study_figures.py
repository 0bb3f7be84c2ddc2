"""The batch-size study's figures, drawn from its analysis.

Per dataset: updates- and epochs-to-target against the effective batch, the
noise scale along training, and the paper's one-step-per-epoch twin at its
tuned rate and at the paper's 0.01.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from accumulate.paper.figures import epoch_numbers, save_figure
from accumulate.paper.study_analysis import Point
from accumulate.paper.study_answers import DatasetAnswers
from accumulate.paper.study_plan import (
    ADAPTIVE,
    DATASET_TITLES,
    OPTIMIZER_TITLES,
    PAPER_LEARNING_RATE,
    window_label,
)
from accumulate.paper.study_records import Record, effective_batch

__all__ = ["draw_figures", "plot_noise_scale", "plot_paper_twin", "plot_to_target"]

_COLOURS = {"sgd": "tab:blue", "momentum": "tab:orange", ADAPTIVE: "tab:green"}


def draw_figures(
    answers: DatasetAnswers, summary: dict[str, Any], out: Path
) -> list[Path]:
    """Writes one dataset's four figures into ``out``; returns their paths."""
    dataset, series, main = answers.dataset, answers.series, answers.main
    context = _settings_line(summary, dataset)
    adaptive = {o: arm.best for o, arm in answers.adaptive.items()}
    written = [
        plot_to_target(
            series,
            adaptive,
            key,
            out / f"{stem}-{dataset}.png",
            f"{name} to target vs effective batch, best lr per window\n{context}",
        )
        for key, stem, name in (
            ("updates", "updates_to_target", "Updates"),
            ("epochs", "epochs_to_target", "Epochs"),
        )
    ]
    written.append(
        plot_noise_scale(
            series[main],
            answers.adaptive[main].closest,
            out / f"noise_scale-{dataset}.png",
            f"B_simple over training ({OPTIMIZER_TITLES[main]}, best lr per "
            f"window)\n{context}",
        )
    )
    written.append(
        plot_paper_twin(
            answers.tuned_full_batch("sgd"),
            answers.paper,
            answers.standard_paper,
            out / f"paper_twin-{dataset}.png",
            "One update per epoch: tuned lr vs the "
            f"paper's {PAPER_LEARNING_RATE:g}\n{context}",
            summary["settings"]["targets"][dataset],
            tuned_momentum=answers.tuned_full_batch("momentum"),
        )
    )
    return written


def _settings_line(summary: dict[str, Any], dataset: str) -> str:
    settings = summary["settings"]
    return (
        f"{DATASET_TITLES.get(dataset, dataset)}, MLP 784-128-64-32-10 tanh, "
        f"micro-batch 512, target val acc {settings['targets'][dataset]}, "
        f"budget {settings['epochs']} epochs, seed {settings['seed']}"
    )


def plot_to_target(
    series: dict[str, list[Point]],
    adaptive: dict[str, Record | None],
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
            xs, ys, marker="o", color=colour, label=OPTIMIZER_TITLES.get(optimizer)
        )
        for point in group:
            if point.reached:
                axis.annotate(
                    f"{window_label(point.window)}\nlr {point.rate:g}",
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
                    f"{window_label(point.window)}: not reached",
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
                label=f"perfect scaling ({OPTIMIZER_TITLES.get(optimizer)})",
            )
        record = adaptive.get(optimizer)
        if record and record.get("to_target"):
            axis.plot(
                effective_batch(record),
                record["to_target"][key],
                marker="*",
                markersize=12,
                color=colour,
                linestyle="none",
                label=f"adaptive N ({OPTIMIZER_TITLES.get(optimizer)}), "
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
    return save_figure(figure, path)


def plot_noise_scale(
    series: list[Point],
    adaptive: Record | None,
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
        epochs = epoch_numbers(values)
        ys = np.array([math.nan if v is None or v <= 0 else v for v in values])
        axis.plot(
            epochs,
            ys,
            marker=".",
            color=colour,
            label=f"{window_label(point.window)}, lr "
            f"{record['spec']['learning_rate']:g}"
            + ("" if point.best else " (target not reached)"),
        )
        axis.axhline(point.batch, color=colour, linestyle="--", linewidth=0.8)
    if adaptive is not None:
        values = adaptive["history"].get("gradient_noise_scale", [])
        ys = np.array([math.nan if v is None or v <= 0 else v for v in values])
        axis.plot(
            epoch_numbers(ys),
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
    return save_figure(figure, path)


def plot_paper_twin(
    tuned: Record | None,
    paper: Record | None,
    standard: Record | None,
    path: Path,
    title: str,
    target: float,
    tuned_momentum: Record | None = None,
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
            epoch_numbers(values),
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
    return save_figure(figure, path)


# -- The report ------------------------------------------------------------------
