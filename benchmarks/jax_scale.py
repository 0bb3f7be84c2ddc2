"""Data parallelism on JAX: time and bytes reduced per window, from the programs.

On ``--devices`` virtual CPU devices (4) under `keras.distribution.DataParallel`,
the GPT-2 of `transformer` (4.2M parameters, 64-token sequences; ``--quick``:
the smoke-test size) is compiled three ways: plain Keras, ours
(`enable_accumulation`, N = 8) and Keras's built-in accumulation
(``gradient_accumulation_steps=8``). Each train step is lowered and compiled
as Keras's JAX trainer compiles it, then timed on its own:

- plain: one step;
- ours and Keras's: a micro-batch step that only accumulates (window
  counters at 0) and one that also applies the window (counters at N - 1).

A window costs N plain steps, or N - 1 accumulating steps and one applying
step. Rounds run every program once in turn (paired, so a slow moment of
the machine hits all); a time is the median over rounds, wall and process
CPU. The bytes each program reduces across the batch axis come from its HLO
(`collectives`), as do the program sizes.

Virtual devices share this machine's cores and memory: a collective is a
memory copy here, so the times show what the window costs in compute, and
the bytes show what it would cost in communication on real devices.

    python benchmarks/jax_scale.py --out results/jax
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

STEPS = 8
MICRO_BATCH = 16
QUICK_MICRO_BATCH = 8
VARIANTS = ("plain", "ours", "ours-reduced", "keras")


def virtual_device_flags(devices: int) -> tuple[str, ...]:
    """XLA flags for ``devices`` virtual CPU devices that can all-reduce.

    Single-threaded ops per device: with Eigen's thread pool, a device that
    waits in an all-reduce holds a pool thread the others' matmuls need,
    and on 2 cores XLA aborted a full-size step after its 40 s rendezvous
    timeout (measured; small models never waited).
    """
    return (
        f"--xla_force_host_platform_device_count={devices}",
        "--xla_cpu_multi_thread_eigen=false",
    )


def _size(quick: bool) -> Any:
    import transformer

    if quick:
        return transformer.SIZES["quick"]
    return transformer.Size(4096, 4, 256, 4, 1024, 64)


def _build(variant: str, size: Any, data: tuple, micro_batch: int) -> Any:
    import transformer

    from accumulate import enable_accumulation

    model = transformer.causal_lm(size, seed=0)
    if variant.startswith("ours"):
        model = enable_accumulation(model, accumulation_steps=STEPS)
        if variant == "ours-reduced":
            # One replicated sum, as before per-device sums: every
            # micro-batch's gradient is all-reduced where it is computed.
            model._window_devices = lambda: 1
    model = transformer.compiled(
        model, keras_accumulation=STEPS if variant == "keras" else None
    )
    # One real micro-batch builds the optimizer and the window's state.
    x, y, sample_weight = data
    model.fit(x, y, sample_weight=sample_weight, batch_size=micro_batch, verbose=0)
    return model


def _with_value(values: list, index: int, value: int) -> list:
    import jax
    import jax.numpy as jnp

    values = list(values)
    old = values[index]
    values[index] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
    return values


def _phases(model: Any, variant: str) -> dict[str, tuple]:
    """The train state at which each timed program runs: counters set so
    that the step accumulates only, or also applies."""
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    if variant == "plain":
        return {"step": state}
    trainable, non_trainable, optimizer, metrics = state
    if variant.startswith("ours"):
        index = [id(v) for v in model.non_trainable_variables].index(
            id(model._accumulation.steps)
        )
        return {
            phase: (
                trainable,
                _with_value(non_trainable, index, steps),
                optimizer,
                metrics,
            )
            for phase, steps in (("micro-batch", 0), ("apply", STEPS - 1))
        }
    # Keras counts micro-batches in _iterations (`iterations` is that over
    # N) and applies when (_iterations + 1) % N == 0.
    index = [id(v) for v in model.optimizer.variables].index(
        id(model.optimizer._iterations)
    )
    return {
        phase: (trainable, non_trainable, _with_value(optimizer, index, count), metrics)
        for phase, count in (("micro-batch", 0), ("apply", STEPS - 1))
    }


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    import jax
    import keras
    import transformer
    from collectives import collectives, instructions

    devices = jax.devices()
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    size = _size(quick)
    micro_batch = QUICK_MICRO_BATCH if quick else MICRO_BATCH
    data = transformer.token_data(size, micro_batch)
    batch = jax.tree_util.tree_map(
        lambda array: jax.device_put(
            array, distribution.get_data_layout(array.shape).backend_layout
        ),
        data,
    )
    programs, hlo_numbers, parameters = {}, {}, 0
    for variant in VARIANTS:
        model = _build(variant, size, data, micro_batch)
        parameters = transformer.parameter_count(model)[1]
        step = jax.jit(model.train_step)
        for phase, state in _phases(model, variant).items():
            compiled = step.lower(state, batch).compile()
            hlo = compiled.as_text()
            found = collectives(hlo)
            programs[variant, phase] = (compiled, state)
            hlo_numbers[variant, phase] = {
                "bytes_across_batch": sum(
                    c["bytes"] for c in found if c["across_batch"]
                ),
                "bytes_across_batch_in_branch": sum(
                    c["bytes"] for c in found if c["across_batch"] and c["in_branch"]
                ),
                "collectives": len(found),
                "hlo_instructions": instructions(hlo),
            }
            jax.block_until_ready(compiled(state, batch))  # warm
    times: dict[tuple, dict[str, list[float]]] = {
        key: {"wall": [], "cpu": []} for key in programs
    }
    for _ in range(rounds):
        for key, (compiled, state) in programs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(state, batch))
            times[key]["wall"].append(time.perf_counter() - wall)
            times[key]["cpu"].append(time.process_time() - cpu)
    keras.distribution.set_distribution(None)
    return _summary(
        quick, len(devices), micro_batch, parameters, rounds, times, hlo_numbers
    )


def _summary(
    quick: bool,
    devices: int,
    micro_batch: int,
    parameters: int,
    rounds: int,
    times: dict,
    hlo_numbers: dict,
) -> dict[str, Any]:
    programs = {}
    for (variant, phase), clocks in times.items():
        programs[f"{variant}/{phase}"] = {
            "wall_ms": 1e3 * statistics.median(clocks["wall"]),
            "cpu_ms": 1e3 * statistics.median(clocks["cpu"]),
            **hlo_numbers[variant, phase],
        }
    windows = {}
    for variant in VARIANTS:
        if variant == "plain":
            parts = [("step", STEPS)]
        else:
            parts = [("micro-batch", STEPS - 1), ("apply", 1)]
        window: dict[str, float] = {}
        for clock in ("wall_ms", "cpu_ms"):
            window[clock] = sum(programs[f"{variant}/{p}"][clock] * n for p, n in parts)
        # The apply's branch runs only in the applying step.
        window["bytes_across_batch"] = sum(
            n * programs[f"{variant}/{p}"]["bytes_across_batch"]
            - (n if p == "micro-batch" else 0)
            * programs[f"{variant}/{p}"]["bytes_across_batch_in_branch"]
            for p, n in parts
        )
        windows[variant] = window
    ratios = {
        f"{variant}/plain": {
            key: windows[variant][key] / windows["plain"][key]
            for key in ("wall_ms", "cpu_ms", "bytes_across_batch")
        }
        for variant in VARIANTS[1:]
    }
    return {
        "quick": quick,
        "devices": devices,
        "micro_batch": micro_batch,
        "accumulation_steps": STEPS,
        "trainable_parameters": parameters,
        "gradient_bytes": 4 * parameters,
        "rounds": rounds,
        "programs": programs,
        "per_window": windows,
        "ratios": ratios,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['devices']} devices, micro-batch {result['micro_batch']}, "
        f"N = {result['accumulation_steps']}, "
        f"{result['trainable_parameters']:,} parameters",
        f"{'program':<22}{'wall ms':>9}{'cpu ms':>9}{'bytes reduced':>15}"
        f"{'in apply':>13}{'HLO ops':>9}",
    ]
    for name, numbers in result["programs"].items():
        lines.append(
            f"{name:<22}{numbers['wall_ms']:>9.1f}{numbers['cpu_ms']:>9.1f}"
            f"{numbers['bytes_across_batch']:>15,}"
            f"{numbers['bytes_across_batch_in_branch']:>13,}"
            f"{numbers['hlo_instructions']:>9,}"
        )
    lines.append("per window:")
    for name, window in result["per_window"].items():
        lines.append(
            f"{name:<22}{window['wall_ms']:>9.1f}{window['cpu_ms']:>9.1f}"
            f"{window['bytes_across_batch']:>15,}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/jax")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    args = parser.parse_args()
    # Before JAX starts: the virtual devices, and the backend Keras runs on.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = " ".join(
        (os.environ.get("XLA_FLAGS", ""), *virtual_device_flags(args.devices))
    )
    result = measure(args.quick, args.rounds)
    print(_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
