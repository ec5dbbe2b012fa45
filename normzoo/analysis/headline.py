"""The headline figure of a v2 study: test error against normalisation batch, one panel per model.

Layers with batch statistics are lines with a 95% interval on every point; layers without them are
horizontal bands (mean and 95% interval) across the axis, since they have no normalisation batch.
The GN paper's BN/GN curve (Wu & He 2018) is a narrow last panel, for shape only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from normzoo.analysis.figures import _COLOURS, _SPARE_COLOURS
from normzoo.analysis.significance import error_interval
from normzoo.analysis.study import CELL_KEYS, cell_correct, stack
from normzoo.plotting import log2_axis, new_figure, save_figure
from normzoo.published import GN_PAPER_RESNET50

__all__ = ["fig_headline", "fig_mismatch_v2", "mismatch_cells"]


def _colour(norm: str, order: list[str]) -> str:
    if norm in _COLOURS:
        return _COLOURS[norm]
    return _SPARE_COLOURS[order.index(norm) % len(_SPARE_COLOURS)]


def _published_panel(ax) -> None:
    """The GN paper's curve in a narrow panel of its own (an inset covered the data's bands)."""
    ref = GN_PAPER_RESNET50
    for norm, values in ref.error.items():
        ax.plot(ref.batch_sizes, values, marker=".", color=_COLOURS.get(norm, "k"), lw=1)
    log2_axis(ax, sorted(ref.batch_sizes))
    ax.tick_params(labelsize=7)
    ax.set_title("GN paper, ResNet-50\nImageNet (shape only)", fontsize=8)
    ax.set_xlabel("batch per GPU", fontsize=8)
    ax.set_ylabel("val. error (%)", fontsize=8)


def fig_headline(cells: pd.DataFrame, path: Path) -> Path:
    """Write the headline figure of the i.i.d. ``cells`` (a :func:`cell_table`) to ``path``."""
    models = sorted(cells["model"].unique())
    fig = new_figure(4.2 * len(models) + 4.0, 3.4)
    # one y-axis for the row, unless one panel's top is 3x another's (it would squeeze them flat)
    tops = cells.groupby("model")["hi95"].max()
    share = bool(tops.min() > 0 and tops.max() / tops.min() < 3)
    ratios = [1.0] * len(models) + [0.5]
    *axes, published = fig.subplots(1, len(models) + 1, width_ratios=ratios, squeeze=False)[0]
    for ax in axes[1:]:
        if share:
            ax.sharey(axes[0])
    order = sorted(cells["norm"].unique())
    batches = sorted(int(b) for b in cells["norm_batch"].dropna().unique())
    for ax, model in zip(axes, models, strict=True):
        here = cells[cells["model"] == model]
        for norm in order:
            rows = here[here["norm"] == norm].sort_values("norm_batch")
            if rows.empty:
                continue
            colour = _colour(norm, order)
            label = rows["layer"].iloc[0]
            if rows["norm_batch"].isna().all():
                r = rows.iloc[0]
                ax.axhspan(r["lo95"], r["hi95"], color=colour, alpha=0.15, lw=0)
                ax.axhline(
                    r["error"], color=colour, ls="--", lw=1.2, label=f"{label} (no batch stats)"
                )
                continue
            yerr = [rows["error"] - rows["lo95"], rows["hi95"] - rows["error"]]
            ax.errorbar(
                rows["norm_batch"], rows["error"], yerr=yerr, color=colour, marker="o",
                ms=4, capsize=3, label=label,
            )  # fmt: skip
        if batches:
            log2_axis(ax, batches)
        ax.set_title(model)
        ax.set_xlabel("normalisation batch (samples)")
    axes[0].set_ylabel("test error (%), 95% interval")
    _published_panel(published)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        seen.update({k: v for k, v in zip(lab, h, strict=True) if k not in seen})
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=8)
    return save_figure(fig, path)


_SOURCES = (("test_pred", "EMA", "-"), ("test_pred_batch", "batch stats", ":"),
            ("test_pred_precise", "PreciseBN", "--"))  # fmt: skip


def mismatch_cells(df: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Error (95% interval) of each batch-statistics cell under EMA, batch and PreciseBN stats."""
    rows = []
    for _, c in cells[cells["norm_batch"].notna()].iterrows():
        cell = {k: c[k] for k in CELL_KEYS}
        for key, label, _ in _SOURCES:
            per_seed = cell_correct(df, cell, key)
            if per_seed:
                ci = error_interval(stack(per_seed))
                rows.append({**cell, "layer": c["layer"], "statistics": label,
                             "error": ci.mean, "lo95": ci.lo, "hi95": ci.hi})  # fmt: skip
    return pd.DataFrame(rows)


def fig_mismatch_v2(mism: pd.DataFrame, path: Path) -> Path:
    """One panel per (model, layer with batch statistics): error per source of statistics."""
    panels = sorted(mism.groupby(["model", "layer"]).groups)
    fig = new_figure(3.2 * len(panels) + 1.6, 3.0)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    batches = sorted(int(b) for b in mism["norm_batch"].unique())
    for ax, (model, layer) in zip(axes, panels, strict=True):
        here = mism[(mism["model"] == model) & (mism["layer"] == layer)]
        for _, label, ls in _SOURCES:
            rows = here[here["statistics"] == label].sort_values("norm_batch")
            if rows.empty:
                continue
            yerr = [rows["error"] - rows["lo95"], rows["hi95"] - rows["error"]]
            ax.errorbar(rows["norm_batch"], rows["error"], yerr=yerr, ls=ls, marker="o", ms=3,
                        capsize=2, label=label)  # fmt: skip
        log2_axis(ax, batches)
        ax.set_title(f"{layer}, {model}", fontsize=9)
        ax.set_xlabel("normalisation batch")
    axes[0].set_ylabel("test error (%), 95% interval")
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside right center", fontsize=8)
    return save_figure(fig, path)
