"""The batch-size study's ``report.md`` and figures, from its run files.

`build_study_report` reads what the runner wrote (``study.json`` and
``runs/``), has `accumulate.paper.study_answers` analyse each dataset, draws
the figures (`accumulate.paper.study_figures`) and assembles ``report.md``:
the answers in the words of `accumulate.paper.study_text`, then per dataset
its tables, then the set-up and the caveats. No number is typed in by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accumulate.paper.markdown import MISSING, table
from accumulate.paper.study_analysis import Scaling
from accumulate.paper.study_answers import (
    DatasetAnswers,
    EpochTimes,
    analyse,
    epoch_times,
)
from accumulate.paper.study_figures import draw_figures
from accumulate.paper.study_plan import DATASET_TITLES, OPTIMIZER_TITLES, window_label
from accumulate.paper.study_records import Record, invocations, load_runs
from accumulate.paper.study_text import (
    adaptive_text,
    epoch_cost_text,
    momentum_text,
    noise_text,
    number,
    one_step_text,
    rates_text,
    scaling_text,
)

__all__ = ["build_study_report"]

_CAVEATS = [
    "## Caveats",
    "",
    "* One seed and one data order: the spread over seeds is not measured "
    "here, so a difference of one epoch between windows may not be real.",
    "* Validation runs once per epoch, so counts to target are rounded up to "
    "an epoch; the scaling analysis uses the crossing interpolated linearly "
    "in accuracy within the epoch that reached the target.",
    "* Learning rates are a factor 2 apart, so a window's best count carries "
    "the error of that grid; a best rate at the grid's edge is marked.",
    "* B_simple is the *simple* noise scale (it assumes a well-conditioned "
    "Hessian); McCandlish et al. find it tracks B_crit up to a factor of a "
    "few, which is the precision the comparison above can claim.",
    "",
]


def build_study_report(out: str | os.PathLike[str]) -> list[Path]:
    """Writes the figures and ``report.md`` into ``out``; returns the paths."""
    out = Path(out)
    summary = json.loads((out / "study.json").read_text(encoding="utf-8"))
    records = load_runs(out)
    settings = summary["settings"]
    written: list[Path] = []
    answers: list[str] = ["## Answers", ""]
    details: list[str] = []
    for dataset in settings["datasets"]:
        analysed = analyse(records, dataset, settings["optimizers"], settings["epochs"])
        if analysed is None:
            continue
        written += draw_figures(analysed, summary, out)
        answers += _answers(analysed)
        details += _details(analysed)
    lines = [
        *_header(summary, records),
        *answers,
        *details,
        *_setup(summary),
        *_timing_section(epoch_times(records)),
        *_CAVEATS,
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    written.append(report)
    return written


def _header(summary: dict[str, Any], records: list[Record]) -> list[str]:
    command = summary.get("command") or "python -m accumulate.paper.study"
    lines = [
        "# When does one big step pay? Steps to target against batch size",
        "",
        "After Shallue et al. 2019 (JMLR 20: steps-to-target against batch "
        "size, the learning rate retuned for each) and McCandlish et al. 2018 "
        "(arXiv 1812.06162: the bend sits near the gradient noise scale "
        "B_simple = tr(Σ)/|G|²). Every number below is computed from the run "
        "files in `runs/` by `accumulate/paper/study_analysis.py` and "
        "`study_answers.py`.",
        "",
        f"Produced by `{command}` "
        f"({summary['jobs']} worker processes, one TensorFlow thread each) on "
        f"{summary['machine']['cpu_count']} cores: {len(records)} runs, "
        + _invocations_text(*invocations(summary))
        + (
            " **Quick mode: a smoke test on 10% of the data, not a result.**"
            if summary["settings"].get("quick")
            else ""
        ),
        "",
    ]
    if summary.get("not_run"):
        lines += [
            f"**{len(summary['not_run'])} planned runs did not run** (time limit "
            "or failure); they are listed in `study.json`.",
            "",
        ]
    return lines


def _answers(analysed: DatasetAnswers) -> list[str]:
    """The four questions, answered for one dataset."""
    series, main = analysed.series, analysed.main
    lines = [
        f"### {DATASET_TITLES.get(analysed.dataset, analysed.dataset)}",
        "",
        "**Where accumulation stops paying.**",
    ]
    for optimizer in series:
        lines += [" ".join(scaling_text(analysed.scalings[optimizer], optimizer)), ""]
    fastest = analysed.fewest_epochs
    if fastest is not None:
        lines += [
            f"Per epoch: with {OPTIMIZER_TITLES[main]} the fewest epochs to target "
            f"are {fastest.measure('epochs')} ({window_label(fastest.window)}). "
            + epoch_cost_text(analysed.epoch_cost),
            "",
        ]

    def per_optimizer(sentences: dict[str, list[str]]) -> str:
        return " ".join(
            f"*{OPTIMIZER_TITLES.get(o, o)}:* " + " ".join(text)
            for o, text in sentences.items()
        )

    return [
        *lines,
        "**Is one step per epoch ever better?** "
        + per_optimizer({o: one_step_text(analysed.one_step[o]) for o in series}),
        "",
        "**Does the noise scale predict the bend?** "
        + per_optimizer(
            {
                o: noise_text(analysed.noise[o], analysed.noise_comparisons[o])
                for o in series
            }
        ),
        "",
        "**What the adaptive arm buys.** "
        + " ".join(" ".join(adaptive_text(analysed.adaptive[o])) for o in series),
        "",
        "**Does momentum change the picture?** "
        + " ".join(momentum_text(analysed.momentum)),
        "",
    ]


def _details(analysed: DatasetAnswers) -> list[str]:
    """One dataset's tables, its adaptive runs and its figures."""
    dataset = analysed.dataset
    title = DATASET_TITLES.get(dataset, dataset)
    lines = [f"## {title}: tables and figures", ""]
    for optimizer in analysed.series:
        lines += [
            f"### {OPTIMIZER_TITLES.get(optimizer, optimizer)}",
            "",
            *_window_table(analysed.scalings[optimizer]),
            "",
        ]
        runs = analysed.adaptive[optimizer].runs
        if runs:
            outcomes = [
                f"lr {record['spec']['learning_rate']:g}: "
                + (
                    f"{record['to_target']['updates']:,} updates, "
                    f"{record['to_target']['epochs']} epochs"
                    if record.get("to_target")
                    else f"{record['stopped']}, best val acc {accuracy:.4f}"
                )
                for record, accuracy in runs
            ]
            lines += ["Adaptive arm: " + "; ".join(outcomes), ""]
    return [
        *lines,
        f"![updates to target](updates_to_target-{dataset}.png)",
        f"![epochs to target](epochs_to_target-{dataset}.png)",
        f"![noise scale](noise_scale-{dataset}.png)",
        f"![paper twin](paper_twin-{dataset}.png)",
        "",
    ]


