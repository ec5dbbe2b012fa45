"""The findings of a v2 study: at most a dozen sentences, each computed with its test stated.

Per model: BatchNorm's loss at the smallest normalisation batch (paired vs the largest, and the
trend over log2 normalisation batch), Batch Renorm's recovery (BRN vs BN at the smallest), PreciseBN
(its predictions vs the EMA's, and the inference panel's error against its sample count), batch
statistics at small test batches (panel rows), and the non-i.i.d. result (class-grouped against
i.i.d. batches for BN and for GN, BN's loss against GN's, BRN vs BN on grouped batches). Every p-value of the report's family is Holm-adjusted
together; a sentence's wording is :func:`~normzoo.analysis.significance.verdict`'s outcome with the
stated margin ("equivalent" only inside it), never written in advance.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normzoo.analysis.cells import MARGIN, iid
from normzoo.analysis.significance import (
    holm,
    paired_difference,
    paired_interaction,
    trend,
    verdict,
)
from normzoo.analysis.study import cell_correct, paired_cells
from normzoo.registry import display_name

__all__ = ["Test", "study_findings"]


@dataclass
class Test:
    """One test of the family: what it compares and its numbers; worded after Holm."""

    a: str
    b: str
    kind: str  # "paired" (error A - error B), "interaction" (A's change - B's), "trend" (per doubling)
    estimate: float
    lo95: float
    hi95: float
    lo90: float
    hi90: float
    p: float
    n: str
    p_holm: float = math.nan

    def sentence(self, margin: float) -> str:
        v = verdict(self.estimate, self.lo90, self.hi90, self.p_holm, margin)
        ci = f"{self.estimate:+.2f} points, 95% CI [{self.lo95:+.2f}, {self.hi95:+.2f}]"
        if self.kind == "trend":
            words = {
                "higher": "rises as it grows",
                "lower": "falls as it grows",
                "equivalent": f"is flat (slope within ±{margin:g} points per doubling)",
                "inconclusive": "shows no clear trend (not shown flat)",
            }[v]
            how = f"OLS slope per doubling, t-test over {self.n}"
            return f"{self.a}: error against {self.b} {words} ({ci}; {how}; Holm p = {self.p_holm:.2g})"
        words = {
            "higher": f"is higher than that of {self.b}",
            "lower": f"is lower than that of {self.b}",
            "equivalent": f"is equivalent to that of {self.b} within ±{margin:g} points",
            "inconclusive": f"shows no clear difference from that of {self.b} (not shown equivalent "
            f"within ±{margin:g} points)",
        }[v]
        how = f"paired bootstrap over {self.n}"
        if self.kind == "interaction":
            words = words.replace("that of ", "")
            return f"{self.a} {words} ({ci}; {how}; Holm p = {self.p_holm:.2g})"
        return f"the error of {self.a} {words} ({ci}; {how}; Holm p = {self.p_holm:.2g})"


def _name(norm: str, batch: float | None = None, note: str = "") -> str:
    base = display_name(norm)
    return base + (f"({int(batch)})" if batch is not None and not math.isnan(batch) else "") + note


def _paired(df, a: dict, b: dict, key_a="test_pred", key_b="test_pred") -> tuple | None:
    pair = paired_cells(cell_correct(df, a, key_a), cell_correct(df, b, key_b))
    if pair is None:
        return None
    d = paired_difference(*pair)
    n = f"{pair[0].shape[0]} seeds x {pair[0].shape[1]} test samples"
    return d, n


def _paired_test(df, a, b, name_a, name_b, key_a="test_pred", key_b="test_pred") -> Test | None:
    got = _paired(df, a, b, key_a, key_b)
    if got is None:
        return None
    d, n = got
    return Test(name_a, name_b, "paired", d.diff, d.lo95, d.hi95, d.lo90, d.hi90, d.p, n)


def _trend_test(name: str, axis: str, x: list, y: list) -> Test | None:
    if len(y) < 3 or len(set(x)) < 2:
        return None
    t = trend(np.asarray(x), np.asarray(y))
    return Test(name, axis, "trend", t.slope, t.lo95, t.hi95, t.lo90, t.hi90, t.p, f"{t.n} runs")


def _cell(sweep, model, norm, batch) -> dict:
    return {"sweep": sweep, "model": model, "norm": norm, "norm_batch": batch}


def _batches(runs: pd.DataFrame, model: str, norm: str) -> tuple[str, list[float]] | None:
    here = runs[(runs["model"] == model) & (runs["norm"] == norm) & (runs["status"] == "ok")]
    if here.empty:
        return None
    sweep = here.groupby("sweep")["norm_batch"].nunique().idxmax()
    return sweep, sorted(here.loc[here["sweep"] == sweep, "norm_batch"].dropna().unique())


def _run_errors(df, cell) -> tuple[list, list]:
    per_seed = cell_correct(df, cell)
    return [cell["norm_batch"]] * len(per_seed), [100 * (1 - c.mean()) for c in per_seed.values()]


def _panel(df: pd.DataFrame, cell: dict) -> list[dict]:
    """The inference-panel rows of the cell's ok runs (from their metrics.json)."""
    rows = []
    ok = df[(df["status"] == "ok") & df["run_dir"].notna()]
    for key, value in cell.items():
        ok = ok[ok[key] == value]
    for run_dir in ok["run_dir"]:
        try:
            data = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        panel = data.get("inference_panel") or (data.get("diagnostics") or {}).get(
            "inference_panel"
        )
        rows += [r for r in panel or [] if isinstance(r, dict)]
    return rows


