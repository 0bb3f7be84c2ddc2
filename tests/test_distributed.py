"""`AccumulatingModel` under `tf.distribute`: exactness and communication.

Logical CPU devices must be configured before TensorFlow initialises its
devices, which the rest of the suite has already done in this process, and
collective groups of strategies with different device counts clash within one
process. So each replica count runs in a fresh interpreter: this file is also
the worker script (``python tests/test_distributed.py REPLICAS OUT.json``).
The worker trains the same model on one device and under a
`MirroredStrategy` with the same global batch, and writes what it measured as
JSON; the tests below assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
# Float32 sums over replicas and micro-batches are added in another order
# than on one device; a few ulps of the weights (~0.1-1) is the expected gap.
FLOAT32_TOLERANCE = 1e-6
WORKER_TIMEOUT = 240  # seconds, per interpreter
# tf.distribute is TensorFlow's: JAX's distribution is tested in
# test_jax_scale.py.
pytestmark = pytest.mark.tensorflow_only


# -- The worker (runs in its own interpreter) --------------------------------


def _worker(replicas: int, out_path: str) -> None:  # pragma: no cover - subprocess
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    )
    import keras
    import numpy as np

    from accumulate import AccumulatingModel

    rng = np.random.default_rng(0)
    global_batch = 8
    # 20 full batches and a ragged one of 2 samples: with 4 replicas two of
    # them get an empty micro-batch in the last step.
    n = global_batch * 20 + 2
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, 3, size=n)

    def build(steps, optimizer, micro_batch_size=None, **compile_kwargs):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        outputs = keras.layers.Dense(3, dtype="float32")(hidden)
        model = AccumulatingModel(
            inputs,
            outputs,
            accumulation_steps=steps,
            micro_batch_size=micro_batch_size,
            name="acc",
        )
        compile_kwargs = dict(compile_kwargs)
        reduction = compile_kwargs.pop("reduction", "sum_over_batch_size")
        model.compile(
            optimizer=optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=reduction
            ),
            **compile_kwargs,
        )
        return model

    def train(strategy, steps, epochs, optimizer, data=(x, y), **compile_kwargs):
        with strategy.scope():
            model = build(steps, optimizer, **compile_kwargs)
        model.fit(
            *data, batch_size=global_batch, epochs=epochs, shuffle=False, verbose=0
        )
        return model

    def max_diff(a, b):
        return max(
            float(np.max(np.abs(u - v)))
            for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
        )

    mirrored = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    single = tf.distribute.get_strategy()
    results: dict = {"replicas": mirrored.num_replicas_in_sync, "exact": {}}

    def sgd():
        return keras.optimizers.SGD(0.1)

    def adam_clipped():
        # Clipping sees the window's whole gradient, as on one device.
        return keras.optimizers.Adam(0.01, global_clipnorm=0.05)

    scenarios = {
        "steps=3 sgd": (3, 2, sgd, {}),
        "epoch sgd": ("epoch", 3, sgd, {}),
        "steps=4 adam+global_clipnorm": (4, 2, adam_clipped, {}),
        # Keras divides a mean loss by the replicas, not a sum.
        "steps=3 sgd reduction=sum": (3, 2, sgd, {"reduction": "sum"}),
        # Each replica slices its share of the batch of 8 (2 or 1 samples per
        # slice), against one device's unsplit step.
        "micro_batch_size=4 steps=1 adam+global_clipnorm": (
            1,
            2,
            adam_clipped,
            {"micro_batch_size": 4},
        ),
    }
    strategies = dict.fromkeys(scenarios, mirrored)
    if replicas == 2:
        # Keras compiles the function around `strategy.run` with XLA, which
        # cannot span several devices: a plain keras.Model fails the same way
        # with 2 CPU replicas. So XLA is exercised under a one-device
        # MirroredStrategy (cross-replica merge_call included) against
        # jit_compile=True without a strategy.
        name = "steps=3 sgd jit_compile (1-device MirroredStrategy)"
        scenarios[name] = (3, 2, sgd, {"jit_compile": True})
        strategies[name] = tf.distribute.MirroredStrategy(["/cpu:0"])
    for name, (steps, epochs, optimizer, compile_kwargs) in scenarios.items():
        unsplit = {k: v for k, v in compile_kwargs.items() if k != "micro_batch_size"}
        reference = train(single, steps, epochs, optimizer, **unsplit)
        distributed = train(
            strategies[name], steps, epochs, optimizer, **compile_kwargs
        )
        results["exact"][name] = {
            "max_abs_diff": max_diff(reference, distributed),
            "iterations": [
                int(reference.optimizer.iterations.numpy()),
                int(distributed.optimizer.iterations.numpy()),
            ],
        }

    if replicas == 2:
        results["mixed_float16"] = _mixed_precision(train, max_diff, single, mirrored)
        results["communication"] = _count_all_reduces(train, mirrored, x, y)
    Path(out_path).write_text(json.dumps(results))


def _mixed_precision(train, max_diff, single, mirrored):  # pragma: no cover
    import keras
    import numpy as np

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with single.scope():
            initial = train(single, 3, 0, lambda: keras.optimizers.SGD(0.1))
        reference = train(single, 3, 2, lambda: keras.optimizers.SGD(0.1))
        distributed = train(mirrored, 3, 2, lambda: keras.optimizers.SGD(0.1))
        return {
            "max_abs_diff": max_diff(reference, distributed),
            # How far training moved the weights, to scale float16 rounding.
            "max_abs_update": max(
                float(np.max(np.abs(u - v)))
                for u, v in zip(
                    reference.get_weights(), initial.get_weights(), strict=True
                )
            ),
            "optimizer": type(distributed.optimizer).__name__,
            "loss_scale": float(distributed.optimizer.dynamic_scale.numpy()),
            "iterations": int(distributed.optimizer.iterations.numpy()),
        }
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _count_all_reduces(train, strategy, x, y):  # pragma: no cover - subprocess
    """Counts the cross-replica reductions that execute during one epoch.

    Every reduction of a `MirroredStrategy` goes through its extended
    ``_reduce_to`` (`strategy.reduce`, on-write variables) or
    ``_batch_reduce_to`` (`ReplicaContext.all_reduce`). Each traced call gets
    an in-graph counter increment next to it, so only the reductions that
    actually run (a `tf.cond` branch taken) are counted. Reductions traced
    inside `AccumulatingModel._apply_window` are the window's; eager ones are
    Keras reading the on-read metric variables for the epoch's logs.
    """
    import numpy as np
    import tensorflow as tf

    from accumulate.model import AccumulatingModel

    counters = {
        key: tf.Variable(0, dtype=tf.int64, trainable=False)
        for key in ("window_calls", "window_tensors", "other_in_graph_calls")
    }
    inside_window = [0]
    eager_reads = [0]

    def counted(original, tensors_of):
        def wrapper(*args, **kwargs):
            if tf.executing_eagerly():
                # Keras reading the (on-read) metric variables for the epoch
                # logs, outside the train function.
                eager_reads[0] += 1
            elif inside_window[0]:
                counters["window_calls"].assign_add(1)
                counters["window_tensors"].assign_add(tensors_of(*args, **kwargs))
            else:
                counters["other_in_graph_calls"].assign_add(1)
            return original(*args, **kwargs)

        return wrapper

    extended = strategy.extended
    extended._reduce_to = counted(extended._reduce_to, lambda *a, **k: 1)
    extended._batch_reduce_to = counted(
        extended._batch_reduce_to, lambda op, pairs, *a, **k: len(pairs)
    )
    original_apply_window = AccumulatingModel._apply_window

    def traced_apply_window(self):
        inside_window[0] += 1
        try:
            return original_apply_window(self)
        finally:
            inside_window[0] -= 1

    AccumulatingModel._apply_window = traced_apply_window
    try:
        # 118 micro-batches of 8 (the last one ragged) in one epoch.
        n = 8 * 117 + 4
        rng = np.random.default_rng(1)
        big_x = rng.normal(size=(n, 5)).astype("float32")
        big_y = rng.integers(0, 3, size=n)
        out = {}
        for steps in ("epoch", 40):
            for counter in counters.values():
                counter.assign(0)
            eager_reads[0] = 0
            model = train(
                strategy,
                steps,
                1,
                lambda: __import__("keras").optimizers.SGD(0.1),
                data=(big_x, big_y),
            )
            out[str(steps)] = {
                "micro_batches": 118,
                "updates": int(model.optimizer.iterations.numpy()),
                **{key: int(counter.numpy()) for key, counter in counters.items()},
                "eager_metric_reads": eager_reads[0],
                "trainable_variables": len(model.trainable_variables),
            }
        return out
    finally:
        AccumulatingModel._apply_window = original_apply_window


# -- The tests -----------------------------------------------------------------


def _run_worker(replicas: int, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"mirrored{replicas}") / "results.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    try:
        completed = subprocess.run(
            [sys.executable, str(HERE), str(replicas), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:  # subprocess.run kills the child
        pytest.fail(f"the {replicas}-replica worker timed out:\n{error.stderr}")
    if completed.returncode != 0:
        pytest.fail(
            f"the {replicas}-replica worker failed ({completed.returncode}):\n"
            f"{completed.stderr[-6000:]}"
        )
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    return results


@pytest.fixture(scope="module")
def mirrored2(tmp_path_factory):
    return _run_worker(2, tmp_path_factory)


@pytest.fixture(scope="module")
def mirrored4(tmp_path_factory):
    return _run_worker(4, tmp_path_factory)


def _assert_exact(results: dict) -> None:
    for name, scenario in results["exact"].items():
        reference_iterations, distributed_iterations = scenario["iterations"]
        assert reference_iterations == distributed_iterations, name
        assert scenario["max_abs_diff"] <= FLOAT32_TOLERANCE, (name, scenario)


@pytest.mark.slow
def test_two_replicas_match_one_device(mirrored2):
    assert mirrored2["replicas"] == 2
    _assert_exact(mirrored2)
    assert any("jit_compile" in name for name in mirrored2["exact"])
    assert any("micro_batch_size" in name for name in mirrored2["exact"])


@pytest.mark.slow
def test_four_replicas_match_one_device(mirrored4):
    assert mirrored4["replicas"] == 4
    _assert_exact(mirrored4)


@pytest.mark.slow
def test_mixed_float16_under_mirrored_strategy(mirrored2):
    mixed = mirrored2["mixed_float16"]
    assert mixed["optimizer"] == "LossScaleOptimizer"
    assert mixed["iterations"] == 14  # 21 micro-batches x 2 epochs, windows of 3
    # Each replica's loss is the mean over its own half of the batch, so the
    # float16 backward pass rounds other numbers than on one device: allow
    # float16's unit roundoff (2**-11) relative to how far training moved the
    # weights (measured: ~0.15 of it).
    assert mixed["max_abs_diff"] <= 2.0**-11 * mixed["max_abs_update"], mixed


@pytest.mark.slow
def test_one_all_reduce_per_applied_update(mirrored2):
    communication = mirrored2["communication"]
    for steps, counts in communication.items():
        expected_updates = 1 if steps == "epoch" else 3  # 118 = 40 + 40 + 38
        assert counts["updates"] == expected_updates, (steps, counts)
        # One batched all-reduce per update, carrying every gradient sum and
        # the sample count; the optimizer does not reduce again.
        assert counts["window_calls"] == expected_updates, (steps, counts)
        assert counts["window_tensors"] == expected_updates * (
            counts["trainable_variables"] + 1
        )
        # Nothing else is reduced inside the train function: with a
        # one-worker MirroredStrategy Keras averages the returned logs on the
        # host. (It reads the metric variables once more at the epoch end.)
        assert counts["other_in_graph_calls"] == 0, (steps, counts)


if __name__ == "__main__":  # pragma: no cover - the worker
    _worker(int(sys.argv[1]), sys.argv[2])


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_matches_one_process(tmp_path):
    """examples/multi_worker.py: 2 worker processes on 127.0.0.1 vs 1 process."""
    out = tmp_path / "multi_worker.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    try:
        # The example bounds and reaps its own children; this bounds it.
        completed = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "multi_worker.py"),
                "--workers",
                "2",
                "--timeout",
                str(WORKER_TIMEOUT - 30),
                "--json",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"examples/multi_worker.py timed out:\n{error.stderr}")
    assert completed.returncode == 0, completed.stderr[-6000:]
    result = json.loads(out.read_text())
    print(result)
    assert result["workers"] == 2
    for index in range(2):
        assert result[f"worker{index}_updates"] == result["single_process_updates"] == 8
        assert result[f"worker{index}_max_abs_diff"] <= FLOAT32_TOLERANCE
