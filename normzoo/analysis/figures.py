"""The report's figures (matplotlib's object-oriented API through :mod:`normzoo.plotting`).

Colour by layer family (a native reference shares its from-scratch twin's colour, with square
markers), line style by model/data variant; the GN paper's published curve beside the measured one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from normzoo.analysis.names import family, is_reference
from normzoo.analysis.summary import SeedTable
from normzoo.analysis.wording import variant_of
from normzoo.plotting import log2_axis, new_figure, save_figure
from normzoo.published import GN_PAPER_RESNET50
from normzoo.registry import display_name

__all__ = [
    "fig_batch_dependence",
    "fig_degradation",
    "fig_gaps",
    "fig_lines",
    "fig_mismatch",
    "layer_styles",
]


_COLOURS = {
    "batchnorm": "#1f77b4",
    "batchrenorm": "#ff7f0e",
    "layernorm": "#2ca02c",
    "groupnorm": "#d62728",
    "instancenorm": "#9467bd",
    "weightnorm": "#8c564b",
    "none": "#7f7f7f",
}
_SPARE_COLOURS = ("#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#843c39", "#7b4173")
_LINESTYLES = ("-", "--", ":", "-.")


def layer_styles(t: SeedTable) -> dict[str, dict[str, Any]]:
    """Colour by layer family (the same in every figure), line style by model/data variant,
    square markers for torch's native references."""
    spare = iter(_SPARE_COLOURS * 4)
    colours: dict[str, str] = {}
    variants = list(dict.fromkeys(variant_of(layer) for layer in t.layers))
    out = {}
    for layer in t.layers:
        norm = t.norm[layer]
        base = family(norm)
        if base not in colours:
            colours[base] = _COLOURS.get(base) or next(spare)
        out[layer] = {
            "color": colours[base],
            "linestyle": _LINESTYLES[variants.index(variant_of(layer)) % len(_LINESTYLES)],
            "marker": "s" if is_reference(norm) else "o",
        }
    return out


def fig_degradation(
    t: SeedTable, styles: dict, path: Path, intervals: dict[tuple[str, int], tuple] | None = None
) -> Path:
    """Error vs batch size per layer (band: min–max over seeds, or with ``intervals`` -- {(layer,
    batch): (lo, hi)} -- 95% error bars from the per-sample bootstrap), the GN paper's curve beside."""
    fig = new_figure(12, 4.6)
    ax, ref = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    all_b: set[int] = set()
    n_seeds = 0
    for layer in t.layers:
        bs = t.batches(layer)
        cells = [t.cell(layer, b, "err_ema") for b in bs]
        all_b |= set(bs)
        n_seeds = max([n_seeds, *(c.n for c in cells)])
        means = [c.mean for c in cells]
        ax.plot(bs, means, label=layer, lw=1.8, ms=5, **styles[layer])
        if intervals is not None:
            lo = [m - intervals.get((layer, b), (m, m))[0] for m, b in zip(means, bs, strict=True)]
            hi = [intervals.get((layer, b), (m, m))[1] - m for m, b in zip(means, bs, strict=True)]
            ax.errorbar(
                bs, means, yerr=[lo, hi], fmt="none", capsize=3, color=styles[layer]["color"]
            )
            continue
        ax.fill_between(
            bs,
            [c.lo for c in cells],
            [c.hi for c in cells],
            color=styles[layer]["color"],
            alpha=0.15,
        )
    log2_axis(ax, sorted(all_b))
    ax.set_xlabel("batch size (samples per normalisation batch, log2 scale)")
    ax.set_ylabel("test error (%), EMA statistics")
    band = "bars = 95% bootstrap CI" if intervals is not None else "band = min–max"
    ax.set_title(f"Measured: mean over seeds, {band} (up to {n_seeds} seeds)")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.set_ylim(bottom=0)
    p = GN_PAPER_RESNET50
    for name, values in p.error.items():
        ref.plot(p.batch_sizes, values, label=display_name(name), lw=1.8, ms=5, **_ref_style(name))
    log2_axis(ref, sorted(p.batch_sizes))
    ref.set_xlabel("batch size (images per GPU, log2 scale)")
    ref.set_ylabel(p.metric)
    ref.set_title("Published, for shape only:\n" + p.title, fontsize=10)
    ref.legend(fontsize=8)
    fig.suptitle("Small-batch degradation: test error vs batch size", fontsize=12)
    return save_figure(fig, path)


def _ref_style(name: str) -> dict[str, Any]:
    return {"color": _COLOURS.get(name, "k"), "linestyle": "-", "marker": "o"}


