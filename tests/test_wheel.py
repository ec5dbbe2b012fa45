"""A wheel (not an editable install) gives a working ``normzoo-train``: the Hydra config groups
ship as package data (``normzoo/conf``), the sweeper plugin with them. Offline and in seconds: the
fresh venv finds its dependencies in this interpreter's site-packages through a ``.pth`` file,
and the wheel is installed without them (``--no-deps``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("normzoo", "hydra_plugins", "pyproject.toml", "README.md")
TINY = [
    "train.epochs=1",
    "data.train_subset=120",
    "data.test_subset=60",
    "model.channels=[4,4]",
    "model.strides=[1,2]",
    "diagnostics.precise_samples=32",
    "device=cpu",
]


def _call(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PIP_NO_INDEX": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed; its ``bin`` dir."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building leaves build/ and *.egg-info behind
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    _call([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), "."], src)
    (wheel,) = work.glob("normzoo-*.whl")
    _call([sys.executable, "-m", "venv", "--without-pip", str(work / "fresh")], work)
    python = work / "fresh" / "bin" / "python"
    purelib = Path(
        _call(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work
        ).stdout.strip()
    )
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _call([*pip, "--python", str(python), "install", "--no-deps", "--no-build-isolation", "-q",
           str(wheel)], work)  # fmt: skip
    return work / "fresh" / "bin"


def test_the_wheel_ships_the_config_and_the_plugin(fresh: Path, tmp_path: Path) -> None:
    code = (
        "import normzoo, hydra_plugins.normzoo_sweeper as s, normzoo.config as c; "
        "print(normzoo.__file__, s.__file__, c.CONF_DIR, (c.CONF_DIR / 'config.yaml').is_file())"
    )
    out = _call([str(fresh / "python"), "-c", code], tmp_path).stdout.split()
    site = str(fresh.parent / "lib")
    assert all(path.startswith(site) for path in out[:3]), out  # not this checkout's files
    assert out[3] == "True"


def test_normzoo_train_from_an_empty_directory(fresh: Path, tmp_path: Path) -> None:
    _call([str(fresh / "normzoo-train"), *TINY, "hydra.run.dir=run"], tmp_path)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 1
    _call([str(fresh / "normzoo-train"), "-m", *TINY, "norm=bn,ln", "hydra.sweep.dir=sweep"],
          tmp_path)  # fmt: skip
    found = sorted(
        json.loads(p.read_text())["status"] for p in tmp_path.glob("sweep/*/metrics.json")
    )
    assert found == ["ok", "ok"]
    multirun = (tmp_path / "sweep" / "multirun.yaml").read_text()
    assert "hydra_plugins.normzoo_sweeper.NormzooSweeper" in multirun  # found by Hydra's scan
