"""A sweep's results -> ``report.md`` with PNG figures and CSV tables.

``normzoo-report <sweep dir> [--out DIR]`` (or :func:`build_report`, or :class:`ReportCallback` at the
end of a multirun) reads the sweep with :func:`normzoo.results.load_sweep` and writes, into the output
dir (default ``reports/<study>/``):

* ``report.md`` — sections: findings; small-batch degradation (figure: test error vs batch size on a
  log2 axis, seed mean and min–max band per layer, the GN paper's ResNet-50 curve beside it for
  shape; tables of the error at every batch size and of the degradation relative to each layer's own
  largest-batch error); train/inference mismatch (error with EMA vs batch vs PreciseBN statistics
  per batch size, one panel per layer; statistic gaps and KL; batch dependence); runs that are not
  ``ok`` with their reasons; settings; provenance (versions, device, git revision, commands, sweep
  dir, number of runs, wall time).
* ``fig_degradation.png``, ``fig_mismatch.png``, ``fig_gaps.png``, ``fig_batch_dependence.png``.
* ``runs.csv`` (every run, one row each), ``summary.csv`` (seed aggregates per layer and batch
  size), ``degradation.csv``, ``mismatch.csv``, ``layer_gaps.csv`` (per layer depth), ``problems.csv``.

Every sentence of the findings is computed from the data by :func:`findings`: each claim is tested
against the measured numbers and worded by the outcome (see :data:`RULES`), never written in advance.
Errors are reported in percent; spreads are the standard deviation over seeds (ddof=1), n = seeds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import logging
import math
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from omegaconf import DictConfig, OmegaConf

from normzoo.published import GN_PAPER_RESNET50
from normzoo.results import (
    FINISHED_STATUSES,
    aggregate_seeds,
    load_layers,
    load_sweep,
    ok_runs,
    write_csv,
)

__all__ = [
    "RULES",
    "ReportCallback",
    "build_report",
    "findings",
    "main",
    "prepare",
    "write_report",
]

log = logging.getLogger(__name__)

#: how each claim is decided (also printed in the report)
RULES = {
    "differs": (
        "two seed means differ when a two-sided Welch t-test at 95% rejects equality (|difference| "
        "> t(0.975, Welch dof) x standard error) and |difference| > 0.5 points; with a single "
        "seed, when |difference| > 3 points"
    ),
    "paired": (
        "an effect measured on the same runs (EMA vs PreciseBN, EMA vs batch statistics) is the "
        "mean of per-run differences; it is real when |mean| > t(0.975, n-1) x standard error "
        "and > 0.1 points; when every run shows the same difference (zero spread, so no error "
        "estimate; e.g. one test sample in every seed) or there is a single run, when "
        "|mean| > 3 points. One rule decides both directions and 'no clear difference'"
    ),
    "ranking": (
        "the best and worst layer at the smallest batch are picked from several, so they must "
        "differ by 1.5 times the 'differs' margin and by > 1 point"
    ),
    "flat": (
        "a layer is flat across batch sizes when its seed means span <= 1 point, or <= 3 points "
        "with its highest and lowest mean not clearly different ('differs')"
    ),
    "zero": "a mismatch is zero when the measured value is exactly 0 in every run",
}

ERROR_COLUMNS = {  # metrics.json (fraction) -> report column (percent)
    "test_error": "err_ema",
    "test_error_batch_stats": "err_batch",
    "test_error_precise": "err_precise",
    "train_error": "err_train",
}
_ORDER = (
    "batchnorm",
    "batchrenorm",
    "layernorm",
    "groupnorm",
    "instancenorm",
    "weightnorm",
    "none",
)
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
_NAMES = {
    "batchnorm": "BatchNorm",
    "batchrenorm": "Batch Renorm",
    "layernorm": "LayerNorm",
    "groupnorm": "GroupNorm",
    "instancenorm": "InstanceNorm",
    "weightnorm": "WeightNorm",
    "none": "no norm",
}
_DPI = 150
_LINESTYLES = ("-", "--", ":", "-.")
FLAT_POINTS = 1.0  # see RULES["flat"]


# ----------------------------------------------------------------------------- data preparation


def _base_norm(norm: str) -> str:
    return norm[len("native_") :] if norm.startswith("native_") else norm


def display_name(norm: str) -> str:
    """``batchnorm`` -> ``BatchNorm``; ``native_batchnorm`` -> ``BatchNorm (torch)``."""
    base = _base_norm(norm)
    name = _NAMES.get(base, base)
    return f"{name} (torch)" if norm.startswith("native_") else name


def _uses_batch_stats(norm: str, column: Any) -> bool | None:
    if isinstance(column, (bool, np.bool_)):
        return bool(column)
    try:
        from normzoo.registry import get_norm

        return get_norm(norm).uses_batch_stats
    except Exception:
        return None


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add the report's columns to a ``load_sweep`` frame.

    ``layer`` (display name; the model/data is appended when the sweep varies them, and the
    run's ``variant`` when runs of that layer differ in other settings, so that such runs are
    separate series and never pooled as seeds), ``norm_base``,
    ``batch_stats`` (bool), errors in percent (``err_ema``, ``err_batch``, ``err_precise``,
    ``err_train``) and per-run paired differences in points: ``ema_minus_precise``,
    ``ema_minus_batch``, ``gap_ema`` = |EMA - batch|, ``gap_precise`` = |PreciseBN - batch|,
    ``gap_narrowing`` = gap_ema - gap_precise.
    """
    df = df.copy()
    if "norm" not in df:
        df["norm"] = None
    df["norm"] = df["norm"].where(df["norm"].notna(), "unknown").astype(str)
    variants = [c for c in ("model", "data") if c in df and ok_runs(df)[c].nunique() > 1]
    label = df["norm"].map(display_name)
    for c in variants:
        label = label + " · " + df[c].astype(str)
    df["layer_base"] = label
    if "variant" in df:
        extra = df["variant"].astype(object).where(df["variant"].notna(), "").astype(str)
        label = label.where(extra.eq(""), label + " · " + extra)
    df["layer"] = label
    ok = ok_runs(df)
    if "config_id" in df and "batch_size" in df and not ok.empty:
        # a last guard: one series never holds two configs
        ids = ok["config_id"].astype(object).where(ok["config_id"].notna(), "none")
        n_ids = ids.groupby([ok["layer"], ok["batch_size"]]).transform("nunique")
        clash = ok.index[ok["layer"].isin(ok.loc[n_ids > 1, "layer"])]  # the whole series
        df.loc[clash, "layer"] = df.loc[clash, "layer"] + " · config " + ids[clash].str[:6]
    df["norm_base"] = df["norm"].map(_base_norm)
    flags = df["uses_batch_stats"] if "uses_batch_stats" in df else pd.Series(None, index=df.index)
    df["batch_stats"] = [
        _uses_batch_stats(n, f) for n, f in zip(df["norm"], flags.astype(object), strict=True)
    ]
    for src, dst in ERROR_COLUMNS.items():
        df[dst] = pd.to_numeric(df[src], errors="coerce") * 100 if src in df else np.nan
    if "test_error_ema" in df:  # the diagnostics' eval-mode error, taken on the same batches as
        # err_batch and err_precise (schema >= 2; before, it overwrote test_error itself)
        ema = pd.to_numeric(df["test_error_ema"], errors="coerce") * 100
        df["err_ema"] = ema.where(ema.notna(), df["err_ema"])
    df["ema_minus_precise"] = df["err_ema"] - df["err_precise"]
    df["ema_minus_batch"] = df["err_ema"] - df["err_batch"]
    df["gap_ema"] = (df["err_ema"] - df["err_batch"]).abs()
    df["gap_precise"] = (df["err_precise"] - df["err_batch"]).abs()
    df["gap_narrowing"] = df["gap_ema"] - df["gap_precise"]
    # a sweep run with diagnostics off, or an older schema: NaN columns, not a KeyError later
    for metric in _METRICS:
        if metric not in df:
            df[metric] = np.nan
        else:
            df[metric] = pd.to_numeric(df[metric], errors="coerce")
    return df


