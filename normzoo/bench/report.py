"""``bench.md`` and ``bench.csv``: the provenance, what is measured, the summary and per-shape tables."""

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
from normzoo.bench.summary import TARGETS, summarise
from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.provenance import cpu_model, git_dirty, git_revision, now_utc

__all__ = ["fmt", "provenance", "write_report"]

#: bench.md's line for a ``--quick`` run
_QUICK_NOTE = (
    "- **smoke test** (`--quick`): too few and too short repeats for the ratios to mean much; "
    "no verdicts on the targets"
)

_MEASURED = (
    "One step = forward + backward in training mode: `y = m(x); y.backward(g)` with `x` requiring grad "
    "and a fixed random `g`, grads set to None after each step. The from-scratch layer and its "
    "baseline are timed interleaved in one process (ABBA order), each repeat a block of steps "
    "lasting at least the min block time; times are medians over repeats. "
    "`ratio` = from-scratch median / baseline median; `paired` = median of the per-repeat ratios. "
    "Saved bytes = sum of the distinct storages autograd packs for backward in one forward "
    "(`saved_tensors_hooks`, deduplicated by storage pointer; a saved input or parameter counts too), "
    "the same rule for both contenders. Weight norms are timed on the layer they reparametrise "
    "(`Conv2d(C, C, 3, padding=1)` for conv shapes, `Linear(C, C)` for dense), so the conv's own cost "
    "is in both times. Layers that need spatial dims skip the dense shapes. Compiled: "
    "`torch.compile(m, dynamic=False)`, the first step (compilation) timed separately."
)

_FUSED_NOTE = (
    "The last column is a reference, not a target: the baseline's own compiled time over its "
    "eager time (median over shapes), i.e. torch's decomposition of the layer into tensor ops, "
    "fused by inductor, against torch's hand-written eager kernel. Where it is well above the "
    "eager target, even a fused composition of tensor ops is that much slower than the eager "
    "kernel on this machine; an eager from-scratch layer runs one kernel per op, unfused."
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
    md = ["# normzoo-bench: from-scratch layers vs native torch", ""]
    md += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in info.items()]
    md += [
        f"- **settings**: dtype {config.dtype}, repeats {config.repeats}, warm-up {config.warmup}, "
        f"min block time {config.min_time} s, compile {compile_text}",
        f"- **wall time of the run**: {wall_s:.0f} s",
        *([_QUICK_NOTE] if config.quick else []),
    ]
    return md


def _summary_table(summary: Sequence[dict[str, Any]]) -> str:
    header = ["device", "layer", "baseline", "shapes", f"eager (<= {TARGETS['eager']})",
              f"compiled (<= {TARGETS['compiled']})", f"memory (<= {TARGETS['memory']})",
              "memory worst shape", "memory compiled", "rows with errors",
              "baseline compiled / eager (reference)"]  # fmt: skip
    body = [
        [
            s["device"],
            s["layer"],
            s["baseline"] + ("" if s["pairing"] == "native reference" else f" — {s['pairing']}"),
            s["shapes"],
            f"{fmt(s['eager'], '.3f')} {s['eager_ok']}",
            f"{fmt(s['compiled'], '.3f')} {s['compiled_ok']}",
            f"{fmt(s['memory'], '.3f')} {s['memory_ok']}",
            fmt(s["memory_max"], ".3f"),
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


def _shape_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["device", "mode", "layer", "baseline", "shape", "scratch ms", "native ms", "ratio",
              "paired", "saved KiB scratch", "saved KiB native", "bytes ratio",
              "compile s (scratch/native)", "error"]  # fmt: skip
    body = [
        [
            r["device"],
            r["mode"],
            r["layer"],
            r["baseline"],
            r["shape"],
            fmt(r["scratch_ms"], ".3f"),
            fmt(r["native_ms"], ".3f"),
            fmt(r["ratio"]),
            fmt(r["paired_ratio"]),
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
    summary = summarise(rows, verdicts=not config.quick)
    plot_ratios(rows, summary, paths["png"])
    md = _header(info, config, wall_s)
    md += ["", "## What is measured", "", _MEASURED, ""]
    md += ["## Summary per layer (median over shapes; targets of issue 5)", ""]
    md += [_summary_table(summary), "", _FUSED_NOTE, ""]
    md += [f"![ratios per layer]({paths['png'].name})", "", "## Per shape", ""]
    md += [_shape_table(rows), ""]
    md += ["Raw numbers (with IQRs, block sizes and module configs): [bench.csv](bench.csv).", ""]
    write_text_atomic(paths["md"], "\n".join(md))
    return paths
