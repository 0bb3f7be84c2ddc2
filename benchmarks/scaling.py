"""Does accumulation's overhead stay flat? Time and memory vs steps and width.

Plain fit against accumulation_steps 1, 2, 8, 32, 118 and "epoch" on the
paper's MLP, and against "epoch" and 8 with hidden layers (w, w/2, w/4) for
w = 128, 1024, 4096 (wide models: --wide-epochs); jit off and
steps_per_execution 1 unless told otherwise. Writes bench-scaling.json and
bench-scaling.png into --out; a full run takes 6-8 min on one core.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import harness
import matplotlib.pyplot as plt
import numpy as np
from harness import FIT, Spec, accumulating

WIDTHS, QUICK_WIDTHS, PAPER_WIDTH = (128, 1024, 4096), (32, 64), 128
WIDTH_SPECS = (FIT, accumulating("epoch"), accumulating(8))
BLUE, ORANGE, RED = "#4c72b0", "#dd8452", "#c44e52"
COLUMNS = ["width", "params", "name", "s/epoch", "CPU s", "x fit", "x fit CPU",
           "peak RSS MB", "+MB", "weights B", "accum. B"]  # fmt: skip


def sweep(specs: Sequence[Spec], width: int, data: harness.Data, args: Any) -> dict:
    """Times ``specs`` with hidden layers (w, w/2, w/4): one width_sweep entry."""
    hidden = (width, width // 2, width // 4)
    jit, spe = args.jit, args.steps_per_execution
    variants = [
        harness.fit_variant(replace(s, hidden=hidden), data, jit, spe) for s in specs
    ]
    parameters = variants[0].model.count_params()
    epochs = args.wide_epochs if parameters > harness.WIDE_PARAMETERS else args.epochs
    harness.log(f"hidden units {hidden}:")
    harness.measure(variants, epochs, args.warmup)
    rows = harness.rows(variants, len(data.x))
    for row in rows:
        row.update(width=width, parameters=parameters)
    return {
        "width": width,
        "hidden_units": list(hidden),
        "parameters": parameters,
        "timed_epochs": epochs,
        "variants": rows,
    }


def plot(steps: list[dict[str, Any]], widths: list[dict[str, Any]]) -> Any:
    """Time vs steps, ratio vs width, bytes vs width, RSS growth vs steps."""
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (time_axes, ratio_axes), (bytes_axes, rss_axes) = axes
    labels = [str(row["accumulation_steps"] or "fit") for row in steps]
    note = {"textcoords": "offset points", "ha": "center", "fontsize": 7}
    ours, seconds = range(1, len(steps)), [row["median_s"] for row in steps]
    time_axes.plot(ours, seconds[1:], "o-", color=ORANGE, label="AccumulatingModel")
    for i in ours:
        ratios = "{ratio_to_fit:.3f}x\n(CPU {cpu_ratio_to_fit:.3f}x)".format(**steps[i])
        time_axes.annotate(ratios, (i, seconds[i]), (0, 8), **note)
    time_axes.axhline(seconds[0], color=BLUE, ls="--", label="plain fit")
    time_axes.set(xticks=ours, xticklabels=labels[1:], ylim=(0, max(seconds) * 1.5))
    time_axes.set(ylabel="seconds per epoch (median)")
    time_axes.set_title("Time per epoch vs accumulation_steps (paper MLP)")

    sizes = [entry["width"] for entry in widths]
    for index, (name, colour) in enumerate((("acc-epoch", ORANGE), ("acc-8", RED)), 1):
        for key, style, kind in (("", "o-", "wall"), ("cpu_", "s--", "CPU")):
            values = [e["variants"][index][f"{key}ratio_to_fit"] for e in widths]
            label = f"{name} ({kind})"
            ratio_axes.plot(sizes, values, style, color=colour, label=label)
    ratio_axes.axhline(1.0, color=BLUE, ls="--", label="plain fit")
    ratio_axes.axhline(1.03, color="grey", ls=":", label="1.03x target")
    ratio_axes.set_xscale("log", base=2)
    ratio_axes.set(xticks=sizes, xticklabels=sizes, xlabel="first hidden layer width w")
    ratio_axes.set(ylabel="epoch time / plain fit's (paired median)")
    ratio_axes.set_title("Accumulation overhead vs model width (layers w, w/2, w/4)")

    at = np.arange(len(widths))
    bars = ((-0.19, "trainable", BLUE), (0.19, "accumulator", ORANGE))
    for offset, key, colour in bars:
        mib = [e["variants"][1][f"{key}_bytes"] / 2**20 for e in widths]
        bytes_axes.bar(at + offset, mib, 0.38, label=f"{key} bytes", color=colour)
    bytes_axes.set(yscale="log", xticks=at, xticklabels=[f"w={w}" for w in sizes])
    bytes_axes.set(ylabel="MiB")
    bytes_axes.set_title("Accumulators = one copy of the trainable weights")

    growth = [row["rss_growth_mb"] for row in steps]
    rss_axes.bar(range(len(steps)), growth, color=[BLUE] + [ORANGE] * len(ours))
    for i, row in enumerate(steps):
        peak = f"peak {row['peak_rss_mb']:.0f}"
        rss_axes.annotate(peak, (i, growth[i]), (0, 3), **note)
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


def memory(steps: list[dict[str, Any]], widths: list[dict[str, Any]]) -> dict:
    state = {
        str(r["accumulation_steps"]): r["accumulation_state_bytes"] for r in steps[1:]
    }
    growth, peak = ([row[k] for row in steps] for k in ("rss_growth_mb", "peak_rss_mb"))
    return {
        "accumulator_bytes_over_trainable_bytes_by_width": {
            str(e["width"]): e["variants"][1]["accumulator_bytes"]
            / e["variants"][1]["trainable_bytes"]
            for e in widths
        },
        "accumulation_state_bytes_by_steps": state,
        "state_bytes_independent_of_steps": len(set(state.values())) == 1,
        "rss_growth_mb_range_across_steps": [min(growth), max(growth)],
        "peak_rss_mb_range_across_steps": [min(peak), max(peak)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(__doc__, epochs=5)
    add = parser.add_argument
    add("--wide-epochs", type=int, default=2, help="timed epochs of wide models")
    add("--jit", action="store_true", help="jit_compile=True")
    add("--steps-per-execution", type=int, default=1)
    args, meta, data = harness.start(parser, argv)
    args.wide_epochs = 1 if args.quick else args.wide_epochs
    steps = [1, 2, "epoch"] if args.quick else [1, 2, 8, 32, data.batches, "epoch"]
    # The paper's MLP is w = 128.
    paper = sweep([FIT, *map(accumulating, steps)], PAPER_WIDTH, data, args)
    steps_rows, width_rows = paper["variants"], []
    by_name = {row["name"]: row for row in steps_rows}
    for width in QUICK_WIDTHS if args.quick else WIDTHS:
        names = [spec.name for spec in WIDTH_SPECS]
        if width == PAPER_WIDTH and set(names) <= by_name.keys():  # measured already
            width_rows.append({**paper, "variants": [by_name[n] for n in names]})
        else:
            width_rows.append(sweep(WIDTH_SPECS, width, data, args))
    summary = memory(steps_rows, width_rows)
    widths_rows = [row for entry in width_rows for row in entry["variants"]]
    table = harness.table(steps_rows + widths_rows, COLUMNS)
    harness.log(f"\n{table}\n\n{json.dumps(summary, indent=2)}")
    settings = harness.settings_label(args.jit, args.steps_per_execution)
    meta.update(settings=settings, wide_timed_epochs=args.wide_epochs)
    report = {"steps_sweep": steps_rows, "width_sweep": width_rows}
    report |= {"memory": summary, "table": table}
    figure = plot(steps_rows, width_rows)
    harness.write_report(args, meta, "bench-scaling", report, figure, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
