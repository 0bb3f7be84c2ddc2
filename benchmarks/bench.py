"""Seconds per training epoch: `AccumulatingModel.fit` against its references.

Every `specs` row at jit_compile off/on and steps_per_execution 1/an epoch,
the floor (a hand-written whole-epoch `tf.function`) and the notebook's eager
loops; writes bench.json and bench.png into --out. A full run takes ~10 min:

    python benchmarks/bench.py --only 'fit*,acc-epoch*' --epochs 5
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import harness
import keras
import matplotlib.pyplot as plt
from harness import Spec, Variant, accumulating
from matplotlib.ticker import FormatStrFormatter

COLOURS = {"keras-fit": "#4c72b0", "accumulating": "#dd8452", "keras-ga": "#8172b3",
           "floor": "#55a868", "notebook": "#c44e52"}  # fmt: skip
QUICK = ("fit", "acc-8", "acc-epoch", "keras-ga-")
TARGET_TO_FIT, TARGET_TO_FLOOR = 1.03, 1.3
COLUMNS = ["variant", "backend", "s/epoch", "min s", "CPU s", "samples/s", "x fit",
           "x fit CPU", "x floor", "x floor CPU", "peak RSS MB", "+MB"]  # fmt: skip


def noise_measuring(steps: int | str) -> Spec:
    model = {"accumulation_steps": steps, "measure_noise_scale": True}
    unmeasured = f"acc-{steps}-noise-off"  # see `with_unmeasured_twins`
    return Spec(f"acc-{steps}-noise", "accumulating", model, compare=(unmeasured,))


class TrainFunctions:
    """One model, two traced train steps: with its noise meter and without.

    Two identically configured models differ here by up to 9% in epoch time
    (three identical models in one process: 0.99-1.08 of the first), more
    than the measurement costs;
    one model traced twice over the same variables removes that from the
    comparison. Swaps the library's own private attributes (the meter and the
    traced apply), which is why this lives in a benchmark.
    """

    SWAPPED = ("train_function", "_apply_function")

    def __init__(self, model: Any):
        self.model, self.meter = model, None  # the first measured fit builds it
        self.saved: dict[bool, dict[str, Any]] = {True: {}, False: {}}

    def epoch(self, measured: bool, run: Any) -> harness.EpochTime:
        model = self.model
        if self.meter is None and not measured:
            raise RuntimeError("run the measured variant first: it builds the meter")
        for name in self.SWAPPED:  # None: traced anew on first use
            setattr(model, name, self.saved[measured].get(name))
        model._noise_scale = self.meter if measured else None
        try:
            return run()
        finally:
            for name in self.SWAPPED:
                self.saved[measured][name] = getattr(model, name)
            if measured:
                self.meter = model._noise_scale
            model._noise_scale = self.meter


def with_unmeasured_twins(variants: list[Variant]) -> list[Variant]:
    """Each noise-measuring variant, followed by its model without the meter."""
    result = []
    for variant in variants:
        result.append(variant)
        if not variant.spec.name.endswith("-noise"):
            continue
        functions, warm_up = TrainFunctions(variant.model), variant.warm_up
        twin = dataclasses.replace(
            variant,
            spec=dataclasses.replace(variant.spec, name=f"{variant.spec.name}-off"),
            run_epoch=functools.partial(functions.epoch, False, variant.run_epoch),
            warm_up=warm_up and functools.partial(functions.epoch, False, warm_up),
            epoch_seconds=[],
            epoch_cpu_seconds=[],
            warmup_seconds=[],
        )
        variant.run_epoch = functools.partial(functions.epoch, True, variant.run_epoch)
        variant.warm_up = warm_up and functools.partial(functions.epoch, True, warm_up)
        result.append(twin)
    return result


def build(
    data: harness.Data, quick: bool, patterns: list[str], instances: int = 1
) -> list[Variant]:
    """Every variant whose label matches a pattern, built only if it does.

    ``instances`` models per variant (`harness.Instances`), except for the
    noise-measuring ones: those already pair one model with itself.
    """
    # The `fit` variants; data.batches (118 on MNIST) is a whole epoch.
    batches, ga = data.batches, f"keras-ga-{data.batches}"
    specs = [
        harness.FIT,
        accumulating(1),
        accumulating(8),
        accumulating(batches, compare=(ga,)),
        accumulating("epoch", compare=(ga,)),
        # The noise-scale measurement's cost, against the same window unmeasured.
        *(noise_measuring(steps) for steps in (8, "epoch")),
        # Keras 3's own accumulation: SGD(gradient_accumulation_steps=118).
        Spec(ga, "keras-ga", optimizer={"gradient_accumulation_steps": batches}),
    ]

    def wanted(name: str, jit: bool | None = None, spe: int | None = None) -> bool:
        label = f"{name} [{harness.settings_label(jit, spe)}]"
        # Brackets in labels are literal: escape them for fnmatch.
        return any(fnmatch.fnmatchcase(label, p.replace("[", "[[]")) for p in patterns)

    table = [s for s in specs if not quick or s.name.startswith(QUICK)]
    jits = (False,) if quick else (False, True)
    # Keras's PyTorch trainer runs one step per execution.
    spes = (1,) if keras.backend.backend() == "torch" else (1, data.batches)
    variants = with_unmeasured_twins(
        [
            harness.fit_variant(
                spec, data, jit, spe, 1 if spec.name.endswith("-noise") else instances
            )
            for jit in jits
            for spe in spes
            for spec in table
            if wanted(spec.name, jit, spe)
        ]
    )
    if keras.backend.backend() != "tensorflow":
        # The floor and the notebook's loops are TensorFlow code (tf.function,
        # GradientTape): on another backend only the `fit` variants compare.
        return variants
    variants += [harness.floor_variant(data, j) for j in jits if wanted("floor", j)]
    if wanted("notebook-*"):
        variants += [v for v in harness.notebook_variants(data) if wanted(v.spec.name)]
    return variants


def ratios(rows: list[dict[str, Any]], variants: list[Variant], batches: int) -> dict:
    """The headline comparisons, each a paired wall and CPU ratio."""
    by_key = {variant.key: variant for variant in variants}

    def pair(key: str | None, reference: str | None) -> dict[str, float] | None:
        mine = by_key.get(key or "")
        return mine and harness.paired_ratio(mine, by_key.get(reference or ""))

    per_settings: dict[str, dict[str, Any]] = {}
    for variant, row in zip(variants, rows, strict=True):
        if variant.steps_per_execution is None:
            continue
        entry = per_settings.setdefault(variant.settings, {})
        others = [row["fit_reference"], row["floor_reference"]]
        others += [f"{name} [{variant.settings}]" for name in variant.spec.compare]
        for other in others:
            if other != variant.key and (result := pair(variant.key, other)):
                entry[f"{variant.spec.name}/{other.split(' [')[0]}"] = result

    def best(family: str, name: str | None = None) -> str | None:
        keys = [r for r in rows if r["family"] == family and name in (None, r["name"])]
        return min(keys, key=lambda r: r["median_s"])["key"] if keys else None

    def within(ratio: dict[str, float], limit: float) -> dict[str, bool]:
        return {kind: value <= limit for kind, value in ratio.items()}

    reproduction = harness.settings_label(harness.REPRODUCTION_JIT, batches)
    measured = per_settings.get(reproduction, {})
    targets: dict[str, Any] = {"settings": reproduction}
    for name in dict.fromkeys(key.partition("/")[0] for key in measured):
        to_fit, to_floor = measured.get(f"{name}/fit"), measured.get(f"{name}/floor")
        if name.startswith("acc-") and to_fit:
            targets[name] = {
                "to_fit": to_fit,
                f"to_fit<={TARGET_TO_FIT}": within(to_fit, TARGET_TO_FIT),
            }
            if to_floor:  # TensorFlow only
                targets[name] |= {
                    "to_floor": to_floor,
                    f"to_floor<={TARGET_TO_FLOOR}": within(to_floor, TARGET_TO_FLOOR),
                }
    fit, epoch = best("keras-fit"), best("accumulating", "acc-epoch")
    floor = best("floor")
    return {
        "ratio_method": "median over rounds of per-round ratios (paired)",
        "best_fit": fit,
        "best_acc_epoch": epoch,
        "best_floor": floor,
        "best_fit/best_floor": pair(fit, floor),
        "best_acc_epoch/best_floor": pair(epoch, floor),
        "notebook-standard/best_fit": pair("notebook-standard [eager]", fit),
        "notebook-accumulating/best_acc_epoch": pair(
            "notebook-accumulating [eager]", epoch
        ),
        "per_settings": per_settings,
        "targets": targets,
    }


def plot(rows: list[dict[str, Any]]) -> Any:
    figure, axes = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    positions = range(len(rows) - 1, -1, -1)
    seconds = [row["median_s"] for row in rows]
    axes.barh(positions, seconds, color=[COLOURS[row["family"]] for row in rows])
    axes.set_yticks(positions, [row["key"] for row in rows], fontsize=8)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    axes.tick_params(axis="x", which="minor", labelsize=7)
    axes.set_xlabel("seconds per training epoch (median; log scale)")
    for position, row in zip(positions, rows, strict=True):
        note = f" {row['median_s']:.3f}s"
        if row["ratio_to_fit"] is not None and row["family"] != "keras-fit":
            note += f"  {row['ratio_to_fit']:.2f}x fit"
        axes.text(row["median_s"], position, note, va="center", fontsize=7)
    floors = [row["median_s"] for row in rows if row["family"] == "floor"]
    if floors:
        axes.axvline(min(floors), color=COLOURS["floor"], linestyle="--", linewidth=1)
    shown = [family for family in COLOURS if any(r["family"] == family for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[f]) for f in shown]
    axes.legend(handles, shown, loc="lower right", fontsize=8)
    axes.set_xlim(right=max(seconds) * 4)
    return figure


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(__doc__, epochs=20)
    only = "comma-separated globs over labels (brackets literal), e.g. 'fit*,floor*'"
    parser.add_argument("--only", default="*", help=only)
    args, meta, data = harness.start(parser, argv)
    patterns = [p.strip() for p in args.only.split(",")]
    variants = build(data, args.quick, patterns, args.instances)
    if not variants:
        print(f"--only {args.only!r} matches no variant", file=sys.stderr)
        return 2
    harness.measure(variants, args.epochs, args.warmup)
    rows = harness.rows(variants, len(data.x))
    table, summary = harness.table(rows, COLUMNS), ratios(rows, variants, data.batches)
    harness.log(f"\n{table}\n\n{json.dumps(summary, indent=2)}")
    meta.update(
        only=args.only,
        instances=args.instances,
        model="784-128-64-32-10 tanh, 111,146 parameters",
    )
    report = {"results": rows, "ratios": summary, "table": table}
    subtitle = f"median of {args.epochs} epoch(s)"
    harness.write_report(args, meta, "bench", report, plot(rows), subtitle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
