"""One run dir -> one row: its ``metrics.json`` read, flattened and tidied; its result-relevant config.

A record that does not parse is a ``corrupt`` row and a run dir without one a ``missing`` row, never
an exception: a report must describe a broken sweep, not fail on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normzoo.analysis.jobs import job_identity, job_overrides, override_columns
from normzoo.analysis.names import canonical
from normzoo.config.flat import flatten
from normzoo.config.identity import SERIES_NEUTRAL_KEYS

__all__ = ["FINISHED_STATUSES", "METRICS_FILE", "NEUTRAL_CONFIG_KEYS", "read_run", "run_config"]

METRICS_FILE = "metrics.json"
#: statuses written by a run that reached its end (successfully or not)
FINISHED_STATUSES = ("ok", "failed", "diverged", "invalid")
#: nested sections of metrics.json whose keys become plain column names
_HOISTED = ("config", "cfg", "metrics", "final", "result", "results", "diagnostics", "timing")
#: config keys that never change a run's result: runs that differ only here are the same
#: measurement (the one declaration, in normzoo.config.identity). ``hydra.*`` keys are neutral too.
NEUTRAL_CONFIG_KEYS = SERIES_NEUTRAL_KEYS


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
        for sub, value in flatten(nested[key], scalars_only=True).items():
            name = sub if key in _HOISTED and sub not in row else f"{key}.{sub}"
            row.setdefault(name, value)
    for col in list(row):  # a config group stored as {name: ...} also answers to its group name
        if col.endswith(".name") and "." not in col[: -len(".name")]:
            row.setdefault(col[: -len(".name")], row[col])
    return row


def run_config(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result-relevant config of one ``metrics.json`` record, without ``seed``: the flattened
    ``config`` section with the norm name resolved (``bn`` -> ``batchnorm``), the keys of
    :data:`NEUTRAL_CONFIG_KEYS` and ``hydra.*`` left out, and ``norm_options`` of other layers
    dropped. None when the record has no ``config`` section."""
    cfg = data.get("config")
    if not isinstance(cfg, Mapping):
        return None
    flat = flatten(cfg, keep_empty=False)  # (lists kept: a model's widths matter)
    name = flat.get("norm.name", flat.get("norm", data.get("norm")))
    norm = canonical(str(name)) if name is not None else None
    for key in ("norm.name", "norm"):
        if isinstance(flat.get(key), str):
            flat[key] = norm
    neutral = SERIES_NEUTRAL_KEYS
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in neutral or key == "seed" or key.startswith("hydra."):
            continue
        if key.startswith("norm_options."):
            parts = key.split(".")
            if len(parts) > 2 and canonical(parts[1]) != norm:
                continue  # another layer's options do not touch this run
        out[key] = json.loads(json.dumps(value, default=str))
    return out


def _config_id(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def read_run(run_dir: Path) -> dict[str, Any]:
    overrides = job_overrides(run_dir)
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
        for key, value in override_columns(overrides).items():
            row.setdefault(key, value)
        row["overrides"] = job_identity(overrides)
    else:
        row["overrides"] = None
    row["run_dir"] = str(run_dir)
    row["_mtime"] = path.stat().st_mtime if path.is_file() else 0.0
    return row
