"""benchmarks/ship_model.py's rule for replacing weights/: beat the shipped model and raw
pixels on both k-NN protocols by more than twice the standard error."""

from __future__ import annotations

from benchmarks.ship_model import wins


def _figures(model: float, model_loo: float, raw: float = 53.4, raw_loo: float = 59.0) -> dict:
    return {"model": model, "model_se": 2.65, "model_loo": model_loo, "model_loo_se": 1.18,
            "raw_pixels": raw, "raw_pixels_loo": raw_loo}


def test_a_model_that_wins_on_both_protocols_replaces_the_shipped_one():
    assert wins(_figures(59.5, 63.0), _figures(45.5, 47.9)) == []


def test_a_gain_within_two_errors_is_not_a_win():
    # 5.0 points over raw pixels on the split is less than 2 x 2.65: refused, and the reason says so
    reasons = wins(_figures(58.4, 63.0), _figures(45.5, 47.9))
    assert len(reasons) == 1 and reasons[0].startswith("fixed split: 58.4") and "raw pixels (53.4)" in reasons[0]


def test_each_rival_and_protocol_is_checked():
    # leave-one-out below the old model and within two errors of raw pixels: two reasons
    reasons = wins(_figures(60.0, 60.0), _figures(45.5, 61.0))
    assert [r.split(":")[0] for r in reasons] == ["leave-one-out", "leave-one-out"]
    assert "the shipped model (61.0)" in reasons[0] and "raw pixels (59.0)" in reasons[1]
