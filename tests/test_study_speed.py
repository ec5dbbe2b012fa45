"""normzoo-study-speed: matching two sweeps' runs, the ratios, the report, the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normzoo import study_speed
from normzoo.study_speed import compare_sweeps, default_pairs, main, write_report


def _run(root: Path, norm: str, model: str, batch: int, seed: int, wall: float, status="ok"):
    d = root / f"norm={norm},model={model},bs={batch},seed={seed}"
    d.mkdir(parents=True)
    record = {
        "status": status,
        "norm": norm,
        "model": model,
        "batch_size": batch,
        "seed": seed,
        "wall_time_s": wall,
        "train_time_s": wall * 0.8,
    }
    (d / "metrics.json").write_text(json.dumps(record))


def test_default_pairs_are_the_registry_natives() -> None:
    pairs = dict(default_pairs())
    assert pairs["batchnorm"] == "native_batchnorm"
    assert pairs["weightnorm"] == "native_weightnorm"
    assert "batchrenorm" not in pairs and "none" not in pairs


def test_runs_are_matched_and_summed(tmp_path: Path) -> None:
    a, b = tmp_path / "speed_scratch", tmp_path / "speed_native"
    for seed in (0, 1):
        _run(a, "batchnorm", "mlp", 2, seed, 3.0)
        _run(b, "native_batchnorm", "mlp", 2, seed, 2.0)
        _run(a, "layernorm", "cnn", 8, seed, 1.0)
        _run(b, "native_layernorm", "cnn", 8, seed, 1.0)
    _run(a, "batchnorm", "mlp", 2, 2, 100.0)  # no native partner: left out
    _run(a, "instancenorm", "mlp", 2, 0, 0.0, status="invalid")
    _run(b, "native_instancenorm", "mlp", 2, 0, 0.0, status="invalid")
    pairs = [("batchnorm", "native_batchnorm"), ("layernorm", "native_layernorm")]
    tables = compare_sweeps(a, b, pairs)
    assert len(tables["runs"]) == 4
    layers = tables["layers"].set_index(["layer", "model"])
    assert layers.loc[("batchnorm", "mlp"), "wall_time_s_ratio"] == pytest.approx(1.5)
    assert layers.loc[("layernorm", "cnn"), "wall_time_s_ratio"] == pytest.approx(1.0)
    assert layers.loc[("all", ""), "wall_time_s_scratch"] == pytest.approx(8.0)
    assert layers.loc[("all", ""), "wall_time_s_ratio"] == pytest.approx(8.0 / 6.0)
    batch = tables["batch"].set_index("batch_size")
    assert batch.loc[2, "wall_time_s_ratio"] == pytest.approx(1.5)
    times = {
        "scratch": {"wall_s": 90.0, "command": "a"},
        "native": {"wall_s": 60.0, "command": "b"},
    }
    paths = write_report(tmp_path / "out", tables, times, {"date": "today"})
    text = paths["md"].read_text()
    assert "**1.50**" in text  # end to end: 90 s / 60 s
    assert "1 min 30.0 s" in text and "**1.33**" in text
    assert paths["csv"].read_text().count("\n") == 5  # header + 4 matched runs
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](study_speed.png)" in text
    # a comparison with no matched run writes no figure, and removes a stale one
    empty = compare_sweeps(a, b, [("groupnorm", "native_groupnorm")])  # no such runs
    assert empty["runs"].empty
    again = write_report(tmp_path / "out", empty, times, {"date": "today"})
    assert "png" not in again and not paths["png"].exists()


def test_cli_refuses_existing_dirs_and_unknown_layers(tmp_path: Path, capsys) -> None:
    (tmp_path / "speed_scratch").mkdir()
    assert main(["--sweep-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["--norms", "batchrenorm", "--sweep-root", str(tmp_path / "x")]) == 2
    assert "no native reference" in capsys.readouterr().err
    assert main(["--compare-only", "--sweep-root", str(tmp_path / "nothing")]) == 2


def test_cli_times_two_tiny_sweeps(tmp_path: Path) -> None:
    """End to end on a one-run grid per side (digits ships with scikit-learn: offline)."""
    root, out = tmp_path / "sweeps", tmp_path / "out"
    overrides = ["model=mlp", "data.batch_size=128", "seed=0", "train.epochs=1"]
    overrides += ["diagnostics.enabled=false", "hydra.launcher.n_jobs=1"]
    rc = main(
        ["--norms", "layernorm", "--sweep-root", str(root), "--out", str(out), "--", *overrides]
    )
    assert rc == 0
    for side in ("scratch", "native"):
        record = json.loads((root / f"speed_{side}" / study_speed.TIMES_FILE).read_text())
        assert record["returncode"] == 0 and record["wall_s"] > 0
    text = (out / "study_speed.md").read_text()
    assert "| layernorm | mlp | 1 |" in text
    assert "end-to-end wall time" in text
    rc = main(
        ["--compare-only", "--norms", "layernorm", "--sweep-root", str(root), "--out", str(out)]
    )
    assert rc == 0


def test_one_interleaved_sweep_compares_within_itself(tmp_path: Path) -> None:
    d = tmp_path / "speed_interleaved"
    for seed in (0, 1):
        _run(d, "groupnorm", "cnn", 4, seed, 2.0)
        _run(d, "native_groupnorm", "cnn", 4, seed, 1.6)
    tables = compare_sweeps(d, d, [("groupnorm", "native_groupnorm")])
    total = tables["layers"].iloc[-1]
    assert total["runs"] == 2
    assert total["wall_time_s_ratio"] == pytest.approx(1.25)
    times = {"interleaved": {"wall_s": 30.0, "command": "c", "returncode": 0}}
    text = write_report(tmp_path / "o", tables, times, {})["md"].read_text()
    assert "one interleaved sweep" in text and "30.0 s" in text and "**1.25**" in text