def _panel_trend(df, cell, name, statistics, x_key, axis) -> Test | None:
    rows = [r for r in _panel(df, cell) if r.get("statistics") == statistics and x_key in r]
    x = [r[x_key] for r in rows]
    y = [100 * float(r["test_error"]) for r in rows]
    return _trend_test(name, axis, x, y)


def _model_tests(df: pd.DataFrame, model: str) -> list[tuple[str, list[Test]]]:
    runs = iid(df)
    out: list[tuple[str, list[Test]]] = []
    bn = _batches(runs, model, "batchnorm")
    if bn is None or len(bn[1]) < 2:
        return out
    sweep, batches = bn
    small, large = batches[0], batches[-1]
    c_small, c_large = (
        _cell(sweep, model, "batchnorm", small),
        _cell(sweep, model, "batchnorm", large),
    )
    x, y = [], []
    for b in batches:
        xs, ys = _run_errors(runs, _cell(sweep, model, "batchnorm", b))
        x, y = x + xs, y + ys
    tests = [
        _paired_test(runs, c_small, c_large, _name("batchnorm", small), _name("batchnorm", large)),
        _trend_test(f"{_name('batchnorm')} on {model}", "log2 normalisation batch", x, y),
    ]
    out.append(("BatchNorm at small normalisation batches", tests))
    c_brn = _cell(sweep, model, "batchrenorm", small)
    brn = _paired_test(runs, c_brn, c_small, _name("batchrenorm", small), _name("batchnorm", small))
    out.append(("Batch Renorm's recovery", [brn]))
    precise = _paired_test(
        runs, c_small, c_small, _name("batchnorm", small, " with PreciseBN"),
        _name("batchnorm", small, " with EMA statistics"), key_a="test_pred_precise",
    )  # fmt: skip
    samples = _panel_trend(
        runs, c_small, f"{_name('batchnorm', small)} with PreciseBN", "precise", "samples",
        "log2 PreciseBN samples",
    )  # fmt: skip
    out.append(("PreciseBN" + _precise_count(runs, c_small), [precise, samples]))
    test_batch = _panel_trend(
        runs, c_large, f"{_name('batchnorm', large)} with batch statistics", "batch",
        "test_batch_size", "log2 test batch",
    )  # fmt: skip
    out.append(("Batch statistics at small test batches", [test_batch]))
    out.append(("Non-i.i.d. batches", _noniid_tests(df, model, sweep)))
    return out


