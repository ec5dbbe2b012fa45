"""The GPU check's own scripts, run on the CPU (issue 17): a GPU day must not be the first time
they run. ``scripts/gpu_parity.py cpu`` drives every layer the CUDA run would; ``stack_speed.py``
writes its table from a tiny budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from normzoo.registry import get_norm, list_norms

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_gpu_parity_dry_run_drives_every_layer_and_matches_the_references() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_parity.py"), "cpu"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| layer |")}  # fmt: skip
    expected = {n for n in list_norms() if not get_norm(n).reference}
    assert set(rows) == expected  # weight reparametrisations included
    assert not [r for r in rows.values() if "not run" in r]
    # a layer with a native reference is compared with it (a number, not "-")
    assert rows["weightnorm"].split("|")[3].strip() != "-"
    assert rows["batchnorm"].split("|")[3].strip() != "-"
    assert done.stdout.rstrip().endswith(": ok")


def test_stack_speed_writes_its_table_for_a_short_budget(tmp_path: Path) -> None:
    out = tmp_path / "stacked.md"
    argv = [sys.executable, str(SCRIPTS / "stack_speed.py"), "--model", "mlp", "--device", "cpu",
            "--repeats", "1", "--steps", "6", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "15 runs" in text and "6 steps a run" in text and "--steps 6" in text
    assert "**ratio unstacked / stacked:" in text
    assert "| single |" in text and "| stacked |" in text