def _dodge(batches: Sequence[int], i: int, k: int, width: float = 0.12) -> list[float]:
    """Shift series i of k sideways on the log2 axis so coinciding lines stay visible."""
    shift = width * (i - (k - 1) / 2) / max(k - 1, 1) if k > 1 else 0.0
    return [b * 2**shift for b in batches]


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def fig_mismatch(t: SeedTable, styles: dict, path: Path) -> Path:
    rows, cols = _grid(len(t.layers))
    fig = new_figure(3.6 * cols + 0.6, 3.1 * rows + 0.9)
    # own y range per panel: the comparison that matters is between the three lines of a panel
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    modes = (
        ("err_ema", "EMA (eval mode)", "-", "o"),
        ("err_batch", "batch statistics", "--", "v"),
        ("err_precise", "PreciseBN", ":", "s"),
    )
    for ax, layer in zip(axes, t.layers, strict=False):
        bs = t.batches(layer)
        for i, (metric, label, ls, marker) in enumerate(modes):
            cells = [t.cell(layer, b, metric) for b in bs]
            ax.errorbar(
                _dodge(bs, i, len(modes)),
                [c.mean for c in cells],
                yerr=[0 if math.isnan(c.std) else c.std for c in cells],
                label=label,
                color=styles[layer]["color"],
                linestyle=ls,
                marker=marker,
                ms=4,
                lw=1.5,
                capsize=2,
                alpha=0.9,
            )
        log2_axis(ax, bs)
        kind = "batch statistics" if t.batch_stats[layer] else "no batch statistics: lines coincide"
        ax.set_title(f"{layer}\n({kind})", fontsize=10)
        ax.set_xlabel("batch size (log2)")
    for ax in axes[:: max(1, cols)]:
        ax.set_ylabel("test error (%)")
    for ax in axes[len(t.layers) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color="black", linestyle=ls, marker=marker, ms=4, label=label)
        for _, label, ls, marker in modes
    ]
    spare = axes[len(t.layers) :]
    if len(spare):  # the legend goes into the first empty panel
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles=handles, loc="center", fontsize=10, title="evaluated with")
    else:
        fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(
        "Train/inference mismatch: test error evaluated with EMA, batch and PreciseBN statistics "
        "(mean ± std over seeds)",
        fontsize=11,
    )
    return save_figure(fig, path)


def fig_lines(
    t: SeedTable,
    styles: dict,
    path: Path,
    panels: Sequence[tuple[str, str, str]],
    title: str,
    layers: Sequence[str],
    log_y: bool = False,
) -> Path:
    fig = new_figure(4.6 * len(panels) + 0.4, 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (metric, ylabel, subtitle) in zip(axes, panels, strict=True):
        all_b: set[int] = set()
        for i, layer in enumerate(layers):
            bs = t.batches(layer, metric)
            if not bs:
                continue
            all_b |= set(bs)
            cells = [t.cell(layer, b, metric) for b in bs]
            ax.errorbar(
                _dodge(bs, i, len(layers)),
                [c.mean for c in cells],
                yerr=[0 if math.isnan(c.std) else c.std for c in cells],
                label=layer,
                capsize=2,
                lw=1.6,
                ms=4,
                **styles[layer],
            )
        log2_axis(ax, sorted(all_b) or [1])
        if log_y and all_b:
            values = [t.cell(la, b, metric) for la in layers for b in t.batches(la, metric)]
            top = max(c.hi for c in values)
            positive = [c.lo for c in values if c.lo > 0] + [c.mean for c in values if c.mean > 0]
            # linear only below the smallest non-zero value, so float noise (~1e-8) stays visible
            floor = 10 ** math.floor(math.log10(min(positive))) if positive else 1e-3
            ax.set_yscale("symlog", linthresh=min(floor, 1e-3))
            # a little room below 0 so that measured zeros show as markers, not as the axis line
            ax.set_ylim(-0.2 * min(floor, 1e-3), max(2 * top, 1e-2) if np.isfinite(top) else 1.0)
        ax.set_xlabel("batch size (log2)")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=10)
        if all_b:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def fig_gaps(t: SeedTable, styles: dict, path: Path) -> Path:
    """EMA vs population statistic gaps and the batch- vs EMA-statistics prediction KL."""
    stat_layers = [layer for layer in t.layers if t.batches(layer, "ema_mean_gap")]
    return fig_lines(
        t,
        styles,
        path,
        [
            ("ema_mean_gap", "|μ_EMA − μ_pop| / σ_pop (channel mean)", "mean gap"),
            ("ema_log_std_gap", "|log σ_EMA / σ_pop| (channel mean)", "scale gap"),
            ("kl_batch_vs_ema", "KL(p_batch ‖ p_EMA) (nats per sample)", "prediction KL"),
        ],
        "EMA vs population statistics, and batch- vs EMA-statistics predictions",
        t.layers if not stat_layers else list(dict.fromkeys([*stat_layers, *t.layers])),
    )


def fig_batch_dependence(t: SeedTable, styles: dict, path: Path) -> Path:
    """Batch dependence in train mode, and its eval-mode floor, on a symlog axis."""
    return fig_lines(
        t,
        styles,
        path,
        [
            (
                "batch_dependence",
                "||f(x|B1) − f(x|B2)|| / ||f(x)|| (relative)",
                "train mode (norm layers use batch statistics)",
            ),
            (
                "batch_dependence_floor",
                "same measurement in eval mode (relative)",
                "eval mode: the numerical floor",
            ),
        ],
        "Batch dependence: how far one sample's logits move when its batch companions change",
        t.layers,
        log_y=True,
    )
