"""Exact gradient accumulation with MultiWorkerMirroredStrategy on one machine.

Run ``python examples/multi_worker.py`` (add ``--workers 3`` or ``--json FILE``).
It starts the workers as separate processes on 127.0.0.1 (free ports picked
at run time, ``TF_CONFIG`` set for each), trains the same model once more in
a single process with the same global batch, and prints the largest
difference between the two sets of final weights: float32 rounding, since the
accumulated windows hold the same samples either way. Every child process is
bounded in time and killed if anything fails.

The training code itself is ordinary Keras: build and compile inside
``strategy.scope()``, then ``fit`` with the global batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLOBAL_BATCH = 16
EPOCHS = 2
ACCUMULATION_STEPS = 3


def train(strategy, out_path: str | None) -> list:
    """The training script every worker (and the single process) runs."""
    import keras
    import numpy as np

    from accumulate import AccumulatingModel

    rng = np.random.default_rng(0)
    samples = GLOBAL_BATCH * 10 + 6  # a ragged last batch
    x = rng.normal(size=(samples, 10)).astype("float32")
    y = rng.integers(0, 4, size=samples)

    with strategy.scope():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((10,))
        hidden = keras.layers.Dense(32, activation="tanh")(inputs)
        outputs = keras.layers.Dense(4)(hidden)
        model = AccumulatingModel(
            inputs, outputs, accumulation_steps=ACCUMULATION_STEPS, name="multi_worker"
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    weights = model.get_weights()
    if out_path:
        np.savez(out_path, *weights, iterations=int(model.optimizer.iterations.numpy()))
    return weights


def _worker(index: int, out_path: str) -> None:
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync >= 2, strategy.num_replicas_in_sync
    train(strategy, out_path)


def _single(out_path: str) -> None:
    import tensorflow as tf

    train(tf.distribute.get_strategy(), out_path)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        start_new_session=True,  # its own process group, killed as one
    )


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def run(workers: int, timeout: float) -> dict:
    """Trains with `workers` processes and in one process; compares weights."""
    import numpy as np

    base_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    base_env.pop("TF_CONFIG", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
        processes = []
        try:
            for index in range(workers):
                tf_config = {
                    "cluster": {"worker": addresses},
                    "task": {"type": "worker", "index": index},
                }
                env = {**base_env, "TF_CONFIG": json.dumps(tf_config)}
                out = tmp / f"worker{index}.npz"
                processes.append(
                    _spawn(
                        ["--worker", str(index), str(out)],
                        env,
                        tmp / f"worker{index}.log",
                    )
                )
            processes.append(
                _spawn(
                    ["--single", str(tmp / "single.npz")], base_env, tmp / "single.log"
                )
            )
            deadline = time.monotonic() + timeout
            for process in processes:
                remaining = max(deadline - time.monotonic(), 1)
                code = process.wait(timeout=remaining)
                if code != 0:
                    logs = "\n".join(
                        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                        for log in sorted(tmp.glob("*.log"))
                    )
                    raise RuntimeError(f"a process exited with {code}:\n{logs}")
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"timed out after {timeout} s") from error
        finally:
            for process in processes:
                _kill(process)

        def load(name):
            with np.load(tmp / name) as saved:
                count = len(saved.files) - 1
                return [saved[f"arr_{i}"] for i in range(count)], int(
                    saved["iterations"]
                )

        single, single_iterations = load("single.npz")
        result = {"workers": workers, "single_process_updates": single_iterations}
        for index in range(workers):
            weights, iterations = load(f"worker{index}.npz")
            result[f"worker{index}_updates"] = iterations
            result[f"worker{index}_max_abs_diff"] = max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(weights, single, strict=True)
            )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", help="also write the comparison to this file")
    parser.add_argument(
        "--worker", nargs=2, metavar=("INDEX", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--single", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(int(args.worker[0]), args.worker[1])
        return
    if args.single:
        _single(args.single)
        return
    result = run(args.workers, args.timeout)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
