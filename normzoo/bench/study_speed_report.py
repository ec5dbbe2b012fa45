"""``study_speed.md`` / ``.csv`` / ``.png``: a study's two sweeps compared, from-scratch vs native."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.ticker import FormatStrFormatter, NullLocator

from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.plotting import new_figure, save_figure

__all__ = ["write_report"]

SIDES = ("scratch", "native")
_RATIO_TICKS = [0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0]


def _minutes(seconds: float) -> str:
    m, s = divmod(seconds, 60.0)
    return f"{int(m)} min {s:.1f} s" if m else f"{s:.1f} s"


def _plot(tables: dict[str, pd.DataFrame], path: Path) -> None:
    """Run-time ratio (from-scratch / native, sums over seeds) against batch size: one line per
    (layer, model), the whole study in black, 1 (the same time) in grey; log2 axes (batch sizes double,
    and a ratio is multiplicative)."""
    runs = tables["runs"]
    sums = runs.groupby(["layer", "model", "batch_size"])[
        ["wall_time_s_scratch", "wall_time_s_native"]
    ].sum()
    ratio = (sums["wall_time_s_scratch"] / sums["wall_time_s_native"]).rename("ratio")
    fig = new_figure(8.6, 4.2)
    ax = fig.subplots()
    for i, ((layer, model), line) in enumerate(ratio.groupby(level=["layer", "model"])):
        bs = line.index.get_level_values("batch_size")
        ax.plot(bs, line.to_numpy(), marker="o", ms=3, lw=1.1, color=f"C{i % 10}",
                ls="-" if model == "cnn" else "--", label=f"{layer} · {model}")  # fmt: skip
    batch = tables["batch"]
    if not batch.empty:
        ax.plot(batch["batch_size"], batch["wall_time_s_ratio"], color="black", lw=2.4,
                marker="s", ms=4, label="whole study")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_locator(NullLocator())
    ax.set_xticks(sorted(runs["batch_size"].unique()))
    lo, hi = ax.get_ylim()
    ax.set_yticks([t for t in _RATIO_TICKS if lo <= t <= hi] or [1.0])
    ax.set_xlabel("batch size")
    ax.set_ylabel("run time, from-scratch / native")
    ax.set_title("Study run time per run: from-scratch layers vs native references", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def _totals(tables: dict[str, pd.DataFrame], times: dict[str, dict[str, Any]]) -> list[str]:
    """The end-to-end and summed run times of the two sides, and the sweeps' exit status."""
    total = tables["layers"].iloc[-1]
    walls = {side: times.get(side, {}).get("wall_s") for side in SIDES}
    lines = ["| | from-scratch | native | ratio |", "|---|---|---|---|"]
    if walls["scratch"] and walls["native"]:
        lines.append(
            f"| end-to-end wall time (Hydra start-up, every run, the report) | "
            f"{_minutes(walls['scratch'])} | {_minutes(walls['native'])} | "
            f"**{walls['scratch'] / walls['native']:.2f}** |"
        )
    if times.get("interleaved", {}).get("wall_s"):
        lines.append(
            f"| end-to-end wall time of the one interleaved sweep (both sides) | "
            f"{_minutes(times['interleaved']['wall_s'])} | | |"
        )
    for col, label in (("wall_time_s", "run time"), ("train_time_s", "training time")):
        lines.append(
            f"| sum of the runs' {label} (`{col}`, {int(total['runs'])} runs ok on both sides) | "
            f"{total[f'{col}_scratch']:.1f} s | {total[f'{col}_native']:.1f} s | "
            f"**{total[f'{col}_ratio']:.2f}** |"
        )
    rcs = {k: v.get("returncode") for k, v in times.items()}
    if any(rc not in (0, None) for rc in rcs.values()):
        lines += ["", f"Exit status of the sweeps: {rcs} (non-zero: some runs did not finish ok)."]
    return lines


def _per_layer(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Sums per (layer, model) and, when any, the run-time ratio per batch size."""
    header = ["layer", "model", "runs", "from-scratch run time (s)", "native run time (s)",
              "ratio", "training time ratio"]  # fmt: skip
    body = [
        [
            r["layer"],
            r["model"],
            int(r["runs"]),
            f"{r['wall_time_s_scratch']:.1f}",
            f"{r['wall_time_s_native']:.1f}",
            f"{r['wall_time_s_ratio']:.2f}",
            f"{r['train_time_s_ratio']:.2f}",
        ]
        for _, r in tables["layers"].iterrows()
    ]
    lines = ["Per layer and model (sums over the matched runs; ratio = from-scratch / native):", ""]
    lines.append(md_table(header, body))
    batch = tables["batch"]
    if not batch.empty:
        row = ["run time ratio", *(f"{v:.2f}" for v in batch["wall_time_s_ratio"])]
        lines += ["", md_table(["batch size", *(int(b) for b in batch["batch_size"])], [row])]
    return lines


def write_report(
    out: str | Path,
    tables: dict[str, pd.DataFrame],
    times: dict[str, dict[str, Any]],
    info: dict[str, str],
) -> dict[str, Path]:
    """Write ``study_speed.md``, ``study_speed.csv`` (the matched runs) and, when runs matched,
    ``study_speed.png`` (the ratio per batch size) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "study_speed.csv"
    tables["runs"].to_csv(csv, index=False, float_format="%.4f")
    png = out / "study_speed.png"
    if tables["runs"].empty:
        png.unlink(missing_ok=True)  # (no stale figure from an earlier report)
    else:
        _plot(tables, png)
    lines = ["# Study wall time: from-scratch layers against their native references", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "```bash"]
    lines += [times[k].get("command", "?") for k in (*SIDES, "interleaved") if k in times]
    lines += ["```", ""]
    lines += [*_totals(tables, times), "", *_per_layer(tables)]
    paths = {"md": out / "study_speed.md", "csv": csv}
    if png.exists():
        lines += ["", f"![run-time ratio per batch size]({png.name})"]
        paths["png"] = png
    lines.append("")
    write_text_atomic(paths["md"], "\n".join(lines))
    return paths
