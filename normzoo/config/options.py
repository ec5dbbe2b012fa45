"""The layer options a run's norm gets: its ``norm`` node, the study's ``norm_options`` for it,
and the ``norm.<option>`` keys the command line set (those win)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normzoo.config.schema import NORM_RESERVED_KEYS
from normzoo.registry import UnknownNormError, get_norm

__all__ = ["explicit_norm_keys", "layer_options_from_flat", "norm_layer_options"]


def norm_layer_options(cfg: DictConfig, explicit: Iterable[str] = ()) -> dict[str, Any]:
    """The layer options of the selected norm: the ``norm`` node without its reserved keys, then
    ``norm_options[<key>]`` for every key that names the selected norm (its canonical name or an
    alias) on top, then the ``norm`` keys in ``explicit`` (those set on the command line, see
    :func:`explicit_norm_keys`) on top again: an explicit ``norm.num_groups=4`` wins over a study's
    ``norm_options.groupnorm.num_groups``."""
    node = OmegaConf.to_container(cfg.norm, resolve=True)
    extra = OmegaConf.to_container(cfg.get("norm_options") or OmegaConf.create({}), resolve=True)
    return _merge_layer_options(str(cfg.norm.name), node, extra, explicit)


def explicit_norm_keys(overrides: Iterable[str] | None) -> set[str]:
    """The ``norm`` option keys a job's overrides set (``norm.<key>=``, ``+norm.<key>=``, ...)."""
    keys = set()
    for text in overrides or ():
        key = str(text).split("=", 1)[0].lstrip("+~")
        if key.startswith("norm.") and key[5:]:
            keys.add(key[5:].split(".")[0])
    return keys


def _merge_layer_options(
    name: str, node: dict[str, Any], norm_options: dict[str, Any], explicit: Iterable[str]
) -> dict[str, Any]:
    canonical = get_norm(name).name
    base = {k: v for k, v in node.items() if k not in NORM_RESERVED_KEYS}
    opts = dict(base)
    for key, extra in norm_options.items():
        try:
            target = get_norm(str(key)).name
        except UnknownNormError:
            continue
        if target == canonical and isinstance(extra, dict):
            opts.update(extra)
    for key in explicit:
        if key in base:
            opts[key] = base[key]
    return opts


def layer_options_from_flat(
    flat: dict[str, Any], overrides: Iterable[str] | None = None
) -> dict[str, Any] | None:
    """:func:`norm_layer_options` from a :func:`flatten`-ed config (a ``metrics.json`` record's
    ``config``) and the job's overrides; None when the norm is not registered."""
    node: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("norm."):
            node[key[5:]] = value
        elif key.startswith("norm_options."):
            which, _, option = key[len("norm_options.") :].partition(".")
            if option:
                extra.setdefault(which, {})[option] = value
    try:
        return _merge_layer_options(
            str(node.get("name")), node, extra, explicit_norm_keys(overrides)
        )
    except UnknownNormError:
        return None


def _layer_options(name: str) -> tuple[set[str], bool]:
    spec = get_norm(name)
    params = list(inspect.signature(spec.cls).parameters.values())[1:]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    return set(spec.options()), takes_any
