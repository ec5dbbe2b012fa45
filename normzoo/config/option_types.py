"""The type each layer option allows, read from the layer's signature (its annotation, else its
default), so that ``norm.affine=maybe`` or ``norm.momentum=true`` is refused before anything runs
(``bool("no")`` is True, ``float(True)`` is 1.0: the layer itself would accept both)."""

from __future__ import annotations

import inspect
from typing import Any

from normzoo.errors import ConfigError
from normzoo.registry import NormSpec

__all__ = ["RESERVED_TYPES", "check_option_types", "option_types"]

#: the reserved ``norm`` keys that are not layer arguments, and their types
RESERVED_TYPES: dict[str, frozenset[str]] = {
    "data_init": frozenset({"bool"}),
    "data_init_samples": frozenset({"int"}),
}
_PLAIN = frozenset({"int", "float", "bool", "str", "None"})
_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "None": "null"}  # fmt: skip


def _from_annotation(annotation: Any, default: Any) -> frozenset[str] | None:
    if annotation is inspect.Parameter.empty:
        if default is inspect.Parameter.empty:
            return None
        kinds = {type(default).__name__ if default is not None else "None"}
        return frozenset(kinds) if kinds <= _PLAIN else None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    kinds = {part.strip().replace("NoneType", "None") for part in str(text).split("|")}
    return frozenset(kinds) if kinds <= _PLAIN else None  # torch.device, dtype...: not checked


def option_types(spec: NormSpec) -> dict[str, frozenset[str]]:
    """``option -> allowed type names`` ("int", "float", "bool", "str", "None") of each layer
    argument with a plain type; arguments of other types (device, dtype) are left out."""
    params = list(inspect.signature(spec.cls).parameters.values())[1:]
    out = {}
    for p in params:
        kinds = _from_annotation(p.annotation, p.default)
        if kinds is not None and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            out[p.name] = kinds
    return out


def _fits(value: Any, kinds: frozenset[str]) -> bool:
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    return False


def check_option_types(spec: NormSpec, options: dict[str, Any], where: str = "norm") -> None:
    """Refuse a layer option whose value is not of the type the layer's signature declares.

    Raises:
        ConfigError: ``"norm.affine='maybe' is not allowed for batchnorm: allowed true or false"``.
    """
    types = option_types(spec) | RESERVED_TYPES
    for key, value in options.items():
        kinds = types.get(key)
        if kinds is None or _fits(value, kinds):
            continue
        allowed = " or ".join(_WORDS[k] for k in sorted(kinds, key=list(_WORDS).index))
        raise ConfigError(
            f"{where}.{key}={value!r} is not allowed for norm={spec.name}: allowed {allowed}"
        )
