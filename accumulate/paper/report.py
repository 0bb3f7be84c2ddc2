"""The reproduction report: figures, classification reports and ``report.md``.

For every dataset folder of a results directory (``<out>/<dataset>/history-
*.json``, written by `accumulate.paper.experiment.run_all`) this writes, into that
folder:

* ``curves.png``: loss and accuracy over epochs, ours against the notebook's;
* ``updates.png``: training loss against the number of optimizer updates;
* ``confusion.png`` and ``classification-report-<model>.txt``: the test-set
  predictions stored in the result of the main run;
* ``report.md``: the tables and findings, every number read from the result
  files or from the notebook's logged numbers (`accumulate.paper.reference`),
  and, given a reference directory (the committed ``results/``), how each run
  compares with the reference run of the same file name.

The "main run" is seed 42 (else the lowest seed) of the runs in the
notebook's configuration (SGD, learning rate 0.01, batch 512); runs of the
same configuration with other seeds give the spread across seeds. Runs with
other optimizers only enter the optimizer comparison; runs with another
accumulation window are compared with the notebook only when no run has its
window (one update per epoch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from accumulate.paper.config import OPTIMIZERS, ExperimentConfig
from accumulate.paper.figures import plot_confusion, plot_curves, plot_updates
from accumulate.paper.reference import DATASETS, METRICS, MODELS, load_reference
from accumulate.paper.results import find_results, load_result, result_config

__all__ = [
    "REPORT_EPOCHS",
    "ReferenceComparison",
    "Run",
    "build_dataset_report",
    "build_report",
    "compare_with_reference",
    "reference_path",
]

REPORT_EPOCHS = (1, 10, 50, 100, 150, 200)
_NOTEBOOK = ExperimentConfig("mnist")  # the notebook's settings, as its logs show
_DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
_MODEL_TITLES = {"standard": "standard", "accumulating": "accumulating"}
_MISSING = "—"
_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}
_FASHION_LOGGING = {
    "fashion_mnist": " As exported, the notebook's Fashion-MNIST standard loop "
    "computes the logged means before appending the epoch's last batch, so "
    "they leave that batch out."
}
_NUM_CLASSES = 10  # both datasets, and the MLP's output layer


@dataclass(frozen=True)
class Run:
    """One result file, loaded."""

    path: Path
    config: ExperimentConfig
    result: dict[str, Any]

    @property
    def epochs_run(self) -> int:
        return len(self.result["standard"]["train_loss"])


def _load_run(path: Path) -> Run:
    result = load_result(path)
    return Run(path, result_config(result), result)


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
        runs = [_load_run(path) for path in paths]
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
    compared = _compared_runs(runs)
    main = compared[0]
    title = f"{_DATASET_TITLES[dataset]}, {_describe(main.config)}"
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
    sections = _markdown(dataset, runs, compared, reference)
    if reference_folder is not None:
        sections += (
            "\n" + "\n".join(_reference_section(runs, Path(reference_folder))) + "\n"
        )
    markdown.write_text(sections, "utf-8")
    written.append(markdown)
    return written


# -- Choosing runs -----------------------------------------------------------


def _settings(config: ExperimentConfig) -> tuple[str, float, int, int | str]:
    return (
        config.optimizer,
        config.learning_rate,
        config.batch_size,
        config.accumulation_steps,
    )


def _seed_order(run: Run) -> tuple[bool, int]:
    return (run.config.seed != _NOTEBOOK.seed, run.config.seed)


def _compared_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs compared with the notebook, main run first (see module)."""
    groups: dict[tuple[str, float, int, int | str], list[Run]] = {}
    for run in runs:
        groups.setdefault(_settings(run.config), []).append(run)
    chosen = groups.get(_settings(_NOTEBOOK))
    if chosen is None:  # no run in the notebook's configuration: the largest
        chosen = max(groups.values(), key=len)
    return sorted(chosen, key=_seed_order)