_METRICS = (
    "err_ema",
    "err_batch",
    "err_precise",
    "err_train",
    "ema_minus_precise",
    "ema_minus_batch",
    "gap_ema",
    "gap_precise",
    "gap_narrowing",
    "kl_batch_vs_ema",
    "batch_dependence",
    "batch_dependence_floor",
    "ema_mean_gap",
    "ema_log_std_gap",
    "brn_clip_r",
    "brn_clip_d",
    "wall_time_s",
)


def _layer_order(layers: Sequence[str], df: pd.DataFrame) -> list[str]:
    first = df.drop_duplicates("layer").set_index("layer")["norm"]

    def key(layer: str) -> tuple[int, int, str]:
        norm = str(first.get(layer, layer))
        base = _base_norm(norm)
        rank = _ORDER.index(base) if base in _ORDER else len(_ORDER)
        return (rank, int(norm.startswith("native_")), layer)

    return sorted(dict.fromkeys(layers), key=key)


@dataclass
class _Cell:
    mean: float
    std: float
    n: int
    lo: float
    hi: float

    @property
    def valid(self) -> bool:
        return self.n > 0 and not math.isnan(self.mean)

    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 and not math.isnan(self.std) else math.nan


class _Table:
    """Seed aggregates indexed by (layer, batch size)."""

    def __init__(self, agg: pd.DataFrame, runs: pd.DataFrame) -> None:
        self.agg = agg.set_index(["layer", "batch_size"]) if not agg.empty else agg
        self.runs = runs
        self.layers = _layer_order(list(agg["layer"]) if not agg.empty else [], runs)
        info = runs.drop_duplicates("layer").set_index("layer")
        self.norm = {layer: str(info.loc[layer, "norm"]) for layer in self.layers}
        self.batch_stats: dict[str, bool | None] = {
            layer: _flag(info.loc[layer, "batch_stats"]) for layer in self.layers
        }

    def batches(self, layer: str, metric: str = "err_ema") -> list[int]:
        if layer not in self.layers:
            return []
        sub = self.agg.loc[layer]
        return sorted(int(b) for b in sub.index if sub.loc[b, f"{metric}_n"] > 0)

    def cell(self, layer: str, batch: int, metric: str) -> _Cell:
        try:
            row = self.agg.loc[(layer, batch)]
        except KeyError:
            return _Cell(math.nan, math.nan, 0, math.nan, math.nan)
        return _Cell(
            float(row[f"{metric}_mean"]),
            float(row[f"{metric}_std"]),
            int(row[f"{metric}_n"]),
            float(row[f"{metric}_min"]),
            float(row[f"{metric}_max"]),
        )


def _flag(value: Any) -> bool | None:
    """A bool, or None when unknown (NaN/None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def _summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed aggregates of every metric for a :func:`prepare` frame (which has all of them)."""
    return aggregate_seeds(runs, list(_METRICS), by=("layer", "batch_size"))


# ----------------------------------------------------------------------------- claims


def _pct(c: _Cell, unit: str = "%", digits: int = 1) -> str:
    if not c.valid:
        return "n/a"
    if c.n > 1 and not math.isnan(c.std):
        return f"{c.mean:.{digits}f} ± {c.std:.{digits}f}{unit}"
    return f"{c.mean:.{digits}f}{unit} (1 seed)"


