"""``bench_ratios.png``: each layer's time and saved bytes as multiples of torch's (OO matplotlib).

One panel per metric with data (eager time, compiled time, saved bytes), one row per layer, so the
figure grows with the number of layers (1 works as well as 20): a dot at the median over shapes,
a line over the range across shapes, small dots for the single shapes, one colour per device, and
a vertical line at 1 (the same as torch). Time axes are log2: 2x slower and 2x faster sit equally
far from 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullLocator

from normzoo.plotting import new_figure, save_figure
from normzoo.registry import display_name

__all__ = ["SMOKE_TITLE", "plot_ratios", "ratio_figure"]

SMOKE_TITLE = "SMOKE TEST, NOT A MEASUREMENT (--quick)"
#: per metric: panel title, and the (mode, column) of the single-shape values
_PANELS = {
    "eager": ("eager fwd+bwd time vs torch", "eager", "paired_ratio"),
    "compiled": ("compiled fwd+bwd time vs torch", "compiled", "paired_ratio"),
    "memory": ("saved-for-backward bytes vs torch", "eager", "bytes_ratio"),
}
_TICKS = [0.125, 0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1, 1.05, 1.1, 1.25, 1.5, 2, 3, 4, 8, 16, 32, 64]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks from :data:`_TICKS` inside [lo, hi], 1 always, thinned to at most ~8 on a log axis."""
    gap = math.log2(hi / lo) / 8
    picked = [1.0]
    for t in sorted((t for t in _TICKS if lo <= t <= hi), key=lambda t: abs(math.log2(t))):
        if all(abs(math.log2(t / p)) >= gap for p in picked):
            picked.append(t)
    return sorted(picked)


def _values(rows: Sequence[dict[str, Any]], layer: str, device: str, metric: str) -> list[float]:
    _, mode, column = _PANELS[metric]
    keys = (layer, device, mode)
    vals = [r[column] for r in rows if (r["layer"], r["device"], r["mode"]) == keys]
    return [v for v in vals if isinstance(v, (int, float)) and not math.isnan(v)]


def _panel(ax: Any, metric: str, rows: Sequence[dict[str, Any]], layers: list[str],
           devices: list[str]) -> None:  # fmt: skip
    """One row per layer (first at the top): median dot, range line, single-shape dots."""
    step = 0.6 / max(len(devices), 1)
    seen: list[float] = [1.0]
    for j, dev in enumerate(devices):
        for i, layer in enumerate(layers):
            vals = _values(rows, layer, dev, metric)
            if not vals:
                continue
            y = i + (j - (len(devices) - 1) / 2) * step
            seen += vals
            ax.plot([min(vals), max(vals)], [y, y], color=f"C{j}", lw=1.5, alpha=0.6)
            ax.plot(vals, [y] * len(vals), ".", color="k", ms=3, alpha=0.6)
            ax.plot(
                [statistics.median(vals)],
                [y],
                "o",
                color=f"C{j}",
                ms=6,
                label=dev if i == 0 else None,
            )
    ax.axvline(1.0, color="grey", lw=0.8)
    lo, hi = min(seen), max(seen)
    pad = (hi / lo) ** 0.08 if hi > lo else 1.05
    if metric != "memory":
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lo / pad, hi * pad)
    if metric != "memory":
        ax.set_xticks(_log_ticks(lo / pad, hi * pad))
    ax.set_yticks(range(len(layers)), [display_name(layer) for layer in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_title(_PANELS[metric][0], fontsize=9)
    ax.set_xlabel("x torch's (1 = the same)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def ratio_figure(
    rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], *, smoke: bool = False
) -> Figure:
    """The figure of :func:`plot_ratios` (returned, not saved)."""
    metrics = [m for m in _PANELS if any(not math.isnan(s[m]) for s in summary)] or ["eager"]
    layers = list(dict.fromkeys(s["layer"] for s in summary))
    devices = list(dict.fromkeys(s["device"] for s in summary))
    fig = new_figure(0.8 + 3.4 * len(metrics), 1.6 + 0.32 * max(len(layers), 1))
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        _panel(ax, metric, rows, layers, devices)
    if len(devices) > 1:
        axes[0].legend(fontsize=7, loc="best", frameon=False)
    title = "from-scratch layers as multiples of torch's: median over shapes (dot), range (line)"
    fig.suptitle(f"{SMOKE_TITLE}\n{title}" if smoke else title, fontsize=10,
                 color="crimson" if smoke else "black")  # fmt: skip
    return fig


def plot_ratios(
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    path: Path,
    *,
    smoke: bool = False,
) -> Path:
    """Write :func:`ratio_figure` to ``path`` (PNG)."""
    return save_figure(ratio_figure(rows, summary, smoke=smoke), path, dpi=120)
