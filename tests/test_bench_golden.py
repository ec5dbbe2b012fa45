"""Golden files of the bench's reports: bench.md / bench.csv and study_speed.md / .csv, written from
fixed measured rows (no timing here). ``NORMZOO_UPDATE_GOLDEN=1`` rewrites them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from normzoo import bench, study_speed

GOLDEN = Path(__file__).parent / "golden" / "bench"
#: provenance lines whose values depend on the machine and the moment
_MASKED = ("date", "git revision", "cpu", "torch threads", "torch", "python", "platform", "cuda")


def _mask(text: str) -> str:
    keys = "|".join(re.escape(k) for k in _MASKED)
    text = re.sub(rf"^- \*\*({keys})\*\*: .*$", r"- **\1**: <masked>", text, flags=re.M)
    return re.sub(r"^- \*\*(load average at [a-z]+ \(1/5/15 min\))\*\*: .*$",
                  r"- **\1**: <masked>", text, flags=re.M)  # fmt: skip


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("NORMZOO_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with NORMZOO_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path}"


def _row(layer: str, baseline: str, mode: str, shape: str, scratch: float, native: float,
         saved: tuple[int, int], **extra) -> dict:  # fmt: skip
    row = {
        "device": "cpu", "mode": mode, "layer": layer, "baseline": baseline,
        "pairing": extra.pop("pairing", "native reference"), "kind": "activation",
        "shape": shape, "dtype": "float32", "threads": 1, "repeats": 20,
        "number_scratch": 40, "number_native": 50, "scratch_ms": scratch, "native_ms": native,
        "ratio": scratch / native, "paired_ratio": 0.98 * scratch / native,
        "scratch_iqr_ms": 0.01 * scratch, "native_iqr_ms": 0.02 * native,
        "saved_bytes_scratch": saved[0], "saved_bytes_native": saved[1],
        "bytes_ratio": saved[0] / saved[1], "compile_s_scratch": float("nan"),
        "compile_s_native": float("nan"), "scratch_config": f"{layer}(64)",
        "native_config": f"{baseline}(64)", "error": "",
    }  # fmt: skip
    if mode == "compiled":
        row["compile_s_scratch"], row["compile_s_native"] = 3.25, 2.5
    spread, paired = extra.pop("spread", 0.03), row["paired_ratio"]
    row["ratio_q1"], row["ratio_q3"] = paired * (1 - spread), paired * (1 + spread)
    row["ratio_min"], row["ratio_max"] = paired * (1 - 2 * spread), paired * (1 + 2 * spread)
    row.update(extra)
    return row


def measured_rows() -> list[dict]:
    """A fixed set of rows as ``run_bench`` returns them: two shapes, both modes, an error row."""
    rows = [
        _row("batchnorm", "native_batchnorm", "eager", "32x64x32x32", 2.5, 2.8, (8392704, 8392960)),
        _row("batchnorm", "native_batchnorm", "eager", "256x256", 0.21, 0.2, (262144, 263168)),
        _row("batchnorm", "native_batchnorm", "compiled", "32x64x32x32", 2.0, 1.9, (8392704, 8392704)),
        _row("batchnorm", "native_batchnorm", "compiled", "256x256", 0.19, 0.18, (262144, 262144)),
        _row("batchrenorm", "native_batchnorm", "eager", "32x64x32x32", 2.9, 2.8, (8392704, 8392960),
             pairing="natural baseline (no native)"),
        _row("groupnorm", "native_groupnorm", "eager", "32x64x32x32", 6.0, 2.5, (8400000, 8400000)),
        _row("groupnorm", "native_groupnorm", "compiled", "32x64x32x32", float("nan"), 2.2,
             (0, 8400000), saved_bytes_scratch=float("nan"), bytes_ratio=float("nan"),
             paired_ratio=float("nan"), ratio_q1=float("nan"), ratio_q3=float("nan"),
             ratio_min=float("nan"), ratio_max=float("nan"),
             error="scratch: RuntimeError: backend refused this graph"),
    ]  # fmt: skip
    return rows


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_bench_report_matches_golden(tmp_path: Path, quick: bool) -> None:
    config = bench.BenchConfig(quick=quick, threads=1)
    info = bench.provenance("normzoo-bench --device cpu --threads 1")
    info["heap"] = "glibc mallopt: trim and mmap thresholds 1 GiB"
    info["note"] = "golden fixture"
    paths = bench.write_report(measured_rows(), tmp_path, info=info, config=config, wall_s=106.4)
    suffix = "_quick" if quick else ""
    _check(f"bench{suffix}.md", _mask(paths["md"].read_text()))
    if not quick:  # (the same rows: one CSV)
        _check("bench.csv", paths["csv"].read_text())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(root: Path, norm: str, model: str, batch: int, seed: int, wall: float) -> None:
    d = root / f"norm={norm},model={model},bs={batch},seed={seed}"
    d.mkdir(parents=True)
    record = {"status": "ok", "norm": norm, "model": model, "batch_size": batch, "seed": seed,
              "wall_time_s": wall, "train_time_s": wall * 0.75}  # fmt: skip
    (d / "metrics.json").write_text(json.dumps(record))


def test_study_speed_report_matches_golden(tmp_path: Path) -> None:
    a, b = tmp_path / "speed_scratch", tmp_path / "speed_native"
    for seed in (0, 1):
        for batch, wall in ((2, 3.0), (32, 1.5)):
            _run(a, "batchnorm", "mlp", batch, seed, wall + seed)
            _run(b, "native_batchnorm", "mlp", batch, seed, wall * 0.8 + seed)
            _run(a, "layernorm", "cnn", batch, seed, 2 * wall)
            _run(b, "native_layernorm", "cnn", batch, seed, 2 * wall * 1.1)
    pairs = [("batchnorm", "native_batchnorm"), ("layernorm", "native_layernorm")]
    tables = study_speed.compare_sweeps(a, b, pairs)
    times = {
        "scratch": {"wall_s": 95.5, "command": "normzoo-train -m experiment=digits norm=a",
                    "returncode": 0},
        "native": {"wall_s": 80.25, "command": "normzoo-train -m experiment=digits norm=b",
                   "returncode": 1},
    }  # fmt: skip
    info = {"date": "2026-01-01 00:00 UTC", "study": "digits", "order": "scratch then native"}
    paths = study_speed.write_report(tmp_path / "out", tables, times, info)
    _check("study_speed.md", paths["md"].read_text())
    _check("study_speed.csv", paths["csv"].read_text())
