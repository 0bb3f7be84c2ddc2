"""`AccumulatingModel` under `keras.distribution.DataParallel` on JAX.

Two virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``)
must be configured before JAX starts, so each run is a fresh interpreter:
this file is also the worker (``python tests/test_jax_distribution.py
DEVICES OUT.npz``). The worker trains the same accumulating model, from the
same weights on the same data, and saves its weights, update count and the
number of all-reduce ops XLA compiled into one train step (the micro-batch
step, which holds the conditional apply).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BACKEND

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
WORKER_TIMEOUT = 300
pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="JAX distribution")


def _worker(devices: int, out_path: str) -> None:  # pragma: no cover - subprocess
    import jax
    import keras

    from accumulate import make_twins

    if devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )

    def build() -> keras.Model:
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(hidden))

    _, model = make_twins(0, 4, build=build)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 3, size=96)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    # The compiled micro-batch step, as fit runs it: its collectives.
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    distribution = keras.distribution.distribution()
    inputs = (x[:8], y[:8])
    if distribution is not None:
        inputs = jax.tree_util.tree_map(
            lambda array: jax.device_put(
                array, distribution.get_data_layout(array.shape).backend_layout
            ),
            inputs,
        )
    batch = (*inputs, None)
    hlo = jax.jit(model.train_step).lower(state, batch).compile().as_text()
    np.savez(
        out_path,
        *model.get_weights(),
        iterations=int(model.optimizer.iterations),
        all_reduces=hlo.count(" all-reduce("),
        all_reduce_starts=hlo.count(" all-reduce-start("),
    )


def _run(devices: int, tmp_path: Path) -> dict:
    out = tmp_path / f"devices-{devices}.npz"
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [sys.executable, str(HERE), str(devices), str(out)],
        env=environment,
        check=True,
        timeout=WORKER_TIMEOUT,
        cwd=ROOT,
    )
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


@pytest.mark.slow
def test_data_parallel_gives_the_single_device_weights(tmp_path, record_property):
    single = _run(1, tmp_path)
    parallel = _run(2, tmp_path)
    assert int(parallel["iterations"]) == int(single["iterations"]) == 6
    weights = sorted(key for key in single if key.startswith("arr_"))
    assert weights
    for key in weights:
        np.testing.assert_allclose(parallel[key], single[key], rtol=1e-5, atol=1e-6)
    reductions = int(parallel["all_reduces"]) + int(parallel["all_reduce_starts"])
    record_property("all_reduces_per_micro_batch_step", reductions)
    assert int(single["all_reduces"]) == 0
    # Measured: XLA combines the loss and every gradient into ONE all-reduce
    # per micro-batch step (as for a plain Keras step), so a window of N
    # costs N, not the one per window of the TensorFlow design: under GSPMD
    # the gradient of replicated weights is reduced where it is computed.
    assert reductions == 1


if __name__ == "__main__":  # pragma: no cover - the worker
    _worker(int(sys.argv[1]), sys.argv[2])
