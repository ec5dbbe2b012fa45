"""Which rows are one measurement and which are separate series.

Two run dirs of the same job, or of the same config and seed (``norm=bn`` and ``norm=batchnorm``),
are one measurement: the better one is kept, the other ``superseded``. Runs of one layer, model and
data set that differ in another result-relevant key are separate series (``variant``), never
pooled as seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from normzoo.analysis.record import FINISHED_STATUSES

__all__ = ["superseded", "variants"]

#: config keys that are the axes of a report, not a difference between series
_AXIS_KEYS = frozenset({"seed", "data.batch_size", "norm.name", "model.name", "data.name"})


def superseded(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
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


def variants(df: pd.DataFrame) -> pd.Series:
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
