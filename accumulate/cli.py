"""Command line: ``python -m accumulate reproduce|report`` (or ``accumulate``).

``reproduce`` trains the twins for each dataset and seed (in parallel worker
processes), prints a line per epoch with an ETA, rebuilds the report and ends
with a summary table. ``report`` only rebuilds the report from the result
files already in the output directory.

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

from accumulate.config import DATASETS, OPTIMIZERS, ExperimentConfig
from accumulate.experiment import MODELS, ResultConflictError, RunRecord, run_all
from accumulate.progress import EpochEnd, format_progress
from accumulate.report import build_report
from accumulate.results import load_result

__all__ = ["build_parser", "main"]

_DEFAULTS = ExperimentConfig("mnist")
_ALL = "all"


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


def _existing_directory(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return os.path.abspath(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``accumulate`` argument parser, with its two subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m accumulate",
        description="Reproduce the gradient-accumulation notebook with Keras fit.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    reproduce = commands.add_parser(
        "reproduce",
        help="train the twins, write results/<dataset>/*.json, rebuild the report",
        description="Train the standard and accumulating twins from each seed and "
        "write their histories, then rebuild the report. Runs whose result file "
        "exists are skipped unless --force.",
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
        "--data-dir",
        type=_existing_directory,
        default=None,
        help="folder holding mnist/ and fashion-mnist/ IDX files (default: "
        "$ACCUMULATE_DATA_DIR, else keras.datasets)",
    )
    _add_out_argument(reproduce)
    reproduce.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        help="runs trained at once, each in its own process on one core "
        "(default: %(default)s)",
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
    _add_out_argument(report)
    report.set_defaults(handler=_report)
    return parser


def _add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="results directory (default: %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


def _print_progress(event: EpochEnd) -> None:
    print(format_progress(event), flush=True)


def _reproduce(args: argparse.Namespace) -> int:
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
    reports = build_report(args.out)
    _print_summary(records, reports)
    failed = [record for record in records if record.status == "failed"]
    for record in failed:
        print(f"error: {record.config.label} failed: {record.error}", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    written = build_report(args.out)
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
        identity = [config.dataset, str(config.seed), config.optimizer, record.status]
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
            identity = ["", "", "", ""]  # printed once per run
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
