"""Shared fixtures. Tests run on CPU; torch uses a fixed seed per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["small-input", "one-pass"])
def stats_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both CPU eager statistics routes of the from-scratch activation norms.

    ``small-input``: the centred two-pass route that inputs of at most ``_SMALL_NUMEL`` elements
    take (every test shape is that small); ``one-pass``: the route of larger inputs (one-pass sums
    with the cancellation guard, preallocated buffers), forced with ``_SMALL_NUMEL = 0``.
    """
    if request.param == "one-pass":
        from normzoo.norms import _base

        monkeypatch.setattr(_base, "_SMALL_NUMEL", 0)
    return str(request.param)
