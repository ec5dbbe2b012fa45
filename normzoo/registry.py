"""The norm registry: the only place a normalisation layer's name is resolved.

Every entry is a :class:`NormSpec`. Names are case-insensitive and ignore ``_``/``-`` (as in timm's
``create_norm``), so ``"Batch_Norm"``, ``"batchnorm"`` and the alias ``"bn"`` are one entry.

Two kinds of entry:

* ``activation`` — a layer placed after a conv/linear: ``build_norm(name, num_features, **kw)``.
* ``weight`` — reparametrises the conv/linear itself: ``build_norm(name, module, **kw)`` returns the
  module with its weight reparametrised.
* ``last_dim`` — normalises the trailing dims of its input, torch's ``nn.LayerNorm`` / ``nn.RMSNorm``
  API: ``build_norm(name, normalized_shape, **kw)`` (an int or a tuple), for (B, T, D) token tensors.

Torch's native layers are registered too (``reference=True``), each named ``native_<name>``, so a study
can put a from-scratch layer and its fused counterpart side by side. Third-party packages add entries
through the entry-point group ``normzoo.norms``: the entry point is loaded (importing a module whose
``@register_norm`` decorators run, or returning a :class:`NormSpec`) the first time the registry is read.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "NormSpec",
    "UnknownNormError",
    "build_norm",
    "canonical_name",
    "display_name",
    "from_scratch_twin",
    "get_norm",
    "list_norms",
    "register_norm",
]

ENTRY_POINT_GROUP = "normzoo.norms"
Kind = Literal["activation", "weight", "last_dim"]
T = TypeVar("T")


class UnknownNormError(ValueError):
    """Raised for a name that is neither a registered norm nor one of its aliases."""


@dataclass(frozen=True)
class NormSpec:
    """What the registry knows about one normalisation layer.

    Attributes:
        name: canonical name, lower case (lookups also ignore ``_`` and ``-``).
        cls: the class (or factory) called as ``cls(num_features, **kw)`` for ``activation`` entries
            and ``cls(module, **kw)`` for ``weight`` entries.
        kind: ``"activation"``, ``"weight"`` or ``"last_dim"``.
        aliases: other accepted names (``bn``, ``gn``, ...).
        paper: the paper that introduced the layer, as "Authors Year, Title, arXiv id".
        uses_batch_stats: whether the output of one sample depends on the other samples of its
            batch in training (BatchNorm, Batch Renorm); such layers have a train/inference mismatch.
        reference: True for torch's native (fused) implementations kept for comparison.
        native: for a from-scratch layer, the name of its native reference (or None).
        needs_spatial: True if the layer is undefined without spatial dims (InstanceNorm).
        defaults: keyword arguments applied before the caller's overrides.
        description: one line for listings.
        display: the name reports print (``"Batch Renorm"``); a reference's gets `` (torch)``.
    """

    name: str
    cls: Callable[..., nn.Module]
    kind: Kind = "activation"
    aliases: tuple[str, ...] = ()
    paper: str = ""
    uses_batch_stats: bool = False
    reference: bool = False
    native: str | None = None
    needs_spatial: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    display: str = ""

    def options(self) -> tuple[str, ...]:
        """The keyword arguments the layer accepts (besides its first positional argument)."""
        params = list(inspect.signature(self.cls).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


_REGISTRY: dict[str, NormSpec] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def canonical_name(name: str) -> str:
    """Normalise a user-given name: lower case, ``_`` and ``-`` dropped."""
    if not isinstance(name, str):
        raise TypeError(f"a norm name must be a string, got {type(name).__name__}")
    return name.replace("_", "").replace("-", "").strip().lower()


def _add(spec: NormSpec, *, replace: bool = False) -> None:
    display = spec.name.strip().lower()
    key = canonical_name(display)
    if spec.kind not in ("activation", "weight", "last_dim"):
        raise ValueError(
            f"norm {spec.name!r}: kind must be 'activation', 'weight' or 'last_dim', "
            f"got {spec.kind!r}"
        )
    keys = [key, *(canonical_name(a) for a in spec.aliases)]
    if not replace:
        for k in keys:
            owner = _ALIASES.get(k)
            if owner is not None and owner != display:
                raise ValueError(f"norm name {k!r} is already registered (by {owner!r})")
            if owner == display and _REGISTRY[display].cls is not spec.cls:
                raise ValueError(f"norm {display!r} is already registered")
    frozen = MappingProxyType(dict(spec.defaults))
    spec = NormSpec(**{**spec.__dict__, "name": display, "defaults": frozen})
    _REGISTRY[display] = spec
    for k in keys:
        _ALIASES[k] = display


def register_norm(
    name: str,
    *,
    kind: Kind = "activation",
    aliases: tuple[str, ...] = (),
    paper: str = "",
    uses_batch_stats: bool = False,
    reference: bool = False,
    native: str | None = None,
    needs_spatial: bool = False,
    defaults: Mapping[str, Any] | None = None,
    description: str = "",
    display: str = "",
    replace: bool = False,
) -> Callable[[T], T]:
    """Class decorator that registers a normalisation layer under ``name``.

    Example::

        @register_norm("rmsnorm", aliases=("rms",), paper="Zhang & Sennrich 2019")
        class RMSNorm(nn.Module):
            def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True): ...
    """

    def deco(cls: T) -> T:
        _add(
            NormSpec(
                name=name,
                cls=cls,  # type: ignore[arg-type]
                kind=kind,
                aliases=tuple(aliases),
                paper=paper,
                uses_batch_stats=uses_batch_stats,
                reference=reference,
                native=native,
                needs_spatial=needs_spatial,
                defaults=defaults or {},
                description=description or (cls.__doc__ or "").strip().split("\n")[0],
                display=display,
            ),
            replace=replace,
        )
        return cls

    return deco


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the registry down
            warnings.warn(
                f"normzoo: could not load norm plugin {ep.name!r} ({ep.value}): {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if not isinstance(obj, NormSpec):
            continue  # a module or class: it registered its layers when it was imported
        owner = _ALIASES.get(canonical_name(obj.name))
        if owner is not None and _REGISTRY[owner].cls is obj.cls:
            continue  # registered by an earlier load (reload_plugins)
        try:
            _add(obj)
        except ValueError as exc:  # a name or alias taken: skip this plugin, keep the others
            warnings.warn(
                f"normzoo: norm plugin {ep.name!r} ({ep.value}) not registered: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("normzoo.norms")  # runs the built-in @register_norm decorators
    _load_entry_points()


def reload_plugins() -> None:
    """Load entry points of the ``normzoo.norms`` group again (after installing a plugin)."""
    _ensure_loaded()
    _load_entry_points()


def list_norms(
    kind: Kind | None = None,
    *,
    references: bool = True,
    batch_stats: bool | None = None,
) -> list[str]:
    """Canonical names of the registered norms, sorted.

    Args:
        kind: keep only ``"activation"``, ``"weight"`` or ``"last_dim"`` entries.
        references: include torch's native references (``native_*``).
        batch_stats: keep only entries that do (True) or do not (False) use batch statistics.
    """
    _ensure_loaded()
    out = []
    for key, spec in _REGISTRY.items():
        if kind is not None and spec.kind != kind:
            continue
        if not references and spec.reference:
            continue
        if batch_stats is not None and spec.uses_batch_stats != batch_stats:
            continue
        out.append(key)
    return sorted(out)


def get_norm(name: str) -> NormSpec:
    """The spec registered under ``name`` or one of its aliases.

    Raises:
        UnknownNormError: listing the known names and the closest match.
    """
    _ensure_loaded()
    key = canonical_name(name)
    if key in _ALIASES:
        return _REGISTRY[_ALIASES[key]]
    close = difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.5)
    hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
    aliases = sorted(a for spec in _REGISTRY.values() for a in spec.aliases)
    raise UnknownNormError(
        f"unknown norm {name!r}.{hint} Known norms: {', '.join(sorted(_REGISTRY))} "
        f"(aliases: {', '.join(aliases)})."
    )


def display_name(name: str) -> str:
    """The name a report prints: ``batchnorm`` -> ``BatchNorm``, ``native_bn`` -> ``BatchNorm (torch)``.

    A name the registry does not know is returned unchanged (a report of an old sweep must not fail).
    """
    try:
        spec = get_norm(name)
    except (UnknownNormError, TypeError):
        return str(name)
    if spec.display:
        return spec.display
    if spec.reference:
        twin = from_scratch_twin(spec.name)
        if twin is not None:
            return f"{display_name(twin)} (torch)"
    return spec.name


def from_scratch_twin(name: str) -> str | None:
    """For a native reference, the from-scratch entry whose ``native`` it is (else None)."""
    spec = get_norm(name)
    if not spec.reference:
        return None
    for other in _REGISTRY.values():
        if (
            not other.reference
            and other.native
            and canonical_name(other.native)
            in (
                canonical_name(spec.name),
                *(canonical_name(a) for a in spec.aliases),
            )
        ):
            return other.name
    return None


def build_norm(
    name: str | int | tuple[int, ...] | nn.Module,
    num_features: int | tuple[int, ...] | nn.Module | None = None,
    /,
    **overrides: Any,
) -> nn.Module:
    """Build the norm ``name``: ``build_norm("gn", 64, num_groups=8)``.

    For ``activation`` entries ``num_features`` is the channel count C of an (N, C, *S) input; for
    ``weight`` entries it is the ``nn.Linear``/``nn.ConvNd`` to reparametrise; for ``last_dim``
    entries the ``normalized_shape`` (int or tuple). ``overrides`` update the spec's defaults; an
    option the layer does not take is a ``TypeError`` naming the accepted ones.

    The name may also come as the keyword ``name=`` with the size first,
    ``build_norm(64, name="gn")``: the call a ``norm_layer`` slot makes of
    ``functools.partial(build_norm, name="gn")`` (timm keeps a partial's keywords, not its
    positional arguments; see also :func:`normzoo.norm_layer`).
    """
    if "name" in overrides:
        if num_features is not None:
            raise TypeError("build_norm: pass the name positionally or as name=, not both")
        name, num_features = overrides.pop("name"), name
    if num_features is None and not isinstance(name, str):  # a size alone: the name was lost
        raise TypeError(
            f"build_norm({name!r}) got a size but no layer name: a norm_layer slot that keeps "
            "only a functools.partial's keywords (timm's) dropped a positional name; use "
            "functools.partial(normzoo.build_norm, name='gn') or normzoo.norm_layer('gn')"
        )
    if num_features is None:
        raise TypeError("build_norm needs the layer's size: build_norm(name, num_features, ...)")
    spec = get_norm(name)  # type: ignore[arg-type]
    options = spec.options()
    takes_any = any(
        p.kind == p.VAR_KEYWORD for p in inspect.signature(spec.cls).parameters.values()
    )
    unknown = sorted(set(overrides) - set(options))
    if unknown and not takes_any:
        raise TypeError(
            f"norm {spec.name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(options) or 'no options'}"
        )
    if spec.kind == "activation" and (
        isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1
    ):
        raise ValueError(
            f"norm {spec.name!r}: num_features must be a positive int, got {num_features!r}"
        )
    if spec.kind == "last_dim" and not _is_shape(num_features):
        raise ValueError(
            f"norm {spec.name!r}: normalized_shape must be a positive int or a tuple of them, "
            f"got {num_features!r}"
        )
    if spec.kind == "weight" and not isinstance(num_features, nn.Module):
        raise TypeError(
            f"norm {spec.name!r} reparametrises a layer's weight: pass the nn.Linear/nn.ConvNd "
            f"to wrap, got {type(num_features).__name__}"
        )
    kwargs = {**spec.defaults, **overrides}
    return spec.cls(num_features, **kwargs)


def _is_shape(value: Any) -> bool:
    """A positive int or a non-empty tuple/list of them (a ``normalized_shape``)."""
    items = value if isinstance(value, (tuple, list)) and value else (value,)
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items)
