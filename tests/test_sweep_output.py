"""What a sweep prints (issue 14, item 5): the jobs' lines are tagged with their swept values and
quiet by default (warnings, errors and one ``[k/N]`` line per job); ``train.progress=log`` shows
every line, tagged; each run's ``train.log`` keeps every line either way."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from normzoo.config import CONF_DIR
from normzoo.sweep.job_output import PROGRESS_LOGGER, JobConsole, job_tag, swept_keys

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.train_subset=64", "data.test_subset=64", "train.epochs=1", "device=cpu",
        "model.channels=[4,4]", "model.strides=[1,2]"]  # fmt: skip

SWEEP = ["-m", "norm=bn,ln", "seed=0", *TINY, "diagnostics.enabled=false"]
_EPOCH = re.compile(r"epoch \d+/\d+ step")


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "normzoo.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def test_the_tag_names_the_swept_values_only() -> None:
    job = ["norm=batchnorm", "data.batch_size=16", "train.epochs=3", "model.channels=[4,4]"]
    assert job_tag(job, ["norm", "data.batch_size"]) == "norm=batchnorm,data.batch_size=16"
    assert job_tag(["+x=1", "seed=2"], ["x"]) == "+x=1"
    assert job_tag(job[:2], []) == "norm=batchnorm,data.batch_size=16"  # nothing swept: all


def test_swept_keys_of_the_command_line_and_of_a_study() -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        study = compose("config", ["experiment=digits_noniid"], return_hydra_config=True)
    cfg.hydra.overrides.task = ["norm=bn,gn", "seed=0", "data.batch_size=2,4"]
    assert swept_keys(cfg) == ["norm", "data.batch_size"]
    study.hydra.overrides.task = ["experiment=digits_noniid"]
    assert swept_keys(study) == ["norm", "seed"]


def test_the_console_is_tagged_and_quiet_until_restored(capsys) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        console = JobConsole()
        console.install("norm=batchnorm,seed=1", every_line=False)
        logging.getLogger("normzoo.train").warning("diverged at step %d", 7)
        logging.getLogger("normzoo.train").error("boom")
        logging.getLogger("normzoo.train").info("epoch 1/3 step 8/24")  # quiet: not shown
        logging.getLogger(PROGRESS_LOGGER).warning("[1/2] norm=ln: ok")  # never tagged
        console.restore()
        logging.getLogger("normzoo.train").warning("after")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err.splitlines() == [
        "WARNING - [norm=batchnorm,seed=1] diverged at step 7",
        "ERROR - [norm=batchnorm,seed=1] boom",
        "WARNING - [1/2] norm=ln: ok",
        "WARNING - after",
    ]


def test_a_sweep_prints_one_line_per_job_and_logs_every_line(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    proc = cli(tmp_path, *SWEEP, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert not _EPOCH.search(out), out[-2000:]
    assert "[1/2] norm=batchnorm: ok" in out and "[2/2] norm=layernorm: ok" in out
    logs = sorted(sweep.glob("*/train.log"))
    assert len(logs) == 2
    for log in logs:  # the run's own log file: every line, untagged
        text = log.read_text()
        assert len(_EPOCH.findall(text)) == 1 and "] - [norm=" not in text


def test_train_progress_log_shows_every_job_line_tagged(tmp_path: Path) -> None:
    proc = cli(tmp_path, *SWEEP, "train.progress=log", f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if _EPOCH.search(ln)]
    assert len(lines) == 2
    assert "- [norm=batchnorm] epoch 1/1" in lines[0] and "- [norm=layernorm] epoch 1/1" in lines[1]
