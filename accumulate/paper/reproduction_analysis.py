"""The reproduction's numbers: our runs against the notebook's logged ones.

Pure functions from result files (`accumulate.paper.results`) and the
notebook's logged curves (`accumulate.paper.reference`) to the numbers the
reproduction report (`accumulate.paper.report`) writes out; nothing here
formats text.

The "main run" is seed 42 (else the lowest seed) of the runs in the
notebook's configuration (SGD, learning rate 0.01, batch 512); runs of the
same configuration with other seeds give the spread across seeds. Runs with
other optimizers only enter the optimizer comparison; runs with another
accumulation window are compared with the notebook only when no run has its
window (one update per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accumulate.paper.config import OPTIMIZERS, ExperimentConfig
from accumulate.paper.reference import METRICS, MODELS
from accumulate.paper.results import load_result, result_config

__all__ = [
    "NOTEBOOK",
    "REPORT_EPOCHS",
    "Reference",
    "Run",
    "compared_runs",
    "epoch_rows",
    "load_run",
    "notebook_differences",
    "optimizer_fit",
    "seed_spread",
    "timings",
]

REPORT_EPOCHS = (1, 10, 50, 100, 150, 200)
NOTEBOOK = ExperimentConfig("mnist")  # the notebook's settings, as its logs show
Reference = dict[str, dict[str, np.ndarray]]  # `load_reference`'s curves


@dataclass(frozen=True)
class Run:
    """One result file, loaded."""

    path: Path
    config: ExperimentConfig
    result: dict[str, Any]

    @property
    def epochs_run(self) -> int:
        return len(self.result["standard"]["train_loss"])


def load_run(path: Path) -> Run:
    result = load_result(path)
    return Run(path, result_config(result), result)


# -- Choosing runs -----------------------------------------------------------


def _settings(config: ExperimentConfig) -> tuple[str, float, int, int | str]:
    return (
        config.optimizer,
        config.learning_rate,
        config.batch_size,
        config.accumulation_steps,
    )


def _seed_order(run: Run) -> tuple[bool, int]:
    return (run.config.seed != NOTEBOOK.seed, run.config.seed)


def compared_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs compared with the notebook, main run first (see module)."""
    groups: dict[tuple[str, float, int, int | str], list[Run]] = {}
    for run in runs:
        groups.setdefault(_settings(run.config), []).append(run)
    chosen = groups.get(_settings(NOTEBOOK))
    if chosen is None:  # no run in the notebook's configuration: the largest
        chosen = max(groups.values(), key=len)
    return sorted(chosen, key=_seed_order)


def _main_run_per_optimizer(runs: Sequence[Run]) -> dict[str, Run]:
    """For each optimizer, its run closest to the notebook's other settings."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=_seed_order):
        config = run.config
        if (config.learning_rate, config.batch_size, config.accumulation_steps) != (
            NOTEBOOK.learning_rate,
            NOTEBOOK.batch_size,
            NOTEBOOK.accumulation_steps,
        ):
            continue
        chosen.setdefault(config.optimizer, run)
    return dict(sorted(chosen.items(), key=lambda item: OPTIMIZERS.index(item[0])))


# -- Notebook vs this reproduction ---------------------------------------------


def _at(values: Sequence[float], epoch: int) -> float:
    return float(values[epoch - 1]) if epoch <= len(values) else math.nan


def report_epochs(epochs_run: int) -> list[int]:
    """`REPORT_EPOCHS` within the run, and its last epoch."""
    epochs = [epoch for epoch in REPORT_EPOCHS if epoch <= epochs_run]
    if epochs_run not in epochs:
        epochs.append(epochs_run)  # a short run still shows where it ended
    return epochs


@dataclass(frozen=True)
class EpochRow:
    """One metric at one epoch: the notebook's, the main run's, the seeds'."""

    metric: str
    epoch: int
    logged: float  # NaN where the notebook did not log it
    ours: float
    # Mean, standard deviation (n - 1) and n over the seeds that reached the
    # epoch; None with fewer than two.
    seeds: tuple[float, float, int] | None

    @property
    def difference(self) -> float:
        return self.ours - self.logged


def epoch_rows(
    compared: Sequence[Run], reference: Reference, model: str
) -> list[EpochRow]:
    """One model's rows of the notebook comparison, main run first in ``compared``."""
    main = compared[0]
    rows = []
    for metric in METRICS:
        for epoch in report_epochs(main.epochs_run):
            values = [
                _at(run.result[model][metric], epoch)
                for run in compared
                if run.epochs_run >= epoch
            ]
            seeds = None
            if len(values) >= 2:
                seeds = (
                    float(np.mean(values)),
                    float(np.std(values, ddof=1)),
                    len(values),
                )
            rows.append(
                EpochRow(
                    metric,
                    epoch,
                    _at(reference[model][metric], epoch),
                    _at(main.result[model][metric], epoch),
                    seeds,
                )
            )
    return rows


