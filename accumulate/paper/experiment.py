"""Reproduction runs: both twins from one seed, and many runs in parallel.

`run_experiment` trains the standard twin (one update per batch) and the
accumulating twin (by default ``accumulation_steps="epoch"``: one exact
full-batch update per epoch; ``config.accumulation_steps`` chooses another
window) from bit-identical initial weights and returns everything the
report needs as a JSON-ready dict. `run_all` runs many configurations in
worker processes and stores each result under ``<out_dir>/<dataset>/``.

Result layout (see `run_experiment`)::

    {"config": {...ExperimentConfig fields, "versions": ..., "machine": ...},
     "data": {"train_samples", "test_samples", "batches_per_epoch",
              "source": where the data was read, "test_labels": [...]},
     "standard": {"train_loss": [...], "train_accuracy": [...],
                  "val_loss": [...], "val_accuracy": [...], "updates": int,
                  "cumulative_updates": [...], "seconds": float,
                  "epoch_seconds": [...], "initial_weights_sha256": str,
                  "jit_compile": bool, "test_predictions": [...]},
     "accumulating": {...same keys}}

Test-set predictions are stored in the JSON (predicted class per test image,
plus the labels once) so that the report can draw confusion matrices without
the models or the data.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import queue
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import accumulate
from accumulate.paper.config import ExperimentConfig
from accumulate.paper.datasets import ENV_VAR
from accumulate.paper.progress import EpochEnd, ProgressSink
from accumulate.paper.reference import MODELS
from accumulate.paper.results import (
    load_result,
    result_config,
    result_path,
    save_result,
)
from accumulate.paper.training import JIT_COMPILE, prepare_data, train_twin
from accumulate.paper.workers import spawn_pool, use_one_thread
from accumulate.twins import make_twins

__all__ = [
    "MODELS",
    "ExperimentConfig",
    "ResultConflictError",
    "RunRecord",
    "run_all",
    "run_experiment",
]


def run_experiment(
    config: ExperimentConfig, progress: ProgressSink | None = None
) -> dict[str, Any]:
    """Trains both twins of ``config`` and returns their histories (see module).

    Args:
        config: what to train.
        progress: called with an `EpochEnd` after every epoch of each twin.
    """
    data = prepare_data(config)
    standard, accumulating = make_twins(
        config.seed, accumulation_steps=config.accumulation_steps
    )
    twins = {"standard": standard, "accumulating": accumulating}
    result: dict[str, Any] = {
        "config": {**config.to_dict(), **_environment()},
        "data": {
            "train_samples": data.train_samples,
            "test_samples": len(data.test_labels),
            "batches_per_epoch": data.batches_per_epoch,
            "source": _data_source(config),
            "test_labels": data.test_labels.tolist(),
        },
    }
    for index, name in enumerate(MODELS):
        epochs_after = config.epochs * (len(MODELS) - index - 1)
        result[name] = train_twin(
            twins[name], name, data, config, epochs_after, progress
        )
    return result


def _data_source(config: ExperimentConfig) -> str:
    # The same order `load_dataset` tries them in.
    return config.data_dir or os.environ.get(ENV_VAR) or "keras.datasets"


def _environment() -> dict[str, Any]:
    threading = tf.config.threading
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "accumulate": accumulate.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            # 0 means TensorFlow's default: one thread per core.
            "intra_op_threads": threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": threading.get_inter_op_parallelism_threads(),
        },
        "settings": {"jit_compile": JIT_COMPILE, "steps_per_execution": "epoch"},
    }


# -- Many runs ---------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What `run_all` did with one configuration.

    ``status`` is ``"ran"``, ``"skipped"`` (its result file already existed)
    or ``"failed"`` (then ``error`` says why and ``path`` does not exist).
    """

    config: ExperimentConfig
    path: Path
    status: str
    error: str | None = None


class ResultConflictError(ValueError):
    """A result file exists for the same name but another experiment."""


