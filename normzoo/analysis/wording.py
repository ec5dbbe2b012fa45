"""How numbers and lists are written in the report's sentences and tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

from normzoo.analysis.stats import Cell

__all__ = ["join", "num", "pct", "pm", "sizes", "variant_of"]


def pct(c: Cell, unit: str = "%", digits: int = 1) -> str:
    if not c.valid:
        return "n/a"
    if c.n > 1 and not math.isnan(c.std):
        return f"{c.mean:.{digits}f} ± {c.std:.{digits}f}{unit}"
    return f"{c.mean:.{digits}f}{unit} (1 seed)"


def num(c: Cell, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` significant digits on the mean, the std to the same place."""
    if not c.valid:
        return "n/a"
    mag = math.floor(math.log10(abs(c.mean))) if c.mean != 0 else 0
    places = min(max(digits - 1 - mag, 0), 8)
    if c.n > 1 and not math.isnan(c.std):
        return f"{c.mean:.{places}f} ± {c.std:.{places}f}"
    return f"{c.mean:.{places}f} (1 seed)"


def sizes(batches: Sequence[int]) -> str:
    """'batch size 4' or 'batch sizes 2, 4 and 8'."""
    items = [str(b) for b in batches]
    return f"batch size{'s' if len(items) > 1 else ''} {join(items)}"


def join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def variant_of(layer: str) -> str:
    """The model/data suffix of a layer label ('' when the sweep does not vary them)."""
    return layer.split(" · ", 1)[1] if " · " in layer else ""


def pm(c: Cell, digits: int = 1) -> str:
    if not c.valid:
        return ""
    if c.n > 1 and not math.isnan(c.std):
        return f"{c.mean:.{digits}f} ± {c.std:.{digits}f}"
    return f"{c.mean:.{digits}f}"
