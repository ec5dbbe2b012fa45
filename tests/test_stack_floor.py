"""``scripts/stack_floor.py`` (issue 17): the stacked step against its floor, and the study's run
time at each variant's speed, from a tiny measurement and a study-speed CSV written here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_stack_floor_writes_every_variant_and_the_bound(tmp_path: Path) -> None:
    csv = tmp_path / "study_speed_stacked.csv"
    pd.DataFrame({"model": ["mlp", "mlp"], "wall_time_s_unstacked": [30.0, 10.0],
                  "wall_time_s_stacked": [12.0, 8.0], "train_time_s_stacked": [6.0, 4.0]}
                 ).to_csv(csv, index=False)  # fmt: skip
    out = tmp_path / "floor.md"
    argv = [sys.executable, "-m", "scripts.stack_floor", "--models", "mlp", "--seeds", "1",
            "--repeats", "1", "--steps", "1", "--study-speed", str(csv), "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    for variant in ("single runs", "stacked", "torch's fused BatchNorm", "no norm"):
        assert variant in header
    row = next(line for line in lines if line.startswith("| mlp |")).split("|")
    assert row[2].strip() == "5 + 5"  # BN and BRN x 5 ghost sizes x 1 seed, in 2 stacks
    assert all(float(cell) > 0 for cell in row[3:-1])
    # as measured: 40 core-s unstacked vs 20 stacked; free training steps leave the 10 outside
    assert "| stacked | 40 | 20 | 2.00x |" in lines
    assert "| training steps free | 40 | 10 | 4.00x |" in lines
