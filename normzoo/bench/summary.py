"""Per-layer summary of the measured rows: median ratios over shapes, judged against the targets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["TARGETS", "summarise"]

#: issue-5 targets on the per-layer median ratio from-scratch / native over the shape set
TARGETS: dict[str, float] = {"eager": 1.3, "compiled": 1.0, "memory": 1.0}


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def summarise(rows: Sequence[dict[str, Any]], *, verdicts: bool = True) -> list[dict[str, Any]]:
    """Per (device, layer): median ratios over shapes and pass/fail against :data:`TARGETS`.

    ``memory`` is the median over shapes of the eager saved-bytes ratio (``memory_max`` the worst
    shape). A target is ``pass``/``FAIL``, or ``n/a`` when nothing was measured (``smoke`` for
    every target with ``verdicts=False``: a ``--quick`` run is too short to judge).

    ``native_fused`` is a reference, not a target: the median over shapes of the *baseline's*
    compiled time over its eager time (matched by shape), i.e. how torch's own decomposition of the
    layer into tensor ops fares against its hand-fused eager kernel once inductor fuses it.
    """
    keys = list(dict.fromkeys((r["device"], r["layer"], r["baseline"], r["pairing"]) for r in rows))
    out = []
    for dev, layer, baseline, note in keys:
        mine = [r for r in rows if r["device"] == dev and r["layer"] == layer]
        eager = [r for r in mine if r["mode"] == "eager"]
        comp = [r for r in mine if r["mode"] == "compiled"]
        native_eager = {r["shape"]: r["native_ms"] for r in eager if r["native_ms"] > 0}
        s: dict[str, Any] = {
            "device": dev,
            "layer": layer,
            "baseline": baseline,
            "pairing": note,
            "shapes": len(eager) or len(comp),
            "eager": _median([r["ratio"] for r in eager]),
            "compiled": _median([r["ratio"] for r in comp]),
            "memory": _median([r["bytes_ratio"] for r in eager]),
            "memory_max": max(
                (r["bytes_ratio"] for r in eager if not math.isnan(r["bytes_ratio"])),
                default=math.nan,
            ),
            "memory_compiled": _median([r["bytes_ratio"] for r in comp]),
            "native_fused": _median(
                [
                    r["native_ms"] / native_eager[r["shape"]]
                    for r in comp
                    if r["shape"] in native_eager
                ]
            ),
            "errors": sum(1 for r in mine if r["error"]),
        }
        for metric, target in TARGETS.items():
            v = s[metric]
            s[f"{metric}_ok"] = (
                "n/a"
                if math.isnan(v)
                else ("smoke" if not verdicts else ("pass" if v <= target else "FAIL"))
            )
        out.append(s)
    return out
