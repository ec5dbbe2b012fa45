"""``overhead.md`` and ``overhead.csv``: the cost of normalising, one table per model and batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normzoo.bench.overhead import OVERHEAD_COLUMNS, OverheadConfig
from normzoo.bench.report import SMOKE, fmt
from normzoo.bench.summary import verdict
from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.registry import display_name

__all__ = ["overhead_phrase", "write_overhead_report"]

_MEASURED = (
    "One training step = `zero_grad`, `cross_entropy(model(x), y).backward()`, `SGD(lr=0.01, "
    "momentum=0.9).step()` on a fixed random batch, in training mode. For each model and batch "
    "size, the model with each layer and the same model with `none` (the identity where the norm "
    "goes; a weight-kind layer reparametrises every conv/linear instead) are timed interleaved in "
    "one process, each repeat one block of steps of each, order reversed every other repeat. "
    "**x no-norm time** = the median over repeats of (step time with the layer / step time without "
    "a norm); **IQR** = the interquartile range of those per-repeat ratios. A layer is said to add "
    "time only when its whole IQR (to 1%) lies above 1. **Saved** = the bytes autograd keeps for "
    "backward in one forward + loss (distinct storages; inputs and parameters count too). "
    "**Peak** = `torch.cuda.max_memory_allocated` over one step (CUDA only; CPU has no such counter)."
)


def overhead_phrase(ratio: float, q1: float, q3: float, *, smoke: bool = False) -> str:
    """``1.31x (IQR 1.25-1.40): +31%`` / ``... within the noise`` / ``... smoke test``."""
    if math.isnan(ratio):
        return "—"
    text = f"{ratio:.2f}x (IQR {q1:.2f}–{q3:.2f})"
    word = verdict(q1, q3)
    if smoke:
        return text
    if word == "within the noise":
        return f"{text}: within the noise"
    return f"{text}: {100 * (ratio - 1):+.0f}%"


def _mib(v: Any) -> str:
    return fmt(v / 2**20 if isinstance(v, (int, float)) else v, ".2f")


def _group_table(rows: Sequence[dict[str, Any]], smoke: bool) -> str:
    """One row per layer, none first; the peak columns only where measured (CUDA)."""
    header = ["layer", "params", "step ms", "x no-norm time (IQR over repeats)", "saved MiB",
              "x no-norm saved", "peak MiB", "x no-norm peak", "error"]  # fmt: skip
    first = rows[0]
    peak_none = "—" if math.isnan(first["peak_bytes_none"]) else "1"
    body = [["none (no norm)", fmt(first["params_none"], ".0f"), fmt(first["none_ms"], ".3f"), "1",
             _mib(first["saved_bytes_none"]), "1", _mib(first["peak_bytes_none"]), peak_none, ""]]  # fmt: skip
    for r in rows:
        body.append([
            display_name(r["layer"]), fmt(r["params"], ".0f"), fmt(r["layer_ms"], ".3f"),
            overhead_phrase(r["ratio"], r["ratio_q1"], r["ratio_q3"], smoke=smoke),
            _mib(r["saved_bytes_layer"]), fmt(r["bytes_ratio"], ".2f"), _mib(r["peak_bytes_layer"]),
            fmt(r["peak_ratio"], ".2f"), str(r["error"]).replace("|", "/"),
        ])  # fmt: skip
    if math.isnan(first["peak_bytes_none"]):  # CPU: no peak counter, no empty columns
        header, *body = (
            [c for i, c in enumerate(row) if i not in (6, 7)] for row in (header, *body)
        )
    return md_table(header, body)


def write_overhead_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    info: dict[str, str],
    config: OverheadConfig,
    wall_s: float,
) -> dict[str, Path]:
    """Write ``overhead.csv`` and ``overhead.md`` into ``out_dir``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "overhead.csv", "md": out / "overhead.md"}
    pd.DataFrame(list(rows), columns=list(OVERHEAD_COLUMNS)).to_csv(paths["csv"], index=False)
    md = ["# The cost of normalising: a training step with each layer against no norm", ""]
    if config.quick:
        md += [f"**This is a {SMOKE}** (`--quick`): 2 repeats of one step each; the ratios "
               "say nothing about cost.", ""]  # fmt: skip
    md += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in info.items()]
    md += [f"- **settings**: repeats {config.repeats}, warm-up {config.warmup}, min block time "
           f"{config.min_time} s, torch threads {config.threads} (`--threads`, default 1)",
           f"- **wall time of the run**: {wall_s:.0f} s", "", "## What is measured", "",
           _MEASURED, ""]  # fmt: skip
    groups = list(
        dict.fromkeys((r["device"], r["model"], r["input"], r["batch_size"]) for r in rows)
    )
    for dev, model, shape, batch in groups:
        mine = [
            r
            for r in rows
            if (r["device"], r["model"], r["input"], r["batch_size"]) == (dev, model, shape, batch)
        ]
        md += [
            f"## {model} on {shape} inputs, batch {batch} ({dev})",
            "",
            _group_table(mine, config.quick),
            "",
        ]
    md += ["Raw numbers: [overhead.csv](overhead.csv).", ""]
    write_text_atomic(paths["md"], "\n".join(md))
    return paths
