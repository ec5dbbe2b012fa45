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

import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "FINISHED_STATUSES",
    "NEUTRAL_CONFIG_KEYS",
    "aggregate_seeds",
    "expected_jobs",
    "find_run_dirs",
    "load_layers",
    "load_sweep",
    "ok_runs",
    "write_csv",
]

METRICS_FILE = "metrics.json"
#: statuses written by a run that reached its end (successfully or not)
FINISHED_STATUSES = ("ok", "failed", "diverged", "invalid")
#: nested sections of metrics.json whose keys become plain column names
_HOISTED = ("config", "cfg", "metrics", "final", "result", "results", "diagnostics", "timing")
_FIRST_COLUMNS = ("norm", "batch_size", "seed", "status", "error")
#: config keys that never change a run's result (on top of ``normzoo.train.RESULT_NEUTRAL_KEYS``):
#: runs that differ only here are the same measurement. ``hydra.*`` keys are neutral too.
NEUTRAL_CONFIG_KEYS = frozenset(
    {
        "resume",
        "train.progress",
        "train.checkpoint",
        "report.out",
        "threads",
        "device",
        "data.root",
        "data.download",
        "study",
    }
)
#: config keys that are the axes of a report, not a difference between series
_AXIS_KEYS = frozenset({"seed", "data.batch_size", "norm.name", "model.name", "data.name"})
#: config groups chosen by a plain override (``norm=bn`` sets ``norm.name``)
_GROUPS = ("norm", "model", "data", "optim")


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


def _flatten(
    data: Mapping[str, Any], prefix: str = "", *, scalars_only: bool = True
) -> dict[str, Any]:
    """Nested dicts -> ``a.b`` keys; scalars kept, and lists and other objects dropped unless
    ``scalars_only=False`` (a config, where a model's widths matter)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + ".", scalars_only=scalars_only))
        elif not scalars_only or value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out


def _tidy(data: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level scalars, then hoisted sections (``config``, ``diagnostics``...), then the rest."""
    row: dict[str, Any] = {}
    nested: dict[str, Mapping[str, Any]] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            nested[key] = value
        elif value is None or isinstance(value, (bool, int, float, str)):
            row[key] = value
    for key in [k for k in _HOISTED if k in nested] + [k for k in nested if k not in _HOISTED]:
        for sub, value in _flatten(nested[key]).items():
            name = sub if key in _HOISTED and sub not in row else f"{key}.{sub}"
            row.setdefault(name, value)
    for col in list(row):  # a config group stored as {name: ...} also answers to its group name
        if col.endswith(".name") and "." not in col[: -len(".name")]:
            row.setdefault(col[: -len(".name")], row[col])
    return row


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@functools.lru_cache(maxsize=4096)
def _parse_override(text: str) -> tuple[str, Any, str]:
    """(key, typed value, canonical 'key=value') of one task override string."""
    try:
        override = _parser().parse_override(text)
        key = override.get_key_element()
        value_str = override.get_value_element_as_str()
        value = None if override.is_sweep_override() else override.value()
        name = override.key_or_group
        return name, value, f"{key}={value_str}"
    except Exception:  # not Hydra syntax: keep it verbatim
        key, _, value_str = text.partition("=")
        return key.lstrip("+~"), value_str, text


def _identity(overrides: Iterable[str]) -> str:
    """The job's identity: its canonical task overrides, sorted and joined."""
    return ",".join(sorted(_parse_override(o)[2] for o in overrides))


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
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        lines = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
        parsed = _parser().parse_overrides(lines)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # an unreadable sweep definition must not hide the runs that exist
        return None
    return [list(job) for batch in batches for job in batch]


