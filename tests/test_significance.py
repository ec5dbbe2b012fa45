"""The report's statistical rules on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from normzoo.analysis import significance as sig


def _correct(error: float, seeds: int = 5, n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((seeds, n)) >= error


def test_identical_runs_are_no_difference_and_equivalent() -> None:
    a = _correct(0.1)
    d = sig.paired_difference(a, a.copy())
    assert d.diff == 0 and d.lo95 == 0 and d.hi95 == 0 and d.p == 1.0
    assert sig.mcnemar(a, a) == (0, 0, 1.0)
    assert sig.verdict(d.diff, d.lo90, d.hi90, d.p, margin=0.5) == "equivalent"


def test_a_constant_shift_is_detected() -> None:
    b = _correct(0.05, seed=1)
    a = b.copy()
    a[:, :40] = False  # 40 of 400 samples wrong in every seed: at least +10 points... minus overlap
    d = sig.paired_difference(a, b)
    assert d.diff == pytest.approx(100 * ((~a).mean() - (~b).mean()))
    assert d.lo95 > 0 and d.p < 0.01
    only_a, only_b, p = sig.mcnemar(a, b)
    assert only_b == 0 and only_a > 0 and p < 1e-6
    assert sig.verdict(d.diff, d.lo90, d.hi90, d.p, margin=0.5) == "higher"
    assert sig.verdict(-d.diff, -d.hi90, -d.lo90, d.p, margin=0.5) == "lower"


def test_the_margin_decides_equivalent_or_inconclusive() -> None:
    a, b = _correct(0.10, seed=2), _correct(0.10, seed=3)  # same rate, independent noise
    d = sig.paired_difference(a, b)
    assert d.p > 0.05
    assert sig.verdict(d.diff, d.lo90, d.hi90, d.p, margin=10.0) == "equivalent"
    assert sig.verdict(d.diff, d.lo90, d.hi90, d.p, margin=0.01) == "inconclusive"


def test_interval_covers_the_mean_and_shrinks_with_more_samples() -> None:
    small = sig.error_interval(_correct(0.2, n=100))
    large = sig.error_interval(_correct(0.2, n=4000))
    for iv in (small, large):
        assert iv.lo <= iv.mean <= iv.hi
    assert (large.hi - large.lo) < (small.hi - small.lo) / 3


def test_trend_finds_a_slope_and_flat_needs_the_margin() -> None:
    batch = np.repeat([2, 4, 8, 16, 32], 5)
    rng = np.random.default_rng(0)
    rising = 3.0 + 0.5 * np.log2(batch) + rng.normal(0, 0.1, batch.size)
    t = sig.trend(batch, rising)
    assert t.slope == pytest.approx(0.5, abs=0.05) and t.p < 1e-6 and t.lo95 > 0
    flat = 3.0 + np.tile(rng.normal(0, 0.1, 5), 5)  # the same seeds' spread at every batch size
    f = sig.trend(batch, flat)
    assert abs(f.slope) < 1e-12 and f.p > 0.5
    assert sig.verdict(f.slope, f.lo90, f.hi90, f.p, margin=0.1) == "equivalent"
    assert sig.verdict(f.slope, f.lo90, f.hi90, f.p, margin=0.001) == "inconclusive"
    with pytest.raises(ValueError, match="at least 3 runs"):
        sig.trend([2, 2, 2], [1.0, 2.0, 3.0])


def test_holm_matches_hand_computation() -> None:
    adjusted = sig.holm([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max(0.09, 0.08)=0.09, 0.5*1 -> 0.5
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, 0.5])


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sig.paired_difference(_correct(0.1, seeds=3), _correct(0.1, seeds=5))


def test_predictions_round_trip(tmp_path) -> None:
    import torch

    from normzoo.run.predictions import load_predictions, save_predictions

    y = torch.tensor([0, 3, 9, 2])
    pred = np.array([0, 3, 1, 2])
    save_predictions(tmp_path, {"test_y": y, "test_pred": pred, "test_pred_batch": None})
    back = load_predictions(tmp_path)
    assert set(back) == {"test_y", "test_pred"}
    np.testing.assert_array_equal(back["test_y"], y.numpy())
    np.testing.assert_array_equal(back["test_pred"], pred)
    assert back["test_pred"].dtype == np.int16
    assert load_predictions(tmp_path / "elsewhere") is None
    with pytest.raises(ValueError, match="unknown prediction keys"):
        save_predictions(tmp_path, {"test_logits": pred})


def test_interaction_is_the_difference_of_the_two_losses() -> None:
    a2, b2 = _correct(0.05, seed=2), _correct(0.08, seed=3)
    a1, b1 = a2.copy(), b2.copy()
    a1[:, :60] = False  # A loses more from the change than B does
    b1[:, :20] = False
    d = sig.paired_interaction(a1, a2, b1, b2)
    expected = 100 * (((~a1).mean() - (~a2).mean()) - ((~b1).mean() - (~b2).mean()))
    assert d.diff == pytest.approx(expected) and expected > 5
    assert d.lo95 > 0 and d.p < 0.01
    same = sig.paired_interaction(a1, a2, a1.copy(), a2.copy())  # equal losses: exactly zero
    assert same.diff == 0 and same.lo95 == 0 and same.hi95 == 0 and same.p == 1.0
    with pytest.raises(ValueError, match="same shape"):
        sig.paired_interaction(a1, a2, b1[:, :10], b2)
