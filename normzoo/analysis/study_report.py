"""The v2 study report: the answer first (headline figure, recommendation table, findings), the
rest in ``<details>`` blocks (per-cell tables, mismatch, failures and missing runs, provenance).

Written for a study whose runs keep per-sample predictions (``predictions.npz``); sweeps without
them get the older fixed-epoch report (:mod:`normzoo.analysis.report`). Paths in the written files
are relative to the study dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from normzoo.analysis.cells import MARGIN, cell_table, iid, recommendation_lines, recommendations
from normzoo.analysis.headline import fig_headline, fig_mismatch_v2, mismatch_cells
from normzoo.analysis.provenance import provenance_lines
from normzoo.analysis.results import write_csv
from normzoo.analysis.study_claims import study_findings
from normzoo.markdown import frame_table
from normzoo.published import GN_PAPER_RESNET50

__all__ = ["headline_table", "write_study_report"]


def _relative(df: pd.DataFrame, root: Path | None) -> pd.DataFrame:
    """``run_dir`` relative to the study dir (committed files carry no machine paths)."""
    if root is None or "run_dir" not in df:
        return df
    base = os.path.abspath(root)
    rel = [
        os.path.relpath(os.path.abspath(p), base) if isinstance(p, str) else p
        for p in df["run_dir"]
    ]
    return df.assign(run_dir=rel)


def _details(summary: str, body: list[str]) -> list[str]:
    return [f"<details><summary>{summary}</summary>", "", *body, "", "</details>", ""]


def headline_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Error (%) [95% interval] per (model, layer) and normalisation batch; "any" for layers
    without batch statistics."""
    shown = cells.assign(
        batch=cells["norm_batch"].map(lambda b: "any" if pd.isna(b) else int(b)),
        cell=[f"{e:.1f} [{lo:.1f}, {hi:.1f}]" for e, lo, hi in
              zip(cells["error"], cells["lo95"], cells["hi95"], strict=True)],
    )  # fmt: skip
    table = shown.pivot_table(
        index=["model", "layer"], columns="batch", values="cell", aggfunc="first"
    )
    ints = sorted(c for c in table.columns if c != "any")
    table = table[[*ints, *(["any"] if "any" in table.columns else [])]].fillna("")
    table.columns = [f"norm. batch {c}" for c in table.columns]
    return table.reset_index()


def _headline(cells: pd.DataFrame, out: Path) -> list[str]:
    fig_headline(iid(cells), out / "fig_headline.png")
    table = headline_table(iid(cells))
    write_csv(table, out / "headline.csv")
    return [
        "![Test error against normalisation batch](fig_headline.png)",
        "",
        "Test error (%) against the normalisation batch (ghost batch inside the SGD batch; log2 "
        "axis), one panel per model, at a fixed SGD batch and equal steps. Points and bands: mean "
        "over seeds with a 95% interval (bootstrap over seeds x test samples). Dashed bands: "
        "layers without batch statistics (no normalisation batch). Last panel: "
        f"{GN_PAPER_RESNET50.source} (ResNet-50, ImageNet), for the shape only.",
        "",
        "The same numbers, test error (%) [95% interval] (CSV: `headline.csv`):",
        "",
        frame_table(table, index=False),
        "",
    ]


def _recommendation(df: pd.DataFrame, out: Path) -> list[str]:
    rec = recommendations(df, MARGIN)
    write_csv(rec, out / "recommendation.csv")
    table = recommendation_lines(rec, MARGIN)
    if table.empty:
        return ["_No cell with predictions: no recommendation._", ""]
    return [
        "## Recommendation",
        "",
        "Per model and normalisation batch: the layer with the lowest test error (use), the "
        "layers not distinguishable from it (equivalent within the margin, or not separated), "
        "and those with a higher error (points). Paired bootstrap of each against the best, "
        f"Holm-adjusted over the whole table, alpha 0.05, margin ±{MARGIN:g} points (TOST at "
        "5%). CSV: `recommendation.csv`.",
        "",
        frame_table(table, index=False),
        "",
    ]


