"""The study's analysis on small hand-made run records (no training).

Each record is built the way `study_run.run_one` builds one: per-epoch
validation accuracy, cumulative updates and epoch times, with `to_target`
computed from them. The numbers are chosen so that each answer is known.
"""

from __future__ import annotations

import math

import pytest

from accumulate.paper.study_analysis import noise_comparisons, noise_summary, points
from accumulate.paper.study_answers import (
    adaptive_arm,
    analyse,
    epoch_cost,
    epoch_times,
    momentum_effect,
    one_step_per_epoch,
)
from accumulate.paper.study_plan import ADAPTIVE, EPOCH
from accumulate.paper.study_records import to_target
from accumulate.paper.study_text import (
    adaptive_text,
    noise_text,
    one_step_text,
    scaling_text,
)

SAMPLES = 60_000
BATCHES = 118  # micro-batches of 512 per epoch
TARGET = 0.9


def record(
    window,
    rate,
    accuracy,
    *,
    arm="grid",
    optimizer="sgd",
    dataset="mnist",
    budget=10,
    noise=None,
    seconds=None,
    windows=None,
):
    """A run record whose window applies ``BATCHES / window`` updates an epoch."""
    if arm == ADAPTIVE:
        per_epoch = math.ceil(BATCHES / 4)
    else:
        per_epoch = 1 if window == EPOCH else math.ceil(BATCHES / window)
    updates = [per_epoch * (epoch + 1) for epoch in range(len(accuracy))]
    seconds = seconds or [3.0] + [1.0] * (len(accuracy) - 1)
    history = {
        "val_accuracy": list(accuracy),
        "cumulative_updates": updates,
        "epoch_seconds": seconds,
        "accumulation_steps": windows or [window] * len(accuracy),
    }
    if noise is not None:
        history["gradient_noise_scale"] = noise
    return {
        "spec": {
            "dataset": dataset,
            "arm": arm,
            "window": window,
            "optimizer": optimizer,
            "learning_rate": rate,
            "epochs": budget,
            "target": TARGET,
        },
        "data": {"train_samples": SAMPLES, "test_samples": 10_000},
        "history": history,
        "stopped": "target" if max(accuracy) >= TARGET else "budget",
        "to_target": to_target(accuracy, updates, seconds, TARGET),
        "initial_val_accuracy": 0.1,
    }


def test_points_pick_each_windows_best_rate_and_measure_its_batch():
    records = [
        record(EPOCH, 1.0, [0.5] * 10),
        record(EPOCH, 2.0, [0.6] * 10),
        record(4, 0.5, [0.5, 0.8, 0.95]),
        record(4, 1.0, [0.7, 0.92]),
        record(1, 0.25, [0.92]),
        record(4, 1.0, [0.99], optimizer="momentum"),  # another optimizer
    ]
    series = points(records, "mnist", "sgd")
    assert [p.window for p in series] == [1, 4, EPOCH]
    one, four, full = series
    assert four.rate == 1.0 and four.measure("updates") == 60
    assert four.rates == (0.5, 1.0) and four.at_edge
    assert four.batch == pytest.approx(SAMPLES / 30)
    assert not full.reached and full.closest["spec"]["learning_rate"] == 2.0
    assert full.closest_accuracy == 0.6
    assert full.budget_updates == 10  # one update per epoch for ten epochs
    assert one.record is one.best


