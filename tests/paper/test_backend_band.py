"""`backend_band.judge`: inside TensorFlow's seed band passes, outside fails."""

from __future__ import annotations

from accumulate.paper.backend_band import METRICS, MODELS, judge


def _history(seed: int, offset: float) -> dict:
    curve = [1.0 + offset, 0.5 + offset, 0.25 + offset]
    return {
        "config": {"seed": seed, "optimizer": "sgd"},
        **{model: dict.fromkeys(METRICS, curve) for model in MODELS},
    }


def test_inside_the_band_widened_by_its_width():
    references = [_history(seed, 0.01 * seed) for seed in range(5)]  # width 0.04
    rows = judge(_history(42, 0.07), references)  # 0.03 above the band
    assert all(row["final_inside"] for row in rows)
    assert all(row["epochs_inside"] == 1.0 for row in rows)


def test_outside_the_widened_band_is_reported():
    references = [_history(seed, 0.01 * seed) for seed in range(5)]
    rows = judge(_history(42, 0.2), references)
    assert not any(row["final_inside"] for row in rows)
    assert rows[0]["band_low"] == 0.25 and rows[0]["band_high"] == 0.29
