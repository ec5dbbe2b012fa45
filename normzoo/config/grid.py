"""The one sweep-grid expansion: the jobs a multirun launches, as Hydra's basic sweeper (and
normzoo's, ``hydra_plugins/normzoo_sweeper``) defines them: ``hydra.sweeper.params`` then the
command line, a later override of a key replacing an earlier one in its place (``-m
experiment=digits model=mlp`` replaces the study's ``model: mlp,cnn``), the cartesian product of
the sweeps in that order."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from omegaconf import DictConfig, OmegaConf

from normzoo.errors import ConfigError
from normzoo.registry import UnknownNormError, get_norm

__all__ = [
    "canonical_jobs",
    "canonical_norms",
    "count_jobs",
    "job_nodes",
    "jobs",
    "sweep_overrides",
    "sweep_values",
    "update_node",
]


def sweep_overrides(params: Mapping[str, Any] | None, task: Iterable[str] | None) -> list[Override]:
    """The overrides a multirun's jobs get, parsed: ``params`` (the sweeper's) then ``task`` (the
    command line), one per key, a later one replacing an earlier one in its place."""
    args = [f"{k}={v}" for k, v in (params or {}).items()]
    args += [str(t) for t in task or []]
    final: dict[str, Override] = {}
    for override in OverridesParser.create(config_loader=_hydra_loader()).parse_overrides(args):
        final[override.get_key_element()] = override
    return list(final.values())


def _hydra_loader() -> Any:
    """Hydra's config loader in a process Hydra runs (``glob(...)`` needs the group's options)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    return hydra.config_loader() if hydra.is_initialized() else None


def canonical_norms(values: Iterable[Any]) -> list[Any]:
    """Norm names with aliases resolved and repeats dropped, in order (``bn,batchnorm,gn`` ->
    ``batchnorm,groupnorm``): the alias nodes (``norm/bn``) are group options of their own, so a
    ``glob`` over norms lists each layer under every name. Unknown names are kept (refused later)."""
    out: list[Any] = []
    for value in values:
        try:
            name = get_norm(str(value)).name
        except UnknownNormError:
            name = value
        if name not in out:
            out.append(name)
    return out


def sweep_values(override: Override) -> list[Any]:
    """The values a sweep override takes, in order (``1,2`` -> ``[1, 2]``; norms canonical)."""
    values = list(override.sweep_iterator(transformer=Transformer.identity))
    return canonical_norms(values) if override.key_or_group == "norm" else values


def jobs(params: Mapping[str, Any] | None, task: Iterable[str] | None) -> list[list[str]]:
    """Every job's overrides, in launch order (Hydra's own ``BasicSweeper.split_arguments``)."""
    batches = BasicSweeper.split_arguments(sweep_overrides(params, task), None)
    return canonical_jobs([list(job) for batch in batches for job in batch])


def canonical_jobs(job_list: Iterable[Iterable[str]]) -> list[list[str]]:
    """Jobs with ``norm=<alias>`` written as the canonical name (the run dir names it) and
    repeated jobs dropped, in order: ``norm=glob(*)`` trains each layer once."""
    out: list[list[str]] = []
    for job in job_list:
        canonical = []
        for text in job:
            key, sep, value = str(text).partition("=")
            if sep and key.lstrip("+") == "norm":
                value = str(canonical_norms([value])[0])
            canonical.append(f"{key}{sep}{value}")
        if canonical not in out:
            out.append(canonical)
    return out


def count_jobs(params: Mapping[str, Any] | None, task: Iterable[str] | None) -> int:
    """The number of jobs: the product of the sweeps' lengths."""
    overrides = sweep_overrides(params, task)
    return math.prod(len(sweep_values(o)) for o in overrides if o.is_sweep_override())


def update_node(node: DictConfig, key: str, value: Any, where: str = "") -> None:
    """Set ``key`` (``model.x`` / ``norm.x``: below the node) on a group's node."""
    try:
        OmegaConf.update(node, key.split(".", 1)[1], value, merge=False)
    except Exception as exc:
        raise ConfigError(f"{key}={value!r}: {exc}".split("\n")[0] + where) from None


def job_nodes(
    base: DictConfig, overrides: list[Override], where: str = ""
) -> Iterator[tuple[DictConfig, tuple[tuple[str, Any], ...]]]:
    """A group's node (``model`` / ``norm``) as each job of a sweep gets it: ``base`` with the
    plain ``overrides`` applied, once per combination of the swept ones, with that combination."""
    base = copy.deepcopy(base)
    for override in overrides:
        if not override.is_sweep_override():
            update_node(base, override.key_or_group, override.value(), where)
    sweeps = [
        [(o.key_or_group, v) for v in sweep_values(o)] for o in overrides if o.is_sweep_override()
    ]
    for combination in itertools.product(*sweeps):
        node = copy.deepcopy(base)
        for key, value in combination:
            update_node(node, key, value, where)
        yield node, combination
