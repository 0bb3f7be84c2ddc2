"""Tests for ``python -m accumulate``: end to end on tiny data, and arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accumulate.paper.cli import main
from accumulate.paper.results import load_result
from tests.tiny_data import REPORT_FILES, write_tiny_data_dir

SEEDS = ("42", "7")
BATCH_SIZE = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, data_dir):
    """One real `reproduce` in a subprocess: two seeds in two worker processes."""
    out = tmp_path_factory.mktemp("results")
    command = [sys.executable, "-m", "accumulate", "reproduce", "--dataset", "mnist"]
    command += ["--epochs", "2", "--seeds", *SEEDS, "--batch-size", str(BATCH_SIZE)]
    command += ["--data-dir", str(data_dir), "--out", str(out), "--jobs", "2"]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=out,
    )
    return completed, out


@pytest.mark.slow
def test_reproduce_succeeds_with_progress_and_summary(reproduced):
    completed, _ = reproduced
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    for seed in SEEDS:
        for model in ("standard", "accumulating"):
            assert any(
                f"mnist/seed{seed}/sgd {model}" in line
                and "epoch 2/2" in line
                and "ETA" in line
                for line in lines
            ), completed.stdout
    assert "Summary" in completed.stdout
    assert "final val acc" in completed.stdout
    assert "report.md" in completed.stdout


@pytest.mark.slow
def test_reproduce_writes_results_and_report(reproduced):
    _, out = reproduced
    folder = out / "mnist"
    for seed in SEEDS:
        result = load_result(folder / f"history-seed{seed}-batch{BATCH_SIZE}.json")
        assert result["config"]["seed"] == int(seed)
        assert result["accumulating"]["updates"] == 2
        # Two jobs: each worker process was limited to one thread.
        assert result["config"]["machine"]["intra_op_threads"] == 1
    for name in REPORT_FILES:
        assert (folder / name).stat().st_size > 0, name


@pytest.mark.slow
def test_report_numbers_come_from_the_results(reproduced):
    _, out = reproduced
    folder = out / "mnist"
    result = load_result(folder / f"history-seed42-batch{BATCH_SIZE}.json")
    report = (folder / "report.md").read_text()
    epoch_1 = result["standard"]["val_accuracy"][0]
    assert f"| val_accuracy | 1 | 0.7346 | {epoch_1:.4f} |" in report
    # The notebook's scaling of the accumulated gradient, for this data.
    data = result["data"]
    factor = data["train_samples"] / (BATCH_SIZE * data["batches_per_epoch"])
    assert f"= {factor:.4f} times" in report
    assert "seeds 42, 7" in report


@pytest.mark.slow
def test_rerun_skips_existing_results(reproduced, data_dir, capsys):
    _, out = reproduced
    arguments = ["reproduce", "--dataset", "mnist", "--epochs", "2"]
    arguments += ["--seeds", *SEEDS, "--batch-size", str(BATCH_SIZE)]
    arguments += ["--data-dir", str(data_dir), "--out", str(out)]
    assert main(arguments) == 0
    summary = capsys.readouterr().out
    assert summary.count("skipped") == len(SEEDS)


@pytest.mark.slow
def test_rerun_with_other_epochs_needs_force(reproduced, data_dir, capsys):
    _, out = reproduced
    arguments = ["reproduce", "--dataset", "mnist", "--epochs", "3", "--seeds", "42"]
    arguments += ["--batch-size", str(BATCH_SIZE), "--out", str(out)]
    assert main(arguments) == 2
    assert "2 epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_report_command_rebuilds(reproduced, capsys):
    _, out = reproduced
    (out / "mnist" / "report.md").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "mnist" / "report.md").exists()
    assert "report.md" in capsys.readouterr().out


def test_report_command_without_results(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 1
    assert "no result files" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--epochs", "0"], "'0'"),
        (["--epochs", "many"], "'many'"),
        (["--dataset", "cifar10"], "'cifar10'"),
        (["--seeds", "42", "x"], "'x'"),
        (["--optimizer", "rmsprop"], "'rmsprop'"),
        (["--learning-rate", "-0.1"], "'-0.1'"),
        (["--jobs", "0"], "'0'"),
        (["--accumulation-steps", "0"], "'0'"),
        (["--accumulation-steps", "weekly"], "'weekly'"),
        (["--data-dir", "/no/such/dir"], "'/no/such/dir'"),
    ],
)
def test_bad_arguments_name_the_value(arguments, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", *arguments])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.slow
def test_result_json_is_plain_json(reproduced):
    _, out = reproduced
    path = out / "mnist" / f"history-seed7-batch{BATCH_SIZE}.json"
    assert json.loads(path.read_text())["data"]["test_samples"] > 0


@pytest.mark.slow
def test_accumulation_steps_reach_results_and_report(tmp_path, data_dir, capsys):
    out = tmp_path / "runs"
    arguments = ["reproduce", "--dataset", "mnist", "--epochs", "2", "--seeds", "42"]
    arguments += ["--batch-size", str(BATCH_SIZE), "--accumulation-steps", "2"]
    arguments += ["--data-dir", str(data_dir), "--out", str(out), "--jobs", "1"]
    arguments += ["--reference", str(tmp_path / "no-reference")]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "mnist/seed42/sgd/steps2" in printed
    result = load_result(
        out / "mnist" / f"history-seed42-batch{BATCH_SIZE}-steps2.json"
    )
    assert result["config"]["accumulation_steps"] == 2
    batches = result["data"]["batches_per_epoch"]
    # One update every 2 batches, and a half-full window applied at epoch end.
    assert result["accumulating"]["updates"] == 2 * -(-batches // 2)
    assert result["standard"]["updates"] == 2 * batches
    report = (out / "mnist" / "report.md").read_text()
    assert "accumulating every 2 batches" in report
    assert "No reference run for:" in report


def test_parser_defaults_are_the_notebook_run_into_runs():
    from accumulate.paper.cli import build_parser

    args = build_parser().parse_args(["reproduce"])
    assert args.accumulation_steps == "epoch"
    assert str(args.out) == "runs"
    assert str(args.reference) == "results"
    eight = build_parser().parse_args(["reproduce", "--accumulation-steps", "8"])
    assert eight.accumulation_steps == 8
