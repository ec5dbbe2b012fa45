"""The table of bad command lines in ``docs/bad_command_lines.md`` is what they print now: the
script that made it runs every line again (each is refused before anything trains)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bad_command_lines.py"


def test_the_documented_first_lines_still_match(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_the_table_has_at_least_20_lines_all_refused() -> None:
    rows = [r for r in (ROOT / "docs" / "bad_command_lines.md").read_text().splitlines()
            if r.startswith("| ") and "`normzoo-train " in r]  # fmt: skip
    assert len(rows) >= 20
    for row in rows:
        status = row.split(" | ")[2]
        assert status != "0", row  # refused: a non-zero exit status
        assert "started a run" not in row and "[normzoo.train][INFO] - run " not in row, row
