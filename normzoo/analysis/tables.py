"""The report's tables: frames for the CSVs and for the markdown (written by
:func:`normzoo.markdown.frame_table`)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from normzoo.analysis.record import FINISHED_STATUSES
from normzoo.analysis.results import load_layers
from normzoo.analysis.summary import SeedTable
from normzoo.analysis.wording import pm

__all__ = [
    "degradation_tables",
    "layer_gap_table",
    "mismatch_md",
    "mismatch_table",
    "problems_table",
    "settings_table",
]


def degradation_tables(t: SeedTable) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long CSV frame, error table, degradation table) for the markdown."""
    rows, err_md, deg_md = [], {}, {}
    for layer in t.layers:
        bs = t.batches(layer)
        if not bs:
            continue
        ref = t.cell(layer, bs[-1], "err_ema")
        err_md[layer], deg_md[layer] = {}, {}
        for b in bs:
            c = t.cell(layer, b, "err_ema")
            points = c.mean - ref.mean
            ratio = c.mean / ref.mean if ref.mean > 0 else math.nan
            rows.append(
                {
                    "layer": layer,
                    "norm": t.norm[layer],
                    "batch_size": b,
                    "error_mean_pct": c.mean,
                    "error_std_pct": c.std,
                    "error_min_pct": c.lo,
                    "error_max_pct": c.hi,
                    "n_seeds": c.n,
                    "reference_batch_size": bs[-1],
                    "degradation_points": points,
                    "degradation_ratio": ratio,
                }
            )
            err_md[layer][b] = pm(c)
            deg_md[layer][b] = f"{points:+.1f} ({ratio:.2f}×)" if b != bs[-1] else "ref."
    # columns in batch order, whichever layer lists a batch first
    err = pd.DataFrame(err_md).T.sort_index(axis=1)
    deg = pd.DataFrame(deg_md).T.sort_index(axis=1)
    for frame in (err, deg):
        frame.columns = [f"B={b}" for b in frame.columns]
        frame.index.name = "layer"
    return pd.DataFrame(rows), err.fillna(""), deg.fillna("")


def mismatch_table(t: SeedTable) -> pd.DataFrame:
    rows = []
    for layer in t.layers:
        for b in t.batches(layer):
            row: dict[str, Any] = {"layer": layer, "norm": t.norm[layer], "batch_size": b}
            for metric in (
                "err_ema",
                "err_batch",
                "err_precise",
                "ema_minus_precise",
                "gap_ema",
                "gap_precise",
                "kl_batch_vs_ema",
                "batch_dependence",
                "batch_dependence_floor",
                "ema_mean_gap",
                "ema_log_std_gap",
                "brn_clip_r",
                "brn_clip_d",
            ):
                c = t.cell(layer, b, metric)
                row[f"{metric}_mean"], row[f"{metric}_std"] = c.mean, c.std
            row["n_seeds"] = t.cell(layer, b, "err_ema").n
            rows.append(row)
    return pd.DataFrame(rows)


def mismatch_md(t: SeedTable) -> pd.DataFrame:
    data = {}
    for layer in t.layers:
        bs = t.batches(layer)
        if not bs:
            continue
        for b in (bs[0], bs[-1]) if len(bs) > 1 else (bs[0],):
            data[(layer, b)] = {
                "EMA error (%)": pm(t.cell(layer, b, "err_ema")),
                "batch-stat error (%)": pm(t.cell(layer, b, "err_batch")),
                "PreciseBN error (%)": pm(t.cell(layer, b, "err_precise")),
                "KL(batch ‖ EMA) (nats)": pm(t.cell(layer, b, "kl_batch_vs_ema"), 3),
                "batch dependence": pm(t.cell(layer, b, "batch_dependence"), 3),
                "|Δμ|/σ": pm(t.cell(layer, b, "ema_mean_gap"), 3),
                "|log σ ratio|": pm(t.cell(layer, b, "ema_log_std_gap"), 3),
            }
    frame = pd.DataFrame(data).T
    frame.index.names = ["layer", "batch size"]
    return frame


def layer_gap_table(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    layers = load_layers(df)
    if layers.empty or "mean_gap" not in layers:
        return pd.DataFrame()
    layers = layers[layers["mean_gap"].notna()]
    if layers.empty:
        return pd.DataFrame()
    with_dir = runs[runs["run_dir"].notna()].drop_duplicates("run_dir")
    labels = with_dir.set_index("run_dir")["layer"]
    layers = layers.assign(layer=layers["run_dir"].map(labels))
    cols = [c for c in ("mean_gap", "log_std_gap", "batch_dependence") if c in layers]
    keys = ["layer", "batch_size", "depth", "name"]
    agg = layers.groupby(keys)[cols].agg(["mean", "std", "count"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    return agg.reset_index()


def settings_table(df: pd.DataFrame) -> pd.DataFrame:
    """Config values shared by every run of the sweep, not only the ok ones: a run that failed,
    is invalid or never finished counts wherever it records (or its overrides set) the key.
    Superseded runs are left out; a key that a finished run lacks is not shared."""
    plain = ("model", "data", "epochs", "optimizer", "base_lr", "threads", "precise_samples")
    if "superseded" in df:
        df = df[~df["superseded"].fillna(False).astype(bool)]
    finished = df["status"].isin(FINISHED_STATUSES) if "status" in df else df.index.notna()
    cols = [
        c
        for c in df.columns
        if c in plain
        or ("." in c and not c.startswith(("versions.", "config.")) and c != "superseded_by")
    ]
    rows = []
    for c in cols:
        if df.loc[finished, c].isna().any() or df[c].notna().sum() == 0:
            continue  # set for some runs only (a layer's own option)
        vals = df[c].dropna().astype(str).unique()
        if len(vals) == 1:
            rows.append({"setting": c, "value": vals[0]})
    return pd.DataFrame(rows)


def _distinct(df: pd.DataFrame, col: str) -> int:
    """Number of distinct non-empty values of ``col`` (0 when it is absent)."""
    if col not in df:
        return 0
    vals = df[col].dropna().astype(str)
    return int(vals[vals.ne("")].nunique())


def problems_table(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that is not ``ok`` or is superseded, with its reason; model/data columns
    whenever the sweep varies them (as the layer labels do), and variant."""
    problems = runs[runs["status"].ne("ok") | runs.get("superseded", False)]
    varied = [c for c in ("model", "data", "variant") if _distinct(df, c) > int(c != "variant")]
    prob_cols = [
        c for c in ("norm", *varied, "batch_size", "seed", "status", "error", "run_dir") if c in df
    ]
    prob = df.loc[problems.index, prob_cols].copy()
    for col in ("batch_size", "seed"):
        if col in prob:
            prob[col] = pd.to_numeric(prob[col], errors="coerce").astype("Int64")
    if "superseded" in problems:
        prob["superseded"] = problems["superseded"]
    if "superseded_by" in df and df.loc[problems.index, "superseded_by"].notna().any():
        prob["superseded_by"] = df.loc[problems.index, "superseded_by"]
    return prob
