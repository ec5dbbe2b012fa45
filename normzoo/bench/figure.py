"""``bench_ratios.png``: from-scratch / native per layer, one panel per metric (OO matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FormatStrFormatter, NullLocator

from normzoo.bench.summary import TARGETS
from normzoo.plotting import new_figure, save_figure

__all__ = ["plot_ratios"]

_TITLES = {"eager": "eager fwd+bwd time", "compiled": "compiled fwd+bwd time",
           "memory": "saved-for-backward bytes (eager)"}  # fmt: skip
#: per metric, the (mode, column) of the single-shape dots
_PER_SHAPE = {"eager": ("eager", "ratio"), "compiled": ("compiled", "ratio"),
              "memory": ("eager", "bytes_ratio")}  # fmt: skip
_RATIO_TICKS = [0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32, 64]


def _fmt(v: float, spec: str) -> str:
    return "—" if math.isnan(v) else format(v, spec)


def _panel(ax: Any, metric: str, rows: Sequence[dict[str, Any]],
           summary: Sequence[dict[str, Any]], layers: list[str], devices: list[str]) -> None:  # fmt: skip
    """Bars from 1.0 to each layer's median (one colour per device), dots for single shapes."""
    mode, column = _PER_SHAPE[metric]
    if metric != "memory":  # a ratio is multiplicative: 2x slower and 2x faster sit alike from 1
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    width = 0.8 / max(len(devices), 1)
    for j, dev in enumerate(devices):
        offset = (j - (len(devices) - 1) / 2) * width
        vals = [
            next((s[metric] for s in summary if (s["layer"], s["device"]) == (lay, dev)), math.nan)
            for lay in layers
        ]
        bars = ax.bar([i + offset for i in range(len(layers))], [v - 1 for v in vals],
                      bottom=1.0, width=width, color=f"C{j}", alpha=0.75)  # fmt: skip
        labels = [_fmt(v, ".3f" if metric == "memory" else ".2f") for v in vals]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        for i, lay in enumerate(layers):
            pts = [r[column] for r in rows
                   if (r["layer"], r["device"], r["mode"]) == (lay, dev, mode)]  # fmt: skip
            ax.plot([i + offset] * len(pts), pts, "k.", ms=3, alpha=0.6)
    ax.axhline(TARGETS[metric], color="crimson", ls="--", lw=1.2)
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set_title(f"{_TITLES[metric]} (target <= {TARGETS[metric]}x)", fontsize=9)
    ax.set_ylabel("from-scratch / native")
    ax.margins(y=0.12)
    lo, hi = ax.get_ylim()
    if metric == "memory":  # room above 1.0 for the bar labels
        ax.set_ylim(min(lo, 0.95), max(hi, 1.0) + 0.06 * (max(hi, 1.0) - min(lo, 0.95)))
    else:  # readable ticks on the log axis, also when the range is narrow
        ax.set_yticks([t for t in _RATIO_TICKS if lo <= t <= hi])
        ax.yaxis.set_minor_locator(NullLocator())


def plot_ratios(
    rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], path: Path
) -> None:
    """One panel per metric with data: bars from 1.0 to the per-layer median ratio, dots for the
    single shapes, the issue-5 target dashed. Time panels use a log2 axis."""
    metrics = [m for m in TARGETS if any(not math.isnan(s[m]) for s in summary)] or ["eager"]
    layers = list(dict.fromkeys(s["layer"] for s in summary))
    devices = list(dict.fromkeys(s["device"] for s in summary))
    fig = new_figure(1.2 + 0.75 * max(len(layers), 3) * len(metrics), 4.0)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        _panel(ax, metric, rows, summary, layers, devices)
    handles: list[Any] = [Rectangle((0, 0), 1, 1, color=f"C{j}", alpha=0.75)
                          for j in range(len(devices))]  # fmt: skip
    handles += [
        Line2D([], [], color="crimson", ls="--"),
        Line2D([], [], color="k", ls="", marker="."),
    ]
    fig.legend(handles, [*devices, "target", "single shapes"], loc="outside upper right",
               fontsize=8, ncol=len(devices) + 2, frameon=False)  # fmt: skip
    fig.suptitle("from-scratch / native: median over shapes (bars from 1.0)", fontsize=10, x=0.3)
    save_figure(fig, path, dpi=120)