def _findings(df: pd.DataFrame, out: Path) -> list[str]:
    lines, tests = study_findings(df, MARGIN)
    write_csv(pd.DataFrame([t.__dict__ for t in tests]), out / "findings_tests.csv")
    md = ["## Findings", ""]
    md += [f"{i}. {s}" for i, s in enumerate(lines, 1)] or ["_No finding could be tested._"]
    note = (
        f"Each estimate is error(A) - error(B) in points (or a slope per doubling) with its 95% "
        f"interval; Holm's adjustment runs over all {len(tests)} tests of this report; "
        f"'equivalent'/'flat' means the 90% interval lies inside ±{MARGIN:g} points. Layers "
        "without batch statistics have zero train/eval mismatch by construction (a test in "
        "`tests/`, not a finding). CSV: `findings_tests.csv`."
    )
    return [*md, "", note, ""]


def _cell_details(cells: pd.DataFrame, out: Path) -> list[str]:
    write_csv(cells, out / "cells.csv")
    shown = cells.assign(
        norm_batch=cells["norm_batch"].map(lambda b: "-" if pd.isna(b) else str(int(b))),
        error=[f"{e:.2f} [{lo:.2f}, {hi:.2f}]" for e, lo, hi in
               zip(cells["error"], cells["lo95"], cells["hi95"], strict=True)],
    )[["sweep", "model", "layer", "norm_batch", "seeds", "samples", "error"]]  # fmt: skip
    return _details("Per-cell test error (%), 95% interval", [frame_table(shown, index=False),
                    "", "CSV: `cells.csv`."])  # fmt: skip


def _mismatch_details(df: pd.DataFrame, cells: pd.DataFrame, out: Path) -> list[str]:
    mism = mismatch_cells(df, iid(cells))
    if mism.empty:
        return []
    write_csv(mism, out / "mismatch_v2.csv")
    fig_mismatch_v2(mism, out / "fig_mismatch.png")
    return _details(
        "Train/inference mismatch (layers with batch statistics)",
        [
            "Test error with the EMA running statistics (eval mode), with batch statistics of "
            "test batches, and with PreciseBN population statistics, per layer with batch "
            "statistics; the layers without them compute the same function in both modes.",
            "",
            "![Train/inference mismatch](fig_mismatch.png)",
            "",
            "CSV: `mismatch_v2.csv`.",
        ],
    )


def _problem_details(df: pd.DataFrame) -> list[str]:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return _details("Failures and missing runs: none", ["Every expected run finished ok."])
    cols = [c for c in ("sweep", "model", "norm", "batch_size", "norm_batch", "seed", "status",
                        "error", "run_dir") if c in bad]  # fmt: skip
    shown = bad[cols].assign(error=bad["error"].astype(str).str.slice(0, 160))
    for col in ("batch_size", "norm_batch", "seed"):
        if col in shown:
            shown[col] = pd.to_numeric(shown[col], errors="coerce").astype("Int64")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(bad["status"].value_counts().items()))
    return _details(f"Failures and missing runs: {counts}", [frame_table(shown, index=False)])


def _mixed_revisions(df: pd.DataFrame) -> list[str]:
    revs = df.loc[df["status"] == "ok", "git_rev"].dropna().unique() if "git_rev" in df else []
    if len(revs) <= 1:
        return []
    return [f"**Mixed git revisions**: the runs come from {len(revs)} revisions "
            f"({', '.join(sorted(map(str, revs))[:6])}).", ""]  # fmt: skip


def write_study_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    title: str,
    study_dir: Path | None,
    command: str | None,
) -> Path:
    """Write the v2 ``report.md``, figures and CSVs for a :func:`load_study` frame."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rel = _relative(df, study_dir)
    write_csv(rel, out / "runs.csv")
    cells = cell_table(df)
    md = [f"# {title}", "", *_mixed_revisions(df)]
    md += _headline(cells, out) if not cells.empty else ["_No run kept predictions._", ""]
    md += _recommendation(df, out)
    md += _findings(df, out)
    md += ["## Details", ""]
    md += _cell_details(cells, out) + _mismatch_details(df, cells, out)
    md += _problem_details(rel)
    prov = provenance_lines(df, study_dir, command)
    md += _details("Provenance", prov)
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path
