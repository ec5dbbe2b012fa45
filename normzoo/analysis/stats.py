"""The decision rules of the report's claims (printed in the report as :data:`RULES`).

A claim compares seed aggregates (:class:`Cell`: mean, std with ddof=1, n, min, max) and is made
only when the rule says the difference is clear: Welch's t-test for two independent means
(:func:`differs`), a paired t-test on per-run differences (:func:`paired`), both at 95% two-sided
with Student-t quantiles (:func:`t975`) and a minimum effect in points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FLAT_POINTS", "RULES", "Cell", "differs", "paired", "same_way", "t975"]


#: how each claim is decided (also printed in the report)
RULES = {
    "differs": (
        "two seed means differ when a two-sided Welch t-test at 95% rejects equality (|difference| "
        "> t(0.975, Welch dof) x standard error) and |difference| > 0.5 points; with a single "
        "seed, when |difference| > 3 points"
    ),
    "paired": (
        "an effect measured on the same runs (EMA vs PreciseBN, EMA vs batch statistics) is the "
        "mean of per-run differences; it is real when |mean| > t(0.975, n-1) x standard error "
        "and > 0.1 points; when every run shows the same difference (zero spread, so no error "
        "estimate; e.g. one test sample in every seed) or there is a single run, when "
        "|mean| > 3 points. One rule decides both directions and 'no clear difference'"
    ),
    "ranking": (
        "the best and worst layer at the smallest batch are picked from several, so they must "
        "differ by 1.5 times the 'differs' margin and by > 1 point"
    ),
    "flat": (
        "a layer is flat across batch sizes when its seed means span <= 1 point, or <= 3 points "
        "with its highest and lowest mean not clearly different ('differs')"
    ),
    "zero": "a mismatch is zero when the measured value is exactly 0 in every run",
}

FLAT_POINTS = 1.0  # see RULES["flat"]


@dataclass
class Cell:
    mean: float
    std: float
    n: int
    lo: float
    hi: float

    @property
    def valid(self) -> bool:
        return self.n > 0 and not math.isnan(self.mean)

    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 and not math.isnan(self.std) else math.nan


#: a spread of per-run differences below this (points) is float noise on equal differences
_ZERO_SPREAD = 1e-4

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t975(dof: float) -> float:
    """Two-sided 95% Student-t critical value (table; 2.0 beyond 30 degrees of freedom)."""
    if not dof >= 1:
        return math.inf
    if dof < 10:
        return _T975[max(1, int(dof))]  # rounding dof down is the conservative side
    return 2.228 if dof < 20 else 2.086 if dof < 30 else 2.0


def differs(a: Cell, b: Cell, min_effect: float = 0.5, strict: float = 1.0) -> int:
    """+1 if a > b, -1 if a < b, 0 if no clear difference (RULES['differs'])."""
    if not (a.valid and b.valid):
        return 0
    d = a.mean - b.mean
    if a.n > 1 and b.n > 1:
        va, vb = a.std**2 / a.n, b.std**2 / b.n
        se = math.sqrt(va + vb)
        if se == 0:
            clear = abs(d) > min_effect
        else:  # Welch-Satterthwaite degrees of freedom
            dof = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
            clear = abs(d) > strict * t975(dof) * se and abs(d) > min_effect
    else:
        clear = abs(d) > 3.0
    return int(np.sign(d)) if clear else 0


def paired(c: Cell, min_effect: float = 0.1) -> int:
    """Sign of a per-run paired difference when it is clear (RULES['paired']), else 0."""
    if not c.valid:
        return 0
    if c.n > 1 and not math.isnan(c.std) and c.std > _ZERO_SPREAD:
        clear = abs(c.mean) > t975(c.n - 1) * c.se() and abs(c.mean) > min_effect
    else:  # one run, or all runs equal: the spread gives no error estimate
        clear = abs(c.mean) > 3.0
    return int(np.sign(c.mean)) if clear else 0


def same_way(c: Cell, min_effect: float = 3.0) -> int:
    """Sign of a paired difference that the rule does not call clear (:func:`paired` is 0) but
    that every run shows in the same direction and that is larger than ``min_effect`` points
    (e.g. 3 seeds from 4% to 23%, each by 13 points or more, but t below t(0.975, 2) = 4.3):
    worth reporting as such, never as 'no clear difference'. 0 otherwise."""
    if not c.valid or c.n < 2 or paired(c) != 0 or abs(c.mean) <= min_effect:
        return 0
    if c.lo > 0 or c.hi < 0:
        return int(np.sign(c.mean))
    return 0
