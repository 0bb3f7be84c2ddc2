"""Where does `AccumulatingModel.fit`'s time go? Profiles against plain `fit`.

For plain ``fit`` and `AccumulatingModel` with ``accumulation_steps`` 8 and
``"epoch"``, at Keras's default settings (jit off, ``steps_per_execution``
1, where per-batch Python work shows) and at the reproduction settings (jit
on, a whole epoch per execution), this script

1. profiles a multi-epoch ``fit`` with pyinstrument (Python call tree and a
   flat self-time list, written as text files),
2. times the pieces that are ours outside the graph: the epoch-end flush
   (`apply_accumulated_gradients`, empty and with a window to apply), the
   state check it starts with, and the ``trainable_variables`` walk,
3. counts the ops of one traced train step, plain against ours, so the extra
   in-graph work per micro-batch is visible (and any host transfer would be).

Needs ``pip install pyinstrument`` (``make profile`` installs it).

Usage::

    python benchmarks/profile_fit.py --out results/profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
import tensorflow as tf

VARIANTS: tuple[tuple[str, int | str | None], ...] = (
    ("fit", None),
    ("acc-8", 8),
    ("acc-epoch", "epoch"),
)
# Ops that would move data between the device and Python inside a step.
HOST_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless", "_Send", "_Recv"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("ACCUMULATE_DATA_DIR"))
    parser.add_argument("--epochs", type=int, default=5, help="epochs per profile")
    parser.add_argument(
        "--out", type=Path, default=harness.DEFAULT_RESULTS_DIR / "profile"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="synthetic data")
    return parser.parse_args(argv)


def per_call_microseconds(function: Callable[[], Any], calls: int) -> float:
    """Median over 5 repeats of the mean time of ``calls`` calls, in µs."""
    repeats = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        repeats.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(repeats))


def op_counts(model: Any, batch_size: int) -> dict[str, int]:
    """Op types of one traced train step, nested function bodies included."""
    spec = (
        tf.TensorSpec([batch_size, 28, 28], tf.float32),
        tf.TensorSpec([batch_size], tf.int32),
    )
    concrete = tf.function(model.train_step).get_concrete_function(spec)
    graph_def = concrete.graph.as_graph_def()
    counts: collections.Counter[str] = collections.Counter(
        node.op for node in graph_def.node
    )
    for function in graph_def.library.function:
        counts.update(node.op for node in function.node_def)
    return dict(counts)


def profile_fit(model: Any, dataset: Any, epochs: int, out: Path, label: str) -> float:
    """Profiles ``fit`` for ``epochs`` epochs; writes tree and flat reports."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0002)
    start = time.perf_counter()
    profiler.start()
    model.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
    profiler.stop()
    seconds = time.perf_counter() - start
    (out / f"{label}.tree.txt").write_text(profiler.output_text(show_all=False))
    (out / f"{label}.flat.txt").write_text(
        profiler.output_text(flat=True, show_all=True)
    )
    return seconds


def ours_outside_graph(model: Any, dataset: Any) -> dict[str, float]:
    """Times our Python-side work: the flush and what it calls."""
    results = {
        "trainable_variables_us": per_call_microseconds(
            lambda: model.trainable_variables, 200
        ),
        "build_accumulation_state_us": per_call_microseconds(
            model._build_accumulation_state, 200
        ),
        "flush_empty_window_us": per_call_microseconds(
            model.apply_accumulated_gradients, 200
        ),
    }
    x_batch, y_batch = next(iter(dataset))
    full_flush = []
    for _ in range(30):
        model.train_on_batch(x_batch, y_batch)
        harness._sync(model)
        start = time.perf_counter()
        model.apply_accumulated_gradients()
        harness._sync(model)
        full_flush.append((time.perf_counter() - start) * 1e6)
    results["flush_full_window_us"] = float(np.median(full_flush))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the profiles; returns the process exit code."""
    args = parse_args(argv)
    harness.configure_threads(args.threads)
    harness.quiet_tensorflow()
    from accumulate.twins import make_twins

    if args.quick:
        images, labels = harness.synthetic_mnist(harness.QUICK_SAMPLES)
    else:
        images, labels = harness.load_mnist_train(args.data_dir)
    x, y = harness.to_float(images, labels)
    batches = harness.num_batches(len(x), harness.BATCH_SIZE)
    dataset = harness.fit_dataset(x, y, harness.BATCH_SIZE, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {"meta": harness.environment_info(args.threads)}
    for jit_compile, steps_per_execution in ((False, 1), (True, batches)):
        settings = f"jit={'on' if jit_compile else 'off'} spe={steps_per_execution}"
        tag = f"jit{int(jit_compile)}-spe{steps_per_execution}"
        section: dict[str, Any] = {}
        for name, steps in VARIANTS:
            standard, accumulating = make_twins(
                harness.SEED, accumulation_steps=steps or 1
            )
            model = standard if steps is None else accumulating
            harness.compile_for_fit(
                model, jit_compile=jit_compile, steps_per_execution=steps_per_execution
            )
            model.fit(dataset, epochs=1, verbose=0, shuffle=False)  # warm up
            seconds = profile_fit(
                model, dataset, args.epochs, args.out, f"{name}-{tag}"
            )
            entry: dict[str, Any] = {
                "profiled_seconds_per_epoch": seconds / args.epochs
            }
            if steps is not None:
                entry.update(ours_outside_graph(model, dataset))
            section[name] = entry
            print(f"{settings} {name}: {json.dumps(entry)}", flush=True)
        summary[settings] = section

    plain, _ = make_twins(harness.SEED)
    plain.compile(optimizer="sgd", loss=harness.loss_function(), metrics=["accuracy"])
    counts = {"fit": op_counts(plain, harness.BATCH_SIZE)}
    for name, steps in VARIANTS[1:]:
        _, accumulating = make_twins(harness.SEED, accumulation_steps=steps)
        accumulating.compile(
            optimizer="sgd", loss=harness.loss_function(), metrics=["accuracy"]
        )
        counts[name] = op_counts(accumulating, harness.BATCH_SIZE)
    difference = {
        name: {
            op: count - counts["fit"].get(op, 0)
            for op, count in sorted(op_counts_.items())
            if count != counts["fit"].get(op, 0)
        }
        for name, op_counts_ in counts.items()
        if name != "fit"
    }
    summary["train_step_ops"] = {
        "total": {name: sum(c.values()) for name, c in counts.items()},
        "extra_over_fit": difference,
        "host_transfer_ops": {
            name: {op: c[op] for op in HOST_OPS if op in c}
            for name, c in counts.items()
        },
    }
    print(json.dumps(summary["train_step_ops"], indent=2))
    (args.out / "profile-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote profiles and profile-summary.json into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
