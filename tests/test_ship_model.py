"""benchmarks/ship_model.py's rule for replacing weights/: beat the shipped model and raw
pixels on both k-NN protocols by more than twice the standard error of the gain."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.ship_model import gains, wins
from dinoserve.training.knn import KnnResult


def _gain(split: float, loo: float, se: float = 1.0) -> dict:
    return {"split": {"gain": split, "se": 2 * se}, "loo": {"gain": loo, "se": se}}


def test_a_model_that_wins_on_both_protocols_replaces_the_shipped_one():
    assert wins({"gain_over_raw_pixels": _gain(6.1, 4.0)}, {"gain_over_it": _gain(14.0, 15.1)}) == []


def test_a_gain_within_two_errors_is_not_a_win():
    # 3.9 points over raw pixels on the split is less than 2 x 2.0: refused, and the reason says so
    reasons = wins({"gain_over_raw_pixels": _gain(3.9, 4.0)}, {"gain_over_it": _gain(14.0, 15.1)})
    assert reasons == ["fixed split: +3.9 points over raw pixels is not more than twice the gain's "
                       "paired standard error (4.0)"]


def test_each_rival_and_protocol_is_checked():
    # leave-one-out below the old model and within two errors of raw pixels: two reasons
    reasons = wins({"gain_over_raw_pixels": _gain(6.0, 1.5)}, {"gain_over_it": _gain(14.0, -1.0)})
    assert [r.split(":")[0] for r in reasons] == ["leave-one-out", "leave-one-out"]
    assert "the shipped model" in reasons[0] and "raw pixels" in reasons[1]


def _results(split_hits: list[int], loo_hits: list[int]) -> dict:
    def one(hits: list[int], protocol: str) -> KnnResult:
        h = np.array(hits, dtype=bool)
        return KnnResult(100.0 * h.mean(), 100.0, 5, len(h), 0, protocol=protocol, hits=h)
    return {"split": one(split_hits, "split"), "loo": one(loo_hits, "loo")}


def test_gains_pair_the_same_queries_of_each_protocol():
    new = _results([1, 1, 1, 0], [1, 1, 0, 1, 1, 0])
    old = _results([1, 0, 1, 0], [1, 1, 0, 1, 1, 0])
    g = gains(new, old)
    assert g["split"]["gain"] == 25.0 and g["split"]["se"] == pytest.approx(25.0)  # d = 0,1,0,0
    assert g["loo"] == {"gain": 0.0, "se": 0.0}  # the same answers: no gain, and no doubt about it
