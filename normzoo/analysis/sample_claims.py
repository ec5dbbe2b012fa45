"""The findings of the generic report (variants, sequence, dropout studies) on per-sample predictions.

One family of tests per report, Holm-adjusted together (:func:`~normzoo.analysis.significance.holm`),
each worded by :func:`~normzoo.analysis.significance.verdict` with its stated margin:

* ``paired`` -- error(A) - error(B), runs paired by seed on the same test samples, paired bootstrap
  over seeds and samples (:func:`~normzoo.analysis.significance.paired_difference`): a layer at its
  smallest against its largest normalisation batch; every layer against BatchNorm at the same
  normalisation batch (a batch-free layer against BatchNorm's smallest and largest); PreciseBN's
  predictions against the EMA's; in the dropout study, dropout before against after the norm and
  each dropout rate against none.
* ``mcnemar`` -- AdaBN against the EMA on the same view (the test set, and its shifted view): the
  exact McNemar test on the discordant samples pooled over seeds (the inference panel's counts).
* ``below`` -- an equivalence test that a per-run measurement (batch dependence) is ~0: one-sided
  t-test over seeds of mean < margin (TOST's upper half; p = 0 when every run measures exactly 0).
* ``shift`` -- dropout's variance shift (mean over a model's batch-statistics layers) over that of
  the same model without dropout, paired by seed, against 1: two-sided t-test over seeds;
  "equivalent" when its 90% interval is inside 1 +- the margin.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st

from normzoo.analysis.cells import MARGIN
from normzoo.analysis.results import ok_runs
from normzoo.analysis.significance import holm, paired_difference, verdict
from normzoo.analysis.study import cell_correct, paired_cells
from normzoo.registry import display_name
from normzoo.run.record import METRICS_FILE

__all__ = [
    "DEPENDENCE_MARGIN",
    "MARGIN",
    "SHIFT_MARGIN",
    "SampleTest",
    "cell_name",
    "cell_runs",
    "cells_of",
    "panel_rows",
    "sample_findings",
    "tests_frame",
]

#: batch dependence (relative change of the logits) below this counts as none
DEPENDENCE_MARGIN = 0.01
#: a variance shift within 1 +- this counts as none (5% of the variance)
SHIFT_MARGIN = 0.05
_DROPOUT = ("model.dropout", "model.dropout_position")


@dataclass
class SampleTest:
    """One test of the family; ``verdict`` is set after Holm."""

    family: str
    a: str
    b: str
    kind: str  # paired | mcnemar | below | shift
    estimate: float
    lo95: float
    hi95: float
    lo90: float
    hi90: float
    p: float
    n: str
    unit: str = "points"
    p_holm: float = math.nan
    verdict: str = ""


def cells_of(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm, normalisation batch[, dropout settings where they vary]) of the ok runs."""
    ok = ok_runs(df)
    varied = [c for c in _DROPOUT if c in ok and ok[c].nunique() > 1]
    keys = ["norm", "norm_batch", *([c for c in _DROPOUT if c in ok] if varied else [])]
    return ok[keys].drop_duplicates().sort_values(keys).reset_index(drop=True)


def cell_name(cell: dict[str, Any]) -> str:
    name = display_name(str(cell["norm"]))
    batch = cell.get("norm_batch")
    if batch is not None and not (isinstance(batch, float) and math.isnan(batch)):
        name += f" (norm. batch {int(batch)})"
    if "model.dropout" in cell:
        name += f" · dropout {cell['model.dropout']:g} {cell.get('model.dropout_position', '')}"
    return name


def _paired(
    df: pd.DataFrame,
    family: str,
    a: dict,
    b: dict,
    key_a: str = "test_pred",
    key_b: str = "test_pred",
) -> SampleTest | None:
    pair = paired_cells(cell_correct(df, a, key_a), cell_correct(df, b, key_b))
    if pair is None:
        return None
    d = paired_difference(*pair)
    name_a = cell_name(a) + (
        "" if key_a == "test_pred" else f" [{key_a.removeprefix('test_pred_')}]"
    )
    name_b = cell_name(b) + (
        "" if key_b == "test_pred" else f" [{key_b.removeprefix('test_pred_')}]"
    )
    n = f"{pair[0].shape[0]} seeds x {pair[0].shape[1]} test samples"
    return SampleTest(
        family, name_a, name_b, "paired", d.diff, d.lo95, d.hi95, d.lo90, d.hi90, d.p, n
    )


