"""What the measured rows say: a layer's time as a multiple of its baseline's, with the spread.

A row's time ratio is the median over repeats of (from-scratch block time / baseline block time),
the two blocks of a repeat timed back to back; its spread is the interquartile range (IQR) of those
per-repeat ratios. A layer is *slower* (or *faster*) than its baseline on a shape only when the
whole IQR, to 1% (as printed), lies above (or below) 1; otherwise the difference is within the noise of the run.
Saved bytes are counted, not timed: their ratio has no spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from normzoo.registry import display_name, get_norm

__all__ = ["baseline_words", "bytes_phrase", "findings", "summarise", "time_phrase", "verdict"]

SLOWER, FASTER, NOISE = "slower", "faster", "within the noise"
#: a saved-bytes ratio this close to 1 is "the same" (storage rounding)
_SAME_BYTES = 5e-4


def _clean(values: Sequence[Any]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]


def _median(values: Sequence[Any]) -> float:
    clean = _clean(values)
    return statistics.median(clean) if clean else math.nan


def verdict(q1: float, q3: float) -> str:
    """``slower`` if the spread (to 1%, as printed) lies above 1, ``faster`` if below, else
    ``within the noise``; empty when nothing was measured."""
    if math.isnan(q1) or math.isnan(q3):
        return ""
    return SLOWER if round(q1, 2) > 1.0 else FASTER if round(q3, 2) < 1.0 else NOISE


def baseline_words(baseline: str) -> str:
    """How the prose names a baseline: ``torch`` for a native reference, else its display name."""
    return "torch" if get_norm(baseline).reference else display_name(baseline)


def time_phrase(ratio: float, q1: float, q3: float, baseline: str, *, smoke: bool = False) -> str:
    """``0.88x torch's time (IQR 0.85-0.90): faster than torch by 12%`` (no verdict when ``smoke``)."""
    if math.isnan(ratio):
        return "not measured"
    who = baseline_words(baseline)
    text = f"{ratio:.2f}x {who}'s time (IQR {q1:.2f}–{q3:.2f})"
    word = verdict(q1, q3)
    return f"{text}: smoke test" if smoke else f"{text}: {_by(ratio, who, word)}"


def bytes_phrase(ratio: float, baseline: str) -> str:
    """``1.000x torch's saved bytes (the same)`` / ``... (12% more)``."""
    if math.isnan(ratio):
        return "not measured"
    who = baseline_words(baseline)
    text = f"{ratio:.3f}x {who}'s saved bytes"
    if abs(ratio - 1) < _SAME_BYTES:
        return f"{text} (the same)"
    more = "more" if ratio > 1 else "less"
    return f"{text} ({100 * abs(ratio - 1):.1f}% {more})"


