"""Where run results live on disk, and reading and writing them as JSON.

Layout: ``<out_dir>/<dataset>/history-seed<seed>[-<optimizer>][-lr<rate>]
[-batch<size>][-steps<N>].json``; the suffixes appear only for values other
than the notebook's (SGD, 0.01, 512, one update per epoch), so the
notebook-configuration runs keep the plain ``history-seed42.json`` name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accumulate.paper.config import ExperimentConfig

__all__ = [
    "find_results",
    "load_result",
    "result_config",
    "result_path",
    "save_result",
]

_DEFAULTS = ExperimentConfig("mnist")
RESULT_GLOB = "history-*.json"


def result_path(out_dir: str | os.PathLike[str], config: ExperimentConfig) -> Path:
    """The JSON file a run of ``config`` writes under ``out_dir``.

    Example:
        >>> adam = ExperimentConfig("mnist", optimizer="adam")
        >>> result_path("results", adam).as_posix()
        'results/mnist/history-seed42-adam.json'
        >>> every_8 = ExperimentConfig("mnist", accumulation_steps=8)
        >>> result_path("runs", every_8).as_posix()
        'runs/mnist/history-seed42-steps8.json'
    """
    name = f"history-seed{config.seed}"
    if config.optimizer != _DEFAULTS.optimizer:
        name += f"-{config.optimizer}"
    if config.learning_rate != _DEFAULTS.learning_rate:
        name += f"-lr{config.learning_rate:g}"
    if config.batch_size != _DEFAULTS.batch_size:
        name += f"-batch{config.batch_size}"
    if config.accumulation_steps != _DEFAULTS.accumulation_steps:
        name += f"-steps{config.accumulation_steps}"
    return Path(out_dir) / config.dataset / f"{name}.json"


def save_result(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes ``result`` as JSON, atomically.

    The file appears only once complete, so an interrupted run never leaves a
    truncated file that a later run would mistake for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    # Compact: indenting would put each of the 10,000 predictions on a line.
    partial.write_text(json.dumps(result) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a result written by `save_result`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def result_config(result: dict[str, Any]) -> ExperimentConfig:
    """The `ExperimentConfig` a result was produced with."""
    return ExperimentConfig.from_dict(result["config"])


def find_results(out_dir: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Result files under ``out_dir``, by dataset folder, sorted by name."""
    found: dict[str, list[Path]] = {}
    root = Path(out_dir)
    if not root.is_dir():
        return found
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        paths = sorted(folder.glob(RESULT_GLOB))
        if paths:
            found[folder.name] = paths
    return found
