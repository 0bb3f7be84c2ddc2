"""The batch-size study's sentences: the analysis's numbers, written out.

Each function formats what `accumulate.paper.study_analysis` or
`accumulate.paper.study_answers` computed; the verdicts they decided are
looked up in small tables of words. Nothing here computes a number.
"""

from __future__ import annotations

import math
from typing import Any

from accumulate.paper.markdown import MISSING
from accumulate.paper.study_analysis import (
    EFFICIENCY_BEND,
    NoiseComparison,
    NoiseSummary,
    Scaling,
)
from accumulate.paper.study_answers import (
    AdaptiveArm,
    EpochCost,
    EqualUpdates,
    MomentumEffect,
    OneStepPerEpoch,
)
from accumulate.paper.study_plan import (
    OPTIMIZER_TITLES,
    PAPER_LEARNING_RATE,
    window_label,
)

__all__ = [
    "adaptive_text",
    "epoch_cost_text",
    "momentum_text",
    "noise_text",
    "number",
    "one_step_text",
    "rates_text",
    "scaling_text",
]

_CONTEST_LABELS = {
    "epochs": "per epoch",
    "updates": "per update",
    "seconds_excluding_compile": "per second",
}
_CONTEST_VERDICTS = {
    "level": "level within one epoch's resolution ({resolution})",
    "better": "better",
    "worse": "worse",
}
_EQUAL_UPDATE_VERDICTS = {
    "level": "so per update the two were level (within two standard errors of "
    "a test-set accuracy, {two_errors:.4f})",
    "ahead": "so per update one step per epoch was ahead",
    "behind": "so per update it was behind",
}
_NOISE_TREND = {
    True: ": it grew during training.",
    False: ": it did not grow during training.",
    None: "",
}
_NOISE_CLOSENESS = {
    "close": "within a factor of 2 of",
    "factor": "a factor of {factor:.1f} from",
    "far": "a factor of {factor:.0f} from (so not located by)",
}
_EPOCH_COST = {
    True: ": on one device an epoch costs about the same for every window, so "
    "seconds-to-target follow epochs-to-target, and fewer updates only pay "
    "where an update, not a sample, is the cost (communication between "
    "devices, or memory for a batch).",
    False: ": the windows differ in cost per epoch on this machine.",
}