def run_all(
    configs: Iterable[ExperimentConfig],
    out_dir: str | os.PathLike[str],
    force: bool = False,
    jobs: int = 2,
    progress: ProgressSink | None = None,
) -> list[RunRecord]:
    """Runs ``configs`` and writes each result to `result_path` under ``out_dir``.

    Runs whose result file exists are skipped unless ``force``. With
    ``jobs > 1`` runs go to that many worker processes, each limited to one
    TensorFlow thread so that the jobs share the cores instead of fighting
    over them; with ``jobs == 1`` they run here, one after another, on every
    core. A failed run does not stop the others; its record says why.

    Raises:
        ResultConflictError: before running anything, if an existing file
            holds a different experiment under the same name (say, 3 epochs
            where 200 are asked for) and ``force`` is not set.
        ValueError: for duplicate configurations or ``jobs < 1``.
    """
    configs = list(configs)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1; got {jobs!r}")
    paths = [result_path(out_dir, config) for config in configs]
    duplicates = sorted({str(path) for path in paths if paths.count(path) > 1})
    if duplicates:
        raise ValueError(f"several configurations write {', '.join(duplicates)}")

    records: dict[Path, RunRecord] = {}
    to_run: list[tuple[ExperimentConfig, Path]] = []
    for config, path in zip(configs, paths, strict=True):
        if path.exists() and not force:
            _check_same_experiment(config, path)
            records[path] = RunRecord(config, path, "skipped")
        else:
            to_run.append((config, path))

    if jobs == 1 or len(to_run) <= 1:
        for config, path in to_run:
            records[path] = _run_and_save(config, path, progress)
    else:
        for record in _run_in_workers(to_run, min(jobs, len(to_run)), progress):
            records[record.path] = record
    return [records[path] for path in paths]


def _check_same_experiment(config: ExperimentConfig, path: Path) -> None:
    try:
        existing = result_config(load_result(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResultConflictError(
            f"{path} exists but cannot be read as a result ({error}); "
            "delete it or pass force=True (--force) to replace it"
        ) from error
    if not existing.same_experiment(config):
        raise ResultConflictError(
            f"{path} holds another experiment ({existing.epochs} epochs, "
            f"batch {existing.batch_size}) than the one asked for "
            f"({config.epochs} epochs, batch {config.batch_size}); pass "
            "force=True (--force) to replace it or choose another output directory"
        )


def _run_and_save(
    config: ExperimentConfig, path: Path, progress: ProgressSink | None
) -> RunRecord:
    try:
        save_result(run_experiment(config, progress), path)
    except Exception as error:  # one failed run must not lose the others
        return RunRecord(config, path, "failed", f"{type(error).__name__}: {error}")
    return RunRecord(config, path, "ran")


def _run_in_workers(
    to_run: Sequence[tuple[ExperimentConfig, Path]],
    jobs: int,
    progress: ProgressSink | None,
) -> list[RunRecord]:
    # The queue comes from the same (spawn) context as the pool's workers.
    events = multiprocessing.get_context("spawn").Queue()
    records = []
    with spawn_pool(jobs, _start_worker, events) as pool:
        submitted: dict[Future[RunRecord], tuple[ExperimentConfig, Path]] = {
            pool.submit(_run_in_worker, config, path): (config, path)
            for config, path in to_run
        }
        pending = set(submitted)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                _forward_events(events, progress)
                records.extend(
                    _record_of(future, *submitted[future]) for future in done
                )
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    _forward_events(events, progress)
    return records


def _record_of(
    future: Future[RunRecord], config: ExperimentConfig, path: Path
) -> RunRecord:
    try:
        return future.result()
    except Exception as error:  # a worker that died (say, killed for memory)
        return RunRecord(config, path, "failed", f"{type(error).__name__}: {error}")


_worker_events: Any = None


def _start_worker(events: Any) -> None:
    """Runs first in each worker: one thread each, progress to the parent."""
    global _worker_events
    _worker_events = events
    use_one_thread()


def _run_in_worker(config: ExperimentConfig, path: Path) -> RunRecord:
    return _run_and_save(config, path, _worker_events.put)


def _forward_events(events: Any, progress: ProgressSink | None) -> None:
    # Always drained, even when nobody listens, so the queue never fills up.
    while True:
        try:
            event: EpochEnd = events.get_nowait()
        except queue.Empty:
            return
        if progress is not None:
            progress(event)
