"""``study_speed_stacked.md`` / ``.csv`` / ``.png``: the study's sweeps stacked vs unstacked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.plotting import new_figure, save_figure

__all__ = ["FLOOR_NOTE", "write_report"]

#: where this grid's floor is measured (scripts/stack_floor.py reads this report's CSV)
FLOOR_NOTE = (
    "Floor, measured for this grid: [stack_floor.md](stack_floor.md) (`python -m "
    "scripts.stack_floor --study-speed study_speed_stacked.csv`) times a stacked step against the "
    "same stack with torch's fused BatchNorm and with no normalisation at all, and states this "
    "table's run time at each speed."
)


def _s(x: float | None) -> str:
    return "" if x is None or pd.isna(x) else f"{x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"**{a / b:.2f}x**" if a and b else ""


def _plot(groups: pd.DataFrame, end_to_end: float | None, path: Path) -> None:
    fig = new_figure(8.6, 3.8)
    ax = fig.subplots()
    labels = [f"{r.sweep.replace('digits_', '').replace('digits', 'ghost')}\n{r.model} "
              f"{int(r.norm_batch)}" for r in groups.itertuples()]  # fmt: skip
    x = range(len(groups))
    ax.bar([i - 0.2 for i in x], groups["wall_time_s_ratio"], width=0.4, label="run time")
    ax.bar([i + 0.2 for i in x], groups["train_time_s_ratio"], width=0.4, label="training steps")
    if end_to_end:
        ax.axhline(end_to_end, color="black", lw=1.5, label=f"end to end ({end_to_end:.2f}x)")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set_ylabel("unstacked / stacked")
    ax.set_title("Default study: speed-up of stacked training (model, normalisation batch)",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path, dpi=120)


def write_report(
    out: Path,
    tables: dict[str, pd.DataFrame],
    times: dict[str, dict[str, Any]],
    sweeps: Sequence[str],
    info: dict[str, str],
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    groups, moved, runs = tables["groups"], tables["moved"], tables["runs"]
    lines = ["# Stacked training: the default study's sweeps, stacked vs unstacked", ""]
    lines += [*md_table(["", ""], list(info.items())).splitlines(), ""]
    rows, total = [], {side: 0.0 for side in ("unstacked", "stacked")}
    for sweep in sweeps:
        a = times.get(f"unstacked/{sweep}", {}).get("wall_s")
        b = times.get(f"stacked/{sweep}", {}).get("wall_s")
        rc = [times.get(f"{s}/{sweep}", {}).get("returncode") for s in ("unstacked", "stacked")]
        total["unstacked"] += a or 0.0
        total["stacked"] += b or 0.0
        load = [times.get(f"{s}/{sweep}", {}).get("load") or "?" for s in ("unstacked", "stacked")]
        rows.append([sweep, _s(a), _s(b), _ratio(a, b), f"{rc[0]} / {rc[1]}", " ; ".join(load)])
    e2e = total["unstacked"] / total["stacked"] if total["stacked"] else None
    rows.append(["**all sweeps**", _s(total["unstacked"]), _s(total["stacked"]),
                 _ratio(total["unstacked"], total["stacked"]), "", ""])  # fmt: skip
    lines += ["## End to end (each sweep a fresh `normzoo-train -m` process, wall seconds)", ""]
    lines += md_table(
        [
            "sweep",
            "unstacked s",
            "stacked s",
            "ratio",
            "exit status",
            "load at end (1/5/15 min), unstacked ; stacked",
        ],
        rows,
    ).splitlines()
    if not groups.empty:
        sums = groups[[c for c in groups if c.endswith(("_unstacked", "_stacked"))]].sum()
        lines += ["", "Summed over the runs ok on both sides "
                  f"({int(groups['runs'].sum())} runs): run time "
                  f"{sums['wall_time_s_unstacked']:.0f} vs {sums['wall_time_s_stacked']:.0f} "
                  f"core-s ({sums['wall_time_s_unstacked'] / sums['wall_time_s_stacked']:.2f}x), "
                  f"training steps {sums['train_time_s_unstacked']:.0f} vs "
                  f"{sums['train_time_s_stacked']:.0f} core-s "
                  f"({sums['train_time_s_unstacked'] / sums['train_time_s_stacked']:.2f}x). "
                  "Outside the training steps (evaluations, diagnostics, inference panel, files, "
                  f"set-up): {sums['wall_time_s_unstacked'] - sums['train_time_s_unstacked']:.0f}"
                  f" vs {sums['wall_time_s_stacked'] - sums['train_time_s_stacked']:.0f} core-s."]  # fmt: skip
        lines += ["", FLOOR_NOTE, "", "## Per (sweep, model, normalisation batch)", "",
                  "Sums over the seeds and norms of the group; `wall`: run time (a stacked "
                  "member's share of its stack plus its own evaluations and diagnostics), "
                  "`train`: the training steps. A stack can hold several groups (the ghost "
                  "sizes of one model share a bucket) and each member is charged 1/K of its "
                  "stack, so a group's stacked time is a share, not its own measurement, and its "
                  "unstacked time carries the machine's noise of those runs: read the sums and "
                  "the end-to-end times first.", ""]  # fmt: skip
        table = [[r.sweep, r.model, int(r.norm_batch), int(r.runs), _s(r.wall_time_s_unstacked),
                  _s(r.wall_time_s_stacked), f"{r.wall_time_s_ratio:.2f}",
                  _s(r.train_time_s_unstacked), _s(r.train_time_s_stacked),
                  f"{r.train_time_s_ratio:.2f}"] for r in groups.itertuples()]  # fmt: skip
        lines += md_table(["sweep", "model", "norm batch", "runs", "wall unstacked",
                           "wall stacked", "wall ratio", "train unstacked", "train stacked",
                           "train ratio"], table).splitlines()  # fmt: skip
        _plot(groups, e2e, out / "study_speed_stacked.png")
        lines += ["", "![speed-up](study_speed_stacked.png)"]
    lines += ["", "## Numbers that moved (stacked vs unstacked, per run)", ""]
    n = len(runs)
    if moved.empty:
        lines.append(f"None: all {n} matched runs have the same status and the same "
                     "test/validation/diagnostic errors.")  # fmt: skip
    else:
        counts = moved.groupby("number").size().to_dict()
        lines.append(f"{n} runs matched; moved: " + ", ".join(f"{k} in {v} runs" for k, v in
                                                              sorted(counts.items())) + ".")  # fmt: skip
        table = md_table(
            ["sweep", "run", "number", "unstacked", "stacked", "change"],
            [[r.sweep, r.run, r.number, _fmt(r.unstacked), _fmt(r.stacked), _fmt(r.change)]
             for r in moved.itertuples()],
        )  # fmt: skip
        lines += ["", *table.splitlines()]
    md = out / "study_speed_stacked.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    csv = out / "study_speed_stacked.csv"
    groups.to_csv(csv, index=False)
    if not moved.empty:
        moved.to_csv(out / "study_speed_stacked_moved.csv", index=False)
    return {"md": md, "csv": csv}


def _fmt(x: Any) -> str:
    return f"{x:+.4f}" if isinstance(x, float) and x < 0 else (
        f"{x:.4f}" if isinstance(x, float) else str(x))  # fmt: skip
