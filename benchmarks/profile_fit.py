"""Where does `AccumulatingModel.fit`'s time go? Profiles against plain `fit`.

Plain fit and accumulation_steps 8 and "epoch", at Keras's defaults (where
per-batch Python work shows) and the reproduction settings: pyinstrument
profiles of fit, the times of our work outside the graph (the epoch-end flush
and what it calls), and the extra ops of a traced train step (host transfers
included). Needs pyinstrument, which make profile installs.
"""

from __future__ import annotations

import collections
import json
import sys
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
import tensorflow as tf

SPECS = (harness.FIT, harness.accumulating(8), harness.accumulating("epoch"))
# Ops that would move data between the device and Python inside a step.
HOST_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless", "_Send", "_Recv"}


def per_call_us(function: Callable[[], Any], calls: int = 200) -> float:
    """Median over 5 repeats of the mean time of ``calls`` calls, in µs."""
    seconds = timeit.repeat(function, number=calls, repeat=5)
    return float(np.median(seconds)) / calls * 1e6


def op_counts(model: Any) -> collections.Counter[str]:
    """Op types of one traced train step, nested function bodies included."""
    x = tf.TensorSpec([harness.BATCH_SIZE, 28, 28], tf.float32)
    y = tf.TensorSpec([harness.BATCH_SIZE], tf.int32)
    graph = tf.function(model.train_step).get_concrete_function((x, y)).graph
    graph_def = graph.as_graph_def()
    counts = collections.Counter(node.op for node in graph_def.node)
    for function in graph_def.library.function:
        counts.update(node.op for node in function.node_def)
    return counts


def profile(model: Any, data: harness.Data, epochs: int, path: Path) -> float:
    """Seconds per epoch of ``epochs`` profiled ones."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0002)
    profiler.start()
    model.fit(data.dataset, epochs=epochs, verbose=0, shuffle=False)
    session = profiler.stop()
    path.with_suffix(".tree.txt").write_text(profiler.output_text(show_all=False))
    flat = profiler.output_text(flat=True, show_all=True)
    path.with_suffix(".flat.txt").write_text(flat)
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
        full.append(harness.timed(model.apply_accumulated_gradients, model)[0] * 1e6)
    result["flush_full_window_us"] = float(np.median(full))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(__doc__, epochs=5, out=harness.RESULTS_DIR / "profile")
    args, meta, data = harness.start(parser, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"meta": meta}
    counts: dict[str, collections.Counter[str]] = {}
    for jit, spe in ((False, 1), (True, data.batches)):
        settings = harness.settings_label(jit, spe)
        for spec in SPECS:
            model = harness.compiled(spec, jit, spe)
            model.fit(data.dataset, epochs=args.warmup, verbose=0, shuffle=False)
            path = args.out / f"{spec.name}-jit{int(jit)}-spe{spe}"
            seconds = profile(model, data, args.epochs, path)
            entry = {"profiled_seconds_per_epoch": seconds}
            if spec.model is not None:
                entry.update(outside_graph(model, data))
            # A train step's ops do not depend on jit or steps_per_execution.
            counts[spec.name] = counts.get(spec.name) or op_counts(model)
            summary.setdefault(settings, {})[spec.name] = entry
            harness.log(f"{settings} {spec.name}: {json.dumps(entry)}")
    fit = counts["fit"]
    summary["train_step_ops"] = {
        "total": {name: c.total() for name, c in counts.items()},
        "extra_over_fit": {
            name: {op: c[op] - fit[op] for op in sorted(c | fit) if c[op] != fit[op]}
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
