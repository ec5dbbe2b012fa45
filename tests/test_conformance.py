"""The plugin conformance suite (issue 15, item 7): every built-in from-scratch entry passes the
checks its declaration names; a correct RMSNorm plugin kept here passes; a broken one fails the
checks it breaks, and only those."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import normzoo
from normzoo import registry
from normzoo.testing import CHECKS, assert_conforms, conformance_of, run_conformance

sys.path.insert(0, str(Path(__file__).parent))
from conformance_plugins import BrokenRMSNorm, PluginRMSNorm


@pytest.fixture
def plugins() -> Iterator[None]:
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    normzoo.register_norm("plugin_rmsnorm", kind="last_dim")(PluginRMSNorm)
    normzoo.register_norm("broken_rmsnorm", kind="last_dim")(BrokenRMSNorm)
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved[0])
        registry._ALIASES.clear()
        registry._ALIASES.update(saved[1])


@pytest.mark.parametrize("name", normzoo.list_norms(references=False))
def test_every_built_in_layer_conforms(name: str) -> None:
    assert_conforms(name)


def test_the_defaults_follow_the_registry_kind() -> None:
    assert conformance_of("rmsnorm").shapes == ((2, 3, 4), (2, 3, 2, 4))
    assert conformance_of("rmsnorm").reference == "native_rmsnorm"
    assert "parity" not in conformance_of("batchrenorm").checks  # no native reference
    assert conformance_of("instancenorm").shapes == ((2, 4, 5),)  # needs spatial dims


def test_a_correct_plugin_passes(plugins: None) -> None:
    results = run_conformance("plugin_rmsnorm")
    assert [r.check for r in results] == list(CHECKS)
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_a_broken_plugin_fails_what_it_breaks(plugins: None) -> None:
    results = {r.check: r for r in run_conformance("broken_rmsnorm")}
    failed = {name for name, r in results.items() if not r.passed}
    assert failed == {"parity", "state_dict", "no_fused_ops"}
    assert "rms_norm" in results["no_fused_ops"].message
    assert "scale" in results["parity"].message  # the reference cannot load its state dict
    with pytest.raises(AssertionError, match="fails 3 conformance check"):
        assert_conforms("broken_rmsnorm")


def test_an_unknown_check_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown check"):
        run_conformance("bn", ["speed"])