def _job_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        value = _read_yaml(path)
    except Exception:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _override_columns(overrides: Sequence[str]) -> dict[str, Any]:
    """Config columns named by a job's overrides (``data.batch_size=2`` -> ``data.batch_size``
    and, where no plain override of that name exists, ``batch_size``), so a run that never wrote
    ``metrics.json`` can still be named in the report."""
    out: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    for text in overrides:
        key, value, _ = _parse_override(text)
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
        out["norm"] = _canonical_norm(out["norm"])
    for group in _GROUPS:  # a group choice names the group's config (for the settings table)
        if isinstance(out.get(group), str):
            out.setdefault(f"{group}.name", out[group])
    return out


def _canonical_norm(name: str) -> str:
    """The registry's canonical name for an override such as ``norm=bn`` (unknown names kept)."""
    try:
        from normzoo.registry import get_norm

        return get_norm(name).name
    except Exception:
        return name


@functools.lru_cache(maxsize=1)
def _neutral_keys() -> frozenset[str]:
    keys = set(NEUTRAL_CONFIG_KEYS)
    try:  # the trainer's own list, so that a key it learns to ignore is ignored here too
        from normzoo.train import RESULT_NEUTRAL_KEYS

        keys |= set(RESULT_NEUTRAL_KEYS)
    except Exception:  # pragma: no cover - the analysis must not need the trainer
        pass
    return frozenset(keys)


