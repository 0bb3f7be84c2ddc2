"""Does accumulation's overhead stay flat? Time and memory vs steps and width.

Two sweeps, each timed round-robin in one process like ``bench.py`` (jit off
and ``steps_per_execution`` 1, Keras's defaults, unless told otherwise):

* accumulation_steps 1, 2, 8, 32, 118 and ``"epoch"`` against plain ``fit``,
  on the paper's MLP: seconds per epoch, peak RSS, RSS growth in an epoch;
* model width: hidden units (w, w/2, w/4) for w = 128, 1024, 4096, plain
  ``fit`` against ``AccumulatingModel`` with ``"epoch"`` and 8. The wide
  models' epochs are long, so they get fewer timed epochs and warm up on a
  three-batch dataset with the same batch shapes (512, 512 and the ragged 96).

Memory is counted exactly too: the bytes of the accumulators
(``model._accumulation.gradient_sums``) against the bytes of the trainable
weights, for every width and every steps value.

Usage::

    python benchmarks/scaling.py                      # ~6-8 min on one core
    python benchmarks/scaling.py --quick --out /tmp   # smoke test

Writes ``bench-scaling.json`` and ``bench-scaling.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np

WIDTHS = (128, 1024, 4096)
QUICK_WIDTHS = (32, 64)
WIDE_PARAMETERS = 2_000_000  # models above this get --wide-epochs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", default=os.environ.get("ACCUMULATE_DATA_DIR"))
    parser.add_argument(
        "--epochs", type=int, default=None, help="timed epochs per variant (default 5)"
    )
    parser.add_argument(
        "--wide-epochs",
        type=int,
        default=2,
        help=f"timed epochs for models over {WIDE_PARAMETERS:,} parameters",
    )
    parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--quick", action="store_true", help="tiny synthetic smoke test"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pin-cpus", default=None)
    parser.add_argument(
        "--jit", action="store_true", help="compile with jit_compile=True"
    )
    parser.add_argument(
        "--steps-per-execution", type=int, default=1, help="fit's steps_per_execution"
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 5
    if args.quick:
        args.wide_epochs = 1
    return args


def _bytes(variables: Sequence[Any]) -> int:
    """Total bytes of the values of ``variables`` (Keras or TensorFlow)."""
    import tensorflow as tf

    return int(
        sum(
            int(np.prod(v.shape, dtype=np.int64)) * tf.as_dtype(v.dtype).size
            for v in variables
        )
    )


def accumulator_bytes(model: Any) -> int | None:
    """Bytes of an `AccumulatingModel`'s gradient sums (None for other models)."""
    accumulation = getattr(model, "_accumulation", None)
    if accumulation is None:
        return None
    return _bytes(accumulation.gradient_sums)


def accumulation_state_bytes(model: Any) -> int | None:
    """Bytes of all of its accumulation state (sums, sample and step counters)."""
    accumulation = getattr(model, "_accumulation", None)
    if accumulation is None:
        return None
    return _bytes(accumulation.variables_to_save)