def _precise_count(df, cell) -> str:
    ok = df[(df["status"] == "ok") & (df["model"] == cell["model"]) & (df["norm"] == cell["norm"])]
    vals = pd.to_numeric(
        ok.get("precise_samples", pd.Series(dtype=float)), errors="coerce"
    ).dropna()
    return f" ({int(vals.min())} samples)" if not vals.empty else ""


def _noniid_tests(df: pd.DataFrame, model: str, iid_sweep: str) -> list[Test | None]:
    """Class-grouped batches: each of BatchNorm and GroupNorm against itself on i.i.d. batches (the
    loss from grouping), BatchNorm's loss against GroupNorm's (the part due to batch statistics:
    GroupNorm sees the same correlated gradients but no batch statistics), Batch Renorm vs BN."""
    non = df[
        (df["classes_per_batch"].fillna(0) > 0) & (df["model"] == model) & (df["status"] == "ok")
    ]
    if non.empty:
        return []
    sweep = non["sweep"].iloc[0]
    k = int(non["classes_per_batch"].iloc[0])
    runs = iid(df)

    def cell(norm: str) -> dict:
        b = non.loc[non["norm"] == norm, "norm_batch"]
        return _cell(sweep, model, norm, b.iloc[0] if not b.empty else math.nan)

    def iid_cell(norm: str, batch: float) -> dict:
        here = runs[(runs["model"] == model) & (runs["norm"] == norm) & (runs["status"] == "ok")]
        where = (
            iid_sweep
            if norm in ("batchnorm", "batchrenorm") or here.empty
            else here["sweep"].iloc[0]
        )
        return _cell(where, model, norm, batch)

    note, plain = f" with {k} classes per batch", " with i.i.d. batches"
    bn, gn, brn = cell("batchnorm"), cell("groupnorm"), cell("batchrenorm")
    iid_bn, iid_gn = iid_cell("batchnorm", bn["norm_batch"]), iid_cell("groupnorm", math.nan)
    bn_name, gn_name = _name("batchnorm", bn["norm_batch"]), _name("groupnorm")
    tests = [
        _paired_test(df, bn, iid_bn, bn_name + note, bn_name + plain),
        _paired_test(df, gn, iid_gn, gn_name + note, gn_name + plain),
        _interaction_test(df, (bn, iid_bn), (gn, iid_gn), bn_name, gn_name, k),
        _paired_test(df, brn, bn, _name("batchrenorm", brn["norm_batch"], note), bn_name + note),
    ]
    return tests


def _interaction_test(df, a: tuple, b: tuple, name_a: str, name_b: str, k: int) -> Test | None:
    cells = [cell_correct(df, c) for c in (*a, *b)]
    common = sorted(set.intersection(*(set(c) for c in cells)))
    if not common:
        return None
    arrays = [np.stack([c[s] for s in common]) for c in cells]
    if any(x.shape != arrays[0].shape for x in arrays):
        return None
    d = paired_interaction(*arrays)
    n = f"{arrays[0].shape[0]} seeds x {arrays[0].shape[1]} test samples"
    what = f"{name_a}'s increase from i.i.d. to {k} classes per batch"
    return Test(what, f"{name_b}'s", "interaction", d.diff, d.lo95, d.hi95, d.lo90, d.hi90, d.p, n)


def study_findings(df: pd.DataFrame, margin: float = MARGIN) -> tuple[list[str], list[Test]]:
    """(finding bullets, the tests behind them), Holm over every test of the report."""
    groups: list[tuple[str, str, list[Test]]] = []
    for model in sorted(df.loc[df["status"] == "ok", "model"].dropna().unique()):
        for title, tests in _model_tests(df, str(model)):
            kept = [t for t in tests if t is not None]
            if kept:
                groups.append((str(model), title, kept))
    family = [t for _, _, tests in groups for t in tests]
    if family:
        for t, p in zip(family, holm([t.p for t in family]), strict=True):
            t.p_holm = float(p)
    lines = []
    for model, title, tests in groups[:12]:
        body = "; ".join(t.sentence(margin) for t in tests)
        body = body[:1].upper() + body[1:]
        lines.append(f"**{title}, {model}.** {body}.")
    return lines, family
