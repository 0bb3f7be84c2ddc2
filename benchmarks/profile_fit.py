"""Where does `AccumulatingModel.fit`'s time go? Profiles against plain `fit`.

For plain ``fit`` and `AccumulatingModel` with ``accumulation_steps`` 8 and
``"epoch"``, at Keras's defaults (jit off, ``steps_per_execution`` 1, where
per-batch Python work shows) and at the reproduction settings (jit on, a whole
epoch per execution), this script

1. profiles a multi-epoch ``fit`` with pyinstrument (call tree and flat
   self-time list, as text files);
2. times our work outside the graph: the epoch-end flush (empty and with a
   window to apply), the state check it starts with and the
   ``trainable_variables`` walk;
3. counts the ops of one traced train step, plain against ours, so the extra
   in-graph work per micro-batch shows (and any host transfer would).

Needs pyinstrument (``make profile`` installs it). Usage::

    python benchmarks/profile_fit.py --out results/profile
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
import tensorflow as tf
from harness import Spec

SPECS = (
    Spec("fit", "keras-fit"),
    Spec("acc-8", "accumulating", {"accumulation_steps": 8}),
    Spec("acc-epoch", "accumulating", {"accumulation_steps": "epoch"}),
)
# Ops that would move data between the device and Python inside a step.
HOST_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless", "_Send", "_Recv"}


def per_call_us(function: Callable[[], Any], calls: int = 200) -> float:
    """Median over 5 repeats of the mean time of ``calls`` calls, in µs."""
    repeats = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        repeats.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(repeats))


def op_counts(model: Any) -> collections.Counter[str]:
    """Op types of one traced train step, nested function bodies included."""
    spec = (
        tf.TensorSpec([harness.BATCH_SIZE, 28, 28], tf.float32),
        tf.TensorSpec([harness.BATCH_SIZE], tf.int32),
    )
    graph = tf.function(model.train_step).get_concrete_function(spec).graph
    graph_def = graph.as_graph_def()
    counts = collections.Counter(node.op for node in graph_def.node)
    for function in graph_def.library.function:
        counts.update(node.op for node in function.node_def)
    return counts


def profile(model: Any, data: harness.Data, epochs: int, path: Path) -> float:
    """Profiles ``epochs`` epochs of ``fit``; returns seconds per epoch."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0002)
    profiler.start()
    model.fit(data.dataset, epochs=epochs, verbose=0, shuffle=False)
    session = profiler.stop()
    path.with_suffix(".tree.txt").write_text(profiler.output_text(show_all=False))
    path.with_suffix(".flat.txt").write_text(
        profiler.output_text(flat=True, show_all=True)
    )
    return session.duration / epochs


def outside_graph(model: Any, data: harness.Data) -> dict[str, float]:
    """Times our Python-side work: the flush and what it calls."""
    result = {
        "trainable_variables_us": per_call_us(lambda: model.trainable_variables),
        "build_accumulation_state_us": per_call_us(model._build_accumulation_state),
        "flush_empty_window_us": per_call_us(model.apply_accumulated_gradients),
    }
    x_batch, y_batch = next(iter(data.dataset))
    full = []
    for _ in range(30):
        model.train_on_batch(x_batch, y_batch)
        harness.sync(model)
        full.append(harness.timed(model.apply_accumulated_gradients, model).wall * 1e6)
    result["flush_full_window_us"] = float(np.median(full))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the profiles; returns the process exit code."""
    parser = harness.parser(__doc__, epochs=5, out=harness.RESULTS_DIR / "profile")
    args, meta, data = harness.start(parser, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"meta": meta}
    counts: dict[str, collections.Counter[str]] = {}
    for jit, spe in ((False, 1), (True, data.batches)):
        settings, section = harness.settings_label(jit, spe), {}
        for spec in SPECS:
            model = harness.compiled(spec, jit, spe)
            model.fit(data.dataset, epochs=args.warmup, verbose=0, shuffle=False)
            path = args.out / f"{spec.name}-jit{int(jit)}-spe{spe}"
            entry = {
                "profiled_seconds_per_epoch": profile(model, data, args.epochs, path)
            }
            if spec.model is not None:
                entry.update(outside_graph(model, data))
            # A train step's ops do not depend on jit or steps_per_execution.
            if spec.name not in counts:
                counts[spec.name] = op_counts(model)
            section[spec.name] = entry
            harness.log(f"{settings} {spec.name}: {json.dumps(entry)}")
        summary[settings] = section
    fit = counts["fit"]
    summary["train_step_ops"] = {
        "total": {name: c.total() for name, c in counts.items()},
        "extra_over_fit": {
            name: {op: n - fit[op] for op, n in sorted(c.items()) if n != fit[op]}
            for name, c in counts.items()
            if name != "fit"
        },
        "host_transfer_ops": {
            name: {op: c[op] for op in HOST_OPS if op in c}
            for name, c in counts.items()
        },
    }
    harness.log(json.dumps(summary["train_step_ops"], indent=2))
    (args.out / "profile-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    harness.log(f"wrote profiles and profile-summary.json into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
