"""A stack's sweep configs composed once per set of config-group choices (issue 17).

Why: ``load_sweep_config`` composes every job from scratch (defaults list, every YAML and schema
node merged: 0.1-0.5 s CPU a job), although the jobs of one stack differ only in a few value
overrides (``norm.<option>=``, ``seed=``, ``optim.base_lr=``) and in ``norm=``.

What is proven, by reading Hydra 1.3's ``ConfigLoaderImpl._load_configuration_impl``: a job's sweep
config is ``compose(defaults list)``, then its value overrides applied in order, then the ``hydra``
bookkeeping (``hydra.overrides``, ``runtime.choices``, ``job.env_set``, ``runtime.version``/
``version_base``/``cwd``/``config_sources``, ``job.name``, ``job.override_dirname``,
``job.config_name``), then ``copy_cache`` from the master config. The defaults list, and so the
composed config, depends only on the config name, the search path and the config-group overrides:
``create_defaults_list`` files every override on a key that is not a config group under
``config_overrides`` and leaves it alone. So for a job whose overrides are config-group choices
``G`` (``key=option`` on a key that is a config group, as Hydra decides it: ``group_exists``) and
plain value overrides ``V``, its sweep config is the *template* ``load_sweep_config(G)`` (one per
distinct ``G``, its lines in order: other choices, e.g. another ``model=``, compose their own) with ``V`` applied by the same ``OmegaConf.update(cfg, key, value, merge=True)`` Hydra uses (values
parsed by Hydra's ``OverridesParser``, ``value()``) and the bookkeeping that reads the overrides
redone: ``hydra.overrides.task`` (the template's entries for ``G`` replaced by the job's lines in
order), ``hydra.job.override_dirname`` (Hydra's ``get_overrides_dirname``), ``job.env_set`` and
``runtime.cwd`` (re-read), the cache copied again. The rest of the bookkeeping is the same for both:
``hydra.overrides.hydra`` (the master's lines; a job's own ``hydra.*`` override falls back),
``runtime.choices`` (the same defaults list), version, config sources and config name. Applying
``V`` after the template's bookkeeping instead of before changes nothing, since no value in ``V``
can read ``hydra`` (interpolations fall back) and the bookkeeping reads only ``hydra`` (the one read
that could reach outside it, ``"name" in cfg.hydra.job``, is guarded: an interpolated
``hydra.job.name`` falls back).

Derived only where that argument holds; every other job gets a full ``load_sweep_config``:

- a job override that is not a plain ``key=value``: ``+key=``, ``++key=``, ``~key``, ``key@pkg=``,
  sweep syntax (``1,2``, ``range()``, ...);
- an override of a ``hydra.*`` / ``hydra/*`` key;
- a value containing ``${`` (an interpolation), or a dict value (merged into the node);
- a value override whose key is a config group (``norm={...}``), or whose key, or a node above it,
  the template lacks, holds no plain dict, or is an interpolation;
- a template with ``hydra.searchpath`` set (the groups would then be looked up in another
  repository than the loader's), an interpolated ``hydra.job.name``, or one Hydra could not
  compose (the job's own composition then raises Hydra's error);
- a config loader that is not Hydra's ``ConfigLoaderImpl``.

``tests/test_compose_once.py`` checks every job of the default study's grids, and the fallbacks,
against a fresh ``load_sweep_config``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

__all__ = ["SweepComposer"]


@dataclass
class _Plan:
    """A job's overrides split into the template's (config-group choices) and its value ones."""

    groups: tuple[str, ...]  # input lines of the config-group overrides, in order
    values: list[Override]  # plain value overrides, in order
    task: list[Override]  # every override, in order (all of them app overrides)


@dataclass
class _Template:
    config: DictConfig | None  # None: Hydra could not compose it (or it is not derivable)
    n_group_lines: int  # entries at the end of hydra.overrides.task that are the group lines


@dataclass
class SweepComposer:
    """``config_loader.load_sweep_config(master_config, overrides)``, composing once per set of
    config-group choices. ``composed``/``derived``/``fallbacks`` count what each call did."""

    config_loader: Any
    master_config: DictConfig
    templates: dict[tuple[str, ...], _Template] = field(default_factory=dict)
    composed: int = 0  # templates composed
    derived: int = 0  # sweep configs derived from a template
    fallbacks: int = 0  # full load_sweep_config calls
    _parser: Any = field(default_factory=OverridesParser.create)
    _is_group: dict[str, bool] = field(default_factory=dict)

    def load_sweep_config(self, overrides: list[str]) -> DictConfig:
        derived = self._derive(list(overrides))
        if derived is not None:
            self.derived += 1
            return derived
        self.fallbacks += 1
        return self.config_loader.load_sweep_config(self.master_config, list(overrides))

    def _derive(self, overrides: list[str]) -> DictConfig | None:
        plan = self._plan(overrides)
        if plan is None:
            return None
        template = self.templates.get(plan.groups)
        if template is None:
            template = self.templates[plan.groups] = self._template(plan.groups)
        if template.config is None:
            return None
        return _apply(template, plan, self.master_config)

    def _plan(self, overrides: list[str]) -> _Plan | None:
        if type(self.config_loader) is not ConfigLoaderImpl:  # the code read above, not a subclass
            return None
        repository = self.config_loader.repository
        try:
            parsed = self._parser.parse_overrides(overrides=overrides)
        except Exception:
            return None  # Hydra's own parse raises its error
        groups, values = [], []
        for override in parsed:
            if (
                override.type != OverrideType.CHANGE
                or override.package is not None
                or override.value_type != ValueType.ELEMENT
                or override.is_hydra_override()
            ):
                return None
            value = override.value()
            if isinstance(value, dict) or _has_interpolation(value):
                return None
            if self._group(repository, override.key_or_group):
                if not isinstance(value, str):
                    return None  # a list of options, or Hydra's error
                groups.append(override.input_line)
            else:
                values.append(override)
        return _Plan(tuple(groups), values, list(parsed))

    def _group(self, repository: Any, key: str) -> bool:
        if key not in self._is_group:
            self._is_group[key] = bool(repository.group_exists(key))
        return self._is_group[key]

    def _template(self, groups: tuple[str, ...]) -> _Template:
        self.composed += 1
        try:
            cfg = self.config_loader.load_sweep_config(self.master_config, list(groups))
        except Exception:
            return _Template(None, 0)
        searchpath = OmegaConf.select(cfg, "hydra.searchpath")
        if searchpath or OmegaConf.is_interpolation(cfg.hydra.job, "name"):
            return _Template(None, 0)
        return _Template(cfg, len(groups))


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def _plain_key(cfg: DictConfig, key: str) -> bool:
    """``key`` is in ``cfg`` below plain dict nodes: no interpolation on the way or at it (looked
    at without resolving anything), no list, no missing or None node on the way."""
    node: Any = cfg
    for part in key.split("."):
        if (
            not isinstance(node, DictConfig)
            or node._is_missing()
            or node._is_none()
            or node._is_interpolation()
        ):
            return False
        try:
            node = node._get_node(part, throw_on_missing_key=False)
        except Exception:
            return False
        if node is None:
            return False
    return not node._is_interpolation()


def _apply(template: _Template, plan: _Plan, master: DictConfig) -> DictConfig | None:
    """The template with the plan's value overrides applied and the bookkeeping that reads them
    redone, as ``_load_configuration_impl`` and ``load_sweep_config`` do it; None where not proven."""
    base = template.config
    assert base is not None
    if not all(_plain_key(base, o.key_or_group) for o in plan.values):
        return None
    cfg = copy.deepcopy(base)
    try:
        for override in plan.values:  # _apply_overrides_to_config, for a plain override
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    except Exception:
        return None  # the full composition raises Hydra's error
    task = cfg.hydra.overrides.task
    assert isinstance(task, ListConfig)
    keep = len(task) - template.n_group_lines
    for _ in range(template.n_group_lines):
        del task[keep]
    for override in plan.task:
        task.append(override.input_line)
    with open_dict(cfg.hydra):
        for key in cfg.hydra.job.env_copy:
            cfg.hydra.job.env_set[key] = os.environ[key]
    cfg.hydra.runtime.cwd = os.getcwd()
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=plan.task,
        kv_sep=cfg.hydra.job.config.override_dirname.kv_sep,
        item_sep=cfg.hydra.job.config.override_dirname.item_sep,
        exclude_keys=cfg.hydra.job.config.override_dirname.exclude_keys,
    )
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    return cfg