def _setup(summary: dict[str, Any]) -> list[str]:
    """What the study trained, and the learning-rate grids it planned."""
    settings = summary["settings"]
    setup: list[str] = [
        "## Set-up",
        "",
        "* Model and data: the notebook's 784-128-64-32-10 tanh MLP, the same "
        f"initial weights for every run (seed {settings['seed']}), micro-batches "
        "of 512, pixels / 255, sparse categorical cross-entropy on logits. "
        "Validation accuracy is measured on the test set after every epoch, as "
        "in the notebook (there is no separate held-out set: the study counts "
        "steps to a target, it does not report a final accuracy).",
        "* The training set is reshuffled every epoch, in the same order "
        "sequence for every run and every window.",
        "* Windows N (micro-batches per update): "
        + ", ".join(str(w) for w in settings["windows"])
        + "; N = 1 is the standard twin (a plain `keras.Model`), N ≥ 2 the "
        "`AccumulatingModel` twin. A window that does not divide the epoch's "
        "micro-batches is applied at the epoch's end with what it holds, so "
        "the effective batch is measured as samples per update.",
        "* Targets (validation accuracy): "
        + ", ".join(
            f"{DATASET_TITLES.get(d, d)} {t}"
            for d, t in settings["targets"].items()
            if d in settings["datasets"]
        )
        + f"; budget {settings['epochs']} epochs; a run stops at the target, or "
        "when its epoch loss is non-finite or above 2 ln 10 (diverged).",
        "* Learning rates: per window a grid of "
        f"{settings['grid_size']} rates a factor 2 apart, centred on a guess "
        "that grows with the batch; "
        + (
            "a grid whose best rate was at its edge was extended by one rate "
            "beyond it. "
            if settings.get("extend_edges")
            else ""
        )
        + "Optimizers: plain SGD (the paper's) and SGD with momentum 0.9"
        + (
            f" (momentum for windows {settings['momentum_windows']} only)"
            if settings.get("momentum_windows")
            else ""
        )
        + ". The best rate of a window reaches the target in the fewest updates.",
        "* Adaptive arm: each epoch's window is B_simple of the previous epoch "
        "divided by 512, rounded to a power of two, clipped to [2, the epoch]; "
        f"{settings['adaptive_grid_size']} learning rates per optimizer, fixed "
        "during a run.",
        "* The noise scale is measured by `AccumulatingModel(measure_noise_scale="
        "True)` in every run with N ≥ 2 (per epoch, from the windows of that "
        "epoch). The N = 1 runs cannot measure it; figure 3 shows the N ≥ 2 runs."
        if settings.get("measure_noise_scale")
        else "* The noise scale was not measured in this study (and the adaptive "
        "arm, which needs it, did not run).",
        "",
        "Learning-rate grids as planned (extensions, if any, appear in the tables):",
        "",
        "| optimizer | window | rates |",
        "|---|---|---|",
    ]
    setup += [
        f"| {OPTIMIZER_TITLES.get(optimizer, optimizer)} | {window} | "
        + rates_text(rates)
        + " |"
        for optimizer, grids in summary["learning_rate_grids"].items()
        for window, rates in grids.items()
    ]
    return [*setup, ""]


