"""The batch-size study: its plan and bookkeeping on synthetic histories, and --quick.

The analysis on hand-made records is `tests/test_study_analysis.py`.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from accumulate.paper import study, study_runner
from accumulate.paper.study_analysis import (
    bend,
    fit_critical_batch,
    scaling_efficiencies,
)
from accumulate.paper.study_plan import (
    ADAPTIVE,
    EPOCH,
    OPTIMIZERS,
    WINDOWS,
    StudySettings,
    learning_rate_grid,
    noise_scale_window,
    plan,
)
from accumulate.paper.study_records import (
    best_run,
    crossing,
    edge_extension,
    load_runs,
    to_target,
)


def test_to_target_counts_the_first_epoch_at_or_above_the_target():
    accuracy = [0.30, 0.80, 0.949, 0.95, 0.99]
    updates = [118, 236, 354, 472, 590]
    seconds = [5.0, 0.3, 0.4, 0.3, 0.3]
    reached = to_target(accuracy, updates, seconds, 0.95)
    assert reached["epochs"] == 4  # 0.949 is below, 0.95 counts
    assert reached["updates"] == 472
    assert reached["seconds"] == pytest.approx(6.0)
    # The 5 s first epoch (compilation) is replaced by the median of the rest.
    assert reached["seconds_excluding_compile"] == pytest.approx(0.3 + 1.0)


def test_to_target_is_none_when_never_reached_and_skips_missing_values():
    assert to_target([0.5, 0.6], [1, 2], [1.0, 1.0], 0.95) is None
    assert to_target([None, 0.96], [1, 2], [1.0, 1.0], 0.95)["epochs"] == 2


def test_to_target_rejects_histories_of_different_lengths():
    with pytest.raises(ValueError, match="one entry per epoch"):
        to_target([0.5, 0.96], [1], [1.0, 1.0], 0.95)


def test_crossing_interpolates_within_the_epoch_that_reached_the_target():
    # Halfway between 0.90 (100 updates) and 1.00 (200 updates).
    assert crossing([0.9, 1.0], [100, 200], 0.95) == pytest.approx(150)
    # In the first epoch, from the initial accuracy at 0 updates.
    assert crossing([0.9], [10], 0.5, initial_accuracy=0.1) == pytest.approx(5)
    assert crossing([0.5, 0.6], [1, 2], 0.95) is None


def test_scaling_efficiency_and_bend_on_a_known_curve():
    batches = [512, 1024, 2048, 4096, 8192]
    # Perfect scaling twice, then a third of the possible gain, then none.
    updates = [800, 400, 200, 200 / 2 ** (1 / 3), 200 / 2 ** (1 / 3)]
    efficiencies = scaling_efficiencies(batches, updates)
    assert efficiencies[:3] == pytest.approx([1.0, 1.0, 1 / 3])
    assert efficiencies[3] == pytest.approx(0.0, abs=1e-12)
    index, _ = bend(batches, updates)
    assert index == 2  # the step out of 2048 is the first below 0.5


def test_a_window_that_never_reaches_the_target_is_a_bend():
    assert bend([512, 1024, 2048], [400, 200, None])[0] == 1
    assert bend([512, 1024], [400, 200])[0] is None


def test_fit_critical_batch_recovers_the_model():
    batches = [512.0 * 2**k for k in range(7)]
    updates = [150 * (1 + 5000 / b) for b in batches]
    b_crit, s_min = fit_critical_batch(batches, updates)
    assert b_crit == pytest.approx(5000, rel=0.01)
    assert s_min == pytest.approx(150, rel=0.01)
    assert fit_critical_batch([512.0, 1024.0], [10.0, 5.0]) is None


def test_noise_scale_window_rounds_clips_and_handles_bad_measurements():
    assert noise_scale_window(1.0, 512.0 * 8, 118, 2) == 8
    assert noise_scale_window(1.0, 512.0 * 11, 118, 2) == 8  # log2(11) = 3.46
    assert noise_scale_window(1.0, 512.0 * 12, 118, 2) == 16  # log2(12) = 3.58
    assert noise_scale_window(1.0, 10.0, 118, 4) == 2  # at least 2: measures
    assert noise_scale_window(1.0, 512.0 * 128, 118, 2) == EPOCH
    assert noise_scale_window(-1.0, 5.0, 118, 2) == EPOCH  # noise swamps |G|^2
    assert noise_scale_window(1.0, -5.0, 118, 16) == 2  # no measurable noise
    assert noise_scale_window(math.nan, 5.0, 118, 16) == 16  # keep


def test_learning_rate_grids_are_factor_two_ladders_growing_with_the_batch():
    for optimizer in OPTIMIZERS:
        grids = [learning_rate_grid(w, optimizer, 5, 118) for w in WINDOWS]
        for grid in grids:
            assert len(grid) == 5
            assert all(b / a == 2 for a, b in itertools.pairwise(grid))
        centres = [grid[2] for grid in grids]
        assert centres == sorted(centres) and centres[-1] > centres[0]
    assert (
        learning_rate_grid(4, "momentum", 5, 118)[2]
        < learning_rate_grid(4, "sgd", 5, 118)[2]
    )


def _record(rate, updates=None, peak=0.5, accuracy=None):
    reached = {"updates": updates, "epochs": 1, "seconds_excluding_compile": 1.0}
    return {
        "spec": {"learning_rate": rate, "target": 0.9},
        "to_target": reached if updates else None,
        "history": {
            "val_accuracy": accuracy or [peak],
            "cumulative_updates": [updates or 1],
        },
        "initial_val_accuracy": 0.1,
    }


def test_best_run_breaks_ties_in_the_same_epoch_by_the_interpolated_crossing():
    # Both reach 0.9 after the first epoch's 100 updates; the second run
    # crossed it earlier within the epoch (it ended further above it).
    slow = _record(0.5, 100, accuracy=[0.91])
    fast = _record(1.0, 100, accuracy=[0.99])
    assert best_run([slow, fast]) is fast
    assert best_run([fast, slow]) is fast
    assert (
        best_run([_record(0.5, 200), _record(1.0, 100)])["spec"]["learning_rate"] == 1.0
    )
    assert best_run([_record(0.5), _record(1.0)]) is None


def test_edge_extension_goes_beyond_the_edge_holding_the_best_rate():
    inside = [_record(0.5, 300), _record(1.0, 200), _record(2.0, 250)]
    assert edge_extension(inside, 0) is None
    top = [_record(0.5, 300), _record(1.0, 200), _record(2.0, 100)]
    assert edge_extension(top, 0) == 4.0
    assert edge_extension(top, 1) is None  # one extension per grid
    # Nobody reached the target: the highest accuracy decides.
    bottom = [_record(0.5, peak=0.9), _record(1.0, peak=0.8), _record(2.0)]
    assert edge_extension(bottom, 0) == 0.25


# The study is a TensorFlow program (tf.data pipelines, one TensorFlow thread
# per worker), as its committed results are: its suite is TensorFlow's.
@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_quick_study_writes_runs_figures_and_report(tmp_path):
    assert study.main(["--quick", "--out", str(tmp_path), "--jobs", "2"]) == 0
    summary = json.loads((tmp_path / "study.json").read_text())
    planned = plan(StudySettings.quick_settings())
    assert not summary["not_run"]
    assert len(summary["runs"]) == len(planned)
    records = load_runs(tmp_path)
    assert {r["name"] for r in records} == {spec.name for spec in planned}
    for record in records:
        history = record["history"]
        epochs = len(history["epoch_seconds"])
        assert 1 <= epochs <= record["spec"]["epochs"]
        assert len(history["val_accuracy"]) == epochs
        # The bookkeeping agrees with the history it was computed from.
        first = next(
            (
                i + 1
                for i, value in enumerate(history["val_accuracy"])
                if value is not None and value >= record["spec"]["target"]
            ),
            None,
        )
        if first is None:
            assert record["to_target"] is None
            assert record["stopped"] in ("budget", "diverged")
        else:
            assert record["stopped"] == "target" and first == epochs
            assert record["to_target"]["epochs"] == first
            assert record["to_target"]["updates"] == history["cumulative_updates"][-1]
        if record["spec"]["window"] not in (1, ADAPTIVE):
            # N >= 2 measures the noise scale every epoch.
            assert len(history["gradient_noise_scale"]) == epochs
    adaptive = [r for r in records if r["spec"]["arm"] == ADAPTIVE]
    assert adaptive and all(
        r["history"]["accumulation_steps"][0] == 2 for r in adaptive
    )
    report = (tmp_path / "report.md").read_text()
    for heading in (
        "## Answers",
        "Where accumulation stops paying",
        "Is one step per epoch ever better?",
        "Does the noise scale predict the bend?",
        "What the adaptive arm buys",
        "Does momentum change the picture?",
    ):
        assert heading in report
    for stem in ("updates_to_target", "epochs_to_target", "noise_scale", "paper_twin"):
        png = tmp_path / f"{stem}-mnist.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_continued_study_keeps_the_earlier_invocations(tmp_path):
    settings = StudySettings.quick_settings()
    first = {"command": "c", "started_at": "t0", "wall_seconds": 60.0}
    (tmp_path / "study.json").write_text(
        json.dumps({"settings": settings.to_dict(), **first})
    )
    assert study_runner._previous_invocations(tmp_path, settings) == [first]
    other = StudySettings.full()
    assert study_runner._previous_invocations(tmp_path, other) == []
    assert study_runner._previous_invocations(tmp_path / "missing", settings) == []