def _mode_summary(rows: Sequence[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Median time ratio over shapes, its range over shapes, the median width of the per-shape
    IQRs over repeats (the noise) and the verdict count per shape."""
    ratios = _clean([r["paired_ratio"] for r in rows])
    words = [verdict(r["ratio_q1"], r["ratio_q3"]) for r in rows]
    return {
        prefix: _median(ratios),
        f"{prefix}_n": len(ratios),
        f"{prefix}_lo": min(ratios, default=math.nan),
        f"{prefix}_hi": max(ratios, default=math.nan),
        f"{prefix}_iqr": _median([r["ratio_q3"] - r["ratio_q1"] for r in rows]),
        **{f"{prefix}_{w.split()[-1]}": words.count(w) for w in (SLOWER, FASTER, NOISE)},
    }


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (device, layer): medians over shapes of the time and saved-bytes ratios.

    ``eager`` / ``compiled``: median over shapes of the rows' time ratios (``*_n`` of them),
    ``*_lo`` / ``*_hi`` their range over shapes, ``*_iqr`` the median over shapes of the width of
    each row's IQR over repeats, ``*_slower`` / ``*_faster`` / ``*_noise`` how many shapes got each verdict.
    ``memory``: median over shapes of the eager saved-bytes ratio (``memory_max`` the largest).
    ``native_fused``: the *baseline's* compiled time over its eager time (median over shapes).
    """
    keys = list(dict.fromkeys((r["device"], r["layer"], r["baseline"], r["pairing"]) for r in rows))
    out = []
    for dev, layer, baseline, note in keys:
        mine = [r for r in rows if r["device"] == dev and r["layer"] == layer]
        eager = [r for r in mine if r["mode"] == "eager"]
        comp = [r for r in mine if r["mode"] == "compiled"]
        native_eager = {r["shape"]: r["native_ms"] for r in eager if r["native_ms"] > 0}
        fused = [
            r["native_ms"] / native_eager[r["shape"]] for r in comp if r["shape"] in native_eager
        ]
        out.append(
            {
                "device": dev,
                "layer": layer,
                "baseline": baseline,
                "pairing": note,
                "shapes": len(eager) or len(comp),
                **_mode_summary(eager, "eager"),
                **_mode_summary(comp, "compiled"),
                "memory": _median([r["bytes_ratio"] for r in eager]),
                "memory_max": max(_clean([r["bytes_ratio"] for r in eager]), default=math.nan),
                "memory_compiled": _median([r["bytes_ratio"] for r in comp]),
                "native_fused": _median(fused),
                "errors": sum(1 for r in mine if r["error"]),
            }
        )
    return out


def _by(ratio: float, who: str, word: str) -> str:
    """``slower than torch by 12%`` / ``faster than torch by 12%`` (less time) / the noise."""
    if word == SLOWER:
        return f"slower than {who} by {100 * (ratio - 1):.0f}%"
    if word == FASTER:
        return f"faster than {who} by {100 * (1 - ratio):.0f}%"
    return "no difference outside the spread"


def _counts(s: dict[str, Any], mode: str, who: str) -> str:
    """``faster than torch on 3, within the noise on 1 (of 4 shapes)``; one shape: its verdict."""
    n = {w: s[f"{mode}_{w.split()[-1]}"] for w in (SLOWER, FASTER, NOISE)}
    total = sum(n.values())
    if total == 1:
        return _by(s[mode], who, next(w for w, k in n.items() if k))
    labels = {SLOWER: f"slower than {who}", FASTER: f"faster than {who}", NOISE: NOISE}
    parts = [f"{labels[w]} on {k}" for w, k in n.items() if k]
    return ", ".join(parts) + f" (of {total} shapes)"


def _over_shapes(s: dict[str, Any], mode: str) -> str:
    """``one shape; spread over repeats: IQR 0.04 wide`` / ``median over 4 shapes; 0.88-1.03
    across them; spread over repeats: IQR 0.04 wide (median over shapes)``."""
    n, lo, hi = s[f"{mode}_n"], f"{s[f'{mode}_lo']:.2f}", f"{s[f'{mode}_hi']:.2f}"
    iqr = s.get(f"{mode}_iqr", math.nan)
    noise = "" if math.isnan(iqr) else f"; spread over repeats: IQR {iqr:.2f} wide"
    if n == 1:
        return "one shape" + noise
    across = "" if lo == hi else f"; {lo}–{hi} across them"
    return f"median over {n} shapes{across}" + (f"{noise} (median over shapes)" if noise else "")


def _bytes_over_shapes(s: dict[str, Any]) -> str:
    if s["shapes"] == 1:
        return "one shape"
    return f"median over {s['shapes']} shapes; largest {s['memory_max']:.3f}x"


def findings(summary: Sequence[dict[str, Any]], *, smoke: bool = False) -> list[str]:
    """One sentence per (device, layer, mode) measured, and one on saved bytes."""
    lines = []
    for s in summary:
        who = baseline_words(s["baseline"])
        name = f"{display_name(s['layer'])} ({s['device']})"
        for mode in ("eager", "compiled"):
            if math.isnan(s[mode]):
                continue
            text = f"{name}, {mode}: {s[mode]:.2f}x {who}'s time ({_over_shapes(s, mode)})"
            text += ": smoke test, not a measurement" if smoke else f"; {_counts(s, mode, who)}"
            lines.append(text + ".")
        if not math.isnan(s["memory"]):
            memory = bytes_phrase(s["memory"], s["baseline"])
            lines.append(f"{name}, saved for backward: {memory} ({_bytes_over_shapes(s)}).")
    return lines