def _num(c: _Cell, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` significant digits on the mean, the std to the same place."""
    if not c.valid:
        return "n/a"
    mag = math.floor(math.log10(abs(c.mean))) if c.mean != 0 else 0
    places = min(max(digits - 1 - mag, 0), 8)
    if c.n > 1 and not math.isnan(c.std):
        return f"{c.mean:.{places}f} ± {c.std:.{places}f}"
    return f"{c.mean:.{places}f} (1 seed)"


#: a spread of per-run differences below this (points) is float noise on equal differences
_ZERO_SPREAD = 1e-4

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _t975(dof: float) -> float:
    """Two-sided 95% Student-t critical value (table; 2.0 beyond 30 degrees of freedom)."""
    if not dof >= 1:
        return math.inf
    if dof < 10:
        return _T975[max(1, int(dof))]  # rounding dof down is the conservative side
    return 2.228 if dof < 20 else 2.086 if dof < 30 else 2.0


def _differs(a: _Cell, b: _Cell, min_effect: float = 0.5, strict: float = 1.0) -> int:
    """+1 if a > b, -1 if a < b, 0 if no clear difference (RULES['differs'])."""
    if not (a.valid and b.valid):
        return 0
    d = a.mean - b.mean
    if a.n > 1 and b.n > 1:
        va, vb = a.std**2 / a.n, b.std**2 / b.n
        se = math.sqrt(va + vb)
        if se == 0:
            clear = abs(d) > min_effect
        else:  # Welch-Satterthwaite degrees of freedom
            dof = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
            clear = abs(d) > strict * _t975(dof) * se and abs(d) > min_effect
    else:
        clear = abs(d) > 3.0
    return int(np.sign(d)) if clear else 0


def _paired(c: _Cell, min_effect: float = 0.1) -> int:
    """Sign of a per-run paired difference when it is clear (RULES['paired']), else 0."""
    if not c.valid:
        return 0
    if c.n > 1 and not math.isnan(c.std) and c.std > _ZERO_SPREAD:
        clear = abs(c.mean) > _t975(c.n - 1) * c.se() and abs(c.mean) > min_effect
    else:  # one run, or all runs equal: the spread gives no error estimate
        clear = abs(c.mean) > 3.0
    return int(np.sign(c.mean)) if clear else 0


def _same_way(c: _Cell, min_effect: float = 3.0) -> int:
    """Sign of a paired difference that the rule does not call clear (:func:`_paired` is 0) but
    that every run shows in the same direction and that is larger than ``min_effect`` points
    (e.g. 3 seeds from 4% to 23%, each by 13 points or more, but t below t(0.975, 2) = 4.3):
    worth reporting as such, never as 'no clear difference'. 0 otherwise."""
    if not c.valid or c.n < 2 or _paired(c) != 0 or abs(c.mean) <= min_effect:
        return 0
    if c.lo > 0 or c.hi < 0:
        return int(np.sign(c.mean))
    return 0


def _sizes(batches: Sequence[int]) -> str:
    """'batch size 4' or 'batch sizes 2, 4 and 8'."""
    items = [str(b) for b in batches]
    return f"batch size{'s' if len(items) > 1 else ''} {_join(items)}"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _degradation_claims(t: _Table) -> list[str]:
    out = []
    for layer in t.layers:
        if t.batch_stats[layer] is not True:
            continue
        bs = t.batches(layer)
        if len(bs) < 2:
            continue
        lo, hi = bs[0], bs[-1]
        small, large = t.cell(layer, lo, "err_ema"), t.cell(layer, hi, "err_ema")
        sign = _differs(small, large)
        delta = small.mean - large.mean
        ratio = small.mean / large.mean if large.mean > 0 else math.inf
        if sign > 0:
            first = next(b for b in bs if _differs(t.cell(layer, b, "err_ema"), large) > 0)
            onset = (
                f"; it is clearly above that level at batch sizes <= {first}" if first != lo else ""
            )
            out.append(
                f"{layer}'s test error rises from {_pct(large)} at batch {hi} to {_pct(small)} at "
                f"batch {lo} (+{delta:.1f} points, {ratio:.1f}×){onset}."
            )
        elif sign < 0:
            out.append(
                f"{layer}'s test error falls from {_pct(large)} at batch {hi} to {_pct(small)} at "
                f"batch {lo} ({delta:.1f} points): no small-batch degradation."
            )
        else:
            out.append(
                f"{layer}'s test error shows no clear change between batch {hi} ({_pct(large)}) "
                f"and batch {lo} ({_pct(small)})."
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
        clear = _differs(cells[hi_b], cells[lo_b]) != 0
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
        names = _join([e[0] for e in flat])
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


def _varying_claim(t: _Table, layer: str, span: float, lo_v: float, hi_v: float) -> str:
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
    if _differs(cells[bs[0]], cells[mid]) > 0:
        return (
            f"{head}, and it is clearly worse at batch {bs[0]} ({_pct(cells[bs[0]])}) than at "
            f"batch {mid} ({_pct(cells[mid])}): a small-batch loss."
        )
    return (
        f"{head}, but not at small batch: at batch {bs[0]} it is {_pct(cells[bs[0]])} against "
        f"{_pct(cells[mid])} at batch {mid} (not clearly higher)."
    )


def _smallest_batch_ranking(t: _Table) -> list[str]:
    common = set.intersection(*(set(t.batches(layer)) for layer in t.layers)) if t.layers else set()
    if not common or len(t.layers) < 2:
        return []
    b = min(common)
    cells = {layer: t.cell(layer, b, "err_ema") for layer in t.layers}
    best = min(cells, key=lambda k: cells[k].mean)
    worst = max(cells, key=lambda k: cells[k].mean)
    if _differs(cells[worst], cells[best], min_effect=1.0, strict=1.5) == 0:
        return [
            f"At batch {b} no layer is clearly better than another (lowest error {best} "
            f"{_pct(cells[best])}, highest {worst} {_pct(cells[worst])})."
        ]
    return [
        f"At batch {b} the lowest test error is {best}'s ({_pct(cells[best])}) and the highest "
        f"{worst}'s ({_pct(cells[worst])})."
    ]


def _variant(layer: str) -> str:
    """The model/data suffix of a layer label ('' when the sweep does not vary them)."""
    return layer.split(" · ", 1)[1] if " · " in layer else ""


def _renorm_claims(t: _Table) -> list[str]:
    out: list[str] = []
    for bn in [layer for layer in t.layers if t.norm[layer] == "batchnorm"]:
        brn = next(
            (x for x in t.layers if t.norm[x] == "batchrenorm" and _variant(x) == _variant(bn)),
            None,
        )
        if brn is not None:
            out += _renorm_pair(t, bn, brn)
    return out


def _renorm_pair(t: _Table, bn: str, brn: str) -> list[str]:
    common = sorted(set(t.batches(bn)) & set(t.batches(brn)))
    if len(common) < 2:
        return []
    hi = common[-1]
    bn_large = t.cell(bn, hi, "err_ema")
    out = []
    for b in common[:-1]:
        bn_small, brn_small = t.cell(bn, b, "err_ema"), t.cell(brn, b, "err_ema")
        if _differs(bn_small, bn_large) <= 0:
            continue  # no BatchNorm loss to recover at this batch size
        loss = bn_small.mean - bn_large.mean
        gained = bn_small.mean - brn_small.mean
        share = 100 * gained / loss
        sign = _differs(bn_small, brn_small)
        if sign > 0:
            out.append(
                f"At batch {b}, {brn} recovers {share:.0f}% of {bn}'s small-batch loss "
                f"({_pct(brn_small)} vs {_pct(bn_small)}; {bn} at batch {hi}: "
                f"{_pct(bn_large)})."
            )
        elif sign < 0:
            out.append(
                f"At batch {b}, {brn} is worse than {bn} ({_pct(brn_small)} vs "
                f"{_pct(bn_small)}): it recovers none of {bn}'s small-batch loss."
            )
        else:
            out.append(
                f"At batch {b}, {brn} does not clearly recover {bn}'s small-batch loss "
                f"({_pct(brn_small)} vs {_pct(bn_small)})."
            )
    if not out:
        out.append(
            f"{bn} shows no clear small-batch loss in this sweep, so {brn}'s recovery "
            "is not measured."
        )
    return out[:2]


def _precise_claims(t: _Table) -> list[str]:
    out = []
    for layer in t.layers:
        if t.batch_stats[layer] is not True:
            continue
        bs = [b for b in t.batches(layer, "ema_minus_precise")]
        if not bs:
            continue
        cells = {b: t.cell(layer, b, "ema_minus_precise") for b in bs}
        better = [b for b in bs if _paired(cells[b]) > 0]
        worse = [b for b in bs if _paired(cells[b]) < 0]
        # large, in every seed the same way, but not clear by the rule: said as such
        same_way = [b for b in bs if _same_way(cells[b])]
        unclear = [b for b in bs if b not in better and b not in worse and b not in same_way]
        # one rule (RULES['paired']) decides 'lowers', 'raises' and 'no clear difference'
        if better:
            b = max(better, key=lambda k: cells[k].mean)
            text = (
                f"PreciseBN recalibration lowers {layer}'s error where its EMA statistics cost "
                f"accuracy ({_sizes(better)}): at batch {b} from "
                f"{_pct(t.cell(layer, b, 'err_ema'))} with EMA statistics to "
                f"{_pct(t.cell(layer, b, 'err_precise'))} with population statistics "
                f"(paired difference {_pct(cells[b], ' points')})."
            )
            if worse:
                w = min(worse, key=lambda k: cells[k].mean)
                text += (
                    f" It raises the error at {_sizes(worse)} (at batch {w}: paired difference "
                    f"{_pct(cells[w], ' points')})."
                )
        elif worse:
            w = min(worse, key=lambda k: cells[k].mean)
            text = (
                f"PreciseBN recalibration raises {layer}'s error at {_sizes(worse)}: at batch "
                f"{w} from {_pct(t.cell(layer, w, 'err_ema'))} with EMA statistics to "
                f"{_pct(t.cell(layer, w, 'err_precise'))} with population statistics (paired "
                f"difference EMA − PreciseBN {_pct(cells[w], ' points')})"
                + (f"; no clear difference at {_sizes(unclear)}." if unclear else ".")
            )
        elif unclear:
            b = max(unclear, key=lambda k: abs(cells[k].mean))
            at = "any batch size" if not same_way else _sizes(unclear)
            text = (
                f"PreciseBN makes no clear difference to {layer}'s error at {at}: the largest "
                f"paired change (EMA − PreciseBN) there is {_pct(cells[b], ' points')} at "
                f"batch {b}."
            )
        else:
            text = ""
        if same_way:
            s = max(same_way, key=lambda k: abs(cells[k].mean))
            n = cells[s].n
            direction = "rose" if cells[s].mean < 0 else "fell"
            text += (
                f"{' ' if text else ''}At {_sizes(same_way)} every seed's error {direction} with "
                f"PreciseBN (at batch {s}: {_pct(t.cell(layer, s, 'err_ema'))} with EMA "
                f"statistics, {_pct(t.cell(layer, s, 'err_precise'))} with population "
                f"statistics, paired difference {_pct(cells[s], ' points')}), too spread to pass "
                f"the 95% bar with {n} seeds."
            )
        out.append(text)
        lo = bs[0]
        ema_gap, pre_gap = t.cell(layer, lo, "gap_ema"), t.cell(layer, lo, "gap_precise")
        sign = _paired(t.cell(layer, lo, "gap_narrowing"))
        verb = {1: "narrows", -1: "widens", 0: "does not clearly change"}[sign]
        text = (
            f"At batch {lo}, PreciseBN {verb} {layer}'s train/inference gap "
            f"(|inference error − batch-statistics error|): {_pct(ema_gap, ' points')} with EMA "
            f"statistics, {_pct(pre_gap, ' points')} with population statistics."
        )
        err_batch, err_precise = t.cell(layer, lo, "err_batch"), t.cell(layer, lo, "err_precise")
        if sign < 0 and err_precise.mean < err_batch.mean:
            text += (
                f" It widens because inference with population statistics "
                f"({_pct(err_precise)}) is better than normalising with the batch's own "
                f"statistics ({_pct(err_batch)}): the gap is then a gain, not a loss."
            )
        out.append(text)
    return out


def _zero_mismatch_claims(runs: pd.DataFrame, t: _Table) -> list[str]:
    layers = [layer for layer in t.layers if t.batch_stats[layer] is False]
    sub = runs[runs["layer"].isin(layers)]
    if sub.empty or "err_batch" not in sub or sub["err_batch"].isna().all():
        return []
    err = (sub["err_ema"] - sub["err_batch"]).abs().max()
    kl = sub["kl_batch_vs_ema"].abs().max() if "kl_batch_vs_ema" in sub else math.nan
    dep = sub["batch_dependence"].max() if "batch_dependence" in sub else math.nan
    floor = sub["batch_dependence_floor"].max() if "batch_dependence_floor" in sub else math.nan
    names = _join(layers)
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


def _dependence_claims(t: _Table) -> list[str]:
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
            f"companions are replaced) is {_num(cells[0])} at batch {bs[0]} and "
            f"{_num(cells[-1])} at batch {bs[-1]}{trend}."
        )
        mg0, mg1 = t.cell(layer, bs[0], "ema_mean_gap"), t.cell(layer, bs[-1], "ema_mean_gap")
        if mg0.valid and mg1.valid:
            cmp = {1: "larger", -1: "smaller", 0: "not clearly different"}[
                _differs(mg0, mg1, min_effect=0.0)
            ]
            out.append(
                f"Its EMA statistics deviate from the population statistics by {_num(mg0)} σ in "
                f"mean at batch {bs[0]} against {_num(mg1)} σ at batch {bs[-1]} ({cmp} at the "
                f"small batch)."
            )
    return out


def _clip_claims(t: _Table) -> list[str]:
    out = []
    for layer in t.layers:
        bs = t.batches(layer, "brn_clip_r")
        if not bs:
            continue
        r, d = t.cell(layer, bs[0], "brn_clip_r"), t.cell(layer, bs[0], "brn_clip_d")
        r.mean, r.std = r.mean * 100, r.std * 100
        d.mean, d.std = d.mean * 100, d.std * 100
        out.append(
            f"{layer} clipped r in {_pct(r)} and d in {_pct(d)} of the channels in its last "
            f"training step at batch {bs[0]}."
        )
    return out


def _series_claims(runs: pd.DataFrame) -> list[str]:
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
            f"{base}'s runs differ in {_join(keys)} (besides seed and batch size), so they are "
            f"separate series, not pooled as seeds: {_join(series)}."
        )
    return out


def _duplicate_claims(df: pd.DataFrame) -> list[str]:
    if "superseded_by" not in df:
        return []
    by = df["superseded_by"].dropna().astype(str)
    dup = by[by.str.endswith("(same config and seed)")]
    if dup.empty:
        return []
    names = [Path(str(d)).name for d in df.loc[dup.index, "run_dir"].dropna()][:3]
    more = f" and {len(dup) - len(names)} more" if len(dup) > len(names) else ""
    return [
        f"{len(dup)} run{'s' if len(dup) > 1 else ''} repeat{'' if len(dup) > 1 else 's'} the "
        f"config and seed of another run (e.g. a layer alias such as bn for batchnorm) and "
        f"{'are' if len(dup) > 1 else 'is'} counted once, not as extra seeds: "
        f"{_join([f'`{n}`' for n in names]) + more} (see 'Runs that are not ok')."
    ]


def _run_claims(df: pd.DataFrame) -> list[str]:
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
            *_duplicate_claims(runs),
            *_run_claims(runs),
        ]
    t = _Table(_summary(ok), ok)
    out: list[str] = []
    out += _degradation_claims(t)
    out += _smallest_batch_ranking(t)
    out += _renorm_claims(t)
    out += _precise_claims(t)
    out += _zero_mismatch_claims(ok, t)
    out += _dependence_claims(t)
    out += _clip_claims(t)
    out += _series_claims(runs)
    out += _duplicate_claims(runs)
    out += _run_claims(runs)
    return [s[:1].upper() + s[1:] for s in out]


# ----------------------------------------------------------------------------- figures


def _styles(t: _Table) -> dict[str, dict[str, Any]]:
    """Colour by layer family (the same in every figure), line style by model/data variant,
    square markers for torch's native references."""
    spare = iter(_SPARE_COLOURS * 4)
    colours: dict[str, str] = {}
    variants = list(dict.fromkeys(_variant(layer) for layer in t.layers))
    out = {}
    for layer in t.layers:
        norm = t.norm[layer]
        base = _base_norm(norm)
        if base not in colours:
            colours[base] = _COLOURS.get(base) or next(spare)
        out[layer] = {
            "color": colours[base],
            "linestyle": _LINESTYLES[variants.index(_variant(layer)) % len(_LINESTYLES)],
            "marker": "s" if norm.startswith("native_") else "o",
        }
    return out


def _log2_axis(ax: Any, batches: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batches))
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def _fig_degradation(t: _Table, styles: dict, path: Path) -> Path:
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax, ref = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    all_b: set[int] = set()
    n_seeds = 0
    for layer in t.layers:
        bs = t.batches(layer)
        cells = [t.cell(layer, b, "err_ema") for b in bs]
        all_b |= set(bs)
        n_seeds = max([n_seeds, *(c.n for c in cells)])
        ax.plot(bs, [c.mean for c in cells], label=layer, lw=1.8, ms=5, **styles[layer])
        ax.fill_between(
            bs,
            [c.lo for c in cells],
            [c.hi for c in cells],
            color=styles[layer]["color"],
            alpha=0.15,
        )
    _log2_axis(ax, sorted(all_b))
    ax.set_xlabel("batch size (samples per normalisation batch, log2 scale)")
    ax.set_ylabel("test error (%), EMA statistics")
    ax.set_title(f"Measured: mean over seeds, band = min–max (up to {n_seeds} seeds)")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.set_ylim(bottom=0)
    p = GN_PAPER_RESNET50
    for name, values in p.error.items():
        ref.plot(p.batch_sizes, values, label=display_name(name), lw=1.8, ms=5, **_ref_style(name))
    _log2_axis(ref, sorted(p.batch_sizes))
    ref.set_xlabel("batch size (images per GPU, log2 scale)")
    ref.set_ylabel(p.metric)
    ref.set_title("Published, for shape only:\n" + p.title, fontsize=10)
    ref.legend(fontsize=8)
    fig.suptitle("Small-batch degradation: test error vs batch size", fontsize=12)
    return _save(fig, path)


def _ref_style(name: str) -> dict[str, Any]:
    return {"color": _COLOURS.get(name, "k"), "linestyle": "-", "marker": "o"}


def _dodge(batches: Sequence[int], i: int, k: int, width: float = 0.12) -> list[float]:
    """Shift series i of k sideways on the log2 axis so coinciding lines stay visible."""
    shift = width * (i - (k - 1) / 2) / max(k - 1, 1) if k > 1 else 0.0
    return [b * 2**shift for b in batches]


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _fig_mismatch(t: _Table, styles: dict, path: Path) -> Path:
    rows, cols = _grid(len(t.layers))
    fig = Figure(figsize=(3.6 * cols + 0.6, 3.1 * rows + 0.9), layout="constrained")
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
        _log2_axis(ax, bs)
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
    return _save(fig, path)


def _fig_lines(
    t: _Table,
    styles: dict,
    path: Path,
    panels: Sequence[tuple[str, str, str]],
    title: str,
    layers: Sequence[str],
    log_y: bool = False,
) -> Path:
    fig = Figure(figsize=(4.6 * len(panels) + 0.4, 4.2), layout="constrained")
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
        _log2_axis(ax, sorted(all_b) or [1])
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
    return _save(fig, path)


# ----------------------------------------------------------------------------- tables


def _pm(c: _Cell, digits: int = 1) -> str:
    if not c.valid:
        return ""
    if c.n > 1 and not math.isnan(c.std):
        return f"{c.mean:.{digits}f} ± {c.std:.{digits}f}"
    return f"{c.mean:.{digits}f}"


def _degradation_tables(t: _Table) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long CSV frame, error table, degradation table) for the markdown."""
    rows, err_md, deg_md = [], {}, {}
    for layer in t.layers:
        bs = t.batches(layer)
        if not bs:
            continue
        ref = t.cell(layer, bs[-1], "err_ema")
        err_md[layer], deg_md[layer] = {}, {}
        for b in bs:
            c = t.cell(layer, b, "err_ema")
            points = c.mean - ref.mean
            ratio = c.mean / ref.mean if ref.mean > 0 else math.nan
            rows.append(
                {
                    "layer": layer,
                    "norm": t.norm[layer],
                    "batch_size": b,
                    "error_mean_pct": c.mean,
                    "error_std_pct": c.std,
                    "error_min_pct": c.lo,
                    "error_max_pct": c.hi,
                    "n_seeds": c.n,
                    "reference_batch_size": bs[-1],
                    "degradation_points": points,
                    "degradation_ratio": ratio,
                }
            )
            err_md[layer][b] = _pm(c)
            deg_md[layer][b] = f"{points:+.1f} ({ratio:.2f}×)" if b != bs[-1] else "ref."
    # columns in batch order, whichever layer lists a batch first
    err = pd.DataFrame(err_md).T.sort_index(axis=1)
    deg = pd.DataFrame(deg_md).T.sort_index(axis=1)
    for frame in (err, deg):
        frame.columns = [f"B={b}" for b in frame.columns]
        frame.index.name = "layer"
    return pd.DataFrame(rows), err.fillna(""), deg.fillna("")


def _mismatch_table(t: _Table) -> pd.DataFrame:
    rows = []
    for layer in t.layers:
        for b in t.batches(layer):
            row: dict[str, Any] = {"layer": layer, "norm": t.norm[layer], "batch_size": b}
            for metric in (
                "err_ema",
                "err_batch",
                "err_precise",
                "ema_minus_precise",
                "gap_ema",
                "gap_precise",
                "kl_batch_vs_ema",
                "batch_dependence",
                "batch_dependence_floor",
                "ema_mean_gap",
                "ema_log_std_gap",
                "brn_clip_r",
                "brn_clip_d",
            ):
                c = t.cell(layer, b, metric)
                row[f"{metric}_mean"], row[f"{metric}_std"] = c.mean, c.std
            row["n_seeds"] = t.cell(layer, b, "err_ema").n
            rows.append(row)
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame, index: bool = True) -> str:
    if df.empty:
        return "_(none)_"
    frame = df.reset_index() if index else df
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = ["" if pd.isna(v) else str(v).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mismatch_md(t: _Table) -> pd.DataFrame:
    data = {}
    for layer in t.layers:
        bs = t.batches(layer)
        if not bs:
            continue
        for b in (bs[0], bs[-1]) if len(bs) > 1 else (bs[0],):
            data[(layer, b)] = {
                "EMA error (%)": _pm(t.cell(layer, b, "err_ema")),
                "batch-stat error (%)": _pm(t.cell(layer, b, "err_batch")),
                "PreciseBN error (%)": _pm(t.cell(layer, b, "err_precise")),
                "KL(batch ‖ EMA) (nats)": _pm(t.cell(layer, b, "kl_batch_vs_ema"), 3),
                "batch dependence": _pm(t.cell(layer, b, "batch_dependence"), 3),
                "|Δμ|/σ": _pm(t.cell(layer, b, "ema_mean_gap"), 3),
                "|log σ ratio|": _pm(t.cell(layer, b, "ema_log_std_gap"), 3),
            }
    frame = pd.DataFrame(data).T
    frame.index.names = ["layer", "batch size"]
    return frame


def _layer_gap_table(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    layers = load_layers(df)
    if layers.empty or "mean_gap" not in layers:
        return pd.DataFrame()
    layers = layers[layers["mean_gap"].notna()]
    if layers.empty:
        return pd.DataFrame()
    with_dir = runs[runs["run_dir"].notna()].drop_duplicates("run_dir")
    labels = with_dir.set_index("run_dir")["layer"]
    layers = layers.assign(layer=layers["run_dir"].map(labels))
    cols = [c for c in ("mean_gap", "log_std_gap", "batch_dependence") if c in layers]
    keys = ["layer", "batch_size", "depth", "name"]
    agg = layers.groupby(keys)[cols].agg(["mean", "std", "count"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    return agg.reset_index()


# ----------------------------------------------------------------------------- provenance


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _sweep_command(sweep_dir: Path | None) -> str | None:
    if sweep_dir is None or not (sweep_dir / "multirun.yaml").is_file():
        return None
    try:
        conf = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml"), resolve=False)
        ov = conf["hydra"]["overrides"]
        hydra_ov = [o for o in ov.get("hydra") or [] if o != "hydra.mode=MULTIRUN"]
        task = list(ov.get("task") or [])
        name = conf["hydra"].get("job", {}).get("name") or "train"
        app = "normzoo-train" if name in ("train", "normzoo-train") else name
        return shlex.join([app, "-m", *task, *hydra_ov])
    except Exception:
        return None


def _provenance(df: pd.DataFrame, sweep_dir: Path | None, command: str | None) -> list[str]:
    ok = ok_runs(df)
    lines = []
    if sweep_dir is not None:
        lines.append(f"- sweep dir: `{sweep_dir}`")
    sweep_cmd = _sweep_command(sweep_dir)
    if sweep_cmd:
        lines.append(f"- sweep command (from `multirun.yaml`): `{sweep_cmd}`")
    commands = set()
    for run_dir in ok["run_dir"].dropna().head(200) if "run_dir" in ok else []:
        cmd = _read_json(Path(run_dir) / "metrics.json").get("command")
        if isinstance(cmd, list) and cmd:
            commands.add(shlex.join(str(c) for c in cmd))
    for cmd in sorted(commands)[:5]:
        lines.append(f"- command recorded by the runs: `{cmd}`")
    if command:
        lines.append(f"- report built by: `{command}`")
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    lines.append(
        f"- runs: {len(df)} rows ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none'})"
        + (
            f"; {int(df['superseded'].sum())} superseded"
            if df.get("superseded", pd.Series()).any()
            else ""
        )
    )
    for col, label in (("git_rev", "git revision"), ("device", "device"), ("hostname", "host")):
        if col in ok and ok[col].notna().any():
            vals = sorted(map(str, ok[col].dropna().unique()))
            lines.append(f"- {label}: {', '.join(f'`{v}`' for v in vals[:6])}")
    versions = [c for c in ok.columns if c.startswith("versions.")]
    if versions:
        parts = []
        for c in versions:
            vals = sorted(map(str, ok[c].dropna().unique()))
            if vals:
                parts.append(f"{c.split('.', 1)[1]} {'/'.join(vals)}")
        lines.append(f"- versions (runs): {', '.join(parts)}")
    lines.append(
        f"- report built with: python {platform.python_version()}, pandas {pd.__version__}, "
        f"normzoo {_version()}, at {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}"
    )
    if "wall_time_s" in ok and ok["wall_time_s"].notna().any():
        total = float(ok["wall_time_s"].sum())
        lines.append(f"- compute time: {total:.0f} s summed over ok runs")
    span = _elapsed(ok)
    if span is not None:
        lines.append(f"- sweep wall time (first start to last finish of ok runs): {span:.0f} s")
    return lines


def _version() -> str:
    try:
        from normzoo import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "?"


def _elapsed(ok: pd.DataFrame) -> float | None:
    if "started_at" not in ok or "finished_at" not in ok:
        return None
    start = pd.to_datetime(ok["started_at"], errors="coerce", utc=True).min()
    end = pd.to_datetime(ok["finished_at"], errors="coerce", utc=True).max()
    if pd.isna(start) or pd.isna(end):
        return None
    return float((end - start).total_seconds())


def _settings(df: pd.DataFrame) -> pd.DataFrame:
    """Config values shared by every run of the sweep, not only the ok ones: a run that failed,
    is invalid or never finished counts wherever it records (or its overrides set) the key.
    Superseded runs are left out; a key that a finished run lacks is not shared."""
    plain = ("model", "data", "epochs", "optimizer", "base_lr", "threads", "precise_samples")
    if "superseded" in df:
        df = df[~df["superseded"].fillna(False).astype(bool)]
    finished = df["status"].isin(FINISHED_STATUSES) if "status" in df else df.index.notna()
    cols = [
        c
        for c in df.columns
        if c in plain
        or ("." in c and not c.startswith(("versions.", "config.")) and c != "superseded_by")
    ]
    rows = []
    for c in cols:
        if df.loc[finished, c].isna().any() or df[c].notna().sum() == 0:
            continue  # set for some runs only (a layer's own option)
        vals = df[c].dropna().astype(str).unique()
        if len(vals) == 1:
            rows.append({"setting": c, "value": vals[0]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the report


def write_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    title: str | None = None,
    sweep_dir: str | Path | None = None,
    command: str | None = None,
) -> Path:
    """Write ``report.md``, its figures and CSV tables for a ``load_sweep`` frame; returns the
    path of ``report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = Path(sweep_dir) if sweep_dir is not None else None
    runs = prepare(df)
    ok = ok_runs(runs)
    title = title or f"normzoo report: {sweep.name if sweep else 'sweep'}"
    write_csv(df, out / "runs.csv")
    problems = runs[runs["status"].ne("ok") | runs.get("superseded", False)]
    # model/data columns whenever the sweep varies them (as the layer labels do), and variant
    varied = [c for c in ("model", "data", "variant") if _distinct(df, c) > int(c != "variant")]
    prob_cols = [
        c for c in ("norm", *varied, "batch_size", "seed", "status", "error", "run_dir") if c in df
    ]
    prob = df.loc[problems.index, prob_cols].copy()
    for col in ("batch_size", "seed"):
        if col in prob:
            prob[col] = pd.to_numeric(prob[col], errors="coerce").astype("Int64")
    if "superseded" in problems:
        prob["superseded"] = problems["superseded"]
    if "superseded_by" in df and df.loc[problems.index, "superseded_by"].notna().any():
        prob["superseded_by"] = df.loc[problems.index, "superseded_by"]
    write_csv(prob, out / "problems.csv")

    md: list[str] = [f"# {title}", ""]
    md += [
        "Generated by `normzoo.report` from the sweep's `metrics.json` files; every number and "
        "every sentence below is computed from them. Errors are test errors in percent, "
        "`mean ± std` over seeds (std with ddof=1).",
        "",
    ]
    md += ["## Findings", ""]
    md += [f"- {s}" for s in findings(df)]
    md += ["", "<details><summary>How claims are decided</summary>", ""]
    md += [f"- **{k}**: {v}" for k, v in RULES.items()]
    md += ["", "</details>", ""]

    if ok.empty:
        md += ["_No run finished ok: no figures or tables._", ""]
    else:
        summary = _summary(ok)
        t = _Table(summary, ok)
        styles = _styles(t)
        write_csv(summary, out / "summary.csv")
        long, err_md, deg_md = _degradation_tables(t)
        write_csv(long, out / "degradation.csv")
        write_csv(_mismatch_table(t), out / "mismatch.csv")
        gaps = _layer_gap_table(df, runs)
        if not gaps.empty:
            write_csv(gaps, out / "layer_gaps.csv")
        _fig_degradation(t, styles, out / "fig_degradation.png")
        _fig_mismatch(t, styles, out / "fig_mismatch.png")
        stat_layers = [layer for layer in t.layers if t.batches(layer, "ema_mean_gap")]
        _fig_lines(
            t,
            styles,
            out / "fig_gaps.png",
            [
                ("ema_mean_gap", "|μ_EMA − μ_pop| / σ_pop (channel mean)", "mean gap"),
                ("ema_log_std_gap", "|log σ_EMA / σ_pop| (channel mean)", "scale gap"),
                ("kl_batch_vs_ema", "KL(p_batch ‖ p_EMA) (nats per sample)", "prediction KL"),
            ],
            "EMA vs population statistics, and batch- vs EMA-statistics predictions",
            t.layers if not stat_layers else list(dict.fromkeys([*stat_layers, *t.layers])),
        )
        _fig_lines(
            t,
            styles,
            out / "fig_batch_dependence.png",
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
        n_seeds = int(ok.groupby(["layer", "batch_size"]).size().max())
        md += [
            "## Small-batch degradation",
            "",
            f"Test error (EMA statistics, eval mode) against the training batch size, mean over "
            f"seeds with the min–max band (up to {n_seeds} seeds per point). Right: the GN "
            f"paper's ResNet-50/ImageNet curve ({GN_PAPER_RESNET50.source}), a different model "
            f"and data set: compare the shape, not the level.",
            "",
            "![Small-batch degradation](fig_degradation.png)",
            "",
            "Test error (%) at every batch size:",
            "",
            _md_table(err_md),
            "",
            "Degradation relative to each layer's own error at its largest batch size "
            "(points, and ratio):",
            "",
            _md_table(deg_md),
            "",
            "CSV: `degradation.csv`, `summary.csv`.",
            "",
            "## Train/inference mismatch",
            "",
            "Each trained model is evaluated three ways on the test set: eval mode with the EMA "
            "running statistics; its norm layers in training mode, normalising with the "
            "statistics of test batches of the training batch size (batch statistics); and eval "
            "mode with population statistics recomputed by PreciseBN over at least "
            f"{_precise_samples(ok)} training samples. Layers without batch statistics are "
            "measured the same way; their three lines coincide.",
            "",
            "![Train/inference mismatch](fig_mismatch.png)",
            "",
            "Per-layer statistic gaps (channel means of |μ_EMA − μ_pop|/σ_pop and |log σ_EMA/σ_pop|, "
            "averaged over the model's layers with running statistics) and the KL divergence "
            "between batch-statistics and EMA predictions:",
            "",
            "![Statistic gaps](fig_gaps.png)",
            "",
            "Batch dependence: mean over probe test samples of the relative change of the logits "
            "when the other samples of the batch are replaced by different random training "
            "samples. The eval-mode measurement is the float-arithmetic floor (0 when batched "
            "matmuls are row-independent).",
            "",
            "![Batch dependence](fig_batch_dependence.png)",
            "",
            "At the smallest and largest batch size:",
            "",
            _md_table(_mismatch_md(t)),
            "",
            "CSV: `mismatch.csv`"
            + (", `layer_gaps.csv` (per layer depth)." if not gaps.empty else "."),
            "",
        ]
    md += ["## Runs that are not ok", ""]
    if prob.empty:
        md += ["None: every run finished ok.", ""]
    else:
        md += [
            "`failed`: an exception; `diverged`: non-finite loss; `invalid`: an impossible "
            "combination; `missing`: a run dir without `metrics.json` (killed or still running); "
            "`corrupt`: an unreadable `metrics.json`; `not_started`: expected by `multirun.yaml`, "
            "no run dir; `superseded`: the same job, or the same config and seed (an alias such as "
            "`norm=bn` for `norm=batchnorm`), has a better or newer run elsewhere, named in "
            "`superseded_by` (not counted).",
            "",
            _md_table(prob.assign(error=prob["error"].astype(str).str.slice(0, 200)), index=False),
            "",
            "CSV: `problems.csv`.",
            "",
        ]
    settings = _settings(runs)
    if not settings.empty:
        md += [
            "## Settings shared by all runs",
            "",
            "<details><summary>config</summary>",
            "",
            _md_table(settings, index=False),
            "",
            "</details>",
            "",
        ]
    md += ["## Provenance", ""]
    md += _provenance(df, sweep, command)
    md += ["", "All runs, one row each: `runs.csv`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _distinct(df: pd.DataFrame, col: str) -> int:
    """Number of distinct non-empty values of ``col`` (0 when it is absent)."""
    if col not in df:
        return 0
    vals = df[col].dropna().astype(str)
    return int(vals[vals.ne("")].nunique())


def _precise_samples(ok: pd.DataFrame) -> str:
    if "precise_samples" in ok:
        vals = pd.to_numeric(ok["precise_samples"], errors="coerce")
        vals = vals[vals > 0]
        if not vals.empty:
            return f"{int(vals.min())}"
    return "the configured number of"


def default_out_dir(sweep_dir: str | Path, df: pd.DataFrame | None = None) -> Path:
    """``reports/<study>``: the runs' ``study`` when they agree on one, else the sweep dir's name."""
    study = None
    if df is not None and "study" in df:
        vals = df["study"].dropna().astype(str).unique()
        study = vals[0] if len(vals) == 1 else None
    return Path("reports") / (study or Path(sweep_dir).resolve().name)


def build_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    title: str | None = None,
    command: str | None = None,
) -> Path:
    """Load the sweep at ``sweep_dir`` and write its report into ``out_dir`` (default
    ``reports/<study>``); returns the path of ``report.md``."""
    df = load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir is not None else default_out_dir(sweep_dir, df)
    return write_report(df, out, title=title, sweep_dir=sweep_dir, command=command)


class ReportCallback(Callback):
    """Hydra callback: at the end of a multirun, build the report of ``hydra.sweep.dir`` into
    ``report.out`` (relative to the directory the command was started in); nothing when
    ``report.out`` is unset. A failing report is logged, not raised: the runs are on disk and
    ``normzoo-report <sweep dir>`` rebuilds it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        out = OmegaConf.select(config, "report.out", default=None)
        if not out:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None)
        out_path = Path(str(out))
        if not out_path.is_absolute() and cwd:
            out_path = Path(str(cwd)) / out_path
        if not sweep_dir.is_absolute() and cwd:
            sweep_dir = Path(str(cwd)) / sweep_dir
        try:
            path = build_report(
                sweep_dir, out_path, command="ReportCallback after: " + shlex.join(sys.argv)
            )
        except Exception:
            log.exception(
                "report for %s failed; rebuild it with: normzoo-report %s --out %s",
                sweep_dir,
                sweep_dir,
                out_path,
            )
            return
        log.info("report: %s", path)


def main(argv: Sequence[str] | None = None) -> int:
    """``normzoo-report <sweep dir> [--out DIR] [--title TEXT]``."""
    parser = argparse.ArgumentParser(
        prog="normzoo-report",
        description="Build report.md, figures and CSV tables from a normzoo sweep dir.",
    )
    parser.add_argument("sweep_dir", help="a Hydra multirun dir (or a single run dir)")
    parser.add_argument(
        "--out", default=None, help="output dir (default: reports/<study or sweep dir name>)"
    )
    parser.add_argument("--title", default=None, help="title of report.md")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir)
    if not sweep.is_dir():
        parser.error(f"sweep dir {str(sweep)!r} does not exist or is not a directory")
    cmd = shlex.join(["normzoo-report", *(sys.argv[1:] if argv is None else argv)])
    path = build_report(sweep, args.out, title=args.title, command=cmd)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