def _main_run_per_optimizer(runs: Sequence[Run]) -> dict[str, Run]:
    """For each optimizer, its run closest to the notebook's other settings."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=_seed_order):
        config = run.config
        if (config.learning_rate, config.batch_size, config.accumulation_steps) != (
            _NOTEBOOK.learning_rate,
            _NOTEBOOK.batch_size,
            _NOTEBOOK.accumulation_steps,
        ):
            continue
        chosen.setdefault(config.optimizer, run)
    return chosen


# -- Formatting ----------------------------------------------------------------


def _describe(config: ExperimentConfig) -> str:
    name = _OPTIMIZER_NAMES[config.optimizer]
    described = f"{name}({config.learning_rate:g}), batch {config.batch_size}"
    if config.accumulation_steps != _NOTEBOOK.accumulation_steps:
        described += f", accumulating every {config.accumulation_steps} batches"
    return described


def _number(value: float, digits: int = 4) -> str:
    return _MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return _MISSING if math.isnan(value) else f"{value:+.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _at(values: Sequence[float], epoch: int) -> float:
    return float(values[epoch - 1]) if epoch <= len(values) else math.nan


def _report_epochs(epochs_run: int) -> list[int]:
    epochs = [epoch for epoch in REPORT_EPOCHS if epoch <= epochs_run]
    if epochs_run not in epochs:
        epochs.append(epochs_run)  # a short run still shows where it ended
    return epochs


def _value_range(values: Sequence[float]) -> str:
    return f"{_number(min(values))} to {_number(max(values))}"


# -- report.md -----------------------------------------------------------------


def _markdown(
    dataset: str,
    runs: Sequence[Run],
    compared: Sequence[Run],
    reference: dict[str, dict[str, np.ndarray]],
) -> str:
    main = compared[0]
    seeds = ", ".join(str(run.config.seed) for run in compared)
    sections: list[list[str]] = [
        [
            f"# {_DATASET_TITLES[dataset]}: reproducing the notebook",
            "",
            "Generated by `python -m accumulate report` from the "
            f"{len(runs)} result file(s) in this folder and the notebook's "
            "logged numbers (`accumulate/paper/data/seed_metrics.csv`, parsed from "
            '"AP Project — Gradient Accumulation Project", 2023-12-22). '
            "Regenerate it rather than editing it.",
            "",
            f"Compared with the notebook: {_describe(main.config)}, "
            f"seed{'s' if len(compared) > 1 else ''} {seeds}; the main run is "
            f"seed {main.config.seed} "
            f"(`{main.path.name}`, {main.epochs_run} epochs).",
        ],
        _comparison_section(compared, reference),
        _optimizer_section(runs, reference),
        _differences_section(runs, main),
        _spread_section(compared),
        _timings_section(runs),
        [
            "## Figures",
            "",
            "![Loss and accuracy over epochs](curves.png)",
            "",
            "![Training loss against optimizer updates](updates.png)",
            "",
            f"![Confusion matrices, seed {main.config.seed}](confusion.png)",
            "",
            "Classification reports (test set, seed "
            f"{main.config.seed}): "
            + ", ".join(
                f"[{model}](classification-report-{model}.txt)" for model in MODELS
            )
            + ".",
        ],
    ]
    return "\n".join("\n".join(section) + "\n" for section in sections)


def _comparison_section(
    compared: Sequence[Run], reference: dict[str, dict[str, np.ndarray]]
) -> list[str]:
    main = compared[0]
    several = len(compared) > 1
    lines = [
        "## Notebook vs this reproduction",
        "",
        f"Per epoch, the notebook's logged value, ours (seed {main.config.seed}) "
        "and the difference"
        + (
            f", and the mean ± standard deviation (n - 1) over the {len(compared)} "
            "seeds that reached that epoch"
            if several
            else ""
        )
        + f". {_MISSING}: not logged by the notebook (it logged validation "
        "only for the MNIST standard run).",
    ]
    header = ["metric", "epoch", "notebook", f"seed {main.config.seed}", "difference"]
    if several:
        header.append("mean ± std (seeds)")
    for model in MODELS:
        rows = []
        for metric in METRICS:
            for epoch in _report_epochs(main.epochs_run):
                logged = _at(reference[model][metric], epoch)
                ours = _at(main.result[model][metric], epoch)
                row = [metric, str(epoch), _number(logged), _number(ours)]
                row.append(_signed(ours - logged))
                if several:
                    row.append(_mean_std(compared, model, metric, epoch))
                rows.append(row)
        lines += ["", f"### {_MODEL_TITLES[model].capitalize()} model", ""]
        lines += _table(header, rows)
    return lines


def _mean_std(runs: Sequence[Run], model: str, metric: str, epoch: int) -> str:
    values = [
        _at(run.result[model][metric], epoch) for run in runs if run.epochs_run >= epoch
    ]
    if len(values) < 2:
        return _MISSING
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (n={len(values)})"


def _mean_abs_difference(
    ours: Sequence[float], logged: np.ndarray, epochs: int
) -> float:
    return float(np.mean(np.abs(np.asarray(ours[:epochs]) - logged[:epochs])))


def _optimizer_section(
    runs: Sequence[Run], reference: dict[str, dict[str, np.ndarray]]
) -> list[str]:
    candidates = _main_run_per_optimizer(runs)
    lines = [
        "## Which optimizer the notebook used",
        "",
        "The notebook's text says Adam with a learning rate of 0.01; the cell "
        "defining its optimizer is not in the export. Its logged curves are "
        "compared here with our runs of each optimizer (learning rate "
        f"{_NOTEBOOK.learning_rate:g}, batch {_NOTEBOOK.batch_size}). The "
        "initial weights differ from the notebook's (see below), so even the "
        "right optimizer does not match it exactly.",
    ]
    if not candidates:
        return [*lines, "", "No run with that learning rate and batch size here."]
    common = min(
        len(reference["standard"]["train_loss"]),
        *(run.epochs_run for run in candidates.values()),
    )
    rows = [
        [
            "notebook",
            _MISSING,
            _MISSING,
            _MISSING,
            _number(reference["standard"]["train_loss"][0]),
            _number(reference["standard"]["train_accuracy"][0]),
            _number(reference["standard"]["val_accuracy"][0]),
        ]
    ]
    differences: dict[str, float] = {}
    for optimizer in sorted(candidates, key=OPTIMIZERS.index):
        run = candidates[optimizer]
        standard = run.result["standard"]
        differences[optimizer] = _mean_abs_difference(
            standard["train_loss"], reference["standard"]["train_loss"], common
        )
        accumulating = _mean_abs_difference(
            run.result["accumulating"]["train_loss"],
            reference["accumulating"]["train_loss"],
            common,
        )
        rows.append(
            [
                f"{_describe(run.config)}, seed {run.config.seed}",
                f"1-{common}",
                _number(differences[optimizer]),
                _number(accumulating),
                _number(standard["train_loss"][0]),
                _number(standard["train_accuracy"][0]),
                _number(standard["val_accuracy"][0]),
            ]
        )
    header = [
        "run",
        "epochs compared",
        "mean abs. train-loss difference, standard",
        "same, accumulating",
        "epoch-1 train loss (standard)",
        "epoch-1 train accuracy (standard)",
        "epoch-1 val accuracy (standard)",
    ]
    lines += ["", *_table(header, rows)]
    if len(differences) > 1:
        ranked = sorted(differences, key=differences.get)
        closest, *others = ranked
        lines += [
            "",
            f"Over epochs 1-{common}, the notebook's standard training loss is "
            f"closest to {_OPTIMIZER_NAMES[closest]}'s: on average "
            f"{_number(differences[closest])} away, against "
            + ", ".join(
                f"{_number(differences[other])} for {_OPTIMIZER_NAMES[other]}"
                for other in others
            )
            + ".",
        ]
    else:
        missing = "Adam" if "sgd" in candidates else "SGD"
        lines += [
            "",
            f"No {missing} run here to compare with (`make reproduce-adam` "
            "adds Adam runs).",
        ]
    return lines


def _differences_section(runs: Sequence[Run], main: Run) -> list[str]:
    data = main.result["data"]
    samples = data["train_samples"]
    batch_size = main.config.batch_size
    batches = data["batches_per_epoch"]
    last_batch = samples - batch_size * (batches - 1)
    factor = samples / (batch_size * batches)
    identical = [
        run
        for run in runs
        if run.result["standard"]["initial_weights_sha256"]
        == run.result["accumulating"]["initial_weights_sha256"]
    ]
    digest = main.result["standard"]["initial_weights_sha256"]
    twins_headline = (
        "The twins start identical here."
        if len(identical) == len(runs)
        else "Twins that should start identical do not, in some files."
    )
    accumulating_updates = main.result["accumulating"]["updates"]
    standard_updates = main.result["standard"]["updates"]
    return [
        "## What differs from the notebook",
        "",
        f"* **{twins_headline}** In {len(identical)} of {len(runs)} result "
        "file(s) the standard and accumulating twins' initial weights have the "
        f"same SHA-256 (seed {main.config.seed}: `{digest[:16]}…`). The "
        "notebook seeds TensorFlow "
        "once and then builds its two models one after the other, so they "
        "draw different initial weights and its comparison starts from two "
        "different points.",
        "* **The accumulated gradient is exact here.** The notebook sums the "
        "per-batch mean gradients, scaling the last batch's gradient by "
        f"{last_batch}/{batch_size} ({samples} = {batches - 1} x {batch_size} + "
        f"{last_batch}), and divides by the number of batches, {batches}: its "
        "update is "
        f"{samples}/({batch_size} x {batches}) = {factor:.4f} times the "
        "full-batch mean gradient (for plain SGD, a learning rate "
        f"{factor:.4f} times the stated one). `AccumulatingModel` weights "
        "each batch by its number of samples and divides by the total, so "
        "its update is the full-batch mean gradient; in the main run the "
        f"accumulating twin applied {accumulating_updates} updates in "
        f"{main.epochs_run} epochs and the standard twin {standard_updates}.",
        "* **Logged training metrics.** The notebook's epoch loss and accuracy "
        "are plain means over batches (the last, smaller batch counts as much "
        "as a full one); Keras's `fit` weights each batch by its samples."
        + _FASHION_LOGGING.get(main.config.dataset, ""),
        "* **Validation.** The notebook logged validation numbers only for the "
        "MNIST standard run; here both twins are validated on the test set "
        "after every epoch.",
        "* **Optimizer instances.** The notebook passes one `optimizer` object "
        "to all four training loops; each twin here gets a fresh one (plain "
        "SGD keeps no state besides its update counter, so for SGD this only "
        "changes the counts).",
    ]


def _spread_section(compared: Sequence[Run]) -> list[str]:
    lines = ["## Spread across seeds", ""]
    if len(compared) < 2:
        return [
            *lines,
            f"Only seed {compared[0].config.seed} ran in this configuration "
            "(`make reproduce-seeds` adds seeds 1-4).",
        ]
    final = min(run.epochs_run for run in compared)
    seeds = ", ".join(str(run.config.seed) for run in compared)
    rows: list[list[str]] = []
    quantities: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("epoch-1 val accuracy", lambda history: history["val_accuracy"][0]),
        (
            f"epoch-{final} val accuracy",
            lambda history: history["val_accuracy"][final - 1],
        ),
        (f"epoch-{final} train loss", lambda history: history["train_loss"][final - 1]),
    ]
    for model in MODELS:
        for name, pick in quantities:
            values = [pick(run.result[model]) for run in compared]
            rows.append(
                [
                    model,
                    name,
                    _value_range(values),
                    _number(max(values) - min(values)),
                ]
            )
    return [
        *lines,
        f"Minimum-maximum over seeds {seeds} ({_describe(compared[0].config)}).",
        "",
        *_table(["model", "quantity", "range", "width"], rows),
    ]


def _timings_section(runs: Sequence[Run]) -> list[str]:
    rows = []
    for run in sorted(runs, key=lambda run: run.path.name):
        machine = run.result["config"]["machine"]
        threads = machine["intra_op_threads"] or "all"
        for model in MODELS:
            history = run.result[model]
            later = history["epoch_seconds"][1:] or history["epoch_seconds"]
            rows.append(
                [
                    f"`{run.path.name}`",
                    model,
                    str(run.epochs_run),
                    str(history["updates"]),
                    _number(history["seconds"], 1),
                    _number(history["epoch_seconds"][0], 2),
                    _number(float(np.median(later)), 3),
                    f"{threads} / {machine['cpu_count']}",
                    "yes" if history.get("jit_compile") else "no",
                ]
            )
    main_config = runs[0].result["config"]
    versions = ", ".join(
        f"{name} {version}" for name, version in main_config["versions"].items()
    )
    settings = main_config["settings"]
    return [
        "## Timings and updates",
        "",
        "Wall time of each twin's `fit` (validation included); the first epoch "
        "includes tracing and compilation, the median is over the later epochs. "
        "Threads: TensorFlow threads per run / cores of the machine.",
        "",
        *_table(
            [
                "file",
                "model",
                "epochs",
                "updates",
                "fit seconds",
                "first epoch s",
                "median epoch s",
                "threads",
                "XLA",
            ],
            rows,
        ),
        "",
        f"Versions: {versions}. Machine: {main_config['machine']['platform']}. "
        f"Batches per graph call (steps_per_execution): "
        f"{settings['steps_per_execution']}.",
    ]


# -- Against the reference runs ----------------------------------------------


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
    def summary(self) -> str:
        if not self.same_experiment:
            return f"{self.reference} holds another experiment; not compared"
        finals = ", ".join(
            f"{model} {self.final[model, 'val_accuracy'][0]:.4f}" for model in MODELS
        )
        if self.largest_difference == 0 and self.same_initial_weights:
            verdict = "identical to the reference in every logged number"
        else:
            verdict = (
                f"largest difference from the reference {self.largest_difference:.2e}"
            )
        return f"{verdict} over {self.epochs} epochs (final val acc {finals})"


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


def _reference_section(runs: Sequence[Run], folder: Path) -> list[str]:
    lines = [
        "## This run vs the reference run",
        "",
        f"Each result file here against the file of the same name in `{folder}` "
        "(the committed reference runs): the last common epoch's value in both, "
        "and the largest absolute difference over all common epochs. Training "
        "is deterministic on one machine, so the same experiment should give "
        "the same numbers to the last digit; versions or hardware that differ "
        "may move them in the last places.",
    ]
    rows: list[list[str]] = []
    missing: list[str] = []
    for run in sorted(runs, key=lambda run: run.path.name):
        path = folder / run.path.name
        if not path.exists():
            missing.append(f"`{run.path.name}`")
            continue
        comparison = compare_with_reference(run.result, path)
        if not comparison.same_experiment:
            missing.append(f"`{run.path.name}` (the reference is another experiment)")
            continue
        for model in MODELS:
            for metric in METRICS:
                ours, theirs = comparison.final[model, metric]
                rows.append(
                    [
                        f"`{run.path.name}`",
                        model,
                        metric,
                        str(comparison.epochs),
                        f"{ours:.6f}",
                        f"{theirs:.6f}",
                        f"{comparison.differences[model, metric]:.2e}",
                    ]
                )
        predictions = " and ".join(
            f"{comparison.same_predictions[model]}/{comparison.test_samples} ({model})"
            for model in MODELS
        )
        weights = "identical" if comparison.same_initial_weights else "different"
        lines.append("")
        lines.append(
            f"* `{run.path.name}`: {comparison.summary}; initial weights "
            f"{weights}; test-set predictions the same for {predictions}."
        )
    if rows:
        header = [
            "file",
            "model",
            "metric",
            "epoch",
            "this run",
            "reference",
            "largest difference",
        ]
        lines += ["", *_table(header, rows)]
    if missing:
        lines += ["", "No reference run for: " + ", ".join(missing) + "."]
    return lines
