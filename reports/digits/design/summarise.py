"""Tables of a design sweep's CSV (``sweep.py --out``): validation error per layer x batch.

    python reports/digits/design/summarise.py /tmp/design.csv [more.csv ...]

One table per (data, model) of one CSV (one experiment per CSV): mean validation error in % over the seeds,
with the seeds' spread (sd) and count; then the steps, learning rates and seconds per run.
"""

from __future__ import annotations

import sys

import pandas as pd

from normzoo.markdown import frame_table


def _cell(values: pd.Series) -> str:
    pct = 100 * values
    sd = f" ± {pct.std():.1f}" if len(values) > 1 else ""
    return f"{pct.mean():.1f}{sd} (n={len(values)})"


def summarise(frame: pd.DataFrame) -> str:
    out = []
    for (data, model), part in frame.groupby(["data", "model"]):
        table = part.pivot_table(
            index="norm", columns="norm_batch", values="val_error", aggfunc=_cell
        )
        sgd = sorted(part["sgd_batch"].unique().tolist())
        out.append(f"**{data}, {model}, SGD batch {sgd}** (validation error %, mean ± sd)\n")
        out.append(frame_table(table))
        seconds = {c: (c, "mean") for c in ("train_s", "wall_s", "cpu_s") if c in part}
        runs = part.groupby(["norm", "norm_batch"]).agg(
            steps=("steps", "mean"), lr=("lr", "first"), **seconds
        )
        out.append("\n" + frame_table(runs.round(3)) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(pd.concat([pd.read_csv(p) for p in sys.argv[1:]], ignore_index=True)))
