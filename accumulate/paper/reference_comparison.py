"""A fresh run against the committed reference run of the same file name.

Training is deterministic on one machine, so the same experiment should give
the same numbers to the last digit; `compare_with_reference` measures how far
a run is from its reference, for the report and the command line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accumulate.paper.reference import METRICS, MODELS
from accumulate.paper.results import load_result, result_config

__all__ = ["ReferenceComparison", "compare_with_reference", "reference_path"]


@dataclass(frozen=True)
class ReferenceComparison:
    """How one run's numbers compare with a reference run's.

    ``differences`` maps ``(model, metric)`` to the largest absolute
    difference over the epochs both ran; ``final`` maps it to the last common
    epoch's ``(run, reference)`` values.
    """

    reference: Path
    same_experiment: bool
    epochs: int
    differences: dict[tuple[str, str], float]
    final: dict[tuple[str, str], tuple[float, float]]
    same_initial_weights: bool
    same_predictions: dict[str, int]  # model -> test images predicted alike
    test_samples: int

    @property
    def largest_difference(self) -> float:
        return max(self.differences.values(), default=math.nan)

    @property
    def identical(self) -> bool:
        """The same initial weights and every logged number the same."""
        return self.largest_difference == 0 and self.same_initial_weights


def reference_path(
    run_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str],
) -> Path:
    """The reference file for ``run_path``: the same path under ``reference_dir``.

    Example:
        >>> reference_path("runs/mnist/history-seed42.json", "runs", "results")
        PosixPath('results/mnist/history-seed42.json')
    """
    return Path(reference_dir) / Path(run_path).relative_to(out_dir)


def compare_with_reference(
    result: dict[str, Any], reference_file: str | os.PathLike[str]
) -> ReferenceComparison:
    """Compares ``result`` with the result stored in ``reference_file``."""
    reference_file = Path(reference_file)
    reference = load_result(reference_file)
    config = result_config(result)
    epochs = min(
        len(result["standard"]["train_loss"]), len(reference["standard"]["train_loss"])
    )
    differences: dict[tuple[str, str], float] = {}
    final: dict[tuple[str, str], tuple[float, float]] = {}
    same_predictions: dict[str, int] = {}
    for model in MODELS:
        for metric in METRICS:
            ours = np.asarray(result[model][metric][:epochs], dtype=np.float64)
            theirs = np.asarray(reference[model][metric][:epochs], dtype=np.float64)
            differences[model, metric] = float(np.max(np.abs(ours - theirs)))
            final[model, metric] = (float(ours[-1]), float(theirs[-1]))
        same_predictions[model] = int(
            np.sum(
                np.asarray(result[model]["test_predictions"])
                == np.asarray(reference[model]["test_predictions"])
            )
        )
    return ReferenceComparison(
        reference=reference_file,
        same_experiment=config.same_experiment(result_config(reference)),
        epochs=epochs,
        differences=differences,
        final=final,
        same_initial_weights=all(
            result[model]["initial_weights_sha256"]
            == reference[model]["initial_weights_sha256"]
            for model in MODELS
        ),
        same_predictions=same_predictions,
        test_samples=len(result["data"]["test_labels"]),
    )
