"""The report's decision rules (normzoo.analysis.stats) on hand-made seed aggregates."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from normzoo.analysis.stats import Cell, differs, paired, same_way, t975


def _cell(
    mean: float, std: float, n: int, lo: float | None = None, hi: float | None = None
) -> Cell:
    return Cell(mean, std, n, mean - std if lo is None else lo, mean + std if hi is None else hi)


@pytest.mark.parametrize("dof", range(1, 10))
def test_t_quantiles_are_student_t(dof: int) -> None:
    assert t975(dof) == pytest.approx(scipy_stats.t.ppf(0.975, dof), abs=5e-4)


def test_t_quantiles_round_the_dof_down_and_are_conservative_below_30_dof() -> None:
    for dof in (1.5, 2.9, 9.99, 10.0, 15.5, 19.9, 20.0, 29.9):
        assert t975(dof) >= scipy_stats.t.ppf(0.975, dof) - 1e-3, dof
    # from 30 dof on a flat 2.0: slightly below the exact quantile (2.042 at 30, 1.96 at infinity)
    for dof in (30.0, 45.0, 200.0):
        assert abs(t975(dof) - scipy_stats.t.ppf(0.975, dof)) < 0.05, dof
    assert t975(2.9) == t975(2) and t975(45) == 2.0
    assert t975(0.5) == math.inf and t975(math.nan) == math.inf


def test_two_means_differ_only_beyond_the_welch_bar_and_the_minimum_effect() -> None:
    a, b = _cell(20.0, 1.0, 3), _cell(10.0, 1.0, 3)
    assert differs(a, b) == 1 and differs(b, a) == -1
    # t = 2 / sqrt(2/3) = 2.45 < t(0.975, 4) = 2.78: not clear
    assert differs(_cell(12.0, 1.0, 3), _cell(10.0, 1.0, 3)) == 0
    # far beyond the t bar but under 0.5 points: not an effect
    assert differs(_cell(10.4, 0.01, 3), _cell(10.0, 0.01, 3)) == 0
    # strict=1.5 (the ranking rule) needs 1.5 times the margin
    assert differs(_cell(13.0, 1.0, 3), _cell(10.0, 1.0, 3)) == 1
    assert differs(_cell(13.0, 1.0, 3), _cell(10.0, 1.0, 3), strict=1.5) == 0


def test_single_seeds_and_zero_spread_use_the_three_point_margin() -> None:
    assert differs(_cell(13.1, math.nan, 1), _cell(10.0, math.nan, 1)) == 1
    assert differs(_cell(12.9, math.nan, 1), _cell(10.0, math.nan, 1)) == 0
    assert differs(_cell(10.6, 0.0, 3), _cell(10.0, 0.0, 3)) == 1  # se 0: only min_effect
    assert differs(_cell(10.0, 1.0, 0), _cell(0.0, 1.0, 3)) == 0  # no seeds: no claim


def test_paired_differences() -> None:
    assert paired(_cell(2.0, 0.5, 3)) == 1 and paired(_cell(-2.0, 0.5, 3)) == -1
    assert paired(_cell(1.0, 1.0, 3)) == 0  # t = 1.73 < 4.30
    assert paired(_cell(0.09, 0.001, 5)) == 0  # under 0.1 points
    # the same difference in every run has no error estimate: the 3-point margin decides
    assert paired(_cell(0.28, 0.0, 3)) == 0 and paired(_cell(3.5, 0.0, 3)) == 1
    assert paired(_cell(-3.5, math.nan, 1)) == -1


def test_same_way_names_large_consistent_changes_the_paired_rule_does_not_pass() -> None:
    every_seed_worse = _cell(-18.0, 7.8, 3, lo=-28.0, hi=-13.0)  # t = 4.0 < 4.30
    assert paired(every_seed_worse) == 0 and same_way(every_seed_worse) == -1
    assert same_way(_cell(-18.0, 12.0, 3, lo=-30.0, hi=2.0)) == 0  # one seed the other way
    assert same_way(_cell(2.5, 1.0, 3, lo=1.5, hi=3.5)) == 0  # under 3 points
    assert same_way(_cell(20.0, 0.5, 3, lo=19.5, hi=20.5)) == 0  # already clear: paired says it