class Sweep:
    """Builds `fit` variants of one model shape sharing data and settings."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        threads: int,
        jit_compile: bool,
        steps_per_execution: int,
    ):
        batch_size = harness.BATCH_SIZE
        self.dataset = harness.fit_dataset(x, y, batch_size, threads)
        # Same batch shapes as an epoch (two full batches and the ragged
        # tail), so warming up on it traces and compiles everything.
        tail = len(x) % batch_size
        warm = 2 * batch_size + tail
        self.warmup_dataset = harness.fit_dataset(
            np.concatenate([x[: 2 * batch_size], x[len(x) - tail :]])[:warm],
            np.concatenate([y[: 2 * batch_size], y[len(y) - tail :]])[:warm],
            batch_size,
            threads,
        )
        self.jit_compile = jit_compile
        self.steps_per_execution = steps_per_execution
        self.models: dict[str, Any] = {}

    def variant(
        self,
        name: str,
        accumulation_steps: int | str | None,
        hidden_units: tuple[int, ...],
        short_warmup: bool,
    ) -> harness.Variant:
        """Plain fit (``accumulation_steps=None``) or an `AccumulatingModel`."""
        from accumulate.twins import build_mlp, make_twins

        standard, accumulating = make_twins(
            harness.SEED,
            accumulation_steps=accumulation_steps or 1,
            build=lambda: build_mlp(hidden_units=hidden_units),
        )
        model = standard if accumulation_steps is None else accumulating
        harness.compile_for_fit(
            model,
            jit_compile=self.jit_compile,
            steps_per_execution=self.steps_per_execution,
        )
        self.models[name] = model
        dataset, warmup_dataset = self.dataset, self.warmup_dataset
        return harness.Variant(
            name,
            "keras-fit" if accumulation_steps is None else "accumulating",
            lambda: harness.fit_one_epoch(model, dataset),
            jit_compile=self.jit_compile,
            steps_per_execution=self.steps_per_execution,
            accumulation_steps=accumulation_steps,
            warm_up=(lambda: harness.fit_one_epoch(model, warmup_dataset))
            if short_warmup
            else None,
        )


def _row(
    variant: harness.Variant,
    measurement: harness.Measurement,
    model: Any,
    fit: harness.Measurement,
    num_samples: int,
) -> dict[str, Any]:
    """One variant's JSON row; ratios are paired with plain fit's epochs."""
    return {
        "name": variant.name,
        "accumulation_steps": variant.accumulation_steps,
        "epoch_seconds": measurement.seconds,
        "epoch_cpu_seconds": measurement.cpu_seconds,
        "median_s": measurement.median_seconds,
        "cpu_median_s": measurement.median_cpu_seconds,
        "samples_per_s": num_samples / measurement.median_seconds,
        "ratio_to_fit": harness.paired_ratio(measurement.seconds, fit.seconds),
        "cpu_ratio_to_fit": harness.paired_ratio(
            measurement.cpu_seconds, fit.cpu_seconds
        ),
        "peak_rss_mb": measurement.peak_rss_mb,
        "rss_growth_mb": measurement.rss_growth_mb,
        "trainable_bytes": _bytes(model.trainable_variables),
        "accumulator_bytes": accumulator_bytes(model),
        "accumulation_state_bytes": accumulation_state_bytes(model),
    }


def steps_sweep(
    x: np.ndarray,
    y: np.ndarray,
    args: argparse.Namespace,
    steps_values: Sequence[int | str],
) -> list[dict[str, Any]]:
    """Plain fit and every steps value on the paper's MLP."""
    from accumulate.twins import PAPER_HIDDEN_UNITS

    sweep = Sweep(x, y, args.threads, args.jit, args.steps_per_execution)
    variants = [sweep.variant("fit", None, PAPER_HIDDEN_UNITS, short_warmup=False)]
    variants += [
        sweep.variant(f"acc-{steps}", steps, PAPER_HIDDEN_UNITS, short_warmup=False)
        for steps in steps_values
    ]
    print(f"steps sweep: {len(variants)} variants", flush=True)
    measurements = harness.measure_round_robin(
        variants, args.epochs, 1, log=lambda m: print(m, flush=True)
    )
    fit = measurements[variants[0].key]
    return [
        _row(v, measurements[v.key], sweep.models[v.name], fit, len(x))
        for v in variants
    ]


