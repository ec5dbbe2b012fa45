"""The statistical tests a report's claims rest on, on per-sample test predictions.

Every function takes ``correct`` arrays of shape ``(seeds, test samples)`` (bool: the sample was
classified correctly by that seed's run) and answers in percentage points of test error:

* :func:`error_interval` -- a run group's mean error with a 95% interval (two-level bootstrap:
  seeds, then test samples), for every plotted point.
* :func:`paired_difference` -- error(A) - error(B) for two groups evaluated on the same test set:
  a paired bootstrap that resamples seeds (pairing seed i of A with seed i of B) and test samples
  jointly, with its 95% and 90% intervals and a two-sided p-value.
* :func:`paired_interaction` -- [error(A1) - error(A2)] - [error(B1) - error(B2)] for four groups on
  the same test set (a difference in differences: whether one layer loses more than another from
  the same change), the four resampled jointly.
* :func:`mcnemar` -- the exact McNemar test on the discordant samples, pooled over seeds.
* :func:`trend` -- the OLS slope of error against log2(batch size) over every run, in points per
  doubling, with a t-test and intervals.
* :func:`verdict` -- the one decision rule: a difference is *higher/lower* when its Holm-adjusted
  p-value is below alpha, *equivalent* when its 90% interval lies inside +-margin (TOST at 5%), and
  *inconclusive* otherwise. "No difference" is never said without the margin.
* :func:`holm` -- Holm's step-down adjustment over a family of p-values.

References: Efron & Tibshirani 1993 (bootstrap); McNemar 1947; Schuirmann 1987 (TOST); Holm 1979.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as _st

__all__ = [
    "Difference",
    "Interval",
    "Trend",
    "error_interval",
    "holm",
    "mcnemar",
    "paired_difference",
    "paired_interaction",
    "trend",
    "verdict",
]

Verdict = Literal["higher", "lower", "equivalent", "inconclusive"]
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Interval:
    """A mean (points) with its 95% interval."""

    mean: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Difference:
    """error(A) - error(B) in points: 95% and 90% intervals, two-sided p-value."""

    diff: float
    lo95: float
    hi95: float
    lo90: float
    hi90: float
    p: float


@dataclass(frozen=True)
class Trend:
    """Slope of error (points) per doubling of the batch size."""

    slope: float
    lo95: float
    hi95: float
    lo90: float
    hi90: float
    p: float
    n: int


def _as_correct(correct: np.ndarray) -> np.ndarray:
    arr = np.asarray(correct, dtype=bool)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected correct[seeds, samples], got shape {np.shape(correct)}")
    return arr


def _resampled_errors(wrong: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Mean error (points) of ``n`` two-level bootstrap resamples of ``wrong[stack, seeds, samples]``.

    The same seed and sample indices are drawn for every array of the stack, which makes the
    resamples of A and B paired.
    """
    _, s, m = wrong.shape
    seeds = rng.integers(0, s, size=(n, s))
    samples = rng.integers(0, m, size=(n, m))
    # per seed, the error on the resampled samples: (stack, n, seeds) via the sample counts
    counts = np.zeros((n, m))
    np.add.at(counts, (np.arange(n)[:, None], samples), 1.0)
    per_seed = np.einsum("ksm,nm->kns", wrong.astype(float), counts) / m
    picked = np.take_along_axis(per_seed, seeds[None, :, :], axis=2)
    return 100.0 * picked.mean(axis=2)


def error_interval(correct: np.ndarray, *, seed: int = 0, n_boot: int = BOOTSTRAP) -> Interval:
    """Mean test error (points) over seeds with a 95% two-level percentile bootstrap interval."""
    wrong = ~_as_correct(correct)
    boot = _resampled_errors(wrong[None], np.random.default_rng(seed), n_boot)[0]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Interval(float(100.0 * wrong.mean()), float(lo), float(hi))


def paired_difference(
    correct_a: np.ndarray, correct_b: np.ndarray, *, seed: int = 0, n_boot: int = BOOTSTRAP
) -> Difference:
    """error(A) - error(B) (points) on the same test samples, seeds paired by index.

    The p-value is the two-sided bootstrap p: twice the smaller share of resampled differences on
    either side of zero (at least 1 / (n_boot + 1)).
    """
    return _combined([correct_a, correct_b], seed, n_boot)


