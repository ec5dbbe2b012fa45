"""normzoo-bench: the quick run's CSV, the saved-bytes counter, interleaving, compile path, summary."""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import torch

from normzoo import bench, get_norm
from normzoo.bench import (
    CSV_COLUMNS,
    QUICK_SHAPES,
    Pairing,
    main,
    measure_pair,
    resolve_pairings,
    saved_tensor_bytes,
    summarise,
    time_interleaved,
)


def test_quick_run_writes_a_row_per_benchmarked_layer(tmp_path) -> None:
    pairings = resolve_pairings()
    assert pairings, "the registry should hold from-scratch layers with a baseline"
    argv = ["--quick", "--device", "cpu", "--note", "shared machine", "--out", str(tmp_path)]
    assert main(argv) == 0

    df = pd.read_csv(tmp_path / "bench.csv", keep_default_na=False, na_values=[""])
    assert list(df.columns) == list(CSV_COLUMNS)
    shape = "x".join(map(str, QUICK_SHAPES[0]))
    assert sorted(zip(df.layer, df.baseline, strict=True)) == sorted(
        (p.layer, p.baseline) for p in pairings
    )
    assert (
        set(df["shape"]) == {shape} and set(df["mode"]) == {"eager"} and set(df.device) == {"cpu"}
    )
    assert (df.error.isna() | (df.error == "")).all(), df.error.tolist()
    assert (df.scratch_ms > 0).all() and (df.native_ms > 0).all()
    assert (df.repeats == 2).all()
    # ratios come from the same rows
    assert df.ratio.to_numpy() == pytest.approx((df.scratch_ms / df.native_ms).to_numpy(), rel=1e-9)
    assert (df.saved_bytes_scratch > 0).all() and (df.saved_bytes_native > 0).all()
    assert df.bytes_ratio.to_numpy() == pytest.approx(
        (df.saved_bytes_scratch / df.saved_bytes_native).to_numpy(), rel=1e-9
    )
    # every baseline is the registry's native reference, or the natural one for layers without it
    for layer, baseline in zip(df.layer, df.baseline, strict=True):
        spec = get_norm(layer)
        assert baseline == (spec.native or bench.NATURAL_BASELINES[layer])

    md = (tmp_path / "bench.md").read_text()
    assert "![ratios per layer](bench_ratios.png)" in md
    assert f"torch**: {torch.__version__}" in md and "normzoo-bench --quick" in md
    assert "**note**: shared machine" in md
    for layer in df.layer:
        assert f"| cpu | {layer} |" in md
    png = (tmp_path / "bench_ratios.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_quick_run_without_out_leaves_the_shipped_benchmark_alone(
    tmp_path, monkeypatch, capsys
) -> None:
    """A smoke test writes to a temporary folder, not to reports/bench, and judges nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert main(["--quick", "--device", "cpu", "--norms", "layernorm"]) == 0
    assert not (tmp_path / "reports").exists()
    md = (tmp_path / "tmp" / "normzoo-bench-quick" / "bench.md").read_text()
    assert "smoke test" in md and " pass |" not in md and "FAIL" not in md
    assert "(smoke)" in capsys.readouterr().out


def test_saved_bytes_counts_one_known_tensor() -> None:
    class SavesOne(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(torch.ones(7, 5, dtype=torch.float64))  # 280 bytes
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    x = torch.randn(100, requires_grad=True)
    assert saved_tensor_bytes(lambda: SavesOne.apply(x)) == 7 * 5 * 8


def test_saved_bytes_rules_inputs_views_and_dedup() -> None:
    x = torch.randn(10, 10, requires_grad=True)
    y = torch.randn(10, 10, requires_grad=True)
    assert saved_tensor_bytes(lambda: x * 2.0) == 0  # a python scalar factor saves nothing
    assert saved_tensor_bytes(lambda: x * y) == 2 * 400  # both inputs are saved and counted
    assert saved_tensor_bytes(lambda: x * x) == 400  # one storage, counted once
    assert saved_tensor_bytes(lambda: torch.exp(x)) == 400  # exp saves its output
    # a view saved for backward counts its whole storage
    assert saved_tensor_bytes(lambda: x[:2] * y[:2]) == 2 * 400


def test_time_interleaved_alternates_order_and_skips_failed() -> None:
    calls: list[str] = []
    steps = [lambda: calls.append("A"), None, lambda: calls.append("B")]
    times, numbers = time_interleaved(steps, repeats=4, warmup=1, min_time=0.0)
    assert numbers == [1, 0, 1] and times[1] == []
    # warm-up + calibration per step, then ABBA order
    assert calls == ["A", "A", "B", "B", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert all(len(t) == 4 and min(t) > 0 for t in (times[0], times[2]))

    def slow() -> None:
        time.sleep(0.002)

    times, numbers = time_interleaved([slow], repeats=3, warmup=0, min_time=0.006)
    assert 1 <= numbers[0] <= 3 and min(times[0]) >= 0.002
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved([slow], repeats=0, warmup=0, min_time=0.0)


def test_compiled_mode_times_both_and_records_a_failure() -> None:
    pair = resolve_pairings(["batchnorm"])[0]
    row = measure_pair(pair, (4, 8, 4, 4), mode="compiled", repeats=2, warmup=1, min_time=0.0,
                       backend="aot_eager")  # fmt: skip
    assert row["error"] == ""
    assert row["compile_s_scratch"] > 0 and row["compile_s_native"] > 0
    assert row["scratch_ms"] > 0 and row["native_ms"] > 0
    assert row["ratio"] == pytest.approx(row["scratch_ms"] / row["native_ms"])
    assert row["saved_bytes_scratch"] > 0 and row["saved_bytes_native"] > 0

    calls = {"n": 0}

    def fails_first(gm, example_inputs):  # the from-scratch layer (compiled first) fails
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("backend refused this graph")
        return gm.forward

    row = measure_pair(pair, (4, 8, 4, 4), mode="compiled", repeats=2, warmup=0, min_time=0.0,
                       backend=fails_first)  # fmt: skip
    assert row["error"].startswith("scratch:") and "backend refused this graph" in row["error"]
    assert math.isnan(row["scratch_ms"]) and math.isnan(row["ratio"])
    assert row["native_ms"] > 0


def test_resolve_pairings_from_the_registry(monkeypatch) -> None:
    pairs = resolve_pairings()
    names = {p.layer for p in pairs}
    assert "none" not in names and not any(get_norm(n).reference for n in names)
    assert Pairing("batchnorm", "native_batchnorm", "native reference") in pairs
    assert resolve_pairings(["none:none"]) == [Pairing("none", "none", "explicit pair")]
    with pytest.raises(ValueError, match="no native reference"):
        resolve_pairings(["none"])
    with pytest.raises(ValueError, match="cannot pair"):
        resolve_pairings(["batchnorm:native_weightnorm"])
    monkeypatch.setitem(bench.NATURAL_BASELINES, "none", "native_batchnorm")
    natural = Pairing("none", "native_batchnorm", "natural baseline (no native)")
    assert resolve_pairings(["identity"]) == [natural]
    assert natural in resolve_pairings()


def test_summary_medians_and_targets() -> None:
    def row(mode: str, shape: str, ratio: float, bytes_ratio: float, native_ms: float) -> dict:
        return {"device": "cpu", "mode": mode, "layer": "x", "baseline": "native_x",
                "pairing": "native reference", "shape": shape, "ratio": ratio,
                "bytes_ratio": bytes_ratio, "native_ms": native_ms, "error": ""}  # fmt: skip

    rows = [row("eager", "a", 1.0, 0.5, 2.0), row("eager", "b", 2.0, 1.5, 1.0)]
    rows += [row("eager", "c", 1.2, 1.0, math.nan)]
    rows += [row("compiled", "a", 0.9, 0.8, 3.0), row("compiled", "b", math.nan, math.nan, 4.0)]
    rows += [row("compiled", "c", 1.0, 1.0, 5.0)]  # (no eager baseline time: not in native_fused)
    (s,) = summarise(rows)
    # the baseline's compiled / eager time, matched by shape: a 3.0 / 2.0, b 4.0 / 1.0
    assert s["native_fused"] == pytest.approx((1.5 + 4.0) / 2)
    assert s["eager"] == pytest.approx(1.2) and s["eager_ok"] == "pass"
    assert s["compiled"] == pytest.approx(0.95) and s["compiled_ok"] == "pass"
    assert s["memory"] == pytest.approx(1.0) and s["memory_ok"] == "pass"
    assert s["memory_max"] == pytest.approx(1.5) and s["memory_compiled"] == pytest.approx(0.9)
    rows[2]["ratio"] = 1.4
    assert summarise(rows)[0]["eager_ok"] == "FAIL"


def test_cli_errors(tmp_path, capsys) -> None:
    assert main(["--quick", "--norms", "nosuchnorm", "--out", str(tmp_path)]) == 2
    assert "unknown norm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--shapes", "4", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main(["--device", "cuda", "--out", str(tmp_path)])
    assert not (tmp_path / "bench.csv").exists()


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "normzoo.bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--min-time" in out.stdout and "--no-compile" in out.stdout