# -- Tables -----------------------------------------------------------------------


def _window_table(scaling: Scaling) -> list[str]:
    """One row per window: its best rate and what it took to reach the target."""
    rows = []
    for index, point in enumerate(scaling.series):
        efficiencies = scaling.efficiencies
        efficiency = efficiencies[index] if index < len(efficiencies) else None
        batch, rates = f"{point.batch:,.0f}", rates_text(point.rates)
        start = [window_label(point.window), batch, rates]
        if point.reached:
            edge = " (grid edge)" if point.at_edge else ""
            rows.append(
                [
                    *start,
                    f"{point.rate:g}{edge}",
                    f"{point.measure('updates'):,}",
                    number(point.interpolated_updates),
                    str(point.measure("epochs")),
                    f"{point.measure('seconds_excluding_compile'):.1f}",
                    number(efficiency, 2),
                ]
            )
        else:
            rows.append(
                [
                    *start,
                    f"not reached (best val acc {point.closest_accuracy:.4f} at lr "
                    f"{point.closest['spec']['learning_rate']:g})",
                    f"> {point.budget_updates:,}",
                    MISSING,
                    f"> {point.budget_epochs}",
                    MISSING,
                    MISSING,
                ]
            )
    header = [
        "window",
        "effective batch",
        "rates tried",
        "best rate",
        "updates",
        "updates (interpolated)",
        "epochs",
        "seconds",
        "efficiency to next window",
    ]
    return table(header, rows)


def _timing_section(times: EpochTimes) -> list[str]:
    lines = [
        "## Time per epoch",
        "",
        "Epoch wall time (training and validation) pooled over every run of a "
        "window, without each run's first two epochs (tracing, compilation and "
        "other one-off work), one TensorFlow thread per run:",
        "",
        *table(
            [
                "window",
                "epochs",
                "seconds per epoch (median)",
                "10th-90th percentile",
            ],
            [
                [
                    w.window,
                    str(w.epochs),
                    f"{w.median:.3f}",
                    f"{w.low:.3f}-{w.high:.3f}",
                ]
                for w in times.windows
            ],
        ),
    ]
    if times.first_epoch is not None:
        lines += [
            "",
            f"The first epoch, which includes tracing and XLA compilation, took "
            f"{times.first_epoch:.2f} s (median over {times.first_epoch_runs} runs). "
            "Seconds-to-target below count it at the run's median epoch time "
            "(`seconds_excluding_compile` in the JSON; the raw sum is there too).",
        ]
    return [*lines, ""]


def _invocations_text(listed: list[dict[str, Any]], total_seconds: float) -> str:
    """When the study ran, and for how long, in one or several invocations."""
    if len(listed) == 1:
        only = listed[0]
        reused = only.get("runs_reused")
        return (
            f"started {only['started_at']}, wall time "
            f"{only['wall_seconds'] / 60:.1f} minutes"
            + (
                f" ({reused} of the runs were reused, as finished by an earlier, "
                "interrupted invocation with the same run settings)."
                if reused
                else "."
            )
        )
    parts = [
        f"{i['started_at']} for {i['wall_seconds'] / 60:.1f} minutes"
        + (
            f" ({i['runs_trained']} runs trained, {i['runs_reused']} reused)"
            if "runs_trained" in i
            else ""
        )
        for i in listed
    ]
    return (
        f"in {len(listed)} invocations of the same command (a later one "
        "reuses the runs an earlier one finished): "
        + "; ".join(parts)
        + f"; {total_seconds / 60:.1f} minutes in all."
    )
