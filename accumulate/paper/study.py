"""The batch-size study's command: "when does one big step pay?"

``python -m accumulate study`` (or ``python -m accumulate.paper.study``) runs
the study and writes its report; ``--report-only`` rebuilds the report from
the run files. The study is the work of one module per job, each reading
only what the ones before it wrote (docs/study.md draws the flow):

* `accumulate.paper.study_plan`: the settings, the runs and their rates;
* `accumulate.paper.study_run`: one run, trained, as a JSON-ready record;
* `accumulate.paper.study_runner`: every run, in worker processes;
* `accumulate.paper.study_records`: reading one record or a group of them;
* `accumulate.paper.study_analysis` and `accumulate.paper.study_comparisons`:
  the numbers the report states;
* `accumulate.paper.study_figures` and `accumulate.paper.study_text`: those
  numbers drawn and written;
* `accumulate.paper.study_report`: the figures and ``report.md``, assembled.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from accumulate.paper.study_plan import TARGETS, StudySettings

__all__ = ["add_arguments", "main", "run", "settings_from_args"]

# -- Command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's options, for ``python -m accumulate study``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="MNIST only, tiny grid, 10%% of the data, 4 epochs (a smoke test, "
        "~2 minutes)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: results/study, or "
        "/tmp/accumulate-study-quick with --quick)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epoch budget per run (default: 80)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no run after this many minutes (the rest is reported as not run)",
    )
    parser.add_argument(
        "--dataset",
        choices=[*TARGETS, "all"],
        default="all",
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--no-noise-scale",
        action="store_true",
        help="do not measure the gradient noise scale (and skip the adaptive arm)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the figures and report.md from the runs in --out",
    )


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The `StudySettings` the parsed ``args`` ask for."""
    settings = StudySettings.quick_settings() if args.quick else StudySettings.full()
    changes: dict[str, Any] = {}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.dataset != "all":
        changes["datasets"] = (args.dataset,)
    if args.no_noise_scale:
        changes["measure_noise_scale"] = False
    return replace(settings, **changes)


def default_out(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return Path("/tmp/accumulate-study-quick" if args.quick else "results/study")


def command_line(args: argparse.Namespace) -> str:
    """The command that runs this study again, for the report."""
    parts = ["python -m accumulate study"]
    if args.quick:
        parts.append("--quick")
    parts += ["--out", str(default_out(args)), "--jobs", str(args.jobs)]
    for option, value in (
        ("--epochs", args.epochs),
        ("--max-minutes", args.max_minutes),
        ("--dataset", None if args.dataset == "all" else args.dataset),
    ):
        if value is not None:
            parts += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    if args.no_noise_scale:
        parts.append("--no-noise-scale")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Runs the study the parsed ``args`` ask for, then writes the report."""
    from accumulate.paper.study_report import build_study_report
    from accumulate.paper.study_runner import run_study

    out = default_out(args)
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    if not args.report_only:
        run_study(
            settings_from_args(args),
            out,
            args.jobs,
            args.max_minutes,
            command=command_line(args),
        )
    for path in build_study_report(out):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m accumulate.paper.study [--quick] [--out DIR] [--jobs J]``."""
    parser = argparse.ArgumentParser(
        prog="python -m accumulate.paper.study",
        description="When does one big step pay? Steps-to-target vs batch size.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
