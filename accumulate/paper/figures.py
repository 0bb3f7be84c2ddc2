"""The report's figures, drawn from result dicts and the notebook's curves.

Uses Matplotlib's object-oriented API (`matplotlib.figure.Figure`) without
pyplot, so drawing needs no display and leaves no global figure state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from accumulate.paper.reference import MODELS

__all__ = [
    "epoch_numbers",
    "plot_confusion",
    "plot_curves",
    "plot_updates",
    "save_figure",
]

_TITLES = {"standard": "Standard", "accumulating": "Accumulation"}
# One colour per (model, split), in the notebook's plotting order.
_COLOURS = {
    ("standard", "train"): "tab:blue",
    ("standard", "val"): "tab:orange",
    ("accumulating", "train"): "tab:green",
    ("accumulating", "val"): "tab:red",
}
_SPLIT_NAMES = {"train": "training", "val": "validation"}


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Writes ``figure`` as the reports' figures are: 120 dpi, tight box."""
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def epoch_numbers(values: Sequence[Any]) -> np.ndarray:
    """1, 2, ... one per value: the x axis of a per-epoch curve."""
    return np.arange(1, len(values) + 1)


def plot_curves(
    runs: Sequence[dict[str, Any]],
    reference: dict[str, dict[str, np.ndarray]],
    path: str | os.PathLike[str],
    title: str,
) -> Path:
    """The notebook's two-panel figure: loss and accuracy over epochs.

    Solid lines are ``runs[0]``; a shaded band spans the minimum to maximum
    over all ``runs`` (seeds) where there are several; dashed lines are the
    notebook's logged curves (``reference``, from `load_reference`) over the
    same epochs.
    """
    figure = Figure(figsize=(13, 5.5))
    axes = figure.subplots(1, 2)
    for axis, quantity in zip(axes, ("loss", "accuracy"), strict=True):
        for model in MODELS:
            for split in ("train", "val"):
                key = f"{split}_{quantity}"
                colour = _COLOURS[model, split]
                label = f"{_TITLES[model]} - {_SPLIT_NAMES[split]}"
                main = runs[0][model][key]
                axis.plot(
                    epoch_numbers(main), main, color=colour, label=f"{label} (ours)"
                )
                if len(runs) > 1:
                    length = min(len(run[model][key]) for run in runs)
                    stacked = np.array([run[model][key][:length] for run in runs])
                    axis.fill_between(
                        epoch_numbers(stacked[0]),
                        stacked.min(axis=0),
                        stacked.max(axis=0),
                        color=colour,
                        alpha=0.2,
                        linewidth=0,
                    )
                # Only the epochs we ran, so that short runs stay readable.
                logged = reference[model][key][: len(main)]
                if not np.isnan(logged).all():
                    axis.plot(
                        epoch_numbers(logged),
                        logged,
                        color=colour,
                        linestyle="--",
                        linewidth=1,
                        label=f"{label} (notebook)",
                    )
        axis.set_title(f"{quantity.capitalize()} over epochs")
        axis.set_xlabel("Epochs")
        axis.set_ylabel(quantity.capitalize())
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    band = f"; band: min-max over {len(runs)} seeds" if len(runs) > 1 else ""
    figure.suptitle(f"{title} (solid: ours, dashed: notebook{band})")
    return save_figure(figure, path)


def plot_updates(
    run: dict[str, Any],
    reference: dict[str, dict[str, np.ndarray]],
    path: str | os.PathLike[str],
    title: str,
) -> Path:
    """Training loss against the number of optimizer updates, log x-axis.

    One point per epoch at the cumulative number of updates applied by the
    end of that epoch. The notebook's curves (dashed) use the same number of
    updates per epoch as ours: one per batch, or one.
    """
    figure = Figure(figsize=(8, 5.5))
    axis = figure.subplots()
    for model in MODELS:
        colour = _COLOURS[model, "train"]
        updates = np.asarray(run[model]["cumulative_updates"])
        axis.plot(
            updates,
            run[model]["train_loss"],
            marker=".",
            markersize=3,
            color=colour,
            label=f"{_TITLES[model]} (ours)",
        )
        epochs_run = len(run[model]["train_loss"])
        logged = reference[model]["train_loss"][:epochs_run]
        updates_per_epoch = run[model]["updates"] / epochs_run
        axis.plot(
            epoch_numbers(logged) * updates_per_epoch,
            logged,
            color=colour,
            linestyle="--",
            linewidth=1,
            label=f"{_TITLES[model]} (notebook)",
        )
    axis.set_xscale("log")
    axis.set_xlabel("Optimizer updates (cumulative, log scale)")
    axis.set_ylabel("Training loss")
    axis.set_title(f"{title}: training loss per update")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    return save_figure(figure, path)


def plot_confusion(
    matrices: dict[str, np.ndarray],
    path: str | os.PathLike[str],
    title: str,
) -> Path:
    """Confusion matrices side by side, one per model, counts annotated.

    ``matrices`` maps a model name to its (true x predicted) count matrix.
    """
    figure = Figure(figsize=(6.5 * len(matrices), 6))
    axes = np.atleast_1d(figure.subplots(1, len(matrices)))
    for axis, (model, matrix) in zip(axes, matrices.items(), strict=True):
        classes = np.arange(matrix.shape[0])
        axis.imshow(matrix, cmap="Blues")
        # Dark text on light cells, light text on dark ones.
        threshold = matrix.max() / 2
        for row in classes:
            for column in classes:
                count = matrix[row, column]
                axis.text(
                    column,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if count > threshold else "black",
                )
        accuracy = np.trace(matrix) / max(matrix.sum(), 1)
        axis.set_title(f"{_TITLES.get(model, model)} (accuracy {accuracy:.4f})")
        axis.set_xticks(classes)
        axis.set_yticks(classes)
        axis.set_xlabel("Predicted label")
        axis.set_ylabel("True label")
    figure.suptitle(title)
    return save_figure(figure, path)