def width_sweep(
    x: np.ndarray,
    y: np.ndarray,
    args: argparse.Namespace,
    widths: Sequence[int],
    reuse: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Plain fit, "epoch" and 8 for each width (the paper's width reused)."""
    from accumulate.twins import PAPER_HIDDEN_UNITS

    results = []
    for width in widths:
        hidden_units = (width, width // 2, width // 4)
        if hidden_units == PAPER_HIDDEN_UNITS and all(
            name in reuse for name in ("fit", "acc-epoch", "acc-8")
        ):
            rows = [reuse["fit"], reuse["acc-epoch"], reuse["acc-8"]]
            epochs = args.epochs
        else:
            sweep = Sweep(x, y, args.threads, args.jit, args.steps_per_execution)
            from accumulate.twins import build_mlp

            parameters = build_mlp(hidden_units=hidden_units).count_params()
            wide = parameters > WIDE_PARAMETERS
            epochs = args.wide_epochs if wide else args.epochs
            variants = [
                sweep.variant(name, steps, hidden_units, short_warmup=wide)
                for name, steps in (("fit", None), ("acc-epoch", "epoch"), ("acc-8", 8))
            ]
            print(
                f"width {width}: {parameters:,} parameters, {epochs} timed epochs",
                flush=True,
            )
            measurements = harness.measure_round_robin(
                variants, epochs, 1, log=lambda m: print(m, flush=True)
            )
            fit = measurements[variants[0].key]
            rows = [
                _row(v, measurements[v.key], sweep.models[v.name], fit, len(x))
                for v in variants
            ]
        results.append(
            {
                "width": width,
                "hidden_units": list(hidden_units),
                "parameters": rows[0]["trainable_bytes"] // 4,
                "timed_epochs": epochs,
                "variants": rows,
            }
        )
    return results


def render(
    steps_rows: Sequence[dict[str, Any]], width_rows: Sequence[dict[str, Any]]
) -> str:
    """The two sweeps as plain-text tables."""
    steps_table = harness.format_table(
        [
            "variant",
            "s/epoch",
            "CPU s",
            "x fit",
            "x fit CPU",
            "peak RSS MB",
            "+MB in epoch",
            "accum. bytes",
        ],
        [
            [
                row["name"],
                f"{row['median_s']:.3f}",
                f"{row['cpu_median_s']:.3f}",
                f"{row['ratio_to_fit']:.3f}x",
                f"{row['cpu_ratio_to_fit']:.3f}x",
                f"{row['peak_rss_mb']:.0f}",
                f"{row['rss_growth_mb']:.1f}",
                "-"
                if row["accumulator_bytes"] is None
                else f"{row['accumulator_bytes']:,}",
            ]
            for row in steps_rows
        ],
    )
    width_table = harness.format_table(
        [
            "width",
            "params",
            "variant",
            "s/epoch",
            "CPU s",
            "x fit",
            "x fit CPU",
            "weights B",
            "accum. B",
            "+MB in epoch",
        ],
        [
            [
                str(entry["width"]),
                f"{entry['parameters']:,}",
                row["name"],
                f"{row['median_s']:.3f}",
                f"{row['cpu_median_s']:.3f}",
                f"{row['ratio_to_fit']:.3f}x",
                f"{row['cpu_ratio_to_fit']:.3f}x",
                f"{row['trainable_bytes']:,}",
                "-"
                if row["accumulator_bytes"] is None
                else f"{row['accumulator_bytes']:,}",
                f"{row['rss_growth_mb']:.1f}",
            ]
            for entry in width_rows
            for row in entry["variants"]
        ],
    )
    return f"{steps_table}\n\n{width_table}"


def plot(
    steps_rows: Sequence[dict[str, Any]],
    width_rows: Sequence[dict[str, Any]],
    path: Path,
    title: str,
) -> None:
    """Four panels: time vs steps, ratio vs width, bytes vs width, RSS vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((time_axes, ratio_axes), (bytes_axes, rss_axes)) = plt.subplots(
        2, 2, figsize=(12, 8.5)
    )
    fit_row = steps_rows[0]
    accumulating = steps_rows[1:]
    labels = [str(row["accumulation_steps"]) for row in accumulating]
    positions = np.arange(len(accumulating))

    time_axes.plot(
        positions,
        [row["median_s"] for row in accumulating],
        "o-",
        color="#dd8452",
        label="AccumulatingModel",
    )
    for position, row in zip(positions, accumulating, strict=True):
        time_axes.annotate(
            f"{row['ratio_to_fit']:.3f}x\n(CPU {row['cpu_ratio_to_fit']:.3f}x)",
            (position, row["median_s"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=7,
        )
    time_axes.axhline(
        fit_row["median_s"], color="#4c72b0", linestyle="--", label="plain fit"
    )
    time_axes.set_xticks(positions, labels)
    time_axes.set_xlabel("accumulation_steps")
    time_axes.set_ylabel("seconds per epoch (median)")
    time_axes.set_ylim(0, max(row["median_s"] for row in steps_rows) * 1.5)
    time_axes.set_title("Time per epoch vs accumulation_steps (paper MLP)", fontsize=10)
    time_axes.legend(fontsize=8)

    widths = [entry["width"] for entry in width_rows]
    for name, colour in (("acc-epoch", "#dd8452"), ("acc-8", "#c44e52")):
        for field, style, kind in (
            ("ratio_to_fit", "o-", "wall"),
            ("cpu_ratio_to_fit", "s--", "CPU"),
        ):
            ratios = [
                next(r[field] for r in entry["variants"] if r["name"] == name)
                for entry in width_rows
            ]
            ratio_axes.plot(
                widths, ratios, style, color=colour, label=f"{name} ({kind})"
            )
    ratio_axes.axhline(1.0, color="#4c72b0", linestyle="--", label="plain fit")
    ratio_axes.axhline(1.03, color="grey", linestyle=":", label="1.03x target")
    ratio_axes.set_xscale("log", base=2)
    ratio_axes.set_xticks(widths, [str(w) for w in widths])
    ratio_axes.set_xlabel("first hidden layer width w (layers w, w/2, w/4)")
    ratio_axes.set_ylabel("epoch time / plain fit's (paired median)")
    ratio_axes.set_title("Accumulation overhead vs model width", fontsize=10)
    ratio_axes.legend(fontsize=8)

    bar_width = 0.38
    indices = np.arange(len(width_rows))
    weight_mb = [
        entry["variants"][0]["trainable_bytes"] / 2**20 for entry in width_rows
    ]
    accumulator_mb = [
        (
            next(
                r["accumulator_bytes"]
                for r in entry["variants"]
                if r["name"] == "acc-epoch"
            )
            or 0
        )
        / 2**20
        for entry in width_rows
    ]
    bytes_axes.bar(
        indices - bar_width / 2,
        weight_mb,
        bar_width,
        label="trainable weights",
        color="#4c72b0",
    )
    bytes_axes.bar(
        indices + bar_width / 2,
        accumulator_mb,
        bar_width,
        label="accumulators",
        color="#dd8452",
    )
    bytes_axes.set_yscale("log")
    bytes_axes.set_xticks(indices, [f"w={w}" for w in widths])
    bytes_axes.set_ylabel("MiB")
    bytes_axes.set_title(
        "Accumulators = one copy of the trainable weights", fontsize=10
    )
    bytes_axes.legend(fontsize=8)

    rss_labels = ["fit", *labels]
    rss_positions = np.arange(len(steps_rows))
    rss_axes.bar(
        rss_positions,
        [row["rss_growth_mb"] for row in steps_rows],
        color=["#4c72b0"] + ["#dd8452"] * len(accumulating),
    )
    for position, row in zip(rss_positions, steps_rows, strict=True):
        rss_axes.annotate(
            f"peak {row['peak_rss_mb']:.0f}",
            (position, row["rss_growth_mb"]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=7,
        )
    rss_axes.set_xticks(rss_positions, rss_labels)
    rss_axes.set_xlabel("accumulation_steps")
    rss_axes.set_ylabel("RSS growth within an epoch (MiB)")
    rss_axes.set_title(
        "Memory per epoch does not grow with accumulation_steps", fontsize=10
    )

    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs both sweeps; returns the process exit code."""
    args = parse_args(argv)
    info, images, labels, data = harness.start(args)
    started = time.perf_counter()
    x, y = harness.to_float(images, labels)
    batches = harness.num_batches(len(x), harness.BATCH_SIZE)
    steps_values: list[int | str] = (
        [1, 2, "epoch"] if args.quick else [1, 2, 8, 32, batches, "epoch"]
    )
    widths = QUICK_WIDTHS if args.quick else WIDTHS

    steps_rows = steps_sweep(x, y, args, steps_values)
    width_rows = width_sweep(
        x, y, args, widths, {row["name"]: row for row in steps_rows}
    )
    table = render(steps_rows, width_rows)
    print()
    print(table)

    accumulator_ratio = {
        str(entry["width"]): next(
            row["accumulator_bytes"] / row["trainable_bytes"]
            for row in entry["variants"]
            if row["accumulator_bytes"] is not None
        )
        for entry in width_rows
    }
    state_sizes = {
        str(row["accumulation_steps"]): row["accumulation_state_bytes"]
        for row in steps_rows[1:]
    }
    growths = [row["rss_growth_mb"] for row in steps_rows]
    memory = {
        "accumulator_bytes_over_trainable_bytes_by_width": accumulator_ratio,
        "accumulation_state_bytes_by_steps": state_sizes,
        "state_bytes_independent_of_steps": len(set(state_sizes.values())) == 1,
        "rss_growth_mb_range_across_steps": [min(growths), max(growths)],
        "peak_rss_mb_range_across_steps": [
            min(row["peak_rss_mb"] for row in steps_rows),
            max(row["peak_rss_mb"] for row in steps_rows),
        ],
    }
    print()
    print(json.dumps(memory, indent=2))

    settings = f"jit={'on' if args.jit else 'off'} spe={args.steps_per_execution}"
    info.update(
        {
            "load_average_at_end": list(os.getloadavg()),
            "wall_seconds": time.perf_counter() - started,
            "data": data,
            "num_samples": len(x),
            "batch_size": harness.BATCH_SIZE,
            "batches_per_epoch": batches,
            "settings": settings,
            "timed_epochs": args.epochs,
            "wide_timed_epochs": args.wide_epochs,
            "quick": args.quick,
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": info,
        "steps_sweep": steps_rows,
        "width_sweep": width_rows,
        "memory": memory,
        "table": table,
    }
    (args.out / "bench-scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(
        steps_rows,
        width_rows,
        args.out / "bench-scaling.png",
        f"{data}, batch {harness.BATCH_SIZE}, {settings}, {args.threads} thread(s)",
    )
    print(f"\nwrote bench-scaling.json and bench-scaling.png into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
