"""Findings on the train/inference mismatch: PreciseBN against EMA statistics (Wu & Johnson 2021),
zero mismatch of layers without batch statistics, batch dependence, Batch Renorm's clipping."""

from __future__ import annotations

import itertools
import math

import pandas as pd

from normzoo.analysis.stats import differs, paired, same_way
from normzoo.analysis.summary import SeedTable
from normzoo.analysis.wording import join, num, pct, sizes

__all__ = ["clip_claims", "dependence_claims", "precise_claims", "zero_mismatch_claims"]


def precise_claims(t: SeedTable) -> list[str]:
    out = []
    for layer in t.layers:
        if t.batch_stats[layer] is not True:
            continue
        bs = [b for b in t.batches(layer, "ema_minus_precise")]
        if not bs:
            continue
        cells = {b: t.cell(layer, b, "ema_minus_precise") for b in bs}
        better = [b for b in bs if paired(cells[b]) > 0]
        worse = [b for b in bs if paired(cells[b]) < 0]
        # large, in every seed the same way, but not clear by the rule: said as such
        consistent = [b for b in bs if same_way(cells[b])]
        unclear = [b for b in bs if b not in better and b not in worse and b not in consistent]
        # one rule (RULES['paired']) decides 'lowers', 'raises' and 'no clear difference'
        if better:
            b = max(better, key=lambda k: cells[k].mean)
            text = (
                f"PreciseBN recalibration lowers {layer}'s error where its EMA statistics cost "
                f"accuracy ({sizes(better)}): at batch {b} from "
                f"{pct(t.cell(layer, b, 'err_ema'))} with EMA statistics to "
                f"{pct(t.cell(layer, b, 'err_precise'))} with population statistics "
                f"(paired difference {pct(cells[b], ' points')})."
            )
            if worse:
                w = min(worse, key=lambda k: cells[k].mean)
                text += (
                    f" It raises the error at {sizes(worse)} (at batch {w}: paired difference "
                    f"{pct(cells[w], ' points')})."
                )
        elif worse:
            w = min(worse, key=lambda k: cells[k].mean)
            text = (
                f"PreciseBN recalibration raises {layer}'s error at {sizes(worse)}: at batch "
                f"{w} from {pct(t.cell(layer, w, 'err_ema'))} with EMA statistics to "
                f"{pct(t.cell(layer, w, 'err_precise'))} with population statistics (paired "
                f"difference EMA − PreciseBN {pct(cells[w], ' points')})"
                + (f"; no clear difference at {sizes(unclear)}." if unclear else ".")
            )
        elif unclear:
            b = max(unclear, key=lambda k: abs(cells[k].mean))
            at = "any batch size" if not consistent else sizes(unclear)
            text = (
                f"PreciseBN makes no clear difference to {layer}'s error at {at}: the largest "
                f"paired change (EMA − PreciseBN) there is {pct(cells[b], ' points')} at "
                f"batch {b}."
            )
        else:
            text = ""
        if consistent:
            s = max(consistent, key=lambda k: abs(cells[k].mean))
            n = cells[s].n
            direction = "rose" if cells[s].mean < 0 else "fell"
            text += (
                f"{' ' if text else ''}At {sizes(consistent)} every seed's error {direction} with "
                f"PreciseBN (at batch {s}: {pct(t.cell(layer, s, 'err_ema'))} with EMA "
                f"statistics, {pct(t.cell(layer, s, 'err_precise'))} with population "
                f"statistics, paired difference {pct(cells[s], ' points')}), too spread to pass "
                f"the 95% bar with {n} seeds."
            )
        out.append(text)
        lo = bs[0]
        ema_gap, pre_gap = t.cell(layer, lo, "gap_ema"), t.cell(layer, lo, "gap_precise")
        sign = paired(t.cell(layer, lo, "gap_narrowing"))
        verb = {1: "narrows", -1: "widens", 0: "does not clearly change"}[sign]
        text = (
            f"At batch {lo}, PreciseBN {verb} {layer}'s train/inference gap "
            f"(|inference error − batch-statistics error|): {pct(ema_gap, ' points')} with EMA "
            f"statistics, {pct(pre_gap, ' points')} with population statistics."
        )
        err_batch, err_precise = t.cell(layer, lo, "err_batch"), t.cell(layer, lo, "err_precise")
        if sign < 0 and err_precise.mean < err_batch.mean:
            text += (
                f" It widens because inference with population statistics "
                f"({pct(err_precise)}) is better than normalising with the batch's own "
                f"statistics ({pct(err_batch)}): the gap is then a gain, not a loss."
            )
        out.append(text)
    return out


