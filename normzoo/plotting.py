"""Figures through matplotlib's object-oriented API (no pyplot, no global backend switch).

Library code draws on a :class:`matplotlib.figure.Figure` it owns and saves it with
:func:`save_figure`, so importing normzoo never changes a user's matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "log2_axis", "new_figure", "save_figure"]

DPI = 150


def new_figure(width: float, height: float, **kw: Any) -> Figure:
    """A figure of ``width`` x ``height`` inches with constrained layout, not known to pyplot."""
    kw.setdefault("layout", "constrained")
    return Figure(figsize=(width, height), **kw)


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Render ``fig`` with the Agg canvas and write it (PNG by the suffix) to ``path``."""
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def log2_axis(ax: Any, values: Sequence[int], axis: str = "x") -> None:
    """A base-2 log axis with one labelled tick per value (batch sizes), no minor ticks, a grid."""
    set_scale, set_ticks, set_labels = (
        (ax.set_xscale, ax.set_xticks, ax.set_xticklabels)
        if axis == "x"
        else (ax.set_yscale, ax.set_yticks, ax.set_yticklabels)
    )
    set_scale("log", base=2)
    set_ticks(list(values))
    set_labels([str(v) for v in values])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
