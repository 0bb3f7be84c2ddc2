"""Smoke tests of the benchmark scripts: they run, and write what they promise.

Each script runs once, in ``--quick`` mode (a couple of thousand synthetic
samples, one timed epoch, a few variants) in a subprocess, into a temporary
directory. No timing is asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BACKEND

# Benchmarks are measuring tools: they run on each backend's newest versions,
# not again at the floor (whose subject is the library and the application).
pytestmark = pytest.mark.tools

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"


def _run(script: str, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *more],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        # JAX compiles each of the dozen variants's step: minutes on a busy
        # 2-core machine (the first JAX run timed out at 120 s).
        timeout=120 if BACKEND == "tensorflow" else 480,
        check=False,
    )
    assert completed.returncode == 0, (
        f"{script} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    return completed


@pytest.fixture(scope="module")
def bench_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # Off TensorFlow each variant compiles its own step: one setting of
    # steps_per_execution is enough to see the script work there.
    only = () if BACKEND == "tensorflow" else ("--only", "*spe=1]")
    _run("bench.py", out, "--instances", "2", *only)
    return out


@pytest.fixture(scope="module")
def scaling_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scaling")
    _run("scaling.py", out)
    return out


def test_bench_writes_json_and_png(bench_output: Path) -> None:
    report = json.loads((bench_output / "bench.json").read_text())
    assert (bench_output / "bench.png").stat().st_size > 0
    assert set(report) >= {"meta", "results", "ratios", "table"}
    assert report["meta"]["quick"] is True
    assert report["meta"]["threads"] == 1
    assert report["meta"]["instances"] == 2

    # The floor and the notebook's loops are TensorFlow code: only there.
    on_tensorflow = BACKEND == "tensorflow"
    families = {row["family"] for row in report["results"]}
    tensorflow_families = {"floor", "notebook"} if on_tensorflow else set()
    assert families == {"keras-fit", "accumulating", "keras-ga", *tensorflow_families}
    assert {row["backend"] for row in report["results"]} == {BACKEND}
    for row in report["results"]:
        assert len(row["epoch_seconds"]) == report["meta"]["timed_epochs"]
        assert row["median_s"] > 0
        assert row["samples_per_s"] > 0
        assert row["peak_rss_mb"] > 0
        assert len(row["epoch_cpu_seconds"]) == report["meta"]["timed_epochs"]
        ratios = ("ratio_to_fit", "cpu_ratio_to_fit")
        for ratio in (*ratios, "ratio_to_floor") if on_tensorflow else ratios:
            assert row[ratio] is not None and row[ratio] > 0
    keys = {row["key"] for row in report["results"]}
    assert "fit [jit=off spe=1]" in keys
    assert "acc-epoch [jit=off spe=1]" in keys
    assert ("notebook-accumulating [eager]" in keys) == on_tensorflow
    fit = next(row for row in report["results"] if row["key"] == "fit [jit=off spe=1]")
    assert fit["ratio_to_fit"] == pytest.approx(1.0)
    assert fit["cpu_ratio_to_fit"] == pytest.approx(1.0)
    paired = report["ratios"]["per_settings"]["jit=off spe=1"]["acc-epoch/fit"]
    assert set(paired) == {"wall", "cpu"}
    assert all(value > 0 for value in paired.values())


def test_scaling_writes_json_and_png(scaling_output: Path) -> None:
    report = json.loads((scaling_output / "bench-scaling.json").read_text())
    assert (scaling_output / "bench-scaling.png").stat().st_size > 0
    assert set(report) >= {"meta", "steps_sweep", "width_sweep", "memory", "table"}

    steps = report["steps_sweep"]
    assert steps[0]["name"] == "fit" and steps[0]["accumulator_bytes"] is None
    assert [row["accumulation_steps"] for row in steps[1:]] == [1, 2, "epoch"]
    for row in steps[1:]:
        # The accumulators are one float32 copy of the trainable weights.
        assert row["accumulator_bytes"] == row["trainable_bytes"]
    assert report["memory"]["state_bytes_independent_of_steps"] is True

    for entry in report["width_sweep"]:
        names = [row["name"] for row in entry["variants"]]
        assert names == ["fit", "acc-epoch", "acc-8"]
        assert entry["parameters"] * 4 == entry["variants"][0]["trainable_bytes"]


# JAX and PyTorch run it in `make test-without-tensorflow` (the GPU check).
@pytest.mark.tensorflow_only
def test_memory_measures_each_variant_in_its_own_process(tmp_path: Path) -> None:
    # The transformer's ends and LoRA: plain fit at b, ours at N, both LoRA.
    variants = "plain-4,ours-4x4,plain-4-lora,ours-4x4-lora"
    _run("memory.py", tmp_path, "--models", "transformer", "--only", variants)
    report = json.loads((tmp_path / "bench-memory.json").read_text())
    assert (tmp_path / "bench-memory.png").stat().st_size > 0
    runs = {run["name"]: run for run in report["results"]}
    assert set(runs) == set(variants.split(","))
    assert len({run["process"] for run in runs.values()}) == len(runs)
    for run in runs.values():
        assert run["backend"] == BACKEND and run["peak_added_bytes"] > 0
        assert run["epoch_s"] > 0
    # 32 sequences, micro-batches of 4, windows of 4: 4 updates in 2 epochs.
    assert runs["ours-4x4"]["optimizer_updates"] == 4
    assert runs["plain-4"]["optimizer_updates"] == 16
    # The accumulators are one float32 copy of the trainable weights: with
    # LoRA, of the LoRA weights only.
    for name in ("ours-4x4", "ours-4x4-lora"):
        assert (
            runs[name]["accumulator_bytes"] == runs[name]["float32_weight_copy_bytes"]
        )
    assert runs["plain-4"]["accumulator_bytes"] == 0
    lora, full = runs["ours-4x4-lora"], runs["ours-4x4"]
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 4
    limits = {row["variant"]: row for row in report["limits"]}
    assert set(limits) == {"ours-4x4", "ours-4x4-lora"}
    assert limits["ours-4x4"]["limit_mb"] == pytest.approx(
        (runs["plain-4"]["peak_added_bytes"] + full["float32_weight_copy_bytes"])
        / 2**20
    )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_jax_scale_reduces_one_window_of_gradients(tmp_path: Path) -> None:
    _run("jax_scale.py", tmp_path, "--rounds", "2")
    report = json.loads((tmp_path / "bench-scale.json").read_text())
    assert report["devices"] == 4
    programs, windows = report["programs"], report["per_window"]
    assert set(windows) == {"plain", "ours", "ours-reduced", "keras"}
    for name, program in programs.items():
        assert program["wall_ms"] > 0 and program["hlo_instructions"] > 0, name
    # Per micro-batch, ours reduces a few scalars; its apply, the gradients.
    ours = programs["ours/micro-batch"]
    assert ours["bytes_across_batch"] - ours["bytes_across_batch_in_branch"] <= 32
    assert ours["bytes_across_batch_in_branch"] >= report["gradient_bytes"]
    steps = report["accumulation_steps"]
    assert windows["plain"]["bytes_across_batch"] >= steps * report["gradient_bytes"]
    for name in ("keras", "ours-reduced"):
        assert (
            windows[name]["bytes_across_batch"]
            >= windows["plain"]["bytes_across_batch"]
        )
    assert windows["ours"]["bytes_across_batch"] * steps <= (
        windows["plain"]["bytes_across_batch"] * 1.01
    )
