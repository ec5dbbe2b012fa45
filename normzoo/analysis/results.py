"""A sweep directory -> one tidy pandas DataFrame (one row per run), and CSV.

A Hydra multirun writes ``<sweep dir>/multirun.yaml`` (the composed config, including
``hydra.sweeper.params`` and the command line's task overrides ``hydra.overrides.task``) and one dir
per job (``<sweep dir>/<override_dirname>/`` here) holding ``.hydra/`` and, once the run has finished,
``metrics.json``. :func:`load_sweep` turns that into one row per run:

* ``status`` is the run's own (``ok`` | ``failed`` | ``diverged`` | ``invalid``) when its
  ``metrics.json`` parses; ``corrupt`` when it exists but does not parse (the parse error is in
  ``error``; never fatal); ``missing`` for a run dir without ``metrics.json`` (started, never
  finished: killed, or still running); ``not_started`` for a job the sweep definition in
  ``multirun.yaml`` expects but for which no run dir exists.
* columns: the flattened config and metrics scalars from ``metrics.json`` (nested sections such as
  ``config``/``metrics``/``diagnostics`` are hoisted to plain names, other nested dicts become
  ``a.b``; lists such as per-epoch curves and per-layer diagnostics are left out of the frame — see
  :func:`load_layers`), plus ``status``, ``error``, ``run_dir``, ``overrides`` (the job's task
  overrides, the run's identity in the sweep) and ``superseded``.
* each run dir is one row, and each expected job one row at most: a job that matches a run dir is
  not listed again as ``not_started``. If two run dirs hold the same job (the same overrides), the
  better one (ok first, then the newest) is kept and the other is marked ``superseded`` so
  aggregations never count a run twice. The same holds for two run dirs of different jobs that
  resolve to the same config and seed (``norm=bn`` and ``norm=batchnorm``): they are one
  measurement, not two seeds. ``superseded_by`` names the kept run dir and why.
* ``variant``: ``""``, or, where runs of the same layer, model and data set differ in a
  result-relevant config key other than the batch size and the seed, those keys and this run's
  values (``"base_lr=0.1"``, ``"epochs=1"``), so that such runs form separate series instead of
  being pooled as seeds; ``"config not recorded"`` for a finished run without a ``config``
  section beside runs of the same layer that have one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from normzoo.analysis.jobs import GRID_SWEEPERS, expected_jobs, job_identity, override_columns
from normzoo.analysis.record import (
    FINISHED_STATUSES,
    METRICS_FILE,
    NEUTRAL_CONFIG_KEYS,
    flatten,
    read_run,
    run_config,
)
from normzoo.analysis.series import superseded, variants

__all__ = [
    "FINISHED_STATUSES",
    "GRID_SWEEPERS",
    "METRICS_FILE",
    "NEUTRAL_CONFIG_KEYS",
    "aggregate_seeds",
    "expected_jobs",
    "find_run_dirs",
    "load_layers",
    "load_sweep",
    "ok_runs",
    "run_config",
    "write_csv",
]

_FIRST_COLUMNS = ("norm", "batch_size", "seed", "status", "error")


def find_run_dirs(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Run dirs under ``sweep_dir``: dirs holding ``.hydra/`` or ``metrics.json``, each once.

    The walk does not descend into a run dir (its checkpoints or sub-folders are not runs) nor into
    ``.hydra``. ``sweep_dir`` itself counts when it is a run dir (a single run).
    """
    root = Path(sweep_dir)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if ".hydra" in dirnames or METRICS_FILE in filenames:
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def load_sweep(path: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run of the sweep at ``path`` (see the module docstring for the columns).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {str(root)!r} does not exist or is not a directory")
    rows = [read_run(d) for d in find_run_dirs(root)]
    seen = {r["overrides"] for r in rows if r["overrides"] is not None}
    for job in expected_jobs(root) or []:
        ident = job_identity(job)
        if ident in seen:
            continue
        seen.add(ident)
        row = override_columns(job)
        row.update(
            status="not_started",
            error="expected by multirun.yaml, no run dir",
            overrides=ident,
            run_dir=None,
            _mtime=0.0,
        )
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(
            columns=[*_FIRST_COLUMNS, "overrides", "run_dir", "superseded", "superseded_by"]
        )
    for col in ("_config", "config_id"):
        if col not in df:
            df[col] = None
    df["superseded"], df["superseded_by"] = superseded(df)
    df["variant"] = variants(df)
    df = df.drop(columns=["_mtime", "_config"])
    first = [c for c in _FIRST_COLUMNS if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    sort = [c for c in ("norm", "batch_size", "seed") if c in df.columns]
    if sort:
        df = df.sort_values(sort, kind="stable", na_position="last")
    return df.reset_index(drop=True)


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with ``status == "ok"`` that no other run of the same job supersedes."""
    if df.empty or "status" not in df:
        return df.iloc[0:0]
    mask = df["status"].eq("ok")
    if "superseded" in df:
        mask &= ~df["superseded"].fillna(False).astype(bool)
    return df[mask]


def aggregate_seeds(
    df: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    by: Sequence[str] = ("norm", "batch_size"),
) -> pd.DataFrame:
    """Mean, std (ddof=1; NaN for one seed), min, max and n over seeds per ``by`` group.

    Uses :func:`ok_runs` only. Runs with different ``config_id`` (settings other than the seed)
    are never pooled: ``config_id`` is added to ``by`` when the frame has it. ``metrics`` defaults
    to every numeric column except the group keys and ``seed``. Columns are ``<metric>_mean``, ``<metric>_std``, ``<metric>_min``,
    ``<metric>_max``, ``<metric>_n`` (n counts the seeds where the metric is not NaN).
    """
    runs = ok_runs(df)
    wanted = list(by)
    by = [b for b in wanted if b in runs.columns]
    if not by:
        raise ValueError(f"aggregate_seeds: none of the group columns {wanted} is in the frame")
    if "config_id" in runs.columns and "config_id" not in by:
        by.append("config_id")
    if metrics is None:
        numeric = runs.select_dtypes("number").columns
        metrics = [c for c in numeric if c not in by and c != "seed"]
    metrics = [m for m in metrics if m in runs.columns]
    rows = []
    for key, group in runs.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, key, strict=True))
        row["n_runs"] = len(group)
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").dropna()
            n = len(values)
            row[f"{m}_mean"] = values.mean() if n else math.nan
            row[f"{m}_std"] = values.std(ddof=1) if n > 1 else math.nan
            row[f"{m}_min"] = values.min() if n else math.nan
            row[f"{m}_max"] = values.max() if n else math.nan
            row[f"{m}_n"] = n
        rows.append(row)
    return pd.DataFrame(rows)


def load_layers(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (ok run, normalisation layer) from the runs' ``diagnostics.layers`` lists.

    Columns: the run's ``norm``, ``batch_size``, ``seed``, ``run_dir`` and the layer's fields
    (``name``, ``class``, ``uses_batch_stats``, ``mean_gap``, ``log_std_gap``,
    ``batch_dependence``, clip fractions...), with ``depth`` = the layer's index in the model.
    """
    rows = []
    for _, run in ok_runs(df).iterrows():
        if not isinstance(run.get("run_dir"), str) or not run["run_dir"]:
            continue  # None, or NaN in a frame where only some rows have a run dir
        try:
            data = json.loads((Path(run["run_dir"]) / METRICS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        layers = (data.get("diagnostics") or {}).get("layers") or data.get("layers") or []
        for depth, layer in enumerate(layers):
            if not isinstance(layer, Mapping):
                continue
            row = {k: run.get(k) for k in ("norm", "batch_size", "seed", "run_dir")}
            row["depth"] = depth
            flat = flatten(layer, scalars_only=True)
            row.update({f"layer_{k}" if k in row else k: v for k, v in flat.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (no index), creating the parent dir; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out