def test_scaling_finds_the_bend_where_updates_stop_halving():
    # Updates-to-target halve from N=1 to N=4, then barely move.
    records = [
        record(1, 0.5, [0.5, 0.5, 0.5, 0.95]),  # 472 updates
        record(2, 0.5, [0.5, 0.5, 0.5, 0.95]),  # 236
        record(4, 0.5, [0.5, 0.5, 0.5, 0.95]),  # 120
        record(8, 0.5, [0.5] * 7 + [0.95]),  # 120
    ]
    answers = analyse(records, "mnist", ["sgd"], epochs=10)
    scaling = answers.scalings["sgd"]
    # Interpolated within the epoch that reached the target: 459, 233, 117
    # and 118 updates.
    assert [round(e, 2) for e in scaling.efficiencies] == [1.0, 1.0, -0.02]
    assert scaling.bend_index == 2
    first, second = scaling.bend_step
    assert (first.window, second.window) == (4, 8)
    assert scaling.bend_batch == pytest.approx(SAMPLES * 4 / 120)
    assert scaling.batch_factor == pytest.approx(472 / 120 * 2, rel=0.01)
    assert scaling.b_crit is not None and scaling.s_min is not None
    sentence = " ".join(scaling_text(scaling, "sgd"))
    assert "stop halving after N=4" in sentence
    assert "the steps before it: 1.00, 1.00" in sentence


def test_a_step_into_a_window_that_never_reached_the_target_is_the_bend():
    records = [
        record(1, 0.5, [0.5, 0.95]),
        record(2, 0.5, [0.95]),
        record(4, 0.5, [0.5] * 10),
    ]
    scaling = analyse(records, "mnist", ["sgd"], epochs=10).scalings["sgd"]
    assert scaling.bend_index == 1 and scaling.efficiencies[1] is None
    assert scaling.b_crit is None  # two windows reached it: nothing to fit
    assert "gains nothing within the budget: N=4 did not reach the target" in (
        " ".join(scaling_text(scaling, "sgd"))
    )


def test_one_step_per_epoch_loses_per_update_when_another_window_uses_fewer():
    series = points(
        [record(EPOCH, 1.0, [0.5] * 10), record(64, 0.5, [0.95])], "mnist", "sgd"
    )
    answer = one_step_per_epoch(series, None, None, epochs=10)
    assert answer.fewer_updates_elsewhere  # 2 updates against a budget of 10
    assert answer.fewest_updates.window == 64
    assert answer.equal_updates is None and answer.contests == []
    assert "Per update too: N=64 reached the target in 2 updates" in " ".join(
        one_step_text(answer)
    )


def test_where_the_target_cannot_decide_accuracy_at_equal_updates_does():
    # One update per epoch: 10 updates, best 0.85. N=4 reaches the target
    # only after 60 updates; within 10 updates it had nothing to show.
    series = points(
        [
            record(EPOCH, 1.0, [0.6, 0.7, 0.85] + [0.8] * 7),
            record(4, 0.5, [0.5, 0.95]),
            record(64, 0.5, [0.7, 0.8, 0.8, 0.8, 0.8, 0.96]),  # 2 updates an epoch
        ],
        "mnist",
        "sgd",
    )
    answer = one_step_per_epoch(series, None, None, epochs=10)
    assert not answer.fewer_updates_elsewhere
    equal = answer.equal_updates
    # N=64 made 10 updates by epoch 5, where its best was 0.8 (epoch 2).
    assert (equal.updates, equal.own, equal.accuracy) == (10, 0.85, 0.8)
    assert (equal.rival.window, equal.epoch) == (64, 2)
    assert equal.two_errors == pytest.approx(2 * math.sqrt(0.85 * 0.15 / 10_000))
    assert equal.verdict == "ahead"
    assert "so per update one step per epoch was ahead" in one_step_text(answer)[-1]


def test_contests_within_one_epoch_are_level():
    series = points(
        [record(EPOCH, 1.0, [0.5] * 5 + [0.95]), record(64, 1.0, [0.5] * 5 + [0.95])],
        "mnist",
        "sgd",
    )
    answer = one_step_per_epoch(series, None, None, epochs=10)
    verdicts = {contest.key: contest.verdict for contest in answer.contests}
    # The same epochs; 6 against 12 updates (more than one epoch's 2 apart).
    assert verdicts == {
        "epochs": "level",
        "updates": "better",
        "seconds_excluding_compile": "level",
    }
    text = " ".join(one_step_text(answer))
    assert "Per update: one update per epoch needs 6 (updates) against 12" in text