def run_config(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result-relevant config of one ``metrics.json`` record, without ``seed``: the flattened
    ``config`` section with the norm name resolved (``bn`` -> ``batchnorm``), the keys of
    :data:`NEUTRAL_CONFIG_KEYS` and ``hydra.*`` left out, and ``norm_options`` of other layers
    dropped. None when the record has no ``config`` section."""
    cfg = data.get("config")
    if not isinstance(cfg, Mapping):
        return None
    flat = _flatten(cfg, scalars_only=False)  # (lists kept: a model's widths matter)
    name = flat.get("norm.name", flat.get("norm", data.get("norm")))
    norm = _canonical_norm(str(name)) if name is not None else None
    for key in ("norm.name", "norm"):
        if isinstance(flat.get(key), str):
            flat[key] = norm
    neutral = _neutral_keys()
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in neutral or key == "seed" or key.startswith("hydra."):
            continue
        if key.startswith("norm_options."):
            parts = key.split(".")
            if len(parts) > 2 and _canonical_norm(parts[1]) != norm:
                continue  # another layer's options do not touch this run
        out[key] = json.loads(json.dumps(value, default=str))
    return out


def _config_id(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _read_run(run_dir: Path) -> dict[str, Any]:
    overrides = _job_overrides(run_dir)
    row: dict[str, Any] = {}
    path = run_dir / METRICS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"top level is a {type(data).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            row = {"status": "corrupt", "error": f"{METRICS_FILE} does not parse: {exc}"}
        else:
            row = _tidy(data)
            row["status"] = str(row.get("status") or "unknown")
            row.setdefault("error", None)
            config = run_config(data)
            row["_config"] = config
            row["config_id"] = _config_id(config) if config is not None else None
    else:
        # an atomic writer killed mid-write leaves its temp file (".metrics.json.<rand>.tmp")
        partial = sorted(p.name for p in run_dir.glob(f"*{METRICS_FILE}*"))
        note = f" (partial file(s): {', '.join(partial)})" if partial else ""
        row = {"status": "missing", "error": f"no {METRICS_FILE}: started, never finished{note}"}
    if overrides is not None:
        for key, value in _override_columns(overrides).items():
            row.setdefault(key, value)
        row["overrides"] = _identity(overrides)
    else:
        row["overrides"] = None
    row["run_dir"] = str(run_dir)
    row["_mtime"] = path.stat().st_mtime if path.is_file() else 0.0
    return row


def load_sweep(path: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run of the sweep at ``path`` (see the module docstring for the columns).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {str(root)!r} does not exist or is not a directory")
    rows = [_read_run(d) for d in find_run_dirs(root)]
    seen = {r["overrides"] for r in rows if r["overrides"] is not None}
    for job in expected_jobs(root) or []:
        ident = _identity(job)
        if ident in seen:
            continue
        seen.add(ident)
        row = _override_columns(job)
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
    df["superseded"], df["superseded_by"] = _superseded(df)
    df["variant"] = _variants(df)
    df = df.drop(columns=["_mtime", "_config"])
    first = [c for c in _FIRST_COLUMNS if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    sort = [c for c in ("norm", "batch_size", "seed") if c in df.columns]
    if sort:
        df = df.sort_values(sort, kind="stable", na_position="last")
    return df.reset_index(drop=True)


def _superseded(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(superseded, superseded_by): True for a row whose job (same overrides), or whose config and
    seed (same ``config_id`` and ``seed``), another run dir answers better (ok first, then the
    newest); ``superseded_by`` names that run dir and the reason."""
    rank = df["status"].map(lambda s: 0 if s == "ok" else 1 if s in FINISHED_STATUSES else 2)
    order = pd.DataFrame({"rank": rank, "mtime": -df["_mtime"]}, index=df.index)
    by = pd.Series(None, index=df.index, dtype=object)
    seed = df["seed"] if "seed" in df else pd.Series(None, index=df.index, dtype=object)
    config_key = pd.Series(
        [
            None if pd.isna(c) or s is None or pd.isna(s) else f"{c}/seed {s}"
            for c, s in zip(df["config_id"], seed.astype(object), strict=True)
        ],
        index=df.index,
        dtype=object,
    )
    for ident, reason in ((df["overrides"], "same job"), (config_key, "same config and seed")):
        live = ident.notna() & by.isna()
        for _, group in order[live].groupby(ident[live]):
            if len(group) < 2:
                continue
            best = group.sort_values(["rank", "mtime"], kind="stable").index[0]
            name = df.at[best, "run_dir"] or df.at[best, "overrides"]
            by[group.index.difference([best])] = f"{name} ({reason})"
    return by.notna(), by


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "unset" if value is _UNSET else str(value)


_UNSET = object()


def _variants(df: pd.DataFrame) -> pd.Series:
    """Per row: the result-relevant config keys (other than the batch size and the seed) on which
    the ok runs of its layer, model and data set differ, with this row's values; "" if none."""
    out = pd.Series("", index=df.index, dtype=object)
    base_cols = [c for c in ("norm", "model", "data") if c in df]
    if not base_cols:
        return out
    base = pd.Series(
        ["/".join(map(str, values)) for values in df[base_cols].astype(object).itertuples(False)],
        index=df.index,
    )
    has_config = df["_config"].map(lambda c: isinstance(c, Mapping))
    counted = has_config & df["status"].eq("ok") & ~df["superseded"]
    # a run without a recorded config (an older metrics.json) is not pooled with recorded ones
    norm = df["norm"].astype(object) if "norm" in df else base
    mixed = norm.isin(norm[counted]) & ~has_config & df["status"].isin(FINISHED_STATUSES)
    out[mixed] = "config not recorded"
    for key in base[has_config].unique():
        members = df.index[has_config & base.eq(key)]
        ok = [df.at[i, "_config"] for i in members if counted[i]]
        keys = sorted({k for cfg in ok for k in cfg} - _AXIS_KEYS)
        varying = [
            k
            for k in keys
            if len({json.dumps(cfg.get(k, "\0unset"), sort_keys=True) for cfg in ok}) > 1
        ]
        if not varying:
            continue
        leaves = [k.rsplit(".", 1)[-1] for k in varying]
        names = [
            leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(varying, leaves, strict=True)
        ]
        for i in members:
            cfg = df.at[i, "_config"]
            out[i] = ", ".join(
                f"{n}={_value_text(cfg.get(k, _UNSET))}"
                for n, k in zip(names, varying, strict=True)
            )
    return out


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
            row.update({f"layer_{k}" if k in row else k: v for k, v in _flatten(layer).items()})
            rows.append(row)
    return pd.DataFrame(rows)


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (no index), creating the parent dir; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out
