"""The findings: one sentence per claim, each tested against the data (:mod:`.stats`) and worded
by the outcome, never written in advance. Small-batch degradation, the ranking at the smallest
batch, Batch Renorm's recovery, separate series, duplicates and run counts are here; the
train/inference mismatch claims are in :mod:`.mismatch_claims`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from normzoo.analysis.mismatch_claims import (
    clip_claims,
    dependence_claims,
    precise_claims,
    zero_mismatch_claims,
)
from normzoo.analysis.results import ok_runs
from normzoo.analysis.stats import FLAT_POINTS, differs
from normzoo.analysis.summary import SeedTable, prepare, summarise
from normzoo.analysis.wording import join, pct, variant_of

__all__ = ["findings"]


def degradation_claims(t: SeedTable) -> list[str]:
    out = []
    for layer in t.layers:
        if t.batch_stats[layer] is not True:
            continue
        bs = t.batches(layer)
        if len(bs) < 2:
            continue
        lo, hi = bs[0], bs[-1]
        small, large = t.cell(layer, lo, "err_ema"), t.cell(layer, hi, "err_ema")
        sign = differs(small, large)
        delta = small.mean - large.mean
        ratio = small.mean / large.mean if large.mean > 0 else math.inf
        if sign > 0:
            first = next(b for b in bs if differs(t.cell(layer, b, "err_ema"), large) > 0)
            onset = (
                f"; it is clearly above that level at batch sizes <= {first}" if first != lo else ""
            )
            out.append(
                f"{layer}'s test error rises from {pct(large)} at batch {hi} to {pct(small)} at "
                f"batch {lo} (+{delta:.1f} points, {ratio:.1f}×){onset}."
            )
        elif sign < 0:
            out.append(
                f"{layer}'s test error falls from {pct(large)} at batch {hi} to {pct(small)} at "
                f"batch {lo} ({delta:.1f} points): no small-batch degradation."
            )
        else:
            out.append(
                f"{layer}'s test error shows no clear change between batch {hi} ({pct(large)}) "
                f"and batch {lo} ({pct(small)})."
            )
    flat, unresolved, varying = [], [], []
    for layer in t.layers:
        if t.batch_stats[layer] is not False:
            continue
        bs = t.batches(layer)
        if len(bs) < 2:
            continue
        cells = {b: t.cell(layer, b, "err_ema") for b in bs}
        hi_b = max(cells, key=lambda b: cells[b].mean)
        lo_b = min(cells, key=lambda b: cells[b].mean)
        span = cells[hi_b].mean - cells[lo_b].mean
        clear = differs(cells[hi_b], cells[lo_b]) != 0
        stds = [c.std for c in cells.values() if not math.isnan(c.std)]
        entry = (layer, span, cells[lo_b].mean, cells[hi_b].mean, bs[0], bs[-1], max(stds or [0]))
        if span <= FLAT_POINTS or (not clear and span <= 3 * FLAT_POINTS):
            flat.append(entry)
        elif not clear:
            unresolved.append(entry)
        else:
            varying.append(entry)
    if flat:
        widest = max(flat, key=lambda e: e[1])
        names = join([e[0] for e in flat])
        verb = "stays" if len(flat) == 1 else "stay"
        out.append(
            f"Without batch statistics, {names} {verb} flat across batch sizes "
            f"{min(e[4] for e in flat)}–{max(e[5] for e in flat)}: seed means span at most "
            f"{widest[1]:.1f} points ({widest[0]}: {widest[2]:.1f}% to {widest[3]:.1f}%)."
        )
    for layer, span, lo_v, hi_v, b0, b1, std in unresolved:
        out.append(
            f"{layer} (no batch statistics) varies by {span:.1f} points across batch sizes "
            f"{b0}–{b1} ({lo_v:.1f}% to {hi_v:.1f}%), within its seed spread (std up to "
            f"{std:.1f} points): neither flat nor a clear trend."
        )
    for layer, span, lo_v, hi_v, *_ in varying:
        out.append(_varying_claim(t, layer, span, lo_v, hi_v))
    return out


def _varying_claim(t: SeedTable, layer: str, span: float, lo_v: float, hi_v: float) -> str:
    """A layer without batch statistics whose error is not flat: say whether the variation is a
    small-batch loss (the smallest batch clearly worse than the middle batch size) or lies
    elsewhere (e.g. at the largest batches, which get the fewest steps under a fixed epoch budget)."""
    bs = t.batches(layer)
    mid = bs[len(bs) // 2]
    cells = {b: t.cell(layer, b, "err_ema") for b in bs}
    worst = max(cells, key=lambda b: cells[b].mean)
    head = (
        f"{layer} has no batch statistics; its error varies by {span:.1f} points across batch "
        f"sizes {bs[0]}–{bs[-1]} ({lo_v:.1f}% to {hi_v:.1f}%, highest at batch {worst})"
    )
    if differs(cells[bs[0]], cells[mid]) > 0:
        return (
            f"{head}, and it is clearly worse at batch {bs[0]} ({pct(cells[bs[0]])}) than at "
            f"batch {mid} ({pct(cells[mid])}): a small-batch loss."
        )
    return (
        f"{head}, but not at small batch: at batch {bs[0]} it is {pct(cells[bs[0]])} against "
        f"{pct(cells[mid])} at batch {mid} (not clearly higher)."
    )


def smallest_batch_ranking(t: SeedTable) -> list[str]:
    common = set.intersection(*(set(t.batches(layer)) for layer in t.layers)) if t.layers else set()
    if not common or len(t.layers) < 2:
        return []
    b = min(common)
    cells = {layer: t.cell(layer, b, "err_ema") for layer in t.layers}
    best = min(cells, key=lambda k: cells[k].mean)
    worst = max(cells, key=lambda k: cells[k].mean)
    if differs(cells[worst], cells[best], min_effect=1.0, strict=1.5) == 0:
        return [
            f"At batch {b} no layer is clearly better than another (lowest error {best} "
            f"{pct(cells[best])}, highest {worst} {pct(cells[worst])})."
        ]
    return [
        f"At batch {b} the lowest test error is {best}'s ({pct(cells[best])}) and the highest "
        f"{worst}'s ({pct(cells[worst])})."
    ]


def renorm_claims(t: SeedTable) -> list[str]:
    out: list[str] = []
    for bn in [layer for layer in t.layers if t.norm[layer] == "batchnorm"]:
        brn = next(
            (x for x in t.layers if t.norm[x] == "batchrenorm" and variant_of(x) == variant_of(bn)),
            None,
        )
        if brn is not None:
            out += _renorm_pair(t, bn, brn)
    return out


def _renorm_pair(t: SeedTable, bn: str, brn: str) -> list[str]:
    common = sorted(set(t.batches(bn)) & set(t.batches(brn)))
    if len(common) < 2:
        return []
    hi = common[-1]
    bn_large = t.cell(bn, hi, "err_ema")
    out = []
    for b in common[:-1]:
        bn_small, brn_small = t.cell(bn, b, "err_ema"), t.cell(brn, b, "err_ema")
        if differs(bn_small, bn_large) <= 0:
            continue  # no BatchNorm loss to recover at this batch size
        loss = bn_small.mean - bn_large.mean
        gained = bn_small.mean - brn_small.mean
        share = 100 * gained / loss
        sign = differs(bn_small, brn_small)
        if sign > 0:
            out.append(
                f"At batch {b}, {brn} recovers {share:.0f}% of {bn}'s small-batch loss "
                f"({pct(brn_small)} vs {pct(bn_small)}; {bn} at batch {hi}: "
                f"{pct(bn_large)})."
            )
        elif sign < 0:
            out.append(
                f"At batch {b}, {brn} is worse than {bn} ({pct(brn_small)} vs "
                f"{pct(bn_small)}): it recovers none of {bn}'s small-batch loss."
            )
        else:
            out.append(
                f"At batch {b}, {brn} does not clearly recover {bn}'s small-batch loss "
                f"({pct(brn_small)} vs {pct(bn_small)})."
            )
    if not out:
        out.append(
            f"{bn} shows no clear small-batch loss in this sweep, so {brn}'s recovery "
            "is not measured."
        )
    return out[:2]


def series_claims(runs: pd.DataFrame) -> list[str]:
    """Runs of one layer that differ in settings other than seed and batch size are separate
    series; say so, naming the settings."""
    if "variant" not in runs or "layer_base" not in runs:
        return []
    ok = ok_runs(runs)
    ok = ok[ok["variant"].fillna("").astype(str).ne("")]
    out = []
    for base, group in ok.groupby("layer_base", sort=False):
        keys = list(
            dict.fromkeys(
                part.split("=", 1)[0] for v in group["variant"] for part in str(v).split(", ")
            )
        )
        series = sorted(group["layer"].unique())
        out.append(
            f"{base}'s runs differ in {join(keys)} (besides seed and batch size), so they are "
            f"separate series, not pooled as seeds: {join(series)}."
        )
    return out


def duplicate_claims(df: pd.DataFrame) -> list[str]:
    if "superseded_by" not in df:
        return []
    by = df["superseded_by"].dropna().astype(str)
    # an alias dir (norm=bn beside norm=batchnorm) is the same job; other repeats the same config
    dup = by[by.str.endswith("(same config and seed)") | by.str.endswith("(same job)")]
    if dup.empty:
        return []
    names = [Path(str(d)).name for d in df.loc[dup.index, "run_dir"].dropna()][:3]
    more = f" and {len(dup) - len(names)} more" if len(dup) > len(names) else ""
    return [
        f"{len(dup)} run{'s' if len(dup) > 1 else ''} repeat{'' if len(dup) > 1 else 's'} the "
        f"config and seed of another run (e.g. a layer alias such as bn for batchnorm) and "
        f"{'are' if len(dup) > 1 else 'is'} counted once, not as extra seeds: "
        f"{join([f'`{n}`' for n in names]) + more} (see 'Runs that are not ok')."
    ]


def run_claims(df: pd.DataFrame) -> list[str]:
    sup = (
        df["superseded"].fillna(False).astype(bool)
        if "superseded" in df
        else pd.Series(False, index=df.index)
    )
    counts = df.loc[~sup, "status"].value_counts()
    total = int(counts.sum())
    ok = int(counts.get("ok", 0))
    if ok == total:
        return [f"All {ok} runs finished ok."]
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "ok")
    return [f"{ok} of {total} runs finished ok ({others}); only ok runs enter the numbers above."]


def findings(df: pd.DataFrame) -> list[str]:
    """The findings, one sentence each, computed from a ``load_sweep`` frame (see :data:`RULES`)."""
    runs = prepare(df)
    ok = ok_runs(runs)
    if ok.empty:
        return [
            "No run finished ok: there is nothing to compare.",
            *duplicate_claims(runs),
            *run_claims(runs),
        ]
    t = SeedTable(summarise(ok), ok)
    out: list[str] = []
    out += degradation_claims(t)
    out += smallest_batch_ranking(t)
    out += renorm_claims(t)
    out += precise_claims(t)
    out += zero_mismatch_claims(ok, t)
    out += dependence_claims(t)
    out += clip_claims(t)
    out += series_claims(runs)
    out += duplicate_claims(runs)
    out += run_claims(runs)
    return [s[:1].upper() + s[1:] for s in out]
