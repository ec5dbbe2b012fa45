"""``normzoo-study-speed --stacked``: matching the two sides' runs, the ratios, what moved."""

from __future__ import annotations

import json
from pathlib import Path

from normzoo.bench.study_speed_stacked import compare, main


def _run(root: Path, side: str, sweep: str, name: str, wall: float, train: float, err: float,
         ghost: int | None = None, status: str = "ok") -> None:  # fmt: skip
    d = root / side / sweep / name
    d.mkdir(parents=True)
    record = {"status": status, "norm": "batchnorm", "seed": 0, "batch_size": 32,
              "config": {"model.name": "cnn"}, "norm_layer_options": {"ghost_batch_size": ghost},
              "wall_time_s": wall, "train_time_s": train, "test_error": err, "val_error": 0.1}  # fmt: skip
    if side == "stacked":
        record["trained"] = "stacked"
    (d / "metrics.json").write_text(json.dumps(record))


def _study(root: Path) -> None:
    for side, wall, train in (("unstacked", 6.0, 3.0), ("stacked", 2.0, 1.0)):
        for seed in (0, 1):
            _run(root, side, "digits", f"g2_s{seed}", wall, train, 0.05, ghost=2)
            _run(root, side, "digits", f"g8_s{seed}", wall / 2, train / 2, 0.04, ghost=8)
        for sweep in ("digits", "digits_noniid"):
            (root / side / sweep).mkdir(parents=True, exist_ok=True)
            (root / side / sweep / "study_speed.json").write_text(
                json.dumps({"wall_s": 30.0 if side == "unstacked" else 12.0, "returncode": 0})
            )
    # one run whose test error moved by one sample in 359, one that failed stacked only
    _run(root, "unstacked", "digits_noniid", "n0", 4.0, 2.0, 0.0306)
    _run(root, "stacked", "digits_noniid", "n0", 1.0, 0.5, 0.0334)
    _run(root, "unstacked", "digits_noniid", "n1", 4.0, 2.0, 0.03)
    _run(root, "stacked", "digits_noniid", "n1", 1.0, 0.5, 0.03, status="failed")


def test_groups_sum_matched_ok_runs_and_every_moved_number_is_listed(tmp_path: Path) -> None:
    _study(tmp_path)
    tables = compare(tmp_path, ["digits", "digits_noniid"])
    groups = tables["groups"].set_index(["sweep", "norm_batch"])
    assert groups.loc[("digits", 2), "runs"] == 2
    assert groups.loc[("digits", 2), "wall_time_s_ratio"] == 3.0
    assert groups.loc[("digits", 8), "train_time_s_ratio"] == 3.0
    assert groups.loc[("digits_noniid", 32), "runs"] == 1  # the failed one is not timed
    moved = tables["moved"]
    assert set(zip(moved["run"], moved["number"], strict=True)) == {
        ("n0", "test_error"), ("n1", "status")}  # fmt: skip
    assert abs(moved.set_index("number").loc["test_error", "change"] - 0.0028) < 1e-12


def test_compare_only_writes_the_report(tmp_path: Path) -> None:
    _study(tmp_path)
    out = tmp_path / "out"
    rc = main(["--compare-only", "--sweeps", "digits,digits_noniid", "--sweep-root",
               str(tmp_path), "--out", str(out)])  # fmt: skip
    assert rc == 0
    text = (out / "study_speed_stacked.md").read_text()
    assert "| **all sweeps** | 60.0 | 24.0 | **2.50x** |" in text
    assert "test_error in 1 runs" in text and "status in 1 runs" in text
    assert (out / "study_speed_stacked.png").is_file() and (
        out / "study_speed_stacked.csv"
    ).is_file()


def test_the_entry_point_takes_stacked(tmp_path: Path) -> None:
    from normzoo.study_speed import main as entry

    _study(tmp_path)
    rc = entry(["--stacked", "--compare-only", "--sweeps", "digits", "--sweep-root",
                str(tmp_path), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0 and (tmp_path / "o" / "study_speed_stacked.md").is_file()
