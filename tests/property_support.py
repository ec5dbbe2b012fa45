"""What the property tests share (tests/test_properties*.py): hypothesis settings, the
dtypes and rounding tolerances, and the checks that name the worst element."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from torch import Tensor

PROPERTY = settings(
    max_examples=int(os.environ.get("NORMZOO_PROPERTY_EXAMPLES", "20")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)

DTYPES = (torch.float32, torch.float64)

#: Rounding tolerance per unit of condition: a value computed from group statistics is accurate to
#: about RTOL * (1 + |mu| / sigma) (the condition of centring): ~80 ulps of float32, ~450 of
#: float64. The largest error seen over 150 examples per test was 0.074 of this tolerance (float32)
#: and 0.002 (float64); a one-pass variance without its cancellation fallback, a float32 detour in
#: float64, a wrong axis, eps scaled by 1.5 or an unbiased variance each exceed it.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-13}


def _check(what: str, actual: Tensor, expected: Tensor, tol: Tensor | float) -> None:
    """|actual - expected| <= tol elementwise, else an error naming the worst element."""
    actual, expected = actual.double(), expected.double()
    excess = (actual - expected).abs() - tol
    if not bool((excess <= 0).all()):
        i = int(excess.flatten().argmax())
        t = tol if isinstance(tol, float) else torch.broadcast_to(tol, excess.shape).flatten()[i]
        raise AssertionError(
            f"{what}: {actual.flatten()[i].item():.10g} vs expected {expected.flatten()[i].item():.10g}"
            f" (tolerance {float(t):.3g}; {int((excess > 0).sum())} of {excess.numel()} off)"
        )


def _finite(what: str, t: Tensor | None) -> None:
    assert t is not None, f"{what}: no gradient"
    bad = ~torch.isfinite(t)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {t.numel()} values not finite"
