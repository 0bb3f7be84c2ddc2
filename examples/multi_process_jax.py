"""Exact gradient accumulation across JAX processes with `DataParallel`.

Run ``KERAS_BACKEND=jax python examples/multi_process_jax.py`` (add
``--processes 3``, ``--devices-per-process 1`` or ``--json FILE``). It starts
the processes on 127.0.0.1 (`jax.distributed.initialize`, a free port, CPU
collectives over gloo), each with its own virtual CPU devices, and trains
one `AccumulatingModel` under `keras.distribution.DataParallel` over every
process's devices. Each process feeds `fit` its own share of every global
micro-batch, as a multi-host input pipeline would; the window's sums stay on
each device and are reduced once per window. Then the same model trains in
one process on the whole data, and the largest difference between the
weights is printed: float32 rounding.

The training code is ordinary Keras: set the distribution, build, compile,
``fit`` with the per-process batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

GLOBAL_BATCH = 16
SAMPLES = GLOBAL_BATCH * 10 + 8  # a ragged last micro-batch
EPOCHS = 2
ACCUMULATION_STEPS = 3


def train(process: int, processes: int, out_path: str) -> None:
    """What every process (and the single one) runs: ``processes`` = 0 for
    the single process, which trains on the whole data with no distribution."""
    import jax
    import keras
    import numpy as np

    from accumulate import AccumulatingModel

    if processes:
        # Each process hands fit its own rows (below): already sharded.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=jax.devices(), auto_shard_dataset=False
            )
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 10)).astype("float32")
    y = rng.integers(0, 4, size=SAMPLES)
    batch = GLOBAL_BATCH
    if processes:
        # This process's rows of every global micro-batch, in order: an
        # equal share of each, the last (ragged) one included.
        mine = []
        for start in range(0, SAMPLES, GLOBAL_BATCH):
            share = (min(start + GLOBAL_BATCH, SAMPLES) - start) // processes
            mine.extend(range(start + process * share, start + (process + 1) * share))
        x, y, batch = x[mine], y[mine], GLOBAL_BATCH // processes

    keras.utils.set_random_seed(1)
    inputs = keras.Input((10,))
    hidden = keras.layers.Dense(32, activation="tanh")(inputs)
    model = AccumulatingModel(
        inputs, keras.layers.Dense(4)(hidden), accumulation_steps=ACCUMULATION_STEPS
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=batch, epochs=EPOCHS, shuffle=False, verbose=0)
    np.savez(
        out_path,
        *model.get_weights(),
        updates=int(model.optimizer.iterations),
        devices=len(jax.devices()),
        window_devices=model._accumulation.devices,
    )


def _worker(process: int, processes: int, port: int, out_path: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=processes,
        process_id=process,
    )
    try:
        train(process, processes, out_path)
    finally:
        jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(processes: int, devices_per_process: int, timeout: float) -> dict:
    """Trains across ``processes`` and in one process; compares the weights."""
    import numpy as np

    here = os.path.abspath(__file__)
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # Each virtual device's ops on one thread: on a small machine, a
        # thread waiting in an all-reduce can otherwise starve the others.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"
        " --xla_cpu_multi_thread_eigen=false",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = _free_port()
        commands = [
            [
                "--worker",
                str(index),
                str(processes),
                str(port),
                str(tmp / f"{index}.npz"),
            ]
            for index in range(processes)
        ]
        commands.append(["--single", str(tmp / "single.npz")])
        with contextlib.ExitStack() as logs:
            children = [
                subprocess.Popen(
                    [sys.executable, here, *command],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=logs.enter_context(open(tmp / f"{index}.log", "wb")),
                )
                for index, command in enumerate(commands)
            ]
            try:
                codes = [child.wait(timeout=timeout) for child in children]
            except subprocess.TimeoutExpired as error:
                raise RuntimeError(f"a process ran past {timeout} s") from error
            finally:
                for child in children:
                    child.kill()
                    child.wait()
        if any(codes):
            logs = "\n".join(
                f"--- process {index}\n"
                + (tmp / f"{index}.log").read_text(errors="replace")[-3000:]
                for index in range(len(children))
            )
            raise RuntimeError(f"exit codes {codes}:\n{logs}")

        def load(name: str) -> dict:
            with np.load(tmp / name) as saved:
                return {key: saved[key] for key in saved.files}

        single = load("single.npz")
        weights = sorted(key for key in single if key.startswith("arr_"))
        result = {
            "processes": processes,
            "single_process_updates": int(single["updates"]),
        }
        for index in range(processes):
            ours = load(f"{index}.npz")
            result[f"process{index}_updates"] = int(ours["updates"])
            result[f"process{index}_devices"] = int(ours["devices"])
            result[f"process{index}_window_devices"] = int(ours["window_devices"])
            result[f"process{index}_max_abs_diff"] = max(
                float(np.max(np.abs(ours[key] - single[key]))) for key in weights
            )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", help="also write the comparison to this file")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--single", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        process, processes, port, out = args.worker
        _worker(int(process), int(processes), int(port), out)
        return
    if args.single:
        train(0, 0, args.single)
        return
    if GLOBAL_BATCH % (args.processes * args.devices_per_process):
        parser.error(
            f"--processes {args.processes} x --devices-per-process "
            f"{args.devices_per_process} devices must divide the global batch "
            f"{GLOBAL_BATCH}: DataParallel gives each device an equal share."
        )
    result = run(args.processes, args.devices_per_process, args.timeout)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
