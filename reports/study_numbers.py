"""The numbers quoted in reports/{variants,sequence,dropout}/FINDINGS.md, from a study's sweep dir.

    python reports/study_numbers.py {variants,sequence,dropout} multirun/<study>

Comparisons pair runs by seed (same seed: same initialisation, data order and test set): the mean
of the per-seed differences in test error with a paired t-test over seeds, Holm-adjusted over the
comparisons printed for one study (``normzoo.analysis.significance.holm``). The runner on this
base writes no per-sample predictions, so the per-sample bootstrap of
``significance.paired_difference`` cannot be used here.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

from normzoo.analysis.results import load_layers, load_sweep, ok_runs
from normzoo.analysis.significance import holm


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float, float, int]:
    """Mean of per-seed differences a - b (points), its std, the paired t-test p, seeds paired."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    d = 100.0 * (joined["a"] - joined["b"])
    if len(d) < 2 or d.abs().max() < 1e-6 or d.std(ddof=1) == 0:  # equal up to float rounding
        # zero spread: no error estimate, so no p-value (nan, left out of Holm's family)
        return float(d.mean()), 0.0, 1.0 if d.abs().max() < 1e-6 else float("nan"), len(d)
    return (
        float(d.mean()),
        float(d.std(ddof=1)),
        float(stats.ttest_rel(joined["a"], joined["b"]).pvalue),
        len(d),
    )


def table(df: pd.DataFrame, by: list[str], col: str = "test_error") -> pd.DataFrame:
    g = df.groupby(by)[col]
    return pd.DataFrame(
        {"mean_%": 100 * g.mean(), "std_%": 100 * g.std(ddof=1), "n": g.size()}
    ).round(2)


def report_comparisons(rows: list[tuple[str, tuple[float, float, float, int]]]) -> None:
    ps = np.array([r[1][2] for r in rows], dtype=float)
    adjusted = np.full(len(ps), np.nan)
    if np.isfinite(ps).any():
        adjusted[np.isfinite(ps)] = holm(ps[np.isfinite(ps)])
    for (label, (mean, sd, p, n)), p_adj in zip(rows, adjusted, strict=True):
        print(f"{label}: {mean:+.2f} +- {sd:.2f} points (n={n}), p={p:.3g}, Holm p={p_adj:.3g}")


def by_seed(df: pd.DataFrame, mask: pd.Series, col: str = "test_error") -> pd.Series:
    return df[mask].set_index("seed")[col]


def variants(df: pd.DataFrame) -> None:
    print(table(df, ["norm", "batch_size"]).unstack("batch_size").to_string())
    cols = [
        "batch_dependence",
        "batch_dependence_floor",
        "test_error_batch_stats",
        "test_error_precise",
    ]
    print(
        df.groupby(["norm", "batch_size"])[cols].mean().round(4).unstack("batch_size").to_string()
    )
    rows = []
    for b in sorted(df.batch_size.unique()):
        bn = by_seed(df, (df.norm == "batchnorm") & (df.batch_size == b))
        for n in sorted(df.norm.unique()):
            if n != "batchnorm":
                rows.append(
                    (
                        f"B={b} {n} - batchnorm",
                        paired(by_seed(df, (df.norm == n) & (df.batch_size == b)), bn),
                    )
                )
    report_comparisons(rows)
    for n in sorted(df.norm.unique()):
        small, large = (
            by_seed(df, (df.norm == n) & (df.batch_size == b))
            for b in sorted(df.batch_size.unique())
        )
        print(f"degradation {n}: {paired(small, large)}")


