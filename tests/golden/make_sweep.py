"""Regenerate ``tests/golden/sweep/``: a real tiny ``normzoo-train -m`` sweep, frozen as data.

Run from the repository root: ``PYTHONPATH=$PWD python tests/golden/make_sweep.py``. It trains 54
jobs (about a minute on one core), keeps what :func:`normzoo.results.load_sweep` and the report
read (``multirun.yaml``, ``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``metrics.json``), and
then breaks three jobs on purpose so the golden report covers every status: one ``metrics.json``
removed (``missing``), one truncated (``corrupt``), one run dir removed (``not_started``). The
InstanceNorm jobs are ``invalid`` (an mlp has no spatial dims). After regenerating, rebuild the
snapshots with ``NORMZOO_UPDATE_GOLDEN=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "sweep"
ARGS = [
    "-m",
    "norm=batchnorm,batchrenorm,layernorm,native_batchnorm,none,instancenorm",
    "data.batch_size=4,16,32",
    "seed=0,1,2",
    "model=mlp",
    "model.widths=[16]",
    "train.epochs=3",
    "data.train_subset=256",
    "data.test_subset=96",
    "diagnostics.precise_samples=64",
    "device=cpu",
    "train.progress=none",
    "hydra.sweep.dir=sweep",
]
LAUNCH = "import sys; from normzoo.train import main; sys.argv[0] = 'normzoo-train'; main()"
KEEP = {"multirun.yaml", "metrics.json", "overrides.yaml", "config.yaml"}


def _job(root: Path, norm: str, batch: int, seed: int) -> Path:
    (hit,) = [d for d in root.iterdir() if f"norm={norm}," in d.name
              and f"data.batch_size={batch}," in d.name and d.name.endswith(f"seed={seed},train.epochs=3")]  # fmt: skip
    return hit


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", LAUNCH, *ARGS], cwd=tmp, env=env, check=True)
        root = Path(tmp) / "sweep"
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_file() and path.name not in KEEP:
                path.unlink()
        (_job(root, "batchnorm", 32, 2) / "metrics.json").unlink()  # killed: missing
        corrupt = _job(root, "layernorm", 4, 2) / "metrics.json"
        corrupt.write_text(corrupt.read_text()[:200])  # half-written: corrupt
        shutil.rmtree(_job(root, "none", 32, 2))  # never started
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(root, TARGET)
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