def test_adaptive_arm_against_the_fixed_windows():
    fixed = points(
        [record(4, 0.5, [0.5, 0.5, 0.95]), record(16, 0.5, [0.5, 0.95])],
        "mnist",
        "sgd",
    )
    records = [
        record(ADAPTIVE, 0.5, [0.5, 0.95], arm=ADAPTIVE, windows=[2, 4]),
        record(ADAPTIVE, 1.0, [0.5] * 4, arm=ADAPTIVE, windows=[2, 2, 2, 8]),
    ]
    arm = adaptive_arm(records, "mnist", "sgd", fixed)
    assert arm.best["spec"]["learning_rate"] == 0.5
    assert arm.schedule == [(2, 1), (4, 1)]
    # N=16 needs 2 epochs and 16 updates: as good on both counts as 2 and 60.
    assert [p.window for p in arm.dominating] == [16]
    assert arm.constant_window is None
    assert "It is matched or beaten on both counts by N=16" in adaptive_text(arm)[0]


def test_an_adaptive_run_that_kept_one_window_says_so():
    best = record(ADAPTIVE, 0.5, [0.95], arm=ADAPTIVE, windows=[2], noise=[300.0, None])
    arm = adaptive_arm([best], "mnist", "sgd", [])
    assert (arm.constant_window, arm.peak_noise) == ("2", 300.0)
    assert "It kept N=2 throughout" in adaptive_text(arm)[0]


def test_momentum_against_plain_sgd_window_by_window():
    records = [
        record(4, 0.5, [0.5, 0.95]),
        record(16, 0.5, [0.5] * 10),
        record(4, 0.5, [0.95], optimizer="momentum"),
        record(16, 0.5, [0.5, 0.95], optimizer="momentum"),
    ]
    answers = analyse(records, "mnist", ["sgd", "momentum"], epochs=10)
    effect = momentum_effect(answers.series, answers.scalings)
    ((window, ratio),) = effect.ratios
    assert window == 4 and ratio < 1  # fewer updates with momentum
    assert effect.only_momentum == [16]
    assert momentum_effect({"sgd": answers.series["sgd"]}, {}) is None


def test_noise_scale_summary_and_how_far_the_bend_is_from_it():
    series = points(
        [
            record(2, 0.5, [0.5, 0.5, 0.95], noise=[100.0, 200.0, 400.0]),
            record(4, 0.5, [0.5, 0.5, 0.95], noise=[100.0, 200.0, 400.0]),
        ],
        "mnist",
        "sgd",
    )
    noise = noise_summary(series)
    assert (noise.first_epoch, noise.median, noise.at_target) == (100, 200, 400)
    assert noise.grew
    bend_inside, b_crit_far = noise_comparisons(noise, 300.0, 5000.0)
    assert (bend_inside.position, bend_inside.closeness) == ("inside", "close")
    assert (b_crit_far.position, b_crit_far.closeness) == ("above", "far")
    text = " ".join(noise_text(noise, [bend_inside, b_crit_far]))
    assert "it grew during training" in text
    assert "a factor of 25 from (so not located by)" in text


def test_epoch_cost_and_times_per_window():
    slow = [3.0, 2.0, 2.0, 2.0, 2.0]
    records = [
        record(1, 0.5, [0.5] * 5),
        record(EPOCH, 0.5, [0.5] * 5, seconds=slow),
        record(ADAPTIVE, 0.5, [0.5] * 5, arm=ADAPTIVE),
    ]
    cost = epoch_cost(records, "mnist")
    assert (cost.cheapest, cost.dearest, cost.ratio) == (1, EPOCH, 2.0)
    assert not cost.uniform
    assert epoch_cost(records[:1], "mnist") is None
    times = epoch_times(records)
    assert [w.window for w in times.windows] == ["1", EPOCH, ADAPTIVE]
    assert times.windows[1].median == 2.0  # without the first two epochs
    assert (times.first_epoch, times.first_epoch_runs) == (3.0, 3)