def number(value: float | None, digits: int = 3) -> str:
    """A number for prose: ``—`` for missing, else ``digits`` significant.

    Example:
        >>> number(1234.5), number(0.12345), number(None)
        ('1,234', '0.123', '—')
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def rates_text(rates: Any) -> str:
    """Learning rates as prose: ``0.25, 0.5, 1``."""
    return ", ".join(f"{rate:g}" for rate in rates)


def _optimizer(optimizer: str) -> str:
    return OPTIMIZER_TITLES.get(optimizer, optimizer)


def schedule_text(schedule: list[tuple[Any, int]]) -> str:
    """Run-length windows as prose: ``2 (x1), 4 (x3)``."""
    return ", ".join(f"{window} (x{count})" for window, count in schedule) or MISSING


# -- Where accumulation stops paying -------------------------------------------------


def scaling_text(scaling: Scaling, optimizer: str) -> list[str]:
    """The bend and B_crit of one optimizer, in sentences."""
    reached = scaling.reached
    text = [f"*{_optimizer(optimizer)}:*"]
    if len(reached) >= 2:
        (b0, u0), (b1, u1) = reached[0], reached[-1]
        text.append(
            f"From an effective batch of {b0:,.0f} to {b1:,.0f} "
            f"(x{scaling.batch_factor:.0f} samples per update) the interpolated "
            f"updates-to-target fall from {number(u0)} to {number(u1)} "
            f"(x{scaling.update_factor:.1f} fewer; perfect scaling would give "
            f"x{scaling.batch_factor:.0f})."
        )
    step = scaling.bend_step
    if step is None and len(reached) < 2:
        text.append(
            f"Only {len(reached)} window(s) reached the target: too few to "
            "locate a bend."
        )
    elif step is None:
        text.append(
            "No doubling in the grid had a scaling efficiency below "
            f"{EFFICIENCY_BEND}: no bend within the windows that reached the "
            "target."
        )
    else:
        first, second = step
        efficiency = scaling.efficiencies[scaling.bend_index]
        detail = (
            f"has a scaling efficiency of {efficiency:.2f}"
            if efficiency is not None
            else "gains nothing within the budget: "
            f"{window_label(second.window)} did not reach the target"
        )
        before = scaling.efficiencies_before_bend
        run_up = (
            f" (the steps before it: {', '.join(f'{e:.2f}' for e in before)})"
            if before
            else " (it is the first step: no near-perfect scaling is visible above "
            f"{first.batch:,.0f})"
        )
        text.append(
            f"Updates-to-target stop halving after {window_label(first.window)}: "
            f"the step to {window_label(second.window)} (batch {first.batch:,.0f} → "
            f"{second.batch:,.0f}) {detail}{run_up}. The bend is at an "
            f"effective batch of about {first.batch:,.0f}."
        )
    if scaling.b_crit is not None:
        outside = (
            " (outside the batches measured, so only a rough extrapolation)"
            if scaling.b_crit_extrapolated
            else ""
        )
        text.append(
            f"Fitting S(B) = S_min (1 + B_crit / B) to the {len(reached)} windows "
            f"that reached the target gives B_crit ≈ {scaling.b_crit:,.0f} samples "
            f"and S_min ≈ {scaling.s_min:,.0f} updates{outside}."
        )
    return text


def epoch_cost_text(cost: EpochCost | None) -> str:
    """Whether an epoch costs the same whatever the window: seconds vs epochs."""
    if cost is None:
        return ""
    return (
        f"The median epoch time per window ranges from {cost.cheapest_seconds:.2f} s "
        f"({window_label(cost.cheapest)}) to {cost.dearest_seconds:.2f} s "
        f"({window_label(cost.dearest)}), a ratio of {cost.ratio:.2f}"
        + _EPOCH_COST[cost.uniform]
    )


# -- Is one step per epoch ever better? --------------------------------------------


def one_step_text(answer: OneStepPerEpoch | None) -> list[str]:
    if answer is None:
        return ["The grid has no one-step-per-epoch window."]
    full, others = answer.full, answer.others
    text: list[str] = []
    if not full.reached:
        text.append(
            "No rate tried for one update per epoch "
            f"({rates_text(full.rates)}) reached the target within "
            f"{answer.epochs} epochs (= {full.budget_updates:,} updates); its best "
            f"validation accuracy was {full.closest_accuracy:.4f} "
            f"(lr {full.closest['spec']['learning_rate']:g})."
        )
        if others:
            text += _not_reached_but_others(answer)
    else:
        text.append(
            f"One update per epoch reached the target at lr {full.rate:g} in "
            f"{full.measure('epochs')} epochs (= {full.measure('updates'):,} updates, "
            f"{full.measure('seconds_excluding_compile'):.1f} s)."
        )
        if not others:
            text.append("No other window reached it to compare with.")
    for contest in answer.contests:
        verdict = _CONTEST_VERDICTS[contest.verdict].format(
            resolution=number(contest.resolution)
        )
        text.append(
            f"{_CONTEST_LABELS[contest.key].capitalize()}: one update per epoch "
            f"needs {number(contest.mine)} "
            f"({contest.key.replace('_excluding_compile', '')}) against "
            f"{number(contest.theirs)} for the best other window "
            f"({window_label(contest.rival.window)}): {verdict}."
        )
    if answer.paper is not None:
        text.append(_paper_text(answer))
    return text


def _not_reached_but_others(answer: OneStepPerEpoch) -> list[str]:
    full, fewest_epochs = answer.full, answer.fewest_epochs
    fewest_updates = answer.fewest_updates
    assert fewest_epochs is not None and fewest_updates is not None
    fewest, budget = fewest_updates.measure("updates"), full.budget_updates
    text = [
        "So it is worse per epoch and per second than every window that "
        "reached the target ("
        + ", ".join(window_label(p.window) for p in answer.others)
        + f"; the fewest epochs: {fewest_epochs.measure('epochs')} with "
        f"{window_label(fewest_epochs.window)})."
    ]
    if answer.fewer_updates_elsewhere:
        return [
            *text,
            f"Per update too: {window_label(fewest_updates.window)} reached the "
            f"target in {fewest:,} updates, fewer than the {budget:,} that one "
            "update per epoch used without reaching it.",
        ]
    return [
        *text,
        "Per update the target cannot decide: the fewest updates to target were "
        f"{fewest:,} ({window_label(fewest_updates.window)}), more than the "
        f"{budget:,} the budget allowed one update per epoch.",
        equal_updates_text(answer.equal_updates),
    ]


def equal_updates_text(equal: EqualUpdates | None) -> str:
    """Accuracy after as many updates as one update per epoch made."""
    if equal is None:
        return ""
    verdict = _EQUAL_UPDATE_VERDICTS[equal.verdict].format(two_errors=equal.two_errors)
    return (
        f"Compared at equal updates instead: after {equal.updates:,} updates one "
        f"update per epoch had reached {equal.own:.4f} (its best), the best other "
        f"window {equal.accuracy:.4f} ({window_label(equal.rival.window)} after "
        f"epoch {equal.epoch}), {verdict}."
    )


def _outcome(record: dict[str, Any], accuracy: float | None, end: str) -> str:
    reached = record.get("to_target")
    if reached:
        return f"reached the target after {reached['epochs']} epochs"
    return f"reached {accuracy:.4f}{end}"


def _paper_text(answer: OneStepPerEpoch) -> str:
    full, paper, standard = answer.full, answer.paper, answer.standard
    assert paper is not None
    tuned = (
        f"; at its tuned rate {full.rate:g} it reached the target after "
        f"{full.measure('epochs')} epochs"
        if full.reached
        else f"; the best tuned rate got it to {full.closest_accuracy:.4f}"
    )
    standard_text = "."
    if standard is not None:
        standard_text = (
            f". The standard twin at {PAPER_LEARNING_RATE:g} "
            + _outcome(standard, answer.standard_accuracy, "")
            + "."
        )
    return (
        f"At the paper's rate {PAPER_LEARNING_RATE:g} the one-step-per-epoch twin "
        + _outcome(
            paper,
            answer.paper_accuracy,
            f" validation accuracy after {answer.paper_epochs} epochs",
        )
        + tuned
        + standard_text
    )


# -- The noise scale, the adaptive arm, momentum -------------------------------------


def noise_text(noise: NoiseSummary, comparisons: list[NoiseComparison]) -> list[str]:
    """Does the noise scale predict the bend?"""
    if noise.median is None:
        return [
            "No noise-scale measurement is available (the study ran without "
            "`measure_noise_scale`)."
        ]
    text = [
        "Measured along the best run of each window N ≥ 2 up to its target "
        "(or, where no rate reached it, the run that came closest; "
        f"{noise.runs} runs), B_simple was {number(noise.first_epoch)} samples in "
        f"the first epoch, {number(noise.median)} over training (median of each "
        f"run's median) and {number(noise.at_target)} at the epoch that reached the "
        "target (medians over runs)"
        + _NOISE_TREND[noise.grew]
        + ("" if noise.first_epoch and noise.at_target else ".")
    ]
    for comparison in comparisons:
        position = (
            f"{comparison.position} the range B_simple spans during training, and "
            if comparison.position
            else ""
        )
        closeness = _NOISE_CLOSENESS[comparison.closeness].format(
            factor=comparison.factor
        )
        text.append(
            f"The {comparison.label} ({comparison.value:,.0f}) is {position}"
            f"{closeness} the median B_simple ({noise.median:,.0f})."
        )
    return text


def adaptive_text(arm: AdaptiveArm) -> list[str]:
    """What the adaptive arm buys, against the fixed windows."""
    name = _optimizer(arm.optimizer)
    if not arm.runs:
        return [f"The adaptive arm did not run with {name}."]
    rates = rates_text(record["spec"]["learning_rate"] for record, _ in arm.runs)
    if arm.best is None:
        return [
            f"With {name} the adaptive arm (rates {rates}) did not reach the "
            f"target; best validation accuracy {arm.closest_accuracy:.4f}; "
            f"windows used: {schedule_text(arm.schedule)}."
        ]
    reached = arm.best["to_target"]
    fewest = arm.fewest_epochs
    comparison = (
        "It is matched or beaten on both counts by "
        + ", ".join(
            f"{window_label(p.window)} ({p.measure('updates'):,} updates, "
            f"{p.measure('epochs')} epochs)"
            for p in arm.dominating
        )
        + "."
        if arm.dominating
        else "No fixed window reached the target in both as few updates and as "
        "few epochs."
    )
    constant = ""
    if arm.constant_window is not None:
        peak = f" (at most {arm.peak_noise:,.0f})" if arm.peak_noise else ""
        constant = (
            f" It kept N={arm.constant_window} throughout: the B_simple it "
            f"measured{peak} never called for another window before the target, "
            "so here it is that fixed window."
        )
    return [
        f"With {name} the adaptive arm's best rate "
        f"({arm.best['spec']['learning_rate']:g} "
        f"of {rates}) reached the target in {reached['updates']:,} updates, "
        f"{reached['epochs']} epochs and {reached['seconds_excluding_compile']:.1f} s, "
        f"with windows {schedule_text(arm.schedule)} (per epoch). "
        + (
            f"The fixed window with the fewest epochs, "
            f"{window_label(fewest.window)}, needed "
            f"{fewest.measure('updates'):,} updates and "
            f"{fewest.measure('epochs')} epochs. "
            if fewest is not None
            else ""
        )
        + comparison
        + constant
    ]


def momentum_text(effect: MomentumEffect | None) -> list[str]:
    """Does momentum change the picture?"""
    if effect is None:
        return ["Momentum runs are not in this study."]
    text = []
    if effect.ratios:
        ratios = ", ".join(f"{window_label(w)} x{r:.2f}" for w, r in effect.ratios)
        text.append(
            "Updates-to-target with momentum relative to plain SGD, each at its own "
            f"best rate (interpolated counts): {ratios} (median "
            f"x{effect.median_ratio:.2f})."
        )
    if effect.only_momentum:
        text.append(
            "Only with momentum did "
            + ", ".join(window_label(w) for w in effect.only_momentum)
            + " reach the target."
        )
    sgd, momentum = effect.sgd, effect.momentum
    bends = [number(s.bend_batch if s else None) for s in (sgd, momentum)]
    b_crits = [number(s.b_crit if s else None) for s in (sgd, momentum)]
    text.append(
        f"Bend: plain SGD at batch {bends[0]}, momentum at {bends[1]}; fitted "
        f"B_crit: plain SGD {b_crits[0]}, momentum {b_crits[1]}."
    )
    return text
