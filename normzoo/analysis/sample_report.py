"""The generic report's sections that rest on per-sample predictions (variants, sequence, dropout).

* :func:`normalisation_axis` -- a :func:`~normzoo.analysis.study.load_study` frame readied for the
  generic tables: ``batch_size`` becomes the normalisation batch (the ghost batch where one is set)
  for layers with batch statistics, and a ghost size no longer splits a layer into variants.
* :func:`sample_sections` -- the findings (the computed summary per family of tests, then every
  test with its interval and Holm-adjusted p), the error of every cell with its 95% bootstrap
  interval, the inference panel (EMA, PreciseBN, AdaBN on the test set and on a shifted view) and,
  with dropout, the variance shift at each batch-statistics layer. Writes ``findings_tests.csv``,
  ``cells.csv``, ``inference.csv``, ``variance_shift.csv``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from normzoo.analysis.cells import MARGIN
from normzoo.analysis.results import load_layers, write_csv
from normzoo.analysis.sample_claims import (
    DEPENDENCE_MARGIN,
    SHIFT_MARGIN,
    SampleTest,
    cell_name,
    cell_runs,
    cells_of,
    panel_rows,
    sample_findings,
    tests_frame,
)
from normzoo.analysis.significance import error_interval
from normzoo.analysis.study import cell_correct, stack
from normzoo.inference import SHIFT_CONTRAST, SHIFT_NOISE
from normzoo.markdown import frame_table, md_table
from normzoo.run.predictions import load_predictions

__all__ = ["normalisation_axis", "plotted_intervals", "sample_sections"]

_GHOST_VARIANT = re.compile(r"(^|, )ghost_batch_size=[^,]*")
_PANEL = {
    "EMA": ("ema", None),
    "PreciseBN": ("precise", 4096),
    "AdaBN (test set)": ("adabn", None),
    "EMA (shifted)": ("ema_shifted", None),
    "AdaBN (shifted)": ("adabn_shifted", None),
}


_AXIS = (
    "Batch sizes in this report are **normalisation batches**: the ghost batch inside the fixed "
    "SGD batch for layers with batch statistics (equal optimizer steps for every run); layers "
    "without batch statistics appear at the SGD batch. Every finding is a test on the per-sample "
    "test predictions, Holm-adjusted over the whole family below."
)


def normalisation_axis(study: pd.DataFrame) -> pd.DataFrame:
    """``batch_size`` := the normalisation batch of batch-statistics layers (see module)."""
    out = study.copy()
    nb = pd.to_numeric(out["norm_batch"], errors="coerce")
    out["sgd_batch_size"] = out["batch_size"]
    out["batch_size"] = nb.where(nb.notna(), out["batch_size"])
    if "variant" in out:
        cleaned = (
            out["variant"]
            .astype(object)
            .map(lambda v: _GHOST_VARIANT.sub("", v).strip(", ") if isinstance(v, str) else v)
        )
        out["variant"] = cleaned
    return out


def plotted_intervals(ok: pd.DataFrame) -> dict[tuple[str, int], tuple[float, float]]:
    """{(layer, batch size): 95% bootstrap interval of the error} over the ``prepare``d ok runs
    that kept predictions (the error bars of the degradation figure)."""
    out = {}
    for (layer, batch), runs in ok.groupby(["layer", "batch_size"]):
        per_seed = {}
        for _, run in runs.iterrows():
            pred = load_predictions(run["run_dir"]) if isinstance(run.get("run_dir"), str) else None
            if pred is not None and "test_pred" in pred:
                per_seed[int(run["seed"])] = pred["test_pred"] == pred["test_y"]
        if per_seed:
            iv = error_interval(stack(per_seed))
            out[(layer, int(batch))] = (iv.lo, iv.hi)
    return out


def _summary(tests: list[SampleTest]) -> list[str]:
    """One computed line per family: the clear outcomes by name, the rest counted."""
    lines = []
    for family in dict.fromkeys(t.family for t in tests):
        here = [t for t in tests if t.family == family]
        clear = [t for t in here if t.verdict not in ("inconclusive", "not shown below the margin")]
        parts = [
            f"{t.a}{'' if t.kind in ('below', 'shift') else ' vs ' + t.b}: **{t.verdict}** "
            f"({t.estimate:{'.3g' if t.kind in ('below', 'shift') else '+.3g'}} {t.unit}, "
            f"Holm p = {t.p_holm:.2g})"
            for t in clear
        ]
        rest = len(here) - len(clear)
        if rest:
            below = here[0].kind == "below"
            parts.append(
                f"{rest} not shown below the margin"
                if below
                else f"{rest} inconclusive (no clear difference, not shown equivalent)"
            )
        lines.append(f"- **{family}** ({len(here)} tests): " + "; ".join(parts) + ".")
    return lines


def _test_rows(tests: list[SampleTest]) -> list[list[str]]:
    def ci(t: SampleTest) -> str:
        return "" if math.isnan(t.lo95) else f"[{t.lo95:+.3g}, {t.hi95:+.3g}]"

    return [
        [t.family, t.a, t.b, t.kind, f"{t.estimate:+.3g}", ci(t), f"{t.p_holm:.2g}", t.verdict, t.n]
        for t in tests
    ]


def _rules() -> list[str]:
    return [
        "<details><summary>How claims are decided</summary>",
        "",
        "- One family per report: every p-value below is Holm-adjusted together (Holm 1979).",
        f"- **paired**: error(A) − error(B) in points, runs paired by seed on the same test samples; "
        f"paired bootstrap over seeds and test samples (95% CI). *higher/lower*: Holm p < 0.05; "
        f"*equivalent*: the 90% interval inside ±{MARGIN:g} points (TOST at 5%); else "
        "*inconclusive*.",
        "- **mcnemar**: AdaBN vs the EMA on the same view: exact McNemar test on the discordant "
        "samples pooled over seeds; the estimate is the mean error difference (points).",
        f"- **below**: batch dependence ~0 only through an equivalence test: one-sided t-test over "
        f"seeds that its mean is below {DEPENDENCE_MARGIN:g} (p = 0 when every run measures exactly "
        "0); *below the margin* when Holm p < 0.05.",
        "- **shift**: dropout's variance shift (mean over the model's BatchNorm layers) over that "
        "of the same model without dropout, per seed, against 1 (t-test over seeds); "
        f"*equivalent* to no shift inside 1 ± {SHIFT_MARGIN:g}.",
        "",
        "</details>",
        "",
    ]


def _cell_table(df: pd.DataFrame, out: Path) -> list[str]:
    rows = []
    for c in cells_of(df).to_dict("records"):
        per_seed = cell_correct(df, c)
        if not per_seed:
            continue
        iv = error_interval(stack(per_seed))
        rows.append(
            {
                "cell": cell_name(c),
                "seeds": len(per_seed),
                "error": iv.mean,
                "lo95": iv.lo,
                "hi95": iv.hi,
            }
        )
    if not rows:
        return []
    table = pd.DataFrame(rows)
    write_csv(table, out / "cells.csv")
    body = [
        [r["cell"], str(r["seeds"]), f"{r['error']:.2f} [{r['lo95']:.2f}, {r['hi95']:.2f}]"]
        for r in rows
    ]
    return [
        "## Test error of every cell",
        "",
        "Mean over seeds with its 95% two-level bootstrap interval (seeds, then test samples); "
        "EMA statistics (eval mode). CSV: `cells.csv`.",
        "",
        md_table(["cell", "seeds", "test error (%) [95% CI]"], body),
        "",
    ]


def _panel_table(df: pd.DataFrame, out: Path) -> list[str]:
    rows = []
    for c in cells_of(df).to_dict("records"):
        runs = cell_runs(df, c)
        row: dict = {"cell": cell_name(c)}
        for label, (statistics, samples) in _PANEL.items():
            errs = []
            for _, run in runs.iterrows():
                got = panel_rows(run, statistics)
                got = [r for r in got if samples is None or r.get("requested_samples") == samples]
                errs += [100 * got[-1]["test_error"]] if got else []
            row[label] = float(np.mean(errs)) if errs else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.drop(columns="cell").isna().all().all():
        return []
    write_csv(table, out / "inference.csv")
    return [
        "## Inference modes: EMA, PreciseBN, AdaBN",
        "",
        "Test error (%, mean over seeds) of each trained model with each source of statistics: "
        "the EMA of training; PreciseBN (population statistics of 4096 training samples in "
        "training-size batches; Wu & Johnson 2021, arXiv:2105.07576); AdaBN (Li et al. 2016, "
        "arXiv:1603.04779: the statistics re-estimated on the inputs being classified, in "
        "training-size batches). On the test set AdaBN measures what the training statistics miss "
        "on data of the same distribution; on the *shifted view* (the test set with its contrast "
        f"scaled by {SHIFT_CONTRAST:g} about the mean and Gaussian noise of {SHIFT_NOISE:g} pixel "
        "std added, seeded) it measures how much of a covariate shift's damage re-estimating the "
        "statistics undoes (Schneider et al. 2020, arXiv:2006.16971). Layers without running "
        "statistics have nothing to re-estimate (no PreciseBN/AdaBN entry). CSV: `inference.csv`.",
        "",
        frame_table(table.set_index("cell").round(2)),
        "",
    ]


def _shift_table(df: pd.DataFrame, runs: pd.DataFrame, out: Path) -> list[str]:
    layers = load_layers(df)
    if layers.empty or "variance_shift" not in layers:
        return []
    layers = layers[pd.to_numeric(layers["variance_shift"], errors="coerce").notna()]
    if layers.empty:
        return []
    labels = runs.drop_duplicates("run_dir").set_index("run_dir")["layer"]
    layers = layers.assign(
        layer=layers["run_dir"].map(labels), variance_shift=layers["variance_shift"].astype(float)
    )
    agg = layers.groupby(["layer", "depth", "name"])["variance_shift"].agg(["mean", "std", "count"])
    agg = agg.reset_index()
    write_csv(agg, out / "variance_shift.csv")
    wide = agg.assign(
        v=[f"{m:.3f} ± {s:.3f}" for m, s in zip(agg["mean"], agg["std"].fillna(0), strict=True)]
    )
    wide = wide.pivot(index="layer", columns="name", values="v").fillna("")
    wide.columns = [f"BN layer `{c}`" for c in wide.columns]
    return [
        "## Variance shift per BatchNorm layer",
        "",
        "Var_train / Var_eval of each BatchNorm layer's input over the test set (Li et al. 2019, "
        "arXiv:1801.05134; `normzoo.inference.variance_shift`): the whole model in train mode "
        "(dropout on, batch statistics) over eval mode; 1/(1 − p) is the prediction for dropout "
        "with rate p right before a layer on a zero-mean input (1/(1 − p) + p μ²/((1 − p) σ²) "
        "with mean μ, variance σ²); 1 = no shift. The p = 0 rows are the baseline: what train "
        "vs eval mode of the upstream BatchNorm layers alone does to a layer's input variance. "
        "Mean ± std over seeds. CSV: `variance_shift.csv`.",
        "",
        frame_table(wide),
        "",
    ]


def sample_sections(df: pd.DataFrame, runs: pd.DataFrame, out: Path) -> tuple[list[str], list[str]]:
    """(the findings section, the sections after the generic ones); see the module docstring.
    ``df``: the :func:`normalisation_axis` frame, ``runs``: its ``prepare``d form."""
    tests = sample_findings(df)
    write_csv(tests_frame(tests), out / "findings_tests.csv")
    findings = ["## Findings", "", _AXIS, "", *_summary(tests), "", *_rules()]
    findings += [
        "<details><summary>Every test of the family (CSV: `findings_tests.csv`)</summary>",
        "",
        md_table(
            ["family", "A", "B", "test", "estimate", "95% CI", "Holm p", "verdict", "n"],
            _test_rows(tests),
        ),
        "",
        "</details>",
        "",
    ]
    extra = [*_cell_table(df, out), *_panel_table(df, out), *_shift_table(df, runs, out)]
    return findings, extra