def cell_runs(df: pd.DataFrame, cell: dict) -> pd.DataFrame:
    ok = ok_runs(df)
    mask = pd.Series(True, index=ok.index)
    for key, value in cell.items():
        mask &= (
            ok[key].isna() if isinstance(value, float) and math.isnan(value) else ok[key] == value
        )
    return ok[mask]


def panel_rows(run: pd.Series, statistics: str) -> list[dict]:
    """The run's inference-panel rows of ``statistics`` (from its metrics.json)."""
    try:
        data = json.loads((Path(run["run_dir"]) / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        return []
    panel = data.get("inference_panel") or []
    return [r for r in panel if isinstance(r, dict) and r.get("statistics") == statistics]


def _adabn(df: pd.DataFrame, cell: dict, suffix: str) -> SampleTest | None:
    """AdaBN vs the EMA on one view: McNemar pooled over seeds, effect = mean error difference."""
    ema_only = ada_only = 0
    diffs = []
    for _, run in cell_runs(df, cell).iterrows():
        ada, ema = panel_rows(run, "adabn" + suffix), panel_rows(run, "ema" + suffix)
        if len(ada) != 1 or len(ema) != 1:
            continue
        ema_only += int(ada[0]["ema_wrong_only"])
        ada_only += int(ada[0]["adabn_wrong_only"])
        diffs.append(100.0 * (ada[0]["test_error"] - ema[0]["test_error"]))
    if not diffs:
        return None
    n = ema_only + ada_only
    p = 1.0 if n == 0 else float(_st.binomtest(ada_only, n, 0.5).pvalue)
    view = "the shifted test view" if suffix else "the test set"
    nan = math.nan
    how = (
        f"{len(diffs)} seeds; discordant samples: {ada_only} only AdaBN wrong, {ema_only} only EMA"
    )
    return SampleTest(
        "AdaBN", f"{cell_name(cell)} with AdaBN on {view}", f"the EMA on {view}", "mcnemar",
        float(np.mean(diffs)), nan, nan, nan, nan, p, how,
    )  # fmt: skip


def _intervals(v: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """mean, its 95% and 90% t-intervals over runs, and the standard error (0: no spread)."""
    m = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    if se == 0.0:
        return m, m, m, m, m, 0.0
    t95, t90 = _st.t.ppf(0.975, len(v) - 1), _st.t.ppf(0.95, len(v) - 1)
    return m, m - t95 * se, m + t95 * se, m - t90 * se, m + t90 * se, se


def _values(df: pd.DataFrame, cell: dict, column: str) -> np.ndarray:
    runs = cell_runs(df, cell)
    if column not in runs:
        return np.array([])
    return pd.to_numeric(runs[column], errors="coerce").dropna().to_numpy(float)


def _below(df: pd.DataFrame, cell: dict) -> SampleTest | None:
    """Batch dependence ~0: one-sided t-test over seeds that its mean is below the margin."""
    v = _values(df, cell, "batch_dependence")
    if not len(v):
        return None
    m, lo95, hi95, lo90, hi90, se = _intervals(v)
    if se == 0.0:  # every run measures the same (exactly 0 for a batch-free layer)
        p = 0.0 if m < DEPENDENCE_MARGIN else 1.0
    else:
        p = float(_st.t.cdf((m - DEPENDENCE_MARGIN) / se, len(v) - 1))
    return SampleTest(
        "batch dependence", cell_name(cell), f"{DEPENDENCE_MARGIN:g}", "below", m, lo95, hi95,
        lo90, hi90, p, f"{len(v)} runs", unit="relative change of the logits",
    )  # fmt: skip


def _by_seed(df: pd.DataFrame, cell: dict, column: str) -> dict[int, float]:
    runs = cell_runs(df, cell)
    if column not in runs:
        return {}
    values = pd.to_numeric(runs[column], errors="coerce")
    return {
        int(s): float(v) for s, v in zip(runs["seed"], values, strict=True) if not math.isnan(v)
    }


def _shift(df: pd.DataFrame, cell: dict) -> SampleTest | None:
    """Dropout's variance shift relative to the same model without dropout (whose upstream
    BatchNorms alone move a deeper layer's variance between modes): per seed
    shift(p) / shift(p = 0), two-sided t-test of its mean against 1 over seeds."""
    with_p = _by_seed(df, cell, "variance_shift_mean")
    without = _by_seed(df, {**cell, "model.dropout": 0.0}, "variance_shift_mean")
    seeds = sorted(set(with_p) & set(without))
    if not seeds:
        return None
    v = np.array([with_p[s] / without[s] for s in seeds])
    m, lo95, hi95, lo90, hi90, se = _intervals(v)
    p = (
        (1.0 if m == 1.0 else 0.0)
        if se == 0.0
        else float(2 * _st.t.sf(abs(m - 1) / se, len(v) - 1))
    )
    return SampleTest(
        "variance shift", cell_name(cell), "no dropout (ratio 1)", "shift", m, lo95, hi95, lo90,
        hi90, p, f"{len(v)} seeds, paired", unit="x the shift without dropout",
    )  # fmt: skip


def _batches(cells: pd.DataFrame, norm: str) -> list[float]:
    return sorted(b for b in cells.loc[cells["norm"] == norm, "norm_batch"] if not math.isnan(b))


def _batch_tests(df: pd.DataFrame, cells: pd.DataFrame) -> list[SampleTest | None]:
    """Normalisation batch, layers vs BatchNorm, PreciseBN, AdaBN, batch dependence."""
    out: list[SampleTest | None] = []
    bn = _batches(cells, "batchnorm")
    for c in cells.to_dict("records"):
        b, norm = c["norm_batch"], c["norm"]
        batches = _batches(cells, norm)
        if not math.isnan(b) and len(batches) > 1 and b == batches[0]:
            out.append(_paired(df, "normalisation batch", c, {**c, "norm_batch": batches[-1]}))
        if norm != "batchnorm" and bn:
            refs = [b] if b in bn else sorted({bn[0], bn[-1]})
            out += [
                _paired(df, "vs BatchNorm", c, {**c, "norm": "batchnorm", "norm_batch": r})
                for r in refs
            ]
        if not math.isnan(b) and (b == batches[0] or b == batches[-1]):
            out.append(_paired(df, "PreciseBN", c, c, "test_pred_precise", "test_pred"))
            out += [_adabn(df, c, ""), _adabn(df, c, "_shifted")]
        out.append(_below(df, c))
    return out


def _dropout_tests(df: pd.DataFrame, cells: pd.DataFrame) -> list[SampleTest | None]:
    """Dropout before vs after the norm, each rate vs none, PreciseBN, the variance shift."""
    out: list[SampleTest | None] = []
    for c in cells.to_dict("records"):
        p, where = float(c["model.dropout"]), c["model.dropout_position"]
        if p == 0:
            continue
        if where == "before_norm":
            out.append(
                _paired(df, "dropout position", c, {**c, "model.dropout_position": "after_norm"})
            )
        out.append(_paired(df, "dropout rate", c, {**c, "model.dropout": 0.0}))
        if not math.isnan(c["norm_batch"]):
            out.append(_paired(df, "PreciseBN", c, c, "test_pred_precise", "test_pred"))
            out.append(_shift(df, c))
    return out


def _word(t: SampleTest, alpha: float = 0.05) -> str:
    if t.kind == "below":
        return "below the margin" if t.p_holm < alpha else "not shown below the margin"
    if t.kind == "mcnemar":
        return ("higher" if t.estimate > 0 else "lower") if t.p_holm < alpha else "inconclusive"
    margin = SHIFT_MARGIN if t.kind == "shift" else MARGIN
    centre = 1.0 if t.kind == "shift" else 0.0
    return verdict(t.estimate - centre, t.lo90 - centre, t.hi90 - centre, t.p_holm, margin, alpha)


def sample_findings(df: pd.DataFrame) -> list[SampleTest]:
    """Every test of the report's family (see the module docstring), Holm-adjusted and worded.
    ``df``: a :func:`~normzoo.analysis.study.load_study` frame."""
    cells = cells_of(df)
    if cells.empty:
        return []
    dropout = all(c in cells for c in _DROPOUT) and cells["model.dropout"].nunique() > 1
    tests = [t for t in (_dropout_tests if dropout else _batch_tests)(df, cells) if t is not None]
    for t, p in zip(tests, holm([t.p for t in tests]) if tests else [], strict=True):
        t.p_holm = float(p)
        t.verdict = _word(t)
    return tests


def tests_frame(tests: list[SampleTest]) -> pd.DataFrame:
    """The family as a table (``findings_tests.csv``)."""
    return pd.DataFrame([asdict(t) for t in tests])
