"""Which layers the bench measures and against what: pairs read from the registry, and the modules.

A spec's ``native`` names its torch reference (``batchnorm`` -> ``native_batchnorm``); a layer
without one gets its natural baseline from :data:`NATURAL_BASELINES` (Batch Renorm ->
``native_batchnorm``: r = 1, d = 0 is BatchNorm). ``layer:baseline`` pairs any two registry names.
An ``activation`` entry is ``build_norm(name, C)``; a ``weight`` entry wraps an identical copy of
``Conv2d(C, C, 3, padding=1)`` (conv shape) or ``Linear(C, C)`` (dense) for both contenders.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from normzoo.registry import build_norm, canonical_name, get_norm, list_norms

__all__ = ["NATURAL_BASELINES", "Pairing", "build_contender", "config_of", "resolve_pairings",
           "shapes_for", "wrapped_layer"]  # fmt: skip

#: baseline of a from-scratch layer that has no native twin (registry name -> baseline name)
NATURAL_BASELINES: dict[str, str] = {"batchrenorm": "native_batchnorm"}


@dataclass(frozen=True)
class Pairing:
    """One benchmarked layer and the baseline it is measured against."""

    layer: str
    baseline: str
    #: why this baseline: "native reference", "natural baseline (no native)" or "explicit pair"
    note: str


def resolve_pairings(norms: Sequence[str] | None = None) -> list[Pairing]:
    """The (layer, baseline) pairs to benchmark.

    ``norms=None``: every non-reference registry entry with ``spec.native`` or a
    :data:`NATURAL_BASELINES` entry (so ``none`` is left out). Otherwise each item is a registry name
    (or alias), resolved the same way, or ``"layer:baseline"`` for an explicit pair.

    Raises:
        ValueError: a named layer has no baseline, or the two sides of a pair differ in kind.
    """
    if norms is None:
        names = [n for n in list_norms(references=False) if _baseline_of(n) is not None]
        return [_pair(n) for n in names]
    out: list[Pairing] = []
    for item in norms:
        if ":" in item:
            left, right = (s.strip() for s in item.split(":", 1))
            a, b = get_norm(left), get_norm(right)
            if a.kind != b.kind:
                raise ValueError(f"cannot pair {a.name!r} ({a.kind}) with {b.name!r} ({b.kind})")
            out.append(Pairing(a.name, b.name, "explicit pair"))
        else:
            out.append(_pair(get_norm(item).name))
    return out


def _baseline_of(name: str) -> tuple[str, str] | None:
    spec = get_norm(name)
    if spec.native:
        return get_norm(spec.native).name, "native reference"
    natural = NATURAL_BASELINES.get(canonical_name(spec.name))
    if natural is not None:
        return get_norm(natural).name, "natural baseline (no native)"
    return None


def _pair(name: str) -> Pairing:
    found = _baseline_of(name)
    if found is None:
        raise ValueError(
            f"norm {name!r} has no native reference and no natural baseline; "
            f"name one explicitly as '{name}:<baseline>'"
        )
    return Pairing(name, *found)


def shapes_for(pairing: Pairing, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes both sides of ``pairing`` accept (layers that need spatial dims skip dense ones)."""
    spatial = get_norm(pairing.layer).needs_spatial or get_norm(pairing.baseline).needs_spatial
    return [s for s in shapes if not (spatial and len(s) < 3)]


def wrapped_layer(shape: Sequence[int]) -> nn.Module:
    """The conv/linear a ``weight`` entry reparametrises for an input of ``shape``."""
    c = shape[1]
    if len(shape) == 2:
        return nn.Linear(c, c)
    if len(shape) == 4:
        return nn.Conv2d(c, c, 3, padding=1)
    raise ValueError(f"weight norms are benchmarked on 2-D or 4-D inputs, got shape {tuple(shape)}")


def build_contender(
    name: str,
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    base: nn.Module | None = None,
) -> nn.Module:
    """The registry entry ``name`` as a module for input ``shape``, in training mode.

    ``activation`` entries get ``C = shape[1]``, ``last_dim`` entries the last dim; ``weight`` entries wrap a deep copy of ``base``
    (default: :func:`wrapped_layer`), so both contenders of a pair start from the same weights.
    """
    spec = get_norm(name)
    if spec.kind == "weight":
        layer = copy.deepcopy(base) if base is not None else wrapped_layer(shape)
        module = build_norm(name, layer.to(device=device, dtype=dtype))
    elif spec.kind == "last_dim":  # torch's LayerNorm / RMSNorm API: over the last dim
        module = build_norm(name, int(shape[-1]))
    else:
        module = build_norm(name, int(shape[1]))
    return module.to(device=device, dtype=dtype).train()


def config_of(module: nn.Module) -> str:
    """A one-line description of the module's options (its ``extra_repr`` or class name)."""
    text = module.extra_repr() or type(module).__name__
    return f"{type(module).__name__}({text})".replace("\n", " ")
