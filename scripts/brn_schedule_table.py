"""Batch Renorm's schedule for the default study, chosen on validation (`make brn-tune`).

Reads the three sweeps of ``experiment=digits_brn_tune`` (multirun/digits_brn_tune/{paper,ema_hold,
fast_ema}) and writes reports/digits/design/brn_schedule.md: the validation error per candidate,
model and normalisation batch (mean and sd over seeds), and the choice by the rule fixed before
the runs: the lowest validation error averaged over the four (model, batch) cells. Test numbers
are not read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from normzoo.analysis.results import load_sweep, ok_runs
from normzoo.files import write_text_atomic
from normzoo.markdown import md_table

#: candidate -> (its overrides, what it is); the EMA's share of its init at the relax start in ()
CANDIDATES = {
    "paper": ("(none)", "momentum 0.01, plain BN until 5% of the steps (EMA still 74% init)"),
    "ema_hold": (
        "norm.relax_start=0.5 norm.rmax_relaxed=0.85 norm.dmax_relaxed=0.7",
        "momentum 0.01, plain BN until 50% = 3/momentum steps (EMA 4.9% init)",
    ),
    "fast_ema": ("norm.momentum=0.1", "momentum 0.1, plain BN until 5% = 3/momentum steps (4.2%)"),
}


def load(root: Path) -> pd.DataFrame:
    frames = []
    for name in CANDIDATES:
        df = ok_runs(load_sweep(root / name))
        frames.append(df.assign(candidate=name))
    return pd.concat(frames, ignore_index=True)


def table(df: pd.DataFrame) -> tuple[list[str], list[list[str]], str]:
    df = df.assign(
        val=100 * df["val_error"], cell=df["model"] + " / " + df["ghost_batch_size"].astype(str)
    )
    cells = sorted(df["cell"].unique())
    rows, means = [], {}
    for name, (overrides, what) in CANDIDATES.items():
        sub = df[df["candidate"] == name]
        per_cell = sub.groupby("cell")["val"].agg(["mean", "std", "count"])
        means[name] = per_cell["mean"].mean()
        row = [f"`{name}`", what, f"`{overrides}`"]
        row += [f"{per_cell.loc[c, 'mean']:.2f} ({per_cell.loc[c, 'std']:.2f})" for c in cells]
        rows.append([*row, f"{means[name]:.2f}"])
    best = min(means, key=lambda k: means[k])
    header = ["candidate", "setting", "overrides", *[f"{c} (val %)" for c in cells], "mean"]
    return header, rows, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="multirun/digits_brn_tune")
    parser.add_argument("--out", default="reports/digits/design/brn_schedule.md")
    args = parser.parse_args(argv)
    df = load(Path(args.sweeps))
    header, rows, best = table(df)
    n_seeds = df.groupby(["candidate", "model", "ghost_batch_size"]).size().min()
    text = "\n".join(
        [
            "# Batch Renorm's schedule in the default study (validation split only)",
            "",
            "Command: `make brn-tune` (`normzoo-train -m experiment=digits_brn_tune`, once per candidate,",
            f"then `python scripts/brn_schedule_table.py`); {len(df)} ok runs, {n_seeds} seeds per cell.",
            "Batch Renorm corrects each batch's statistics towards the moving averages (r, d); while",
            "those still hold their initial values the correction pulls towards numbers that describe",
            "no data. So the limits stay at plain BatchNorm (r = 1, d = 0) for at least",
            "max(5% of the steps, 3 / momentum steps): after 3/m EMA updates the initial values weigh",
            "(1 - m)^(3/m) < 5%. Cells: model / normalisation (ghost) batch at SGD batch 32, 600 steps.",
            "Numbers: **validation** error (%), mean (sd) over seeds. The test split was not read.",
            "",
            md_table(header, rows),
            "",
            "Rule (fixed before the runs): the candidate with the lowest validation error averaged",
            f"over the cells. Chosen: **`{best}`**, set for `batchrenorm` in",
            "`normzoo/conf/experiment/digits_base.yaml` (`norm_options`).",
            "",
        ]
    )
    write_text_atomic(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
