"""``bench.md`` and ``bench.csv``: provenance, findings, what is measured, summary and per-shape tables."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from normzoo.bench.figure import plot_ratios
from normzoo.bench.measure import CSV_COLUMNS, BenchConfig
from normzoo.bench.summary import findings, summarise, time_phrase
from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.provenance import cpu_model, git_dirty, git_revision, now_utc
from normzoo.registry import display_name

__all__ = ["SMOKE", "fmt", "load_average", "provenance", "write_report"]

#: the line under bench.md's title (and the PNG's title) for a ``--quick`` run
SMOKE = "smoke test, not a measurement"
_SMOKE_NOTE = (
    f"**This is a {SMOKE}** (`--quick`): one tiny shape, 2 repeats of a single step each, no "
    "compile. It shows that every layer runs through the harness; its ratios swing from run to run "
    "and say nothing about speed. Run `normzoo-bench` without `--quick` for a measurement."
)

_MEASURED = (
    "One step = forward + backward in training mode: `y = m(x); y.backward(g)` with `x` requiring "
    "grad and a fixed random `g`, grads set to None after each step. The from-scratch layer and its "
    "baseline (torch's own layer, the registry's native reference, unless named otherwise) are timed "
    "interleaved in one process: each repeat times one block of steps of each side back to back "
    "(order A,B then B,A), each block lasting at least the min block time. "
    "**Time vs torch** = the median over repeats of (from-scratch block time / torch's block "
    "time); **IQR** = the interquartile range of those per-repeat ratios, i.e. the spread the "
    "machine's noise puts on the ratio. A layer is called faster or slower than torch on a shape "
    "only when its whole IQR (to 1%, as printed) lies below or above 1; otherwise the difference is within the noise. "
    "Saved bytes = sum of the distinct storages autograd packs for backward in one forward "
    "(`saved_tensors_hooks`, deduplicated by storage pointer; a saved input or parameter counts "
    "too), the same rule for both sides: a count, without noise. Weight norms are timed on the layer "
    "they reparametrise (`Conv2d(C, C, 3, padding=1)` for conv shapes, `Linear(C, C)` for dense), so "
    "the conv's own cost is in both times. Layers that need spatial dims skip the dense shapes. "
    "Compiled: `torch.compile(m, dynamic=False)`, the first step (compilation) timed separately."
)

_FUSED_NOTE = (
    "The last column is torch's own layer compiled against torch's own layer eager (median over "
    "shapes): inductor's fusion of torch's decomposition into tensor ops, against torch's "
    "hand-written eager kernel. Where it is well above 1, even a fused composition of tensor ops is "
    "that much slower than the eager kernel on this machine; an eager from-scratch layer runs one "
    "kernel per op, unfused."
)

_THREADS_NOTE = (
    "`--threads`, default 1: on a shared machine a pre-empted OpenMP worker stalls every parallel "
    "region, which swings single timings by several times"
)


def fmt(v: Any, spec: str = ".2f") -> str:
    """A float formatted with ``spec`` (NaN as a dash); anything else as ``str``."""
    if isinstance(v, float):
        return "—" if math.isnan(v) else format(v, spec)
    return str(v)


def _revision() -> str:
    """The short git revision, with the uncommitted tracked paths (at most 5 named)."""
    rev = git_revision(short=True)
    if rev is None:
        return "unknown"
    paths = git_dirty((".",), untracked=False) or []
    if not paths:
        return rev
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return f"{rev} (uncommitted changes in {', '.join(paths[:5])}{more})"


def load_average() -> str | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    if not hasattr(os, "getloadavg"):
        return None
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def provenance(command: str) -> dict[str, str]:
    """Machine and software facts recorded at the top of ``bench.md``."""
    info = {
        "date": datetime.fromisoformat(now_utc()).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "git revision": _revision(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    load = load_average()
    if load is not None:
        info["load average at start (1/5/15 min)"] = load
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        info["cuda"] = "not available"
    return info


def _header(info: dict[str, str], config: BenchConfig, wall_s: float) -> list[str]:
    compile_text = f"on ({config.backend})" if config.compile else "off"
    md = ["# normzoo-bench: from-scratch layers against torch's own", ""]
    if config.quick:
        md += [_SMOKE_NOTE, ""]
    md += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in info.items()]
    threads = config.threads if config.threads is not None else torch.get_num_threads()
    md += [
        f"- **settings**: dtype {config.dtype}, repeats {config.repeats}, warm-up {config.warmup}, "
        f"min block time {config.min_time} s, compile {compile_text}, torch threads {threads} "
        f"({_THREADS_NOTE})",
        f"- **wall time of the run**: {wall_s:.0f} s",
    ]
    return md


def _range(s: dict[str, Any], mode: str) -> str:
    if math.isnan(s[mode]):
        return "—"
    lo, hi = f"{s[f'{mode}_lo']:.2f}", f"{s[f'{mode}_hi']:.2f}"
    spread = "" if lo == hi else f" ({lo}–{hi})"
    return f"{s[mode]:.2f}{spread}"


def _verdicts(s: dict[str, Any], mode: str, smoke: bool) -> str:
    if math.isnan(s[mode]):
        return "—"
    if smoke:
        return SMOKE
    return f"{s[f'{mode}_slower']} / {s[f'{mode}_faster']} / {s[f'{mode}_noise']}"


def _summary_table(summary: Sequence[dict[str, Any]], smoke: bool) -> str:
    header = ["device", "layer", "against", "shapes", "eager: time vs torch, median (range over shapes)",
              "eager: shapes slower / faster / within the noise",
              "compiled: time vs torch, median (range over shapes)",
              "compiled: shapes slower / faster / within the noise",
              "saved bytes vs torch (median; largest)", "saved bytes vs torch, compiled",
              "rows with errors", "torch compiled / torch eager"]  # fmt: skip
    body = [
        [
            s["device"],
            display_name(s["layer"]),
            display_name(s["baseline"])
            + ("" if s["pairing"] == "native reference" else f" — {s['pairing']}"),
            s["shapes"],
            _range(s, "eager"),
            _verdicts(s, "eager", smoke),
            _range(s, "compiled"),
            _verdicts(s, "compiled", smoke),
            f"{fmt(s['memory'], '.3f')}; {fmt(s['memory_max'], '.3f')}",
            fmt(s["memory_compiled"], ".3f"),
            s["errors"],
            fmt(s["native_fused"]),
        ]
        for s in summary
    ]
    return md_table(header, body)


def _compile_cell(r: dict[str, Any]) -> str:
    if r["mode"] == "eager":
        return ""
    return f"{fmt(r['compile_s_scratch'], '.1f')} / {fmt(r['compile_s_native'], '.1f')}"


def _shape_table(rows: Sequence[dict[str, Any]], smoke: bool) -> str:
    header = ["device", "mode", "layer", "against", "shape", "from-scratch ms", "torch ms",
              "time vs torch (IQR over repeats)", "saved KiB from-scratch", "saved KiB torch",
              "saved bytes vs torch", "compile s (from-scratch / torch)", "error"]  # fmt: skip
    body = [
        [
            r["device"],
            r["mode"],
            display_name(r["layer"]),
            display_name(r["baseline"]),
            r["shape"],
            fmt(r["scratch_ms"], ".3f"),
            fmt(r["native_ms"], ".3f"),
            time_phrase(
                r["paired_ratio"], r["ratio_q1"], r["ratio_q3"], r["baseline"], smoke=smoke
            ),
            fmt(r["saved_bytes_scratch"] / 1024, ".0f"),
            fmt(r["saved_bytes_native"] / 1024, ".0f"),
            fmt(r["bytes_ratio"], ".3f"),
            _compile_cell(r),
            str(r["error"]).replace("|", "/"),
        ]
        for r in rows
    ]
    return md_table(header, body)


def write_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    info: dict[str, str],
    config: BenchConfig,
    wall_s: float,
) -> dict[str, Path]:
    """Write ``bench.csv``, ``bench_ratios.png`` and ``bench.md`` into ``out_dir``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "bench.csv", "md": out / "bench.md", "png": out / "bench_ratios.png"}
    pd.DataFrame(list(rows), columns=list(CSV_COLUMNS)).to_csv(paths["csv"], index=False)
    summary = summarise(rows)
    smoke = config.quick
    plot_ratios(rows, summary, paths["png"], smoke=smoke)
    md = _header(info, config, wall_s)
    md += ["", "## Findings", ""]
    md += [f"- {line}" for line in findings(summary, smoke=smoke)] or ["- nothing was measured"]
    md += ["", "## What is measured", "", _MEASURED, ""]
    md += ["## Summary per layer (median over shapes)", ""]
    md += [_summary_table(summary, smoke), "", _FUSED_NOTE, ""]
    md += [f"![time and saved bytes against torch per layer]({paths['png'].name})", ""]
    md += ["## Per shape", "", _shape_table(rows, smoke), ""]
    md += ["Raw numbers (with per-side IQRs, block sizes and module configs): "
           "[bench.csv](bench.csv).", ""]  # fmt: skip
    write_text_atomic(paths["md"], "\n".join(md))
    return paths
