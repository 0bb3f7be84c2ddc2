"""The library on JAX and PyTorch where TensorFlow is not installed.

An accelerator machine may hold CUDA builds of JAX and PyTorch and no
TensorFlow. These tests run in the venv `make test-without-tensorflow`
makes (Keras, KerasHub and what they import, as the GPU check installs them,
without TensorFlow), on each of the two backends; where TensorFlow is
installed they skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import BACKEND
from tests.oracle import update_error

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="TensorFlow is installed: run `make test-without-tensorflow`",
)


def _transformer():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import transformer
    finally:
        sys.path.pop(0)
    return transformer


def test_a_kerashub_model_accumulates_exactly_without_tensorflow() -> None:
    from accumulate import enable_accumulation

    transformer = _transformer()
    size = transformer.SIZES["quick"]
    x, y, weight = transformer.token_data(size, 12)
    plain = transformer.compiled(transformer.causal_lm(size))
    before = plain.get_weights()
    plain.train_on_batch(x, y, sample_weight=weight)  # the oracle: one big batch
    ours = enable_accumulation(transformer.causal_lm(size), accumulation_steps=3)
    transformer.compiled(ours).fit(
        x, y, sample_weight=weight, batch_size=4, shuffle=False, verbose=0
    )
    assert int(keras.ops.convert_to_numpy(ours.optimizer.iterations)) == 1
    assert update_error(ours, plain, before) < 1e-5
    assert "tensorflow" not in sys.modules


@pytest.mark.skipif(BACKEND != "jax", reason="runs both backends itself, once")
def test_the_gpu_check_runs_quick(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    completed = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    memory = json.loads((out / "bench-memory.json").read_text())
    assert {run["backend"] for run in memory["results"]} == {"jax", "torch"}
    ours = [run for run in memory["results"] if run["kind"] == "ours"]
    assert ours and all(run["accumulator_bytes"] > 0 for run in ours)
    for backend in ("jax", "torch"):
        speed = json.loads((out / backend / "bench-transformer.json").read_text())
        assert speed["meta"]["backend"] == backend
        for ratio in speed["paired_ratios"].values():
            assert np.isfinite(ratio["wall"]) and ratio["cpu"] > 0
        # micro_batch_size against plain on the same batch and against ours.
        assert {"sliced-16 / plain-16", "sliced-4x4 / ours-4"} <= set(
            speed["paired_ratios"]
        )
        # No accelerator here: "auto" is refused with its remedy, not guessed.
        auto = json.loads((out / backend / "auto-micro-batch.json").read_text())
        assert auto["accelerator"] is None
        assert "Give micro_batch_size an int" in auto["refused_on_cpu"]