def zero_mismatch_claims(runs: pd.DataFrame, t: SeedTable) -> list[str]:
    layers = [layer for layer in t.layers if t.batch_stats[layer] is False]
    sub = runs[runs["layer"].isin(layers)]
    if sub.empty or "err_batch" not in sub or sub["err_batch"].isna().all():
        return []
    err = (sub["err_ema"] - sub["err_batch"]).abs().max()
    kl = sub["kl_batch_vs_ema"].abs().max() if "kl_batch_vs_ema" in sub else math.nan
    dep = sub["batch_dependence"].max() if "batch_dependence" in sub else math.nan
    floor = sub["batch_dependence_floor"].max() if "batch_dependence_floor" in sub else math.nan
    names = join(layers)
    numbers = (
        f"max |EMA − batch-statistics error| = {err:.2g} points, max KL = {kl:.2g} nats, "
        f"max batch dependence = {dep:.2g} over {len(sub)} runs"
    )
    if err == 0 and kl == 0 and (dep == 0 or math.isnan(dep)):
        return [
            f"Layers without batch statistics ({names}) show zero mismatch, measured: {numbers}."
        ]
    if err == 0 and (math.isnan(floor) or dep <= max(floor, 1e-6)):
        return [
            f"Layers without batch statistics ({names}) show no mismatch beyond float noise: "
            f"{numbers} (numerical floor measured in eval mode: {floor:.2g})."
        ]
    return [f"Layers without batch statistics ({names}) show a non-zero mismatch: {numbers}."]


def dependence_claims(t: SeedTable) -> list[str]:
    out = []
    for layer in t.layers:
        if t.batch_stats[layer] is not True:
            continue
        bs = t.batches(layer, "batch_dependence")
        if len(bs) < 2:
            continue
        cells = [t.cell(layer, b, "batch_dependence") for b in bs]
        means = [c.mean for c in cells]
        trend = ""
        if all(a > b for a, b in itertools.pairwise(means)):
            trend = ", falling with every larger batch"
        elif means[0] > means[-1]:
            trend = ", lower at the largest batch but not monotonically"
        else:
            trend = ", not lower at the largest batch"
        out.append(
            f"{layer}'s batch dependence (relative change of one sample's logits when its batch "
            f"companions are replaced) is {num(cells[0])} at batch {bs[0]} and "
            f"{num(cells[-1])} at batch {bs[-1]}{trend}."
        )
        mg0, mg1 = t.cell(layer, bs[0], "ema_mean_gap"), t.cell(layer, bs[-1], "ema_mean_gap")
        if mg0.valid and mg1.valid:
            cmp = {1: "larger", -1: "smaller", 0: "not clearly different"}[
                differs(mg0, mg1, min_effect=0.0)
            ]
            out.append(
                f"Its EMA statistics deviate from the population statistics by {num(mg0)} σ in "
                f"mean at batch {bs[0]} against {num(mg1)} σ at batch {bs[-1]} ({cmp} at the "
                f"small batch)."
            )
    return out


def clip_claims(t: SeedTable) -> list[str]:
    out = []
    for layer in t.layers:
        bs = t.batches(layer, "brn_clip_r")
        if not bs:
            continue
        r, d = t.cell(layer, bs[0], "brn_clip_r"), t.cell(layer, bs[0], "brn_clip_d")
        r.mean, r.std = r.mean * 100, r.std * 100
        d.mean, d.std = d.mean * 100, d.std * 100
        out.append(
            f"{layer} clipped r in {pct(r)} and d in {pct(d)} of the channels in its last "
            f"training step at batch {bs[0]}."
        )
    return out
