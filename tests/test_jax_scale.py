"""JAX at scale: window sums placed like their weights, one reduction per window.

On 4 virtual CPU devices (a fresh interpreter: `tests/jax_scale_worker.py`),
one accumulating model trains with no distribution, under `DataParallel`
and under `ModelParallel` on a 2 x 2 mesh that shards both Dense kernels,
with sample weights that empty one device's share of a micro-batch and a
whole micro-batch, a ragged last micro-batch, L2 regularisation, Adam, and
two loss reductions. The oracle is the model's own single-device run, whose
exactness against plain Keras steps the rest of the suite proves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BACKEND

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
pytestmark = [
    pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's"),
    pytest.mark.slow,
]
DISTRIBUTIONS = ("data", "model")
REDUCTIONS = ("sum_over_batch_size", "mean_with_sample_weight")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("jax-scale") / "runs.json"
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        # One thread per virtual device's ops (benchmarks/jax_scale.py:
        # a pool thread waiting in an all-reduce can starve the others).
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
        "--xla_cpu_multi_thread_eigen=false",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [sys.executable, str(HERE / "jax_scale_worker.py"), str(out)],
        env=environment,
        check=True,
        timeout=600,
        cwd=ROOT,
    )
    return json.loads(out.read_text())


def _assert_trained_alike(run: dict, single: dict) -> None:
    """Same updates, weights and logged losses as the single-device run."""
    assert run["iterations"] == single["iterations"]
    for ours, oracle in zip(run["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(ours, oracle, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["loss"], single["loss"], rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_distributed_weights_equal_the_single_device_weights(
    runs, distribution, reduction
):
    single = runs[f"single/{reduction}"]
    run = runs[f"{distribution}/{reduction}"]
    # Per-device sums are in use: 4 data-parallel devices, or 2 on the mesh.
    assert single["devices"] == 1
    assert run["devices"] == (4 if distribution == "data" else 2)
    _assert_trained_alike(run, single)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_padded_sequences_give_the_single_device_weights(runs, distribution):
    """Keras masks: a device's share, and a whole micro-batch, all padding."""
    single, run = runs["single/padded"], runs[f"{distribution}/padded"]
    assert run["devices"] > single["devices"] == 1
    _assert_trained_alike(run, single)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_every_sum_is_sharded_like_its_variable(runs, distribution):
    run = runs[f"{distribution}/sum_over_batch_size"]
    *sums, samples, steps = run["placements"]
    batch_devices = run["devices"]
    for placement in sums:
        spec = placement["variable_spec"]
        spec = spec + ["None"] * (len(placement["sum_spec"]) - 1 - len(spec))
        # The variable's layout, behind one axis over the batch devices.
        assert placement["sum_spec"] == ["batch", *spec]
        assert placement["sum_shard"] == [1, *placement["variable_shard"]]
        assert placement["sum_device_bytes"] == placement["variable_device_bytes"]
        variable_shards = (
            placement["variable_bytes"] // placement["variable_device_bytes"]
        )
        assert (
            placement["sum_device_bytes"] * batch_devices * variable_shards
            == placement["sum_bytes"]
        )
    kernels = [p for p in sums if p["variable"].endswith("kernel")]
    if distribution == "model":
        # The LayoutMap shards both kernels over "model": so are their sums.
        assert all("model" in p["sum_spec"] for p in kernels)
        assert all(p["sum_device_bytes"] * 4 == p["sum_bytes"] for p in kernels)
    assert samples["sum_spec"] == steps["sum_spec"] == []


