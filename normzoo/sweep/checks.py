"""Up-front checks of every job of a multirun, before the first one starts: each swept value
against the schema, the ranges and the registry; each swept model with the ``model.*`` overrides,
each swept norm with the ``norm.*`` ones (every combination); the data sets; the device."""

from __future__ import annotations

import copy
from typing import Any

from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from normzoo.config.grid import count_jobs as _count_grid
from normzoo.config.grid import job_nodes, sweep_overrides, sweep_values
from normzoo.config.options import explicit_norm_keys
from normzoo.config.schema import CONF_DIR, model_node, norm_choices, norm_node
from normzoo.config.validate import (
    check_override,
    check_value,
    suggest_norm,
    validate,
    validate_model,
    validate_norm,
)
from normzoo.data import check_available
from normzoo.errors import ConfigError
from normzoo.run.device import resolve_device

__all__ = ["check_sweep", "count_jobs", "multirun_overrides"]


def multirun_overrides(config: DictConfig) -> list[Override]:
    """The overrides a multirun's jobs get (:func:`normzoo.config.grid.sweep_overrides` of the
    sweeper's ``params`` and the command line of ``config``, a multirun's full config)."""
    return sweep_overrides(
        OmegaConf.select(config, "hydra.sweeper.params") or {},
        OmegaConf.select(config, "hydra.overrides.task") or [],
    )


def count_jobs(config: DictConfig) -> int:
    """The number of jobs a multirun launches: the product of its sweeps' lengths."""
    return _count_grid(
        OmegaConf.select(config, "hydra.sweeper.params") or {},
        OmegaConf.select(config, "hydra.overrides.task") or [],
    )


def _groups() -> dict[str, list[str]]:
    """The options of each config group as Hydra's config loader sees them in this process (the
    user's ``--config-dir`` / ``hydra.searchpath`` included); normzoo's conf dir outside Hydra.
    The norms: the registry's names."""
    out = {}
    loader = _hydra_loader()
    for path in CONF_DIR.iterdir():
        if path.is_dir() and path.name not in ("norm", "hydra"):
            options = {p.stem for p in path.glob("*.yaml")}
            if loader is not None:
                options.update(loader.get_group_options(path.name))
            out[path.name] = sorted(options)
    return {"norm": norm_choices(), **out}


def _hydra_loader() -> Any:
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    return hydra.config_loader() if hydra.is_initialized() else None


def _check_unnamed(override: Override, key: str, unnamed: set[str]) -> None:
    if override.is_sweep_override() and key in unnamed:
        raise ConfigError(
            f"{override.input_line}: {key} is left out of the run-directory names "
            f"(hydra.job.config.override_dirname.exclude_keys), so the jobs of a sweep over it "
            f"would all write into the same directories; run one sweep per value of {key}, "
            f"each with its own hydra.sweep.dir"
        )


def _check_group_value(config: DictConfig, override: Override, key: str, value: Any,
                       groups: dict[str, list[str]]) -> None:  # fmt: skip
    if str(value) not in groups[key]:
        if key == "norm":
            raise ConfigError(suggest_norm(str(value)))
        raise ConfigError(f"{key}={value}: no such option; choices: {', '.join(groups[key])}")
    if key == "data" and override.is_sweep_override():
        # the root/download the jobs will use: the shared config's (command line)
        check_available(OmegaConf.merge(config.data, {"name": str(value)}))


def check_sweep(config: DictConfig) -> None:
    """Check every value a multirun will use, before it starts.

    Raises:
        ConfigError: naming the key and the value.
    """
    overrides = multirun_overrides(config)
    args = [o.input_line for o in overrides]
    groups = _groups()
    probe = copy.deepcopy(config)
    swept: set[str] = set()
    unnamed = set(
        OmegaConf.select(config, "hydra.job.config.override_dirname.exclude_keys", default=None)
        or []
    )
    model_options: list[str] = []  # the swept model options, in order
    model_overrides = []
    norm_options: list[str] = []  # the swept norm options, in order
    norm_overrides = []
    for override in overrides:
        key = override.key_or_group
        if key.startswith("model.") and not override.is_delete():
            model_overrides.append(override)
        if key.startswith("norm.") and not override.is_delete():
            norm_overrides.append(override)
        _check_unnamed(override, key, unnamed)
        if override.is_hydra_override() or key.startswith("hydra") or override.is_delete():
            continue
        if override.is_sweep_override():
            values = sweep_values(override)
            if key in groups:  # the shared config does not know which option a job gets
                swept.add(key)
                if key == "model":
                    model_options += [str(v) for v in values if str(v) not in model_options]
                if key == "norm":
                    norm_options += [str(v) for v in values if str(v) not in norm_options]
        else:
            values = [override.value()]
        for value in values:
            if key in groups:
                _check_group_value(config, override, key, value, groups)
                continue
            if not override.is_add() and OmegaConf.select(probe, key, default=None) is not None:
                try:
                    OmegaConf.update(probe, key, value, merge=True)
                except Exception as exc:
                    raise ConfigError(f"{key}={value!r}: {exc}".split("\n")[0]) from None
            check_value(key, value)
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    explicit = explicit_norm_keys(args)
    validate(task, skip=tuple(sorted(swept)), explicit=explicit)
    if "model" in swept or model_overrides:
        _check_models(config, model_options, model_overrides)
    if "norm" in swept or any(o.is_sweep_override() for o in norm_overrides):
        _check_norms(config, norm_options, norm_overrides, explicit)
    if "data" not in swept:
        check_available(task.data)
    resolve_device(task.device)  # device=cuda without a GPU: before the first job, not in each


def _check_models(config: DictConfig, swept: list[str], overrides: list[Override]) -> None:
    """Every model a sweep trains, with the ``model.*`` overrides applied to it (every combination
    of the swept ones): a key that one of the swept models lacks, or a value its builder refuses,
    stops the sweep before its first job (it would abort the sweep at that model's first job)."""
    names = swept or [str(config.model.name)]
    where = f" (the sweep over model={','.join(swept)} applies it to every model)" if swept else ""
    for name in names:
        for override in overrides:
            try:
                check_override(override.input_line, name)
            except ConfigError as exc:
                raise ConfigError(f"{exc}{where}") from None
    for name in names:
        base = model_node(name) if swept else config.model
        for node, _ in job_nodes(base, overrides, where):
            try:
                validate_model(node)
            except ConfigError as exc:
                raise ConfigError(f"model={name}: {exc}{where}") from None


def _check_norms(
    config: DictConfig, swept: list[str], overrides: list[Override], explicit: set[str]
) -> None:
    """Every norm a sweep trains, with the ``norm.*`` overrides applied to it (every combination of
    the swept ones) and the shared ``norm_options``: an option a swept norm does not take, or a
    value its layer refuses (``norm.momentum=0.1,2``), stops the sweep before its first job."""
    norm_options = config.get("norm_options") or {}
    for name in swept or [str(config.norm.name)]:
        base = norm_node(name) if swept else config.norm
        for node, combination in job_nodes(base, overrides):
            try:
                validate_norm(node, norm_options, explicit)
            except ConfigError as exc:
                job = [f"norm={name}"] if swept else []
                job += [f"{key}={value}" for key, value in combination]
                raise ConfigError(
                    f"{exc}" + (f" (in the jobs with {' '.join(job)})" if job else "")
                ) from None
