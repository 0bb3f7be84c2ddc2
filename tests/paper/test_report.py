"""Tests for accumulate.paper.report on fabricated result files (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from accumulate.paper.config import ExperimentConfig
from accumulate.paper.reference import load_reference
from accumulate.paper.reference_comparison import (
    compare_with_reference,
    reference_path,
)
from accumulate.paper.report import build_report
from accumulate.paper.reproduction_text import comparison_summary
from accumulate.paper.results import load_result, result_path, save_result
from tests.tiny_data import REPORT_FILES

EPOCHS = 4
TEST_SAMPLES = 50
BATCHES = 118


def _fabricate(config: ExperimentConfig, offset: float) -> dict:
    """A result whose curves are the notebook's, shifted by ``offset``."""
    logged = load_reference(config.dataset)
    rng = np.random.default_rng(config.seed)
    labels = rng.integers(0, 10, TEST_SAMPLES).tolist()
    result = {
        "config": {
            **config.to_dict(),
            "versions": {"keras": "3.15.1"},
            "machine": {"platform": "test", "cpu_count": 2, "intra_op_threads": 1},
            "settings": {"steps_per_execution": "epoch"},
        },
        "data": {
            "train_samples": 60000,
            "test_samples": TEST_SAMPLES,
            "batches_per_epoch": BATCHES,
            "test_labels": labels,
        },
    }
    for model, per_epoch in (("standard", BATCHES), ("accumulating", 1)):
        history = {
            metric: [
                float(value) if np.isfinite(value) else 0.5
                for value in logged[model][metric][: config.epochs] + offset
            ]
            for metric in logged[model]
        }
        history.update(
            updates=per_epoch * config.epochs,
            cumulative_updates=[per_epoch * (e + 1) for e in range(config.epochs)],
            seconds=1.5,
            epoch_seconds=[0.9] + [0.2] * (config.epochs - 1),
            # The Adam file pretends its twins started apart.
            initial_weights_sha256=f"{config.seed:063x}{model == 'standard':d}"
            if config.optimizer == "adam"
            else f"{config.seed:064x}",
            jit_compile=True,
            test_predictions=labels[:-5] + [0] * 5,
        )
        result[model] = history
    return result


@pytest.fixture
def results_dir(tmp_path):
    runs = [
        (ExperimentConfig("mnist", epochs=EPOCHS, seed=42), 0.01),
        (ExperimentConfig("mnist", epochs=EPOCHS, seed=1), 0.03),
        (ExperimentConfig("mnist", epochs=EPOCHS - 1, optimizer="adam"), -0.5),
    ]
    for config, offset in runs:
        save_result(_fabricate(config, offset), result_path(tmp_path, config))
    return tmp_path


def test_writes_every_file(results_dir):
    written = build_report(results_dir)
    names = {path.name for path in written}
    assert names == set(REPORT_FILES)
    assert all(path.parent == results_dir / "mnist" for path in written)


def test_report_tables_use_the_results(results_dir):
    build_report(results_dir)
    report = (results_dir / "mnist" / "report.md").read_text()
    # Seed 42 is the main run, seed 1 adds the spread, Adam only the comparison.
    assert "seeds 42, 1" in report
    notebook = load_reference("mnist")["standard"]["val_accuracy"][0]
    row = f"| val_accuracy | 1 | {notebook:.4f} | {notebook + 0.01:.4f} | +0.0100 |"
    assert row in report
    assert "(n=2)" in report
    assert "closest to SGD's: on average 0.0100 away, against 0.5000 for Adam" in (
        report
    )
    assert "60000/(512 x 118) = 0.9931" in report
    assert "In 2 of 3 result file(s)" in report
    assert "do not, in some files" in report
    assert "| standard | epoch-1 val accuracy |" in report


def test_empty_directory_gives_no_files(tmp_path):
    assert build_report(tmp_path) == []
    assert build_report(tmp_path / "missing") == []


# -- Against a reference directory -------------------------------------------


@pytest.fixture
def fresh_and_reference(tmp_path):
    """A fresh run equal to its reference, one 0.002 off, one without any."""
    fresh, reference = tmp_path / "runs", tmp_path / "results"
    same = ExperimentConfig("mnist", epochs=EPOCHS, seed=42)
    shifted = ExperimentConfig("mnist", epochs=EPOCHS, seed=1)
    alone = ExperimentConfig("mnist", epochs=EPOCHS, seed=2)
    for config, offset in ((same, 0.01), (shifted, 0.03), (alone, 0.0)):
        save_result(_fabricate(config, offset), result_path(fresh, config))
    for config, offset in ((same, 0.01), (shifted, 0.032)):
        save_result(_fabricate(config, offset), result_path(reference, config))
    return fresh, reference


def test_comparison_with_the_reference(fresh_and_reference):
    fresh, reference = fresh_and_reference
    run = fresh / "mnist" / "history-seed42.json"
    same = compare_with_reference(
        load_result(run), reference_path(run, fresh, reference)
    )
    assert same.same_experiment and same.same_initial_weights
    assert same.largest_difference == 0
    assert same.same_predictions == {"standard": 50, "accumulating": 50}
    assert comparison_summary(same).startswith("identical to the reference")
    run = fresh / "mnist" / "history-seed1.json"
    shifted = compare_with_reference(
        load_result(run), reference_path(run, fresh, reference)
    )
    assert shifted.largest_difference == pytest.approx(0.002, abs=1e-9)
    assert comparison_summary(shifted).startswith(
        "largest difference from the reference 2.00e-03"
    )


def test_report_has_the_reference_section_only_when_asked(fresh_and_reference):
    fresh, reference = fresh_and_reference
    build_report(fresh, reference_dir=reference)
    report = (fresh / "mnist" / "report.md").read_text()
    assert "## This run vs the reference run" in report
    assert "* `history-seed42.json`: identical to the reference" in report
    assert "* `history-seed1.json`: largest difference from the reference 2.00e-03" in (
        report
    )
    assert "No reference run for: `history-seed2.json`." in report
    assert "initial weights identical; test-set predictions the same for 50/50" in (
        report
    )
    build_report(fresh)
    assert "reference run" not in (fresh / "mnist" / "report.md").read_text()
    build_report(reference, reference_dir=reference)  # itself: nothing to compare
    assert "reference run" not in (reference / "mnist" / "report.md").read_text()
