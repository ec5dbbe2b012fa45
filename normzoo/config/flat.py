"""The one ``flatten``: nested config (or record) -> dotted keys, as ``metrics.json`` stores a
run's ``config`` and the results table names its columns."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["flatten", "plain"]

_SCALARS = (bool, int, float, str)


def flatten(
    node: Any, prefix: str = "", *, scalars_only: bool = False, keep_empty: bool = True
) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay lists, enums become their names.

    ``scalars_only``: drop leaves that are not None, bool, int, float or str (the results table's
    columns). ``keep_empty``: an empty mapping is a leaf (``{}``), else it yields no key.
    """
    if not isinstance(node, Mapping):
        return {prefix: plain(node)}
    out: dict[str, Any] = {}
    for key in node:
        value = node[key]
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and (len(value) > 0 or not keep_empty):
            out.update(flatten(value, full, scalars_only=scalars_only, keep_empty=keep_empty))
            continue
        value = plain(value)
        if not scalars_only or value is None or isinstance(value, _SCALARS):
            out[full] = value
    return out


def plain(value: Any) -> Any:
    """An OmegaConf container as plain Python (interpolations resolved), an enum as its name."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, enum.Enum):
        return value.name
    return value
