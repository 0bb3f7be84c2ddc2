"""Command line: ``python -m accumulate reproduce|report`` (or ``accumulate``).

``reproduce`` trains the twins for each dataset and seed (in parallel worker
processes) into a fresh-run directory (``runs/`` by default), prints a line
per epoch with an ETA, rebuilds the report and ends with a summary table. The
report compares the fresh runs with the notebook's logged numbers and with
the committed reference runs (``results/``). ``report`` only rebuilds the
report from the result files already in the output directory.

Only the standard library and this package's light modules are imported
here: TensorFlow, Keras, scikit-learn and matplotlib are imported by the
command that needs them, so ``--help`` answers at once.

Example:
    python -m accumulate reproduce --dataset mnist --epochs 3 --out /tmp/check
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from accumulate.paper import study as study_command
from accumulate.paper.config import DATASETS, EPOCH, OPTIMIZERS, ExperimentConfig
from accumulate.paper.reference import MODELS
from accumulate.paper.results import load_result

if TYPE_CHECKING:
    from accumulate.paper.experiment import RunRecord
    from accumulate.paper.progress import EpochEnd

__all__ = ["build_parser", "main"]

_DEFAULTS = ExperimentConfig("mnist")
_ALL = "all"
FRESH_RUNS = Path("runs")
REFERENCE_RUNS = Path("results")
# TensorFlow's C++ start-up lines (CPU features, XLA, oneDNN) say nothing
# about the reproduction; a user who wants them sets the variable.
_QUIET_TENSORFLOW = ("TF_CPP_MIN_LOG_LEVEL", "3")
_BACKENDS = ("tensorflow", "jax", "torch")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to 2**32 - 1, got {text!r}"
        )
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _accumulation_steps(text: str) -> int | str:
    if text == EPOCH:
        return EPOCH
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or {EPOCH!r}, got {text!r}"
        ) from None


def _existing_directory(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return os.path.abspath(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``accumulate`` argument parser, with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m accumulate",
        description="Reproduce the gradient-accumulation notebook with Keras fit.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    reproduce = commands.add_parser(
        "reproduce",
        help="train the twins into runs/<dataset>/*.json, rebuild the report",
        description="Train the standard and accumulating twins from each seed and "
        "write their histories, then rebuild the report, which compares them "
        "with the notebook's logged numbers and with the reference runs. Runs "
        "whose result file exists are skipped unless --force.",
    )
    reproduce.add_argument(
        "--dataset",
        choices=[*DATASETS, _ALL],
        default=_ALL,
        help="dataset to train on (default: %(default)s)",
    )
    reproduce.add_argument(
        "--epochs",
        type=_positive_int,
        default=_DEFAULTS.epochs,
        help="epochs per twin (default: %(default)s)",
    )
    reproduce.add_argument(
        "--seeds",
        type=_seed,
        nargs="+",
        default=[_DEFAULTS.seed],
        metavar="SEED",
        help="one run per seed (default: %(default)s)",
    )
    reproduce.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=_DEFAULTS.optimizer,
        help="optimizer of both twins (default: %(default)s, what the notebook's "
        "logs match)",
    )
    reproduce.add_argument(
        "--learning-rate",
        type=_learning_rate,
        default=_DEFAULTS.learning_rate,
        help="(default: %(default)s)",
    )
    reproduce.add_argument(
        "--batch-size",
        type=_positive_int,
        default=_DEFAULTS.batch_size,
        help="(default: %(default)s, the notebook's)",
    )
    reproduce.add_argument(
        "--accumulation-steps",
        type=_accumulation_steps,
        default=_DEFAULTS.accumulation_steps,
        metavar="N|epoch",
        help="the accumulating twin's window: one update every N batches, or "
        "once per epoch (default: %(default)s, the notebook's)",
    )
    reproduce.add_argument(
        "--data-dir",
        type=_existing_directory,
        default=None,
        help="folder holding mnist/ and fashion-mnist/ IDX files (default: "
        "$ACCUMULATE_DATA_DIR, else keras.datasets)",
    )
    _add_directory_arguments(reproduce)
    reproduce.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        help="runs trained at once, each in its own process on one core "
        "(default: %(default)s)",
    )
    reproduce.add_argument(
        "--backend",
        choices=_BACKENDS,
        default=None,
        help="Keras backend to train on (default: $KERAS_BACKEND, else "
        "tensorflow); jax and torch need the accumulate[jax] / [torch] extras",
    )
    reproduce.add_argument(
        "--force", action="store_true", help="re-run even if a result file exists"
    )
    reproduce.set_defaults(handler=_reproduce)

    report = commands.add_parser(
        "report",
        help="rebuild the figures and report.md from existing results",
        description="Rebuild curves.png, updates.png, confusion.png, the "
        "classification reports and report.md for each dataset folder.",
    )
    _add_directory_arguments(report)
    report.set_defaults(handler=_report)

    study = commands.add_parser(
        "study",
        help="when does one big step pay? updates-to-target vs batch size",
        description="Tune the learning rate for each accumulation window, measure "
        "updates, epochs and seconds to a validation-accuracy target and the "
        "gradient noise scale, then write results/study/ (runs, figures, "
        "report.md).",
    )
    study_command.add_arguments(study)
    study.set_defaults(handler=study_command.run)
    return parser


def _add_directory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=FRESH_RUNS,
        help="results directory (default: %(default)s)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=REFERENCE_RUNS,
        help="reference runs to compare with, file by file (default: "
        "%(default)s, the committed runs; ignored when it is --out)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault(*_QUIET_TENSORFLOW)
    return args.handler(args)


def _print_progress(event: EpochEnd) -> None:
    from accumulate.paper.progress import format_progress

    print(format_progress(event), flush=True)


def _select_backend(backend: str | None) -> None:
    """Sets KERAS_BACKEND for this process and the runs it starts.

    Keras reads it once, on import: this runs before anything imports Keras
    (the command line imports its heavy modules per command).
    """
    if backend is None:
        return
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise SystemExit(
            f"--backend {backend}: Keras is already loaded with another backend"
        )
    os.environ["KERAS_BACKEND"] = backend


def _reproduce(args: argparse.Namespace) -> int:
    _select_backend(args.backend)
    from accumulate.paper.experiment import ResultConflictError, run_all
    from accumulate.paper.report import build_report

    datasets = DATASETS if args.dataset == _ALL else (args.dataset,)
    seeds = list(dict.fromkeys(args.seeds))  # a repeated seed runs once
    configs = [
        ExperimentConfig(
            dataset,
            epochs=args.epochs,
            seed=seed,
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            accumulation_steps=args.accumulation_steps,
        )
        for dataset in datasets
        for seed in seeds
    ]
    print(
        f"{len(configs)} run(s) of {args.epochs} epochs, {args.jobs} at a time, "
        f"into {args.out}/",
        flush=True,
    )
    try:
        records = run_all(
            configs,
            args.out,
            force=args.force,
            jobs=args.jobs,
            progress=_print_progress,
        )
    except ResultConflictError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    reports = build_report(args.out, reference_dir=args.reference)
    _print_summary(records, reports)
    _print_reference_comparison(records, args.out, args.reference)
    failed = [record for record in records if record.status == "failed"]
    for record in failed:
        print(f"error: {record.config.label} failed: {record.error}", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from accumulate.paper.report import build_report

    written = build_report(args.out, reference_dir=args.reference)
    if not written:
        print(
            f"error: no result files under {args.out}/ (expected "
            f"{args.out}/<dataset>/history-*.json); run `python -m accumulate "
            f"reproduce --out {args.out}` first",
            file=sys.stderr,
        )
        return 1
    print("Report files:")
    for path in written:
        print(f"  {path}")
    return 0


def _print_summary(records: Sequence[RunRecord], reports: Sequence[Path]) -> None:
    header = (
        "dataset",
        "seed",
        "optimizer",
        "window",
        "status",
        "model",
        "epochs",
        "final val acc",
        "fit s",
        "updates",
    )
    rows = []
    for record in records:
        config = record.config
        identity = [
            config.dataset,
            str(config.seed),
            config.optimizer,
            str(config.accumulation_steps),
            record.status,
        ]
        if record.status == "failed":
            rows.append([*identity, "-", "-", "-", "-", "-"])
            continue
        result = load_result(record.path)
        for model in MODELS:
            history = result[model]
            rows.append(
                [
                    *identity,
                    model,
                    str(len(history["val_accuracy"])),
                    f"{history['val_accuracy'][-1]:.4f}",
                    f"{history['seconds']:.1f}",
                    str(history["updates"]),
                ]
            )
            identity = [""] * len(identity)  # printed once per run
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("\nSummary")
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(width) for cell, width in cells).rstrip())
    result_paths = [str(r.path) for r in records if r.status != "failed"]
    report_paths = [
        f"{path}  (figures and classification reports alongside)"
        for path in reports
        if path.name == "report.md"
    ]
    for title, paths in (("Results", result_paths), ("Reports", report_paths)):
        print(f"\n{title}:" if title == "Results" else f"{title}:")
        for path in paths or ["(none)"]:
            print(f"  {path}")
    sys.stdout.flush()


def _print_reference_comparison(
    records: Sequence[RunRecord], out: Path, reference: Path
) -> None:
    """One line per run: how far it is from the reference run of the same name."""
    from accumulate.paper.reference_comparison import (
        compare_with_reference,
        reference_path,
    )
    from accumulate.paper.reproduction_text import comparison_summary

    if _same_directory(out, reference):
        return
    print(f"\nAgainst the reference runs in {reference}/:")
    for record in records:
        if record.status == "failed":
            continue
        path = reference_path(record.path, out, reference)
        if not path.exists():
            print(f"  {record.config.label}: no reference run ({path} is missing)")
            continue
        comparison = compare_with_reference(load_result(record.path), path)
        print(f"  {record.config.label}: {comparison_summary(comparison)}")
    sys.stdout.flush()


def _same_directory(first: Path, second: Path) -> bool:
    return first.resolve() == second.resolve()
