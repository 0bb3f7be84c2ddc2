"""Seconds per epoch on a compute-bound model: the KerasHub GPT-2 of `transformer`.

The paper's MLP (`bench.py`) takes a few milliseconds a step, so it times
per-op overhead. Here a micro-batch is seconds of real work (8 sequences of
256 tokens through 8.4M parameters, Adam), so the ratios say what a user
pays: our window of N micro-batches and one apply against N plain steps of
the micro-batch (``x plain`` below 1 means the window is cheaper: one
optimizer update instead of N), in ``"epoch"`` mode, and against Keras's
built-in accumulation at the same N; and ``micro_batch_size``: the window as
one `fit` batch, unsplit (against plain `fit` on that batch) and split into
slices of b inside the step (against our N micro-batches of b).

In one process, like `bench.py`: each variant's models are warmed up (one
epoch, tracing and compiling), then rounds of one epoch per variant in turn;
round ``i`` times instance ``i % K`` of every variant, and a ratio is the
median over rounds of the per-round ratio (paired, so a slow moment of the
machine hits both). No TensorFlow is imported (the GPU check runs this).

    python benchmarks/bench_transformer.py --out results --rounds 6 --instances 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run as a script

import keras  # noqa: E402
import transformer  # noqa: E402

from accumulate import enable_accumulation  # noqa: E402

MICRO_BATCH, STEPS = 8, 8
QUICK_MICRO_BATCH, QUICK_STEPS = 4, 4
BASELINE = "plain"


# Variants fed the whole window as one batch (fit's batch_size = N x b).
WHOLE = "whole_window_batches"


def variants(steps: int, micro_batch: int) -> dict[str, dict[str, Any]]:
    window = steps * micro_batch
    return {
        BASELINE: {},
        f"ours-{steps}": {"accumulation_steps": steps},
        "ours-epoch": {"accumulation_steps": "epoch"},
        f"keras-{steps}": {"keras_accumulation": steps},
        # micro_batch_size: the window as one fit batch, split in the step
        # (N ways), or not at all (a slice as big as the batch), against
        # plain fit on the same batches.
        f"plain-{window}": {WHOLE: True},
        f"sliced-{steps}x{micro_batch}": {WHOLE: True, "micro_batch_size": micro_batch},
        f"sliced-{window}": {WHOLE: True, "micro_batch_size": window},
    }


def build(options: dict[str, Any], size: transformer.Size, seed: int) -> keras.Model:
    options = dict(options)
    options.pop(WHOLE, None)
    keras_steps = options.pop("keras_accumulation", None)
    model = transformer.causal_lm(size, seed=seed)
    if options:
        model = enable_accumulation(model, **options)
    return transformer.compiled(model, keras_accumulation=keras_steps)


def epoch_seconds(model: keras.Model, data: tuple, batch: int) -> tuple[float, float]:
    """Wall and process CPU seconds of one epoch of ``fit``."""
    x, y, weight = data
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(
        x, y, sample_weight=weight, batch_size=batch, epochs=1, shuffle=False, verbose=0
    )
    return time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE.parent / "results")
    parser.add_argument("--rounds", type=int, default=6, help="timed epochs a variant")
    parser.add_argument("--instances", type=int, default=2, help="models a variant")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model")
    parser.add_argument(
        "--only", default="", help="comma-separated variant names (default: all)"
    )
    args = parser.parse_args()
    size = transformer.SIZES["quick" if args.quick else "full"]
    micro_batch, steps = (
        (QUICK_MICRO_BATCH, QUICK_STEPS) if args.quick else (MICRO_BATCH, STEPS)
    )
    # One window of N micro-batches per epoch (so "epoch" is the same window,
    # applied by fit's epoch-end flush instead of in the step).
    data = transformer.token_data(size, micro_batch * steps)
    table = variants(steps, micro_batch)
    if args.only:
        table = {name: table[name] for name in args.only.split(",")}

    def batch(name: str) -> int:
        return micro_batch * steps if table[name].get(WHOLE) else micro_batch

    models = {
        name: [build(options, size, seed=0) for _ in range(args.instances)]
        for name, options in table.items()
    }
    for name, instances in models.items():
        for model in instances:
            epoch_seconds(model, data, batch(name))  # traces and compiles
        print(f"warmed up {name}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in table}
    cpu_times: dict[str, list[float]] = {name: [] for name in table}
    for round_ in range(args.rounds):
        for name, instances in models.items():
            wall, cpu = epoch_seconds(
                instances[round_ % args.instances], data, batch(name)
            )
            times[name].append(wall)
            cpu_times[name].append(cpu)
        print(
            f"round {round_}: "
            + ", ".join(
                f"{n} {t[-1]:.2f}s ({cpu_times[n][-1]:.2f} CPU)"
                for n, t in times.items()
            ),
            flush=True,
        )

    def paired(name: str, reference: str) -> dict[str, float]:
        return {
            clock: statistics.median(
                a / b for a, b in zip(seconds[name], seconds[reference], strict=True)
            )
            for clock, seconds in (("wall", times), ("cpu", cpu_times))
        }

    parameters, trainable = transformer.parameter_count(next(iter(models.values()))[0])
    window = micro_batch * steps
    pairs = [(name, BASELINE) for name in table if name != BASELINE]
    pairs += [(name, f"keras-{steps}") for name in table if name.startswith("ours")]
    # micro_batch_size: unsplit against plain on the same batch; split N
    # ways against our N micro-batches of b (the same samples per update).
    pairs += [
        (f"sliced-{window}", f"plain-{window}"),
        (f"sliced-{steps}x{micro_batch}", f"plain-{window}"),
        (f"sliced-{steps}x{micro_batch}", f"ours-{steps}"),
    ]
    pairs = [pair for pair in pairs if set(pair) <= set(table)]
    ratios = {f"{n} / {reference}": paired(n, reference) for n, reference in pairs}
    report = {
        "meta": {
            "backend": keras.backend.backend(),
            "command": " ".join(["python", *sys.argv]),
            "model": f"GPT2CausalLM from config, {parameters:,} parameters "
            f"({trainable:,} trainable), {size}",
            "micro_batch": micro_batch,
            "accumulation_steps": steps,
            "sequences_per_epoch": micro_batch * steps,
            "optimizer": "Adam",
            "rounds": args.rounds,
            "instances": args.instances,
            "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "median_epoch_s": {name: statistics.median(t) for name, t in times.items()},
        "median_s_per_micro_batch": {
            name: statistics.median(t) / steps for name, t in times.items()
        },
        # Wall time and the process's CPU time (all its threads), paired per
        # round; CPU time does not count the stalls of a shared machine.
        "paired_ratios": ratios,
        "epoch_s": times,
        "epoch_cpu_s": cpu_times,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-transformer.json").write_text(
        json.dumps(report, indent=1) + "\n"
    )
    print(json.dumps(report["paired_ratios"], indent=1))


if __name__ == "__main__":
    main()
