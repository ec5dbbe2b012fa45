"""A sweep's jobs: Hydra task overrides parsed, a job's identity, the jobs ``multirun.yaml`` expects.

A job is named by its task overrides (``norm=bn data.batch_size=2``). Two run dirs with the same
canonical overrides hold the same job; :func:`expected_jobs` lists the jobs a grid sweep defines, so
that a job that never started can be reported.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from normzoo.analysis.names import canonical
from normzoo.config import grid

__all__ = [
    "GRID_SWEEPERS",
    "expected_jobs",
    "job_identity",
    "job_overrides",
    "override_columns",
    "parse_override",
]

#: config groups chosen by a plain override (``norm=bn`` sets ``norm.name``)
_GROUPS = ("norm", "model", "data", "optim")


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@functools.lru_cache(maxsize=4096)
def parse_override(text: str) -> tuple[str, Any, str]:
    """(key, typed value, canonical 'key=value') of one task override string."""
    try:
        override = _parser().parse_override(text)
        key = override.get_key_element()
        value_str = override.get_value_element_as_str()
        value = None if override.is_sweep_override() else override.value()
        name = override.key_or_group
        if name == "norm" and isinstance(value, str):  # norm=bn and norm=batchnorm: one job
            value_str = value = canonical(value)
        return name, value, f"{key}={value_str}"
    except Exception:  # not Hydra syntax: keep it verbatim
        key, _, value_str = text.partition("=")
        return key.lstrip("+~"), value_str, text


def job_identity(overrides: Iterable[str]) -> str:
    """The job's identity: its canonical task overrides, sorted and joined."""
    return ",".join(sorted(parse_override(o)[2] for o in overrides))


def _read_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


#: sweepers that run the cartesian product of their params as Hydra's BasicSweeper does (normzoo's
#: default ``hydra/sweeper=normzoo`` is a BasicSweeper with a cheaper up-front check)
GRID_SWEEPERS = frozenset({"BasicSweeper", "NormzooSweeper"})


def expected_jobs(sweep_dir: str | os.PathLike[str]) -> list[list[str]] | None:
    """The jobs a basic-sweeper multirun defines, from ``<sweep dir>/multirun.yaml``.

    Expands ``hydra.sweeper.params`` followed by the command line's ``hydra.overrides.task`` exactly
    as Hydra's BasicSweeper does (a later override of a key replaces an earlier one; the cartesian
    product of the sweeps). Returns None when there is no (readable) ``multirun.yaml`` or the sweeper
    is not one of :data:`GRID_SWEEPERS` (an optimiser decides its jobs as it goes).
    """
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        conf = _read_yaml(path)
        hydra_conf = conf.get("hydra", {}) or {}
        sweeper = hydra_conf.get("sweeper", {}) or {}
        target = str(sweeper.get("_target_", "BasicSweeper")).rsplit(".", 1)[-1]
        if target not in GRID_SWEEPERS:
            return None
        params = sweeper.get("params") or {}
        task = list((hydra_conf.get("overrides") or {}).get("task") or [])
        return grid.jobs(params, task)
    except Exception:  # an unreadable sweep definition must not hide the runs that exist
        return None


def job_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        value = _read_yaml(path)
    except Exception:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def override_columns(overrides: Sequence[str]) -> dict[str, Any]:
    """Config columns named by a job's overrides (``data.batch_size=2`` -> ``data.batch_size``
    and, where no plain override of that name exists, ``batch_size``), so a run that never wrote
    ``metrics.json`` can still be named in the report."""
    out: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    for text in overrides:
        key, value, _ = parse_override(text)
        if key.startswith("hydra") or not (
            value is None or isinstance(value, (bool, int, float, str))
        ):
            continue
        out[key] = value
        if "." in key:
            leaves.setdefault(key.rsplit(".", 1)[1], value)
    for leaf, value in leaves.items():
        out.setdefault(leaf, value)
    if isinstance(out.get("norm"), str):
        out["norm"] = canonical(out["norm"])
    for group in _GROUPS:  # a group choice names the group's config (for the settings table)
        if isinstance(out.get(group), str):
            out.setdefault(f"{group}.name", out[group])
    return out
