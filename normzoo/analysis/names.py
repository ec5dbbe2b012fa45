"""Layer names as the analysis needs them, all answered by :mod:`normzoo.registry` (display names
are :func:`normzoo.registry.display_name` itself).

A sweep on disk may name a layer the registry no longer knows (an old study, a plugin that is not
installed): every function here then keeps the name as it is instead of failing the report.
"""

from __future__ import annotations

import functools

from normzoo import registry

__all__ = ["canonical", "family", "is_reference", "uses_batch_stats"]


@functools.lru_cache(maxsize=256)
def canonical(name: str) -> str:
    """The registry's canonical name (``bn`` -> ``batchnorm``); unknown names unchanged."""
    try:
        return registry.get_norm(name).name
    except Exception:
        return name


@functools.lru_cache(maxsize=256)
def family(name: str) -> str:
    """The from-scratch layer a name belongs to: ``native_batchnorm`` -> ``batchnorm`` (its
    twin), ``bn`` -> ``batchnorm``; unknown names unchanged. Colours and order go by family."""
    try:
        return registry.from_scratch_twin(name) or registry.get_norm(name).name
    except Exception:
        return name


@functools.lru_cache(maxsize=256)
def is_reference(name: str) -> bool:
    """True for torch's native references (``native_*``), False otherwise or when unknown."""
    try:
        return registry.get_norm(name).reference
    except Exception:
        return False


@functools.lru_cache(maxsize=256)
def uses_batch_stats(name: str) -> bool | None:
    """Whether the layer normalises with batch statistics; None when the registry does not know."""
    try:
        return registry.get_norm(name).uses_batch_stats
    except Exception:
        return None
