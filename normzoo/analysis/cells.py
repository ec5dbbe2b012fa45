"""Per-cell errors with intervals, and the recommendation table, of a v2 study frame.

* :func:`cell_table` -- one row per cell (sweep, model, layer, normalisation batch): seeds, test
  samples, mean error and its 95% interval (:func:`~normzoo.analysis.significance.error_interval`
  over seeds x test samples).
* :func:`recommendations` -- per model and normalisation batch of the i.i.d. sweeps, the layer with
  the lowest error and each other candidate's paired difference to it (layers without batch
  statistics are candidates at every normalisation batch: they have none). Each difference is
  decided by :func:`~normzoo.analysis.significance.verdict` with the stated margin, Holm-adjusted
  over the whole table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normzoo.analysis.significance import error_interval, holm, paired_difference, verdict
from normzoo.analysis.study import CELL_KEYS, cell_correct, paired_cells, stack
from normzoo.registry import display_name

__all__ = ["MARGIN", "cell_table", "iid", "recommendation_lines", "recommendations"]

#: equivalence margin (points of test error) of "no clear difference" in the table and findings
MARGIN = 0.5


def iid(df: pd.DataFrame) -> pd.DataFrame:
    """Runs with i.i.d. batches (``classes_per_batch == 0``)."""
    return df[df["classes_per_batch"].fillna(0) == 0]


def _cells(df: pd.DataFrame) -> list[dict]:
    ok = df[df["status"] == "ok"]
    keys = ok[list(CELL_KEYS)].drop_duplicates()
    return [dict(zip(CELL_KEYS, row, strict=True)) for row in keys.itertuples(index=False)]


def cell_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with predictions: error (%) mean, lo95, hi95, seeds, samples."""
    rows = []
    for cell in _cells(df):
        per_seed = cell_correct(df, cell)
        if not per_seed:
            continue
        correct = stack(per_seed)
        ci = error_interval(correct)
        rows.append(
            {
                **cell,
                "layer": display_name(cell["norm"]),
                "classes_per_batch": _classes(df, cell),
                "seeds": correct.shape[0],
                "samples": correct.shape[1],
                "error": ci.mean,
                "lo95": ci.lo,
                "hi95": ci.hi,
            }
        )
    cols = [*CELL_KEYS, "layer", "classes_per_batch", "seeds", "samples", "error", "lo95", "hi95"]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["sweep", "model", "norm", "norm_batch"], na_position="first")


def _classes(df: pd.DataFrame, cell: dict) -> float:
    here = df[(df["sweep"] == cell["sweep"]) & (df["model"] == cell["model"])]
    return float(here.loc[here["norm"] == cell["norm"], "classes_per_batch"].max())


def _candidates(cells: pd.DataFrame, model: str, batch: float) -> pd.DataFrame:
    here = cells[cells["model"] == model]
    return here[(here["norm_batch"] == batch) | here["norm_batch"].isna()]


def recommendations(df: pd.DataFrame, margin: float = MARGIN) -> pd.DataFrame:
    """Per (model, normalisation batch): best layer and every other's paired difference to it."""
    runs = iid(df)
    cells = cell_table(runs)
    rows = []
    for model in sorted(cells["model"].unique()):
        batches = sorted(cells.loc[cells["model"] == model, "norm_batch"].dropna().unique())
        for batch in batches:
            cand = _candidates(cells, model, batch).sort_values("error")
            if cand.empty:
                continue
            best = cand.iloc[0]
            best_correct = cell_correct(runs, _key(best))
            for _, other in cand.iloc[1:].iterrows():
                pair = paired_cells(cell_correct(runs, _key(other)), best_correct)
                if pair is None:
                    continue
                d = paired_difference(*pair)
                rows.append(_row(model, batch, best, other, d, pair[0].shape[0]))
            if len(cand) == 1:
                rows.append({"model": model, "norm_batch": batch, "best": best["layer"]})
    out = pd.DataFrame(rows)
    if out.empty or "p" not in out:
        return out
    has_p = out["p"].notna()
    out.loc[has_p, "p_holm"] = holm(out.loc[has_p, "p"].to_numpy())
    out["verdict"] = [
        verdict(r.diff, r.lo90, r.hi90, r.p_holm, margin) if not math.isnan(r.p) else None
        for r in out.itertuples()
    ]
    return out


def _key(row: pd.Series) -> dict:
    return {k: row[k] for k in CELL_KEYS}


def _row(model, batch, best, other, d, seeds: int) -> dict:
    return {
        "model": model,
        "norm_batch": int(batch),
        "best": best["layer"],
        "best_error": best["error"],
        "other": other["layer"],
        "other_error": other["error"],
        "diff": d.diff,
        "lo95": d.lo95,
        "hi95": d.hi95,
        "lo90": d.lo90,
        "hi90": d.hi90,
        "p": d.p,
        "seeds": seeds,
    }


def recommendation_lines(rec: pd.DataFrame, margin: float = MARGIN) -> pd.DataFrame:
    """The table a reader sees: model, normalisation batch, use, no clear difference, worse."""
    rows = []
    if rec.empty:
        return pd.DataFrame(columns=["model", "norm. batch", "use", "no clear difference", "worse"])
    for (model, batch), group in rec.groupby(["model", "norm_batch"], sort=True):
        best = group["best"].iloc[0]
        err = group["best_error"].iloc[0] if "best_error" in group else np.nan
        verdicts = group.get("verdict", pd.Series(dtype=object))
        same = group.loc[verdicts == "equivalent", "other"].tolist()
        unsure = group.loc[verdicts.isin(["inconclusive", "lower"]), "other"].tolist()
        worse = [
            f"{o} (+{d:.1f})"
            for o, d in zip(
                group.loc[verdicts == "higher", "other"],
                group.loc[verdicts == "higher", "diff"],
                strict=True,
            )
        ]
        tie = [*(f"{s} (equivalent, ±{margin:g})" for s in same), *unsure]
        rows.append(
            {
                "model": model,
                "norm. batch": int(batch),
                "use": f"{best} ({err:.1f}%)" if not math.isnan(err) else best,
                "no clear difference": ", ".join(tie) or "-",
                "worse": ", ".join(worse) or "-",
            }
        )
    return pd.DataFrame(rows)
