"""The reproduction report: figures, classification reports and ``report.md``.

For every dataset folder of a results directory (``<out>/<dataset>/history-
*.json``, written by `accumulate.paper.experiment.run_all`) this writes, into that
folder:

* ``curves.png``: loss and accuracy over epochs, ours against the notebook's;
* ``updates.png``: training loss against the number of optimizer updates;
* ``confusion.png`` and ``classification-report-<model>.txt``: the test-set
  predictions stored in the result of the main run;
* ``report.md``: the tables and findings, every number computed by
  `accumulate.paper.reproduction_analysis` from the result files and the
  notebook's logged numbers (`accumulate.paper.reference`), and, given a
  reference directory (the committed ``results/``), how each run compares
  with the reference run of the same file name
  (`accumulate.paper.reference_comparison`).

Which runs are compared, and which is the main run, is said in
`accumulate.paper.reproduction_analysis`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from accumulate.paper.figures import plot_confusion, plot_curves, plot_updates
from accumulate.paper.reference import DATASET_TITLES, DATASETS, MODELS, load_reference
from accumulate.paper.reproduction_analysis import Run, compared_runs, load_run
from accumulate.paper.reproduction_text import describe, report_markdown
from accumulate.paper.results import find_results

__all__ = ["build_dataset_report", "build_report"]

_NUM_CLASSES = 10  # both datasets, and the MLP's output layer


def build_report(
    out_dir: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Writes every dataset's report under ``out_dir``; returns the files written.

    With ``reference_dir`` (other than ``out_dir`` itself), each report also
    compares every run with the file of the same name under ``reference_dir``.
    Returns an empty list when ``out_dir`` holds no result files.
    """
    if reference_dir is not None and (
        Path(reference_dir).resolve() == Path(out_dir).resolve()
    ):
        reference_dir = None  # the reference compared with itself says nothing
    written: list[Path] = []
    for dataset, paths in find_results(out_dir).items():
        if dataset not in DATASETS:
            continue  # not a folder this project writes
        runs = [load_run(path) for path in paths]
        references = None
        if reference_dir is not None:
            references = Path(reference_dir) / dataset
        written += build_dataset_report(
            dataset, runs, Path(out_dir) / dataset, references
        )
    return written


def build_dataset_report(
    dataset: str,
    runs: Sequence[Run],
    folder: str | os.PathLike[str],
    reference_folder: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Writes one dataset's figures, classification reports and ``report.md``.

    ``reference_folder``: where the reference runs of ``dataset`` are, for
    the comparison section (left out when None).
    """
    folder = Path(folder)
    reference = load_reference(dataset)
    compared = compared_runs(runs)
    main = compared[0]
    title = f"{DATASET_TITLES[dataset]}, {describe(main.config)}"
    results = [run.result for run in compared]
    written = [
        plot_curves(results, reference, folder / "curves.png", title),
        plot_updates(main.result, reference, folder / "updates.png", title),
    ]
    labels = np.asarray(main.result["data"]["test_labels"])
    # Every class gets a row even if a small test set lacks some.
    classes = np.arange(_NUM_CLASSES)
    matrices = {}
    for model in MODELS:
        predictions = np.asarray(main.result[model]["test_predictions"])
        matrices[model] = confusion_matrix(labels, predictions, labels=classes)
        report_path = folder / f"classification-report-{model}.txt"
        report_path.write_text(
            f"{title}, seed {main.config.seed}, {main.epochs_run} epochs: "
            f"{model} model on the test set\n\n"
            + classification_report(
                labels, predictions, labels=classes, digits=4, zero_division=0
            ),
            encoding="utf-8",
        )
        written.append(report_path)
    written.append(
        plot_confusion(
            matrices,
            folder / "confusion.png",
            f"{title}, seed {main.config.seed}: test-set confusion matrices",
        )
    )
    markdown = folder / "report.md"
    references = None if reference_folder is None else Path(reference_folder)
    text = report_markdown(dataset, runs, compared, reference, references)
    markdown.write_text(text, "utf-8")
    written.append(markdown)
    return written