# -- Which optimizer the notebook used -----------------------------------------


@dataclass(frozen=True)
class OptimizerFit:
    """How close each optimizer's run comes to the notebook's logged curves."""

    runs: dict[str, Run]  # per optimizer, the run in the notebook's settings
    epochs: int  # the epochs every run and the notebook have
    # Per optimizer and twin, the mean absolute train-loss difference.
    differences: dict[str, dict[str, float]]

    @property
    def ranked(self) -> list[str]:
        """Optimizers, the closest to the notebook's standard loss first."""
        return sorted(self.differences, key=lambda o: self.differences[o]["standard"])


def optimizer_fit(runs: Sequence[Run], reference: Reference) -> OptimizerFit | None:
    """``None`` without a run in the notebook's learning rate and batch."""
    candidates = _main_run_per_optimizer(runs)
    if not candidates:
        return None
    common = min(
        len(reference["standard"]["train_loss"]),
        *(run.epochs_run for run in candidates.values()),
    )
    differences = {
        optimizer: {
            model: float(
                np.mean(
                    np.abs(
                        np.asarray(run.result[model]["train_loss"][:common])
                        - reference[model]["train_loss"][:common]
                    )
                )
            )
            for model in MODELS
        }
        for optimizer, run in candidates.items()
    }
    return OptimizerFit(candidates, common, differences)


# -- What differs from the notebook --------------------------------------------


@dataclass(frozen=True)
class NotebookDifferences:
    """The facts behind "what differs from the notebook", from the main run."""

    runs: int
    identical_twins: int  # files whose twins start from the same weights
    digest: str  # the main run's initial weights, SHA-256
    samples: int
    batch_size: int
    batches: int
    last_batch: int  # samples in the epoch's last, smaller batch
    # The notebook's update over the full-batch mean gradient:
    # samples / (batch_size x batches).
    factor: float
    updates: dict[str, int]  # per twin, in the main run


def notebook_differences(runs: Sequence[Run], main: Run) -> NotebookDifferences:
    data = main.result["data"]
    samples, batches = data["train_samples"], data["batches_per_epoch"]
    batch_size = main.config.batch_size
    return NotebookDifferences(
        runs=len(runs),
        identical_twins=sum(
            run.result["standard"]["initial_weights_sha256"]
            == run.result["accumulating"]["initial_weights_sha256"]
            for run in runs
        ),
        digest=main.result["standard"]["initial_weights_sha256"],
        samples=samples,
        batch_size=batch_size,
        batches=batches,
        last_batch=samples - batch_size * (batches - 1),
        factor=samples / (batch_size * batches),
        updates={model: main.result[model]["updates"] for model in MODELS},
    )


# -- Spread across seeds, timings ------------------------------------------------


@dataclass(frozen=True)
class Spread:
    model: str
    quantity: str  # "val_accuracy" or "train_loss"
    epoch: int
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


def seed_spread(compared: Sequence[Run]) -> list[Spread]:
    """Min and max over seeds of the first and last common epochs' numbers."""
    final = min(run.epochs_run for run in compared)
    spreads = []
    for model in MODELS:
        for quantity, epoch in (
            ("val_accuracy", 1),
            ("val_accuracy", final),
            ("train_loss", final),
        ):
            values = [run.result[model][quantity][epoch - 1] for run in compared]
            spreads.append(Spread(model, quantity, epoch, min(values), max(values)))
    return spreads


@dataclass(frozen=True)
class Timing:
    """One twin of one result file: its updates and times."""

    run: Run
    model: str
    updates: int
    seconds: float  # the whole fit
    first_epoch: float  # tracing and compilation included
    median_epoch: float  # over the later epochs
    threads: int | None  # TensorFlow's intra-op threads (None: its default)
    cpu_count: int
    jit_compile: bool


def timings(runs: Sequence[Run]) -> list[Timing]:
    """Every twin of every run, by file name."""
    rows = []
    for run in sorted(runs, key=lambda run: run.path.name):
        machine = run.result["config"]["machine"]
        for model in MODELS:
            history = run.result[model]
            later = history["epoch_seconds"][1:] or history["epoch_seconds"]
            rows.append(
                Timing(
                    run=run,
                    model=model,
                    updates=history["updates"],
                    seconds=history["seconds"],
                    first_epoch=history["epoch_seconds"][0],
                    median_epoch=float(np.median(later)),
                    threads=machine["intra_op_threads"] or None,
                    cpu_count=machine["cpu_count"],
                    jit_compile=bool(history.get("jit_compile")),
                )
            )
    return rows
