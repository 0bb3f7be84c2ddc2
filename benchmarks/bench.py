"""Seconds per training epoch: `AccumulatingModel.fit` against its references.

Everything runs in one process: each variant is warmed up (traced and, with
``jit_compile``, XLA-compiled), then the variants are run round-robin, one
epoch each per round, and each variant's time is the median of its timed
epochs. Validation is never run. The variants, on MNIST with batch 512, the
paper's MLP, SGD(0.01) and sparse categorical cross-entropy on logits:

* ``fit``: plain `keras.Model.fit`;
* ``acc-1``, ``acc-8``, ``acc-118``, ``acc-epoch``: `AccumulatingModel` with
  those ``accumulation_steps``;
* ``keras-ga-118``: plain fit with Keras 3's own
  ``SGD(gradient_accumulation_steps=118)``;

each with ``jit_compile`` off and on and ``steps_per_execution`` 1 and 118
(the whole epoch); and, without those settings,

* ``floor``: one hand-written `tf.function` running the epoch's 118 SGD steps
  on in-memory tensors (jit off and on), the fastest this step can go here;
* ``notebook-standard`` and ``notebook-accumulating``: the notebook's eager
  loops (`accumulate.notebook_loops`), the project's baseline.

Usage::

    python benchmarks/bench.py                     # full run, ~10 min
    python benchmarks/bench.py --quick --out /tmp  # smoke test, seconds
    python benchmarks/bench.py --only 'fit*,acc-epoch*' --epochs 5

Writes ``bench.json`` and ``bench.png`` into ``--out`` (default ``results/``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np

FAMILY_COLOURS = {
    "keras-fit": "#4c72b0",
    "accumulating": "#dd8452",
    "keras-ga": "#8172b3",
    "floor": "#55a868",
    "notebook": "#c44e52",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("ACCUMULATE_DATA_DIR"),
        help="directory holding mnist/*.gz (default: $ACCUMULATE_DATA_DIR, "
        "else keras.datasets)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="timed epochs per variant (default 20; 1 with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed epochs per variant first"
    )
    parser.add_argument(
        "--out", type=Path, default=harness.DEFAULT_RESULTS_DIR, help="output directory"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {harness.QUICK_SAMPLES} synthetic samples, jit off, "
        "a few variants",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="TensorFlow intra- and inter-op threads (default 1: one core)",
    )
    parser.add_argument(
        "--pin-cpus",
        default=None,
        help="comma-separated CPU ids to pin the process to (default: no pinning)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated glob patterns (* and ?; brackets are literal) over "
        "variant labels, e.g. 'fit*,acc-epoch*,floor*' or '*jit=on spe=118]*'",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 20
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


# -- Variants ---------------------------------------------------------------


def _matches(label: str, pattern: str) -> bool:
    """Glob match where ``*`` and ``?`` are wildcards and brackets are literal."""
    literal_brackets = re.sub(r"([\[\]])", r"[\1]", pattern)
    return fnmatch.fnmatchcase(label, literal_brackets)


def _fit_variant(
    name: str,
    family: str,
    model: Any,
    dataset: Any,
    *,
    jit_compile: bool,
    steps_per_execution: int,
    accumulation_steps: int | str | None = None,
    gradient_accumulation_steps: int | None = None,
) -> harness.Variant:
    """Compiles ``model`` and wraps one `fit` epoch of it as a variant."""
    harness.compile_for_fit(
        model,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    return harness.Variant(
        name,
        family,
        lambda: harness.fit_one_epoch(model, dataset),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
        accumulation_steps=accumulation_steps or gradient_accumulation_steps,
    )


def _notebook_variants(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    wanted: Callable[[str], bool],
) -> list[harness.Variant]:
    """The notebook's two eager loops, on the notebook's own float64 pipeline."""
    import keras

    from accumulate.notebook_loops import (
        make_notebook_dataset,
        notebook_accumulating_epoch,
        notebook_standard_epoch,
    )
    from accumulate.twins import build_mlp

    loops = [
        (name, loop)
        for name, loop in [
            ("notebook-standard", notebook_standard_epoch),
            ("notebook-accumulating", notebook_accumulating_epoch),
        ]
        if wanted(f"{name} [eager]")
    ]
    if not loops:
        return []
    dataset = make_notebook_dataset(images, labels, batch_size)
    loss_fn = harness.loss_function()
    variants = []
    for name, loop in loops:
        keras.utils.set_random_seed(harness.SEED)
        model = build_mlp()
        optimizer = keras.optimizers.SGD(harness.LEARNING_RATE)

        def run_epoch(
            loop: Callable = loop, model: Any = model, optimizer: Any = optimizer
        ) -> harness.EpochTime:
            return harness.timed(
                lambda: loop(model, optimizer, dataset, loss_fn),
                lambda: model.trainable_variables[-1].numpy(),
            )

        variants.append(harness.Variant(name, "notebook", run_epoch))
    return variants


def build_variants(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    threads: int,
    quick: bool,
    patterns: list[str] | None,
) -> list[harness.Variant]:
    """Every variant to time, filtered by ``patterns`` before being built."""
    import keras

    from accumulate.twins import build_mlp, make_twins

    x, y = harness.to_float(images, labels)
    batches = harness.num_batches(len(x), batch_size)
    dataset = harness.fit_dataset(x, y, batch_size, threads)

    # name, family, accumulation_steps (ours), gradient_accumulation_steps (Keras)
    fit_specs: list[tuple[str, str, int | str | None, int | None]] = [
        ("fit", "keras-fit", None, None),
        ("acc-1", "accumulating", 1, None),
        ("acc-8", "accumulating", 8, None),
        (f"acc-{batches}", "accumulating", batches, None),
        ("acc-epoch", "accumulating", "epoch", None),
        (f"keras-ga-{batches}", "keras-ga", None, batches),
    ]
    jit_settings = [False, True]
    if quick:
        quick_names = {"fit", "acc-8", "acc-epoch", f"keras-ga-{batches}"}
        fit_specs = [spec for spec in fit_specs if spec[0] in quick_names]
        jit_settings = [False]

    def wanted(label: str) -> bool:
        return patterns is None or any(_matches(label, p) for p in patterns)

    variants: list[harness.Variant] = []
    for jit_compile in jit_settings:
        for steps_per_execution in (1, batches):
            settings = f"jit={'on' if jit_compile else 'off'} spe={steps_per_execution}"
            for name, family, accumulation_steps, keras_steps in fit_specs:
                if not wanted(f"{name} [{settings}]"):
                    continue
                standard, accumulating = make_twins(
                    harness.SEED, accumulation_steps=accumulation_steps or 1
                )
                model = accumulating if family == "accumulating" else standard
                variants.append(
                    _fit_variant(
                        name,
                        family,
                        model,
                        dataset,
                        jit_compile=jit_compile,
                        steps_per_execution=steps_per_execution,
                        accumulation_steps=accumulation_steps,
                        gradient_accumulation_steps=keras_steps,
                    )
                )
    for jit_compile in jit_settings:
        if wanted(f"floor [jit={'on' if jit_compile else 'off'}]"):
            keras.utils.set_random_seed(harness.SEED)
            variants.append(
                harness.floor_variant(build_mlp(), x, y, batch_size, jit_compile)
            )
    return variants + _notebook_variants(images, labels, batch_size, wanted)


# -- Summaries --------------------------------------------------------------

DEFAULT_FIT = "fit [jit=off spe=1]"
TARGET_TO_FIT = 1.03
TARGET_TO_FLOOR = 1.3


def _reference_keys(variant: harness.Variant) -> tuple[str, str]:
    """The plain-fit and floor rows a variant is compared with.

    Keras variants: plain fit at the same jit and steps_per_execution, and
    the floor at the same jit. Floors and notebook loops: plain fit at
    Keras's defaults (jit off, spe 1) and the jit-off floor.
    """
    if variant.family in ("floor", "notebook"):
        fit_key = DEFAULT_FIT
    else:
        fit_key = f"fit [{variant.settings}]"
    return fit_key, f"floor [jit={'on' if variant.jit_compile else 'off'}]"


def _pair(
    measurements: dict[str, harness.Measurement], key: str, reference: str
) -> dict[str, float] | None:
    """Paired wall and CPU ratios of ``key`` to ``reference`` (None if absent)."""
    if key not in measurements or reference not in measurements:
        return None
    mine, theirs = measurements[key], measurements[reference]
    return {
        "wall": harness.paired_ratio(mine.seconds, theirs.seconds),
        "cpu": harness.paired_ratio(mine.cpu_seconds, theirs.cpu_seconds),
    }


def summarise(
    variants: Sequence[harness.Variant],
    measurements: dict[str, harness.Measurement],
    num_samples: int,
) -> list[dict[str, Any]]:
    """One JSON-ready row per variant, with its ratios (see `_reference_keys`).

    Ratios are paired (`harness.paired_ratio`): the median over rounds of
    this variant's epoch time over the reference's in the same round, for
    wall time and for CPU time.
    """
    rows = []
    for variant in variants:
        measurement = measurements[variant.key]
        fit_key, floor_key = _reference_keys(variant)
        to_fit = _pair(measurements, variant.key, fit_key)
        to_floor = _pair(measurements, variant.key, floor_key)
        rows.append(
            {
                "key": variant.key,
                "name": variant.name,
                "family": variant.family,
                "settings": variant.settings,
                "jit_compile": variant.jit_compile,
                "steps_per_execution": variant.steps_per_execution,
                "accumulation_steps": variant.accumulation_steps,
                "epoch_seconds": measurement.seconds,
                "epoch_cpu_seconds": measurement.cpu_seconds,
                "warmup_seconds": measurement.warmup_seconds,
                "median_s": measurement.median_seconds,
                "min_s": min(measurement.seconds),
                "cpu_median_s": measurement.median_cpu_seconds,
                "samples_per_s": num_samples / measurement.median_seconds,
                "fit_reference": fit_key,
                "floor_reference": floor_key,
                "ratio_to_fit": to_fit and to_fit["wall"],
                "cpu_ratio_to_fit": to_fit and to_fit["cpu"],
                "ratio_to_floor": to_floor and to_floor["wall"],
                "cpu_ratio_to_floor": to_floor and to_floor["cpu"],
                "peak_rss_mb": measurement.peak_rss_mb,
                "rss_growth_mb": measurement.rss_growth_mb,
            }
        )
    return rows


def reproduction_settings(batches: int) -> str:
    """The settings `accumulate.training` trains the twins with."""
    try:
        from accumulate.training import JIT_COMPILE
    except ImportError:  # the training module is optional for benchmarking
        JIT_COMPILE = True
    return f"jit={'on' if JIT_COMPILE else 'off'} spe={batches}"


def key_ratios(
    rows: Sequence[dict[str, Any]],
    measurements: dict[str, harness.Measurement],
    batches: int,
) -> dict[str, Any]:
    """The headline comparisons (paired wall and CPU ratios)."""
    settings_list = list(
        dict.fromkeys(
            row["settings"]
            for row in rows
            if row["family"] not in ("floor", "notebook")
        )
    )
    ours = ["1", "8", str(batches), "epoch"]
    keras_ga = f"keras-ga-{batches}"
    per_settings: dict[str, dict[str, Any]] = {}
    for settings in settings_list:
        fit = f"fit [{settings}]"
        floor = f"floor [{settings.split()[0]}]"
        entry = {
            f"acc-{steps}/fit": _pair(measurements, f"acc-{steps} [{settings}]", fit)
            for steps in ours
        }
        entry |= {
            f"acc-{steps}/floor": _pair(
                measurements, f"acc-{steps} [{settings}]", floor
            )
            for steps in ours
        }
        for steps in (str(batches), "epoch"):
            entry[f"acc-{steps}/{keras_ga}"] = _pair(
                measurements, f"acc-{steps} [{settings}]", f"{keras_ga} [{settings}]"
            )
        entry[f"{keras_ga}/fit"] = _pair(measurements, f"{keras_ga} [{settings}]", fit)
        entry["fit/floor"] = _pair(measurements, fit, floor)
        per_settings[settings] = {k: v for k, v in entry.items() if v is not None}

    def best(family: str, name: str | None = None) -> str | None:
        candidates = [
            row
            for row in rows
            if row["family"] == family and (name is None or row["name"] == name)
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda row: row["median_s"])["key"]

    best_fit, best_floor = best("keras-fit"), best("floor")
    best_epoch = best("accumulating", "acc-epoch")
    summary: dict[str, Any] = {
        "ratio_method": "median over rounds of per-round ratios (paired)",
        "best_fit": best_fit,
        "best_acc_epoch": best_epoch,
        "best_floor": best_floor,
        "best_fit/best_floor": best_fit
        and best_floor
        and _pair(measurements, best_fit, best_floor),
        "best_acc_epoch/best_floor": best_epoch
        and best_floor
        and _pair(measurements, best_epoch, best_floor),
        "notebook-standard/best_fit": best_fit
        and _pair(measurements, "notebook-standard [eager]", best_fit),
        "notebook-accumulating/best_acc_epoch": best_epoch
        and _pair(measurements, "notebook-accumulating [eager]", best_epoch),
        "per_settings": per_settings,
    }

    reproduction = reproduction_settings(batches)
    checks = per_settings.get(reproduction, {})
    targets: dict[str, Any] = {"settings": reproduction}
    for steps in ("8", str(batches), "epoch"):
        to_fit = checks.get(f"acc-{steps}/fit")
        to_floor = checks.get(f"acc-{steps}/floor")
        if to_fit is None or to_floor is None:
            continue
        targets[f"acc-{steps}"] = {
            "to_fit": to_fit,
            "to_floor": to_floor,
            f"to_fit<={TARGET_TO_FIT}": {
                k: v <= TARGET_TO_FIT for k, v in to_fit.items()
            },
            f"to_floor<={TARGET_TO_FLOOR}": {
                k: v <= TARGET_TO_FLOOR for k, v in to_floor.items()
            },
        }
    summary["targets"] = targets
    return summary


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table printed at the end of a run."""
    headers = [
        "variant",
        "s/epoch",
        "min s",
        "CPU s",
        "samples/s",
        "x fit",
        "x fit CPU",
        "x floor",
        "x floor CPU",
        "peak RSS MB",
        "+MB",
    ]
    body = [
        [
            row["key"],
            f"{row['median_s']:.3f}",
            f"{row['min_s']:.3f}",
            f"{row['cpu_median_s']:.3f}",
            f"{row['samples_per_s']:,.0f}",
            harness.format_ratio(row["ratio_to_fit"]),
            harness.format_ratio(row["cpu_ratio_to_fit"]),
            harness.format_ratio(row["ratio_to_floor"]),
            harness.format_ratio(row["cpu_ratio_to_floor"]),
            f"{row['peak_rss_mb']:.0f}",
            f"{row['rss_growth_mb']:.1f}",
        ]
        for row in rows
    ]
    return harness.format_table(headers, body)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars of seconds per epoch, one per variant, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [row["key"] for row in rows]
    seconds = [row["median_s"] for row in rows]
    colours = [FAMILY_COLOURS.get(row["family"], "grey") for row in rows]
    figure, axes = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    positions = np.arange(len(rows))[::-1]
    axes.barh(positions, seconds, color=colours)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.tick_params(axis="x", which="minor", labelsize=7)
    axes.set_xlabel("seconds per training epoch (median; log scale)")
    for position, row in zip(positions, rows, strict=True):
        note = f" {row['median_s']:.3f}s"
        if row["ratio_to_fit"] is not None and row["family"] != "keras-fit":
            note += f"  {row['ratio_to_fit']:.2f}x fit"
        axes.text(row["median_s"], position, note, va="center", fontsize=7)
    floors = [row["median_s"] for row in rows if row["family"] == "floor"]
    if floors:
        axes.axvline(
            min(floors), color=FAMILY_COLOURS["floor"], linestyle="--", linewidth=1
        )
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colour)
        for family, colour in FAMILY_COLOURS.items()
        if any(row["family"] == family for row in rows)
    ]
    names = [
        family
        for family in FAMILY_COLOURS
        if any(row["family"] == family for row in rows)
    ]
    axes.legend(handles, names, loc="lower right", fontsize=8)
    axes.set_xlim(right=max(seconds) * 4)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- Main ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code."""
    args = parse_args(argv)
    info, images, labels, data = harness.start(args)
    started = time.perf_counter()
    batch_size = harness.BATCH_SIZE
    batches = harness.num_batches(len(images), batch_size)
    patterns = [p.strip() for p in args.only.split(",")] if args.only else None

    variants = build_variants(
        images, labels, batch_size, args.threads, args.quick, patterns
    )
    if not variants:
        print(f"--only {args.only!r} matches no variant", file=sys.stderr)
        return 2
    print(
        f"{len(variants)} variants, {data}, batch {batch_size} ({batches} batches), "
        f"{args.threads} thread(s), "
        f"{args.warmup} warm-up + {args.epochs} timed epochs each",
        flush=True,
    )
    measurements = harness.measure_round_robin(
        variants, args.epochs, args.warmup, log=lambda m: print(m, flush=True)
    )
    rows = summarise(variants, measurements, len(images))
    table = render_table(rows)
    ratios = key_ratios(rows, measurements, batches)
    print()
    print(table)
    print()
    print(json.dumps(ratios, indent=2))

    info.update(
        {
            "load_average_at_end": list(os.getloadavg()),
            "wall_seconds": time.perf_counter() - started,
            "data": data,
            "num_samples": len(images),
            "batch_size": batch_size,
            "batches_per_epoch": batches,
            "timed_epochs": args.epochs,
            "warmup_epochs": args.warmup,
            "quick": args.quick,
            "only": args.only,
            "model": "build_mlp() (784-128-64-32-10 tanh, 111,146 parameters)",
            "optimizer": f"SGD({harness.LEARNING_RATE})",
            "loss": "SparseCategoricalCrossentropy(from_logits=True)",
            "statistic": "median of timed epochs; variants interleaved round-robin",
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": info, "results": rows, "ratios": ratios, "table": table}
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(
        rows,
        args.out / "bench.png",
        f"{data}, batch {batch_size}, {args.threads} thread(s), "
        f"median of {args.epochs} epoch(s)",
    )
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