def _bytes(collectives: list[dict], in_branch: bool) -> int:
    return sum(
        c["bytes"]
        for c in collectives
        if c["across_batch"] and c["in_branch"] == in_branch
    )


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_one_gradient_reduction_per_window(runs, distribution, record_property):
    run = runs[f"{distribution}/sum_over_batch_size"]
    ours = run["collectives"]
    plain = run["plain_collectives"]["plain"]
    keras_builtin = run["plain_collectives"]["keras"]
    plain_per_step = _bytes(plain, in_branch=False)
    per_micro_batch = _bytes(ours, in_branch=False)
    per_apply = _bytes(ours, in_branch=True)
    record_property("ours_bytes_across_batch_per_micro_batch", per_micro_batch)
    record_property("ours_bytes_across_batch_per_apply", per_apply)
    record_property("plain_bytes_across_batch_per_step", plain_per_step)
    # A micro-batch reduces across devices only its loss and weight (two
    # float32 scalars: what the progress bar and the window's count need).
    assert per_micro_batch <= 8
    # The apply reduces the window once, in one all-reduce: the gradient
    # bytes a plain step reduces (XLA reduces each device's shard of a
    # model-sharded gradient), less the plain step's two scalars.
    applies = [c for c in ours if c["in_branch"] and c["across_batch"]]
    assert [c["op"] for c in applies] == ["all-reduce"]
    assert per_apply >= plain_per_step - 8 > 100
    # Plain Keras and Keras's built-in reduce the gradient every step,
    # outside any branch: N reductions per window of N.
    assert _bytes(keras_builtin, in_branch=False) == plain_per_step
    assert not any(c["in_branch"] for c in plain + keras_builtin)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_batches_split_on_each_device_give_the_single_device_updates(
    runs, distribution
):
    """``micro_batch_size``: batches of STEPS x BATCH split inside the step,
    each device slicing its own rows, make the single device's updates (one
    per batch; `tests/test_micro_batches.py` holds those against plain
    Keras), and still reduce gradients once per update."""
    run, single = runs[f"{distribution}/sliced"], runs["single/sliced"]
    assert run["devices"] == (4 if distribution == "data" else 2)
    assert run["iterations"] == single["iterations"] == 8  # 4 batches an epoch
    for ours, oracle in zip(run["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(ours, oracle, rtol=1e-5, atol=1e-6)
    # Per slice, scalars only (its loss, weight and metric totals, and
    # whether any counted): a few dozen bytes against 368 of gradients.
    outside = [c for c in run["collectives"] if not c["in_branch"]]
    assert all(c["bytes"] <= 32 for c in outside if c["across_batch"])
    assert _bytes(run["collectives"], in_branch=False) <= 64
    applies = [c for c in run["collectives"] if c["in_branch"] and c["across_batch"]]
    assert [c["op"] for c in applies] == ["all-reduce"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_an_open_window_saves_as_one_sum(runs, distribution):
    saved = runs[f"{distribution}/sum_over_batch_size"]["saved"]
    assert saved["loaded_devices"] == 1
    assert saved["samples"][0] == saved["samples"][1] == 16
    for ours, loaded in zip(saved["sums"], saved["loaded_sums"], strict=True):
        assert np.any(np.asarray(ours) != 0)
        np.testing.assert_allclose(loaded, ours, rtol=1e-6, atol=1e-7)
    assert (
        saved["reloaded_devices"]
        == runs[f"{distribution}/sum_over_batch_size"]["devices"]
    )
    for ours, reloaded in zip(saved["sums"], saved["reloaded_sums"], strict=True):
        np.testing.assert_allclose(reloaded, ours, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_the_noise_scale_keeps_one_sum(runs, distribution):
    run = runs[f"{distribution}/noise_scale"]
    assert run["devices"] == 1
    # 13 micro-batches: 3 windows of 4, and the last one flushed.
    assert run["iterations"] == 4
    assert any("noise" in key for key in run["logs"])


def test_two_processes_end_with_the_single_process_weights(tmp_path):
    """examples/multi_process_jax.py: 2 processes x 2 devices vs 1 process."""
    out = tmp_path / "multi_process.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "multi_process_jax.py"),
            *("--json", str(out), "--timeout", "300"),
        ],
        env={**os.environ, "KERAS_BACKEND": "jax"},
        check=True,
        timeout=400,
        cwd=ROOT,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    for process in range(2):
        assert result[f"process{process}_devices"] == 4
        assert result[f"process{process}_window_devices"] == 4
        assert result[f"process{process}_updates"] == result["single_process_updates"]
        assert result[f"process{process}_max_abs_diff"] < 1e-6


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_each_device_share_draws_its_own_dropout_mask(runs, distribution):
    draws = runs[f"{distribution}/dropout"]
    shares = np.split(np.asarray(draws["y_pred"]), draws["devices"])
    # Every input is 1: equal shares would mean one mask on every device.
    for share in shares[1:]:
        assert not np.allclose(share, shares[0])
    # The generator moves on as after one plain step: one draw.
    before, after = draws["seed_before"], draws["seed_after"]
    assert after == [before[0], before[1] + 1]
