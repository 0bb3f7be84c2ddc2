"""The research notebook's logged per-epoch numbers, the reproduction's target.

Source: "AP Project — Gradient Accumulation Project", a Jupyter notebook dated
2023-12-22 (exported to PDF). It trains the 784-128-64-32-10 tanh MLP for 200
epochs on MNIST and Fashion-MNIST, once with one update per batch of 512
("standard") and once with one accumulated update per epoch ("accumulating"),
and prints the epoch's training loss and accuracy (and, for the MNIST standard
run only, the validation loss and accuracy on the test set) after every epoch.

``accumulate/paper/data/seed_metrics.csv`` holds those printed numbers, parsed from
the notebook's output cells, one row per dataset, model and epoch::

    dataset,model,epoch,train_loss,train_accuracy,val_loss,val_accuracy

A metric the notebook did not print is an empty field, loaded as NaN.

Example:
    >>> reference = load_reference("mnist")
    >>> sorted(reference)
    ['accumulating', 'standard']
    >>> round(float(reference["standard"]["val_accuracy"][0]), 4)
    0.7346
    >>> bool(np.isnan(reference["accumulating"]["val_accuracy"]).all())
    True
"""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np

__all__ = ["DATASETS", "DATASET_TITLES", "METRICS", "MODELS", "load_reference"]

DATASETS = ("mnist", "fashion_mnist")
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
MODELS = ("standard", "accumulating")
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")

_CSV_NAME = "seed_metrics.csv"


def load_reference(dataset: str) -> dict[str, dict[str, np.ndarray]]:
    """The notebook's logged curves for ``dataset``: ``{model: {metric: array}}``.

    Each array is float64 and indexed by ``epoch - 1``; entries the notebook
    did not log are NaN.

    Raises:
        ValueError: for a dataset the notebook did not run.
    """
    if dataset not in DATASETS:
        raise ValueError(
            f"dataset must be one of {', '.join(map(repr, DATASETS))}; got {dataset!r}"
        )
    rows_by_model: dict[str, list[dict[str, str]]] = {model: [] for model in MODELS}
    with (
        resources.files("accumulate.paper")
        .joinpath("data", _CSV_NAME)
        .open(encoding="utf-8", newline="") as file
    ):
        for row in csv.DictReader(file):
            if row["dataset"] == dataset:
                rows_by_model[row["model"]].append(row)

    reference = {}
    for model, rows in rows_by_model.items():
        rows.sort(key=lambda row: int(row["epoch"]))
        epochs = [int(row["epoch"]) for row in rows]
        # A gap would silently shift every later epoch by one.
        if epochs != list(range(1, len(rows) + 1)):
            raise ValueError(
                f"{_CSV_NAME}: {dataset}/{model} epochs are not 1..{len(rows)}"
            )
        reference[model] = {
            metric: np.array([_to_float(row[metric]) for row in rows])
            for metric in METRICS
        }
    return reference


def _to_float(field: str) -> float:
    return float(field) if field.strip() else float("nan")
