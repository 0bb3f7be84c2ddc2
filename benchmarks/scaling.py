"""Does accumulation's overhead stay flat? Time and memory vs steps and width.

Two sweeps, each timed round-robin in one process like ``bench.py`` (jit off
and ``steps_per_execution`` 1, Keras's defaults, unless told otherwise):

* accumulation_steps 1, 2, 8, 32, 118 and ``"epoch"`` against plain ``fit``
  on the paper's MLP: seconds per epoch, peak RSS, RSS growth in an epoch;
* width: hidden units (w, w/2, w/4) for w = 128, 1024, 4096, plain ``fit``
  against ``"epoch"`` and 8. Wide models get ``--wide-epochs`` timed epochs
  and warm up on the epoch's three batch shapes only.

Memory is also counted exactly: the accumulators' bytes against the trainable
weights', for every width and steps value.

Usage::

    python benchmarks/scaling.py                      # ~6-8 min on one core
    python benchmarks/scaling.py --quick --out /tmp   # smoke test

Writes ``bench-scaling.json`` and ``bench-scaling.png`` into ``--out``.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import harness
import numpy as np
from harness import Spec

FIT = Spec("fit", "keras-fit")
WIDTHS, QUICK_WIDTHS = (128, 1024, 4096), (32, 64)
BLUE, ORANGE, RED = "#4c72b0", "#dd8452", "#c44e52"
WIDE_PARAMETERS = 2_000_000  # models above this get --wide-epochs


def accumulating(steps: int | str) -> Spec:
    return Spec(f"acc-{steps}", "accumulating", {"accumulation_steps": steps})


def sweep(
    specs: Sequence[Spec], hidden: tuple[int, ...], data: harness.Data, args: Any
) -> tuple[list[dict[str, Any]], int]:
    """Times ``specs`` on one width; returns their rows and the timed epochs."""
    wide = harness.build_mlp(hidden).count_params() > WIDE_PARAMETERS
    epochs = args.wide_epochs if wide else args.epochs
    variants = [
        harness.fit_variant(s, data, args.jit, args.steps_per_execution, hidden, wide)
        for s in specs
    ]
    harness.log(f"hidden units {hidden}: {len(specs)} variants, {epochs} epochs")
    harness.measure(variants, epochs, args.warmup)
    return harness.rows(variants, len(data.x)), epochs


COLUMNS = ["width", "params", "name", "s/epoch", "CPU s", "x fit", "x fit CPU",
           "peak RSS MB", "+MB", "weights B", "accum. B"]  # fmt: skip


def plot(steps: list[dict[str, Any]], widths: list[dict[str, Any]]) -> Any:
    """Time vs steps, ratio vs width, bytes vs width, RSS growth vs steps."""
    plt = harness.pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (time_axes, ratio_axes), (bytes_axes, rss_axes) = axes
    labels = [str(row["accumulation_steps"] or "fit") for row in steps]
    note = functools.partial(
        time_axes.annotate, textcoords="offset points", ha="center", fontsize=7
    )
    ours = range(1, len(steps))
    seconds = [row["median_s"] for row in steps]
    time_axes.plot(ours, seconds[1:], "o-", color=ORANGE, label="AccumulatingModel")
    for i in ours:
        ratios = f"{steps[i]['ratio_to_fit']:.3f}x\n(CPU "
        note(f"{ratios}{steps[i]['cpu_ratio_to_fit']:.3f}x)", (i, seconds[i]), (0, 8))
    time_axes.axhline(seconds[0], color=BLUE, ls="--", label="plain fit")
    time_axes.set(xticks=ours, xticklabels=labels[1:], ylim=(0, max(seconds) * 1.5))
    time_axes.set(ylabel="seconds per epoch (median)")
    time_axes.set_title("Time per epoch vs accumulation_steps (paper MLP)")

    sizes = [entry["width"] for entry in widths]
    for index, (name, colour) in enumerate((("acc-epoch", ORANGE), ("acc-8", RED)), 1):
        for key, style, kind in (("", "o-", "wall"), ("cpu_", "s--", "CPU")):
            values = [e["variants"][index][f"{key}ratio_to_fit"] for e in widths]
            ratio_axes.plot(
                sizes, values, style, color=colour, label=f"{name} ({kind})"
            )
    ratio_axes.axhline(1.0, color=BLUE, ls="--", label="plain fit")
    ratio_axes.axhline(1.03, color="grey", ls=":", label="1.03x target")
    ratio_axes.set_xscale("log", base=2)
    ratio_axes.set(xticks=sizes, xticklabels=sizes, xlabel="first hidden layer width w")
    ratio_axes.set(ylabel="epoch time / plain fit's (paired median)")
    ratio_axes.set_title("Accumulation overhead vs model width (layers w, w/2, w/4)")

    at = np.arange(len(widths))
    for offset, key, colour in (
        (-0.19, "trainable", BLUE),
        (0.19, "accumulator", ORANGE),
    ):
        mib = [e["variants"][1][f"{key}_bytes"] / 2**20 for e in widths]
        bytes_axes.bar(at + offset, mib, 0.38, label=f"{key} bytes", color=colour)
    bytes_axes.set(yscale="log", xticks=at, xticklabels=[f"w={w}" for w in sizes])
    bytes_axes.set(ylabel="MiB")
    bytes_axes.set_title("Accumulators = one copy of the trainable weights")

    growth = [row["rss_growth_mb"] for row in steps]
    rss_axes.bar(range(len(steps)), growth, color=[BLUE] + [ORANGE] * len(ours))
    for i, row in enumerate(steps):
        rss_axes.annotate(
            f"peak {row['peak_rss_mb']:.0f}",
            (i, growth[i]),
            (0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    rss_axes.set(xticks=range(len(steps)), xticklabels=labels)
    rss_axes.set(ylabel="RSS growth within an epoch (MiB)")
    rss_axes.set_title("Memory per epoch does not grow with accumulation_steps")
    for one in axes.flat:
        one.title.set_fontsize(10)
    for one in (time_axes, ratio_axes, bytes_axes):
        one.legend(fontsize=8)
    for one in (time_axes, rss_axes):
        one.set_xlabel("accumulation_steps")
    return figure


def main(argv: Sequence[str] | None = None) -> int:
    """Runs both sweeps; returns the process exit code."""
    parser = harness.parser(__doc__, epochs=5)
    parser.add_argument(
        "--wide-epochs",
        type=int,
        default=2,
        help=f"timed epochs over {WIDE_PARAMETERS:,} parameters",
    )
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--steps-per-execution", type=int, default=1)
    args, meta, data = harness.start(parser, argv)
    args.wide_epochs = 1 if args.quick else args.wide_epochs
    steps_values = (
        [1, 2, "epoch"] if args.quick else [1, 2, 8, 32, data.batches, "epoch"]
    )
    paper = harness.PAPER_HIDDEN_UNITS
    steps_rows, _ = sweep([FIT, *map(accumulating, steps_values)], paper, data, args)
    by_name = {row["name"]: row for row in steps_rows}

    width_rows = []
    for width in QUICK_WIDTHS if args.quick else WIDTHS:
        hidden = (width, width // 2, width // 4)
        names = ("fit", "acc-epoch", "acc-8")
        if hidden == paper and all(name in by_name for name in names):
            rows, epochs = [by_name[name] for name in names], args.epochs  # measured
        else:
            rows, epochs = sweep(
                [FIT, accumulating("epoch"), accumulating(8)], hidden, data, args
            )
        parameters = rows[0]["trainable_bytes"] // 4
        for row in rows:
            row.update(width=width, parameters=parameters)
        width_rows.append(
            {
                "width": width,
                "hidden_units": list(hidden),
                "parameters": parameters,
                "timed_epochs": epochs,
                "variants": rows,
            }
        )

    state = {
        str(r["accumulation_steps"]): r["accumulation_state_bytes"]
        for r in steps_rows[1:]
    }
    growth, peak = (
        [row[k] for row in steps_rows] for k in ("rss_growth_mb", "peak_rss_mb")
    )
    memory = {
        "accumulator_bytes_over_trainable_bytes_by_width": {
            str(e["width"]): e["variants"][1]["accumulator_bytes"]
            / e["variants"][1]["trainable_bytes"]
            for e in width_rows
        },
        "accumulation_state_bytes_by_steps": state,
        "state_bytes_independent_of_steps": len(set(state.values())) == 1,
        "rss_growth_mb_range_across_steps": [min(growth), max(growth)],
        "peak_rss_mb_range_across_steps": [min(peak), max(peak)],
    }
    for row in steps_rows:
        row.update(width=paper[0], parameters=steps_rows[0]["trainable_bytes"] // 4)
    table = harness.table(
        steps_rows + [r for e in width_rows for r in e["variants"]], COLUMNS
    )
    harness.log(f"\n{table}\n\n{json.dumps(memory, indent=2)}")
    settings = harness.settings_label(args.jit, args.steps_per_execution)
    meta.update(settings=settings, wide_timed_epochs=args.wide_epochs)
    report = {
        "steps_sweep": steps_rows,
        "width_sweep": width_rows,
        "memory": memory,
        "table": table,
    }
    figure = plot(steps_rows, width_rows)
    harness.write_report(args, meta, data, "bench-scaling", report, figure, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