def sequence(df: pd.DataFrame) -> None:
    print(table(df, ["norm", "batch_size"]).unstack("batch_size").to_string())
    cols = ["test_error_batch_stats", "test_error_precise", "batch_dependence", "ema_log_std_gap"]
    print(
        df.groupby(["norm", "batch_size"])[cols].mean().round(4).unstack("batch_size").to_string()
    )
    rows = []
    for b in sorted(df.batch_size.unique()):
        bn = by_seed(df, (df.norm == "batchnorm") & (df.batch_size == b))
        for n in ("layernorm_last", "rmsnorm"):
            rows.append(
                (
                    f"B={b} batchnorm - {n}",
                    paired(bn, by_seed(df, (df.norm == n) & (df.batch_size == b))),
                )
            )
        rows.append(
            (
                f"B={b} batchnorm EMA - PreciseBN",
                paired(
                    bn,
                    by_seed(
                        df, (df.norm == "batchnorm") & (df.batch_size == b), "test_error_precise"
                    ),
                ),
            )
        )
    report_comparisons(rows)


def dropout(df: pd.DataFrame, sweep: str) -> None:
    df = df.rename(columns={"model.dropout": "p", "model.dropout_position": "position"})
    print(table(df, ["norm", "p", "position"]).to_string())
    print(
        df.groupby(["norm", "p", "position"])[["variance_shift_mean", "test_error_batch_stats"]]
        .mean()
        .round(4)
        .to_string()
    )
    layers = load_layers(df)
    if not layers.empty and "variance_shift" in layers:
        runs = df.set_index("run_dir")[["p", "position"]]
        layers = layers.join(runs, on="run_dir")
        shift = layers[layers.norm == "batchnorm"].groupby(["p", "position", "name"])[
            "variance_shift"
        ]
        print(pd.DataFrame({"mean": shift.mean(), "std": shift.std(ddof=1)}).round(3).to_string())
    rows = []
    for norm in ("batchnorm", "layernorm"):
        for p in sorted(df.p.unique()):
            if p == 0:
                continue
            sel = (df.norm == norm) & (df.p == p)
            rows.append(
                (
                    f"{norm} p={p} before_norm - after_norm",
                    paired(
                        by_seed(df, sel & (df.position == "before_norm")),
                        by_seed(df, sel & (df.position == "after_norm")),
                    ),
                )
            )
        base = by_seed(df, (df.norm == norm) & (df.p == 0) & (df.position == "before_norm"))
        for p in sorted(df.p.unique()):
            for pos in ("before_norm", "after_norm"):
                if p > 0:
                    sel = (df.norm == norm) & (df.p == p) & (df.position == pos)
                    mean, sd, _, n = paired(by_seed(df, sel), base)
                    print(
                        f"(descriptive) {norm} p={p} {pos} - no dropout: {mean:+.2f} +- {sd:.2f} (n={n})"
                    )
        sel = (df.norm == norm) & (df.p > 0)
        rows.append(
            (
                f"{norm} dropout runs: EMA - batch statistics",
                paired(
                    df[sel]["test_error"].reset_index(drop=True),
                    df[sel]["test_error_batch_stats"].reset_index(drop=True),
                ),
            )
        )
    report_comparisons(rows)
    bn = df[(df.norm == "batchnorm") & (df.p > 0)]
    r = stats.spearmanr(bn["variance_shift_mean"], bn["test_error"])
    print(
        f"spearman(variance_shift_mean, test_error) over BN dropout runs: rho={r.statistic:.2f} p={r.pvalue:.3g} n={len(bn)}"
    )
    print(
        f"wall: max {df.wall_time_s.max():.1f} s, sum {df.wall_time_s.sum():.1f} s over {len(df)} runs"
    )


def main() -> None:
    study, sweep = sys.argv[1], sys.argv[2]
    df = ok_runs(load_sweep(sweep))
    print(
        f"{len(df)} ok runs; wall sum {df.wall_time_s.sum():.0f} s, max {df.wall_time_s.max():.1f} s"
    )
    pd.set_option("display.width", 250)
    np.set_printoptions(precision=3)
    {"variants": variants, "sequence": sequence}.get(study, lambda d: dropout(d, sweep))(df)


if __name__ == "__main__":
    main()