def paired_interaction(
    a1: np.ndarray,
    a2: np.ndarray,
    b1: np.ndarray,
    b2: np.ndarray,
    *,
    seed: int = 0,
    n_boot: int = BOOTSTRAP,
) -> Difference:
    """[error(A1) - error(A2)] - [error(B1) - error(B2)] (points), all four on the same test samples
    with seeds paired by index, resampled jointly as :func:`paired_difference` resamples two."""
    return _combined([a1, a2, b1, b2], seed, n_boot)


def _combined(groups: list[np.ndarray], seed: int, n_boot: int) -> Difference:
    """[err(g0) - err(g1)] - [err(g2) - err(g3)] - ... (pairs of groups, alternating signs) with
    its paired two-level bootstrap intervals and p-value; each pair's difference is taken first,
    so identical pairs cancel exactly."""
    arrays = [_as_correct(g) for g in groups]
    if any(a.shape != arrays[0].shape for a in arrays):
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ValueError(f"paired groups need the same shape, got {shapes}")
    wrong = np.stack([~a for a in arrays])
    boot = _resampled_errors(wrong, np.random.default_rng(seed), n_boot)
    means = wrong.reshape(len(arrays), -1).mean(axis=1)
    d, diff = boot[0] - boot[1], means[0] - means[1]
    for k in range(2, len(arrays), 2):
        d, diff = d - (boot[k] - boot[k + 1]), diff - (means[k] - means[k + 1])
    diff = float(100.0 * diff)
    lo95, lo90, hi90, hi95 = np.percentile(d, [2.5, 5, 95, 97.5])
    if np.all(d == 0):
        p = 1.0
    else:
        share = min(np.mean(d <= 0), np.mean(d >= 0))
        p = float(min(1.0, max(2 * share, 1 / (n_boot + 1))))
    return Difference(diff, float(lo95), float(hi95), float(lo90), float(hi90), p)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test pooled over seeds: (A wrong & B right, A right & B wrong, p-value)."""
    a, b = _as_correct(correct_a), _as_correct(correct_b)
    only_a_wrong = int(np.sum(~a & b))
    only_b_wrong = int(np.sum(a & ~b))
    n = only_a_wrong + only_b_wrong
    p = 1.0 if n == 0 else float(_st.binomtest(only_a_wrong, n, 0.5).pvalue)
    return only_a_wrong, only_b_wrong, p


def trend(batch_sizes: np.ndarray, errors: np.ndarray) -> Trend:
    """OLS slope of ``errors`` (points, one per run) against log2(``batch_sizes``), with a t-test."""
    x = np.log2(np.asarray(batch_sizes, dtype=float))
    y = np.asarray(errors, dtype=float)
    n = len(y)
    if n < 3 or np.ptp(x) == 0:
        raise ValueError("a trend needs at least 3 runs over at least 2 batch sizes")
    xc = x - x.mean()
    slope = float(np.sum(xc * (y - y.mean())) / np.sum(xc**2))
    resid = y - y.mean() - slope * xc
    se = float(np.sqrt(np.sum(resid**2) / (n - 2) / np.sum(xc**2)))
    if se == 0:
        p = 1.0 if slope == 0 else 0.0
        return Trend(slope, slope, slope, slope, slope, p, n)
    t95, t90 = _st.t.ppf(0.975, n - 2), _st.t.ppf(0.95, n - 2)
    p = float(2 * _st.t.sf(abs(slope / se), n - 2))
    return Trend(
        slope, slope - t95 * se, slope + t95 * se, slope - t90 * se, slope + t90 * se, p, n
    )


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given), capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def verdict(
    estimate: float, lo90: float, hi90: float, p_adjusted: float, margin: float, alpha: float = 0.05
) -> Verdict:
    """The decision rule of every claim (see the module docstring)."""
    if p_adjusted < alpha:
        return "higher" if estimate > 0 else "lower"
    if -margin < lo90 and hi90 < margin:
        return "equivalent"
    return "inconclusive"
