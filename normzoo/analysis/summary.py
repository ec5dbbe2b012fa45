"""A ``load_sweep`` frame -> the report's per-run columns and seed aggregates per (layer, batch).

:func:`prepare` adds labels, errors in percent and paired per-run differences; :class:`SeedTable`
answers "the seed aggregate of metric m for layer l at batch b" as a :class:`~normzoo.analysis.
stats.Cell`, with the layers in a fixed family order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from normzoo.analysis import names
from normzoo.analysis.results import aggregate_seeds, ok_runs
from normzoo.analysis.stats import Cell
from normzoo.registry import display_name

__all__ = ["ERROR_COLUMNS", "METRICS", "SeedTable", "layer_order", "prepare", "summarise"]


ERROR_COLUMNS = {  # metrics.json (fraction) -> report column (percent)
    "test_error": "err_ema",
    "test_error_batch_stats": "err_batch",
    "test_error_precise": "err_precise",
    "train_error": "err_train",
}
_ORDER = (
    "batchnorm",
    "batchrenorm",
    "layernorm",
    "groupnorm",
    "instancenorm",
    "weightnorm",
    "none",
)


def _uses_batch_stats(norm: str, column: Any) -> bool | None:
    """The run's own record when it has one, else the registry's answer."""
    if isinstance(column, (bool, np.bool_)):
        return bool(column)
    return names.uses_batch_stats(norm)


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add the report's columns to a ``load_sweep`` frame.

    ``layer`` (display name; the model/data is appended when the sweep varies them, and the
    run's ``variant`` when runs of that layer differ in other settings, so that such runs are
    separate series and never pooled as seeds), ``norm_base``,
    ``batch_stats`` (bool), errors in percent (``err_ema``, ``err_batch``, ``err_precise``,
    ``err_train``) and per-run paired differences in points: ``ema_minus_precise``,
    ``ema_minus_batch``, ``gap_ema`` = |EMA - batch|, ``gap_precise`` = |PreciseBN - batch|,
    ``gap_narrowing`` = gap_ema - gap_precise.
    """
    df = df.copy()
    if "norm" not in df:
        df["norm"] = None
    df["norm"] = df["norm"].where(df["norm"].notna(), "unknown").astype(str)
    variants = [c for c in ("model", "data") if c in df and ok_runs(df)[c].nunique() > 1]
    label = df["norm"].map(display_name)
    for c in variants:
        label = label + " · " + df[c].astype(str)
    df["layer_base"] = label
    if "variant" in df:
        extra = df["variant"].astype(object).where(df["variant"].notna(), "").astype(str)
        label = label.where(extra.eq(""), label + " · " + extra)
    df["layer"] = label
    ok = ok_runs(df)
    if "config_id" in df and "batch_size" in df and not ok.empty:
        # a last guard: one series never holds two configs
        ids = ok["config_id"].astype(object).where(ok["config_id"].notna(), "none")
        n_ids = ids.groupby([ok["layer"], ok["batch_size"]]).transform("nunique")
        clash = ok.index[ok["layer"].isin(ok.loc[n_ids > 1, "layer"])]  # the whole series
        df.loc[clash, "layer"] = df.loc[clash, "layer"] + " · config " + ids[clash].str[:6]
    df["norm_base"] = df["norm"].map(names.family)
    flags = df["uses_batch_stats"] if "uses_batch_stats" in df else pd.Series(None, index=df.index)
    df["batch_stats"] = [
        _uses_batch_stats(n, f) for n, f in zip(df["norm"], flags.astype(object), strict=True)
    ]
    for src, dst in ERROR_COLUMNS.items():
        df[dst] = pd.to_numeric(df[src], errors="coerce") * 100 if src in df else np.nan
    if "test_error_ema" in df:  # the diagnostics' eval-mode error, taken on the same batches as
        # err_batch and err_precise (schema >= 2; before, it overwrote test_error itself)
        ema = pd.to_numeric(df["test_error_ema"], errors="coerce") * 100
        df["err_ema"] = ema.where(ema.notna(), df["err_ema"])
    df["ema_minus_precise"] = df["err_ema"] - df["err_precise"]
    df["ema_minus_batch"] = df["err_ema"] - df["err_batch"]
    df["gap_ema"] = (df["err_ema"] - df["err_batch"]).abs()
    df["gap_precise"] = (df["err_precise"] - df["err_batch"]).abs()
    df["gap_narrowing"] = df["gap_ema"] - df["gap_precise"]
    # a sweep run with diagnostics off, or an older schema: NaN columns, not a KeyError later
    for metric in METRICS:
        if metric not in df:
            df[metric] = np.nan
        else:
            df[metric] = pd.to_numeric(df[metric], errors="coerce")
    return df


METRICS = (
    "err_ema",
    "err_batch",
    "err_precise",
    "err_train",
    "ema_minus_precise",
    "ema_minus_batch",
    "gap_ema",
    "gap_precise",
    "gap_narrowing",
    "kl_batch_vs_ema",
    "batch_dependence",
    "batch_dependence_floor",
    "ema_mean_gap",
    "ema_log_std_gap",
    "brn_clip_r",
    "brn_clip_d",
    "wall_time_s",
)


def layer_order(layers: Sequence[str], df: pd.DataFrame) -> list[str]:
    first = df.drop_duplicates("layer").set_index("layer")["norm"]

    def key(layer: str) -> tuple[int, int, str]:
        norm = str(first.get(layer, layer))
        base = names.family(norm)
        rank = _ORDER.index(base) if base in _ORDER else len(_ORDER)
        return (rank, int(names.is_reference(norm)), layer)

    return sorted(dict.fromkeys(layers), key=key)


class SeedTable:
    """Seed aggregates indexed by (layer, batch size)."""

    def __init__(self, agg: pd.DataFrame, runs: pd.DataFrame) -> None:
        self.agg = agg.set_index(["layer", "batch_size"]) if not agg.empty else agg
        self.runs = runs
        self.layers = layer_order(list(agg["layer"]) if not agg.empty else [], runs)
        info = runs.drop_duplicates("layer").set_index("layer")
        self.norm = {layer: str(info.loc[layer, "norm"]) for layer in self.layers}
        self.batch_stats: dict[str, bool | None] = {
            layer: _flag(info.loc[layer, "batch_stats"]) for layer in self.layers
        }

    def batches(self, layer: str, metric: str = "err_ema") -> list[int]:
        if layer not in self.layers:
            return []
        sub = self.agg.loc[layer]
        return sorted(int(b) for b in sub.index if sub.loc[b, f"{metric}_n"] > 0)

    def cell(self, layer: str, batch: int, metric: str) -> Cell:
        try:
            row = self.agg.loc[(layer, batch)]
        except KeyError:
            return Cell(math.nan, math.nan, 0, math.nan, math.nan)
        return Cell(
            float(row[f"{metric}_mean"]),
            float(row[f"{metric}_std"]),
            int(row[f"{metric}_n"]),
            float(row[f"{metric}_min"]),
            float(row[f"{metric}_max"]),
        )


def _flag(value: Any) -> bool | None:
    """A bool, or None when unknown (NaN/None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed aggregates of every metric for a :func:`prepare` frame (which has all of them)."""
    return aggregate_seeds(runs, list(METRICS), by=("layer", "batch_size"))
