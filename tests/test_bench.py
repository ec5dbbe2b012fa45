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
    findings,
    main,
    measure_pair,
    resolve_pairings,
    saved_tensor_bytes,
    summarise,
    time_interleaved,
    time_phrase,
    write_report,
)
from normzoo.bench.figure import SMOKE_TITLE, plot_ratios, ratio_figure
from normzoo.bench.summary import verdict
from normzoo.registry import display_name


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

    assert (df.ratio_q1 <= df.paired_ratio).all() and (df.paired_ratio <= df.ratio_q3).all()
    assert (df.ratio_min <= df.ratio_q1).all() and (df.ratio_q3 <= df.ratio_max).all()
    assert (df.threads == 1).all()  # one torch thread unless --threads says otherwise

    md = (tmp_path / "bench.md").read_text()
    assert "](bench_ratios.png)" in md
    assert f"torch**: {torch.__version__}" in md and "normzoo-bench --quick" in md
    assert "**note**: shared machine" in md and "torch threads 1 (`--threads`, default 1" in md
    assert md.splitlines()[2].startswith("**This is a smoke test, not a measurement**")
    for layer in df.layer:
        assert f"| cpu | {display_name(layer)} |" in md
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
    assert "smoke test, not a measurement" in md and "pass" not in md and "FAIL" not in md
    assert "than torch by" not in md and "outside the spread" not in md  # no verdicts
    assert "LayerNorm (cpu), eager:" in capsys.readouterr().out


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


def _summary_row(mode: str, shape: str, ratio: float, q: tuple[float, float], bytes_ratio: float,
                 native_ms: float) -> dict:  # fmt: skip
    return {"device": "cpu", "mode": mode, "layer": "batchnorm", "baseline": "native_batchnorm",
            "pairing": "native reference", "shape": shape, "paired_ratio": ratio,
            "ratio_q1": q[0], "ratio_q3": q[1], "bytes_ratio": bytes_ratio, "native_ms": native_ms,
            "error": ""}  # fmt: skip


def test_summary_medians_spread_and_verdicts() -> None:
    row = _summary_row
    rows = [
        row("eager", "a", 0.8, (0.75, 0.85), 0.5, 2.0),
        row("eager", "b", 2.0, (1.9, 2.1), 1.5, 1.0),
    ]
    rows += [row("eager", "c", 1.2, (0.95, 1.3), 1.0, math.nan)]
    rows += [row("compiled", "a", 0.9, (0.8, 1.0), 0.8, 3.0)]
    rows += [row("compiled", "b", math.nan, (math.nan, math.nan), math.nan, 4.0)]
    rows += [row("compiled", "c", 1.0, (1.0, 1.0), 1.0, 5.0)]  # (no eager baseline time)
    (s,) = summarise(rows)
    # torch's compiled / eager time, matched by shape: a 3.0 / 2.0, b 4.0 / 1.0
    assert s["native_fused"] == pytest.approx((1.5 + 4.0) / 2)
    assert s["eager"] == pytest.approx(1.2) and (s["eager_lo"], s["eager_hi"]) == (0.8, 2.0)
    assert (s["eager_slower"], s["eager_faster"], s["eager_noise"]) == (1, 1, 1)
    assert s["compiled"] == pytest.approx(0.95) and s["compiled_n"] == 2
    assert (s["compiled_slower"], s["compiled_faster"], s["compiled_noise"]) == (0, 0, 2)
    assert s["memory"] == pytest.approx(1.0) and s["memory_max"] == pytest.approx(1.5)
    assert s["memory_compiled"] == pytest.approx(0.9)
    (eager, compiled, memory) = findings([s])
    assert s["eager_iqr"] == pytest.approx(0.2)  # widths 0.10, 0.20, 0.35
    assert eager == ("BatchNorm (cpu), eager: 1.20x torch's time (median over 3 shapes; "
                     "0.80–2.00 across them; spread over repeats: IQR 0.20 wide (median over "
                     "shapes)); slower than torch on 1, faster than torch on 1, within the noise "
                     "on 1 (of 3 shapes).")  # fmt: skip
    assert "within the noise on 2 (of 2 shapes)" in compiled
    assert memory.startswith(
        "BatchNorm (cpu), saved for backward: 1.000x torch's saved bytes (the same)"
    )
    assert all("smoke test, not a measurement" in f for f in findings([s], smoke=True)[:2])


def test_faster_or_slower_only_outside_the_spread() -> None:
    assert time_phrase(1.12, 1.05, 1.2, "native_batchnorm") == (
        "1.12x torch's time (IQR 1.05–1.20): slower than torch by 12%"
    )
    assert time_phrase(0.75, 0.7, 0.8, "native_layernorm").endswith("faster than torch by 25%")
    within = time_phrase(1.12, 0.98, 1.2, "native_batchnorm")
    assert within.endswith("no difference outside the spread") and " by " not in within
    # the rule reads the IQR as printed (to 1%): 1.004 is not above 1
    assert verdict(1.004, 1.1) == "within the noise" and verdict(1.006, 1.1) == "slower"
    assert time_phrase(1.12, 1.05, 1.2, "native_batchnorm", smoke=True).endswith("smoke test")
    assert time_phrase(math.nan, math.nan, math.nan, "native_batchnorm") == "not measured"
    assert "BatchNorm's time" in time_phrase(1.5, 1.4, 1.6, "batchnorm")  # not torch: named


def test_report_speaks_without_internal_target_words(tmp_path) -> None:
    from test_bench_golden import measured_rows

    info = {"command": "normzoo-bench"}
    for quick in (False, True):
        config = bench.BenchConfig(quick=quick)
        md = write_report(measured_rows(), tmp_path, info=info, config=config, wall_s=1.0)["md"]
        text = md.read_text()
        for word in ("target", "issue", "PASS", "FAIL", "pass", "smoke)"):
            assert word not in text, word
        assert ("smoke test, not a measurement" in text) is quick
        assert ("slower than torch by 135%" in text) is not quick


@pytest.mark.parametrize("n_layers", [1, 2, 14])
def test_figure_has_one_row_per_layer_for_any_number(tmp_path, n_layers: int) -> None:
    rows = [
        _summary_row("eager", "a", 0.9 + 0.1 * i, (0.85, 1.3), 1.0, 1.0) | {"layer": f"layer{i}"}
        for i in range(n_layers)
    ]
    summary = summarise(rows)
    fig = ratio_figure(rows, summary)
    eager_ax, _ = fig.axes  # no compiled rows: two panels
    labels = [t.get_text() for t in eager_ax.get_yticklabels()]
    assert labels == [display_name(s["layer"]) for s in summary] and len(labels) == len(summary)
    assert fig.get_size_inches()[1] >= 1.6 + 0.32 * len(summary) - 1e-9
    lo, hi = eager_ax.get_xlim()
    assert lo < 1.0 < hi and lo <= min(r["paired_ratio"] for r in rows)
    assert SMOKE_TITLE not in fig.get_suptitle()
    assert ratio_figure(rows, summary, smoke=True).get_suptitle().startswith(SMOKE_TITLE)
    png = plot_ratios(rows, summary, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_torch_thread_by_default() -> None:
    from normzoo.bench.cli import _config_from_args, _parser

    assert _config_from_args(_parser().parse_args([])).threads == 1
    assert _config_from_args(_parser().parse_args(["--threads", "2"])).threads == 2
    with pytest.raises(SystemExit, match="threads >= 1"):
        _config_from_args(_parser().parse_args(["--threads", "0"]))


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
