"""Stacked training inside a Hydra sweep (``hydra/launcher=stacked``), through the real CLI, and
the stack's parity with single runs for what the default study sweeps (ghost batches, Batch
Renorm's clip curve, the kept files).

Tolerance (float32, CPU, these tiny runs of 2 epochs): a stacked member's final test and
validation errors equal its single run's, its losses agree within 1e-5 relative, and its
``predictions.npz`` arrays are equal. A rerun of a stack is bitwise identical (records without
their timings, ``predictions.npz``, ``model.pt`` weights): ``tests/test_stack.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from normzoo.config import CONF_DIR
from normzoo.run import runner
from normzoo.run.predictions import load_predictions
from normzoo.run.stack import train_stacked
from normzoo.run.stack_plan import bucket_key, plan_stacks

ROOT = Path(__file__).resolve().parent.parent
LOSS_TOLERANCE = 1e-5
TIMING = {"wall_time_s", "train_time_s", "eval_time_s", "steps_per_s", "started_at",
          "finished_at", "stack", "command", "diagnostics_seconds"}  # fmt: skip
TINY = [
    "data.train_subset=160",
    "data.test_subset=60",
    "data.val_fraction=0.2",
    "data.batch_size=8",
    "train.epochs=2",
    "model=mlp",
    "model.widths=[16,16]",
    "diagnostics.precise_samples=32",
    "device=cpu",
]
#: one stack of all 4 jobs (BatchNorm and LayerNorm segments), in this process (n_jobs=1)
SWEEP = ["norm=bn,ln", "seed=0,1", "hydra.launcher.n_jobs=1", "hydra.launcher.stacks_per_worker=1"]
#: what every run dir of a sweep holds, stacked or not
RUN_FILES = {"metrics.json", "model.pt", "predictions.npz", "train.log",
             ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}  # fmt: skip


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "normzoo.train", "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def stripped(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in TIMING}


def assert_same_result(stacked: dict, single: dict, name: str) -> None:
    for key in ("test_error", "val_error", "steps", "lr", "rerun_command"):
        assert stacked[key] == single[key], (name, key)
    for key in ("train_loss", "test_loss", "val_loss"):
        assert abs(stacked[key] - single[key]) <= LOSS_TOLERANCE * abs(single[key]), (name, key)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    """One stacked and one unstacked sweep of the same 4 jobs."""
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for name, launcher in (("stacked", ["hydra/launcher=stacked", *SWEEP]), ("single", SWEEP[:2])):
        proc = cli(root, *launcher, *TINY,
                   f"hydra.sweep.dir={root / name}")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = proc.stdout + proc.stderr
        assert "[4/4]" in said and "4 ok" in said, said[-2000:]
        out[name] = root / name
    return out


def test_stacked_sweep_writes_what_a_sweep_writes(sweeps) -> None:
    stacked_dirs = sorted(p.parent for p in sweeps["stacked"].glob("*/metrics.json"))
    assert len(stacked_dirs) == 4
    for run_dir in stacked_dirs:
        single_dir = sweeps["single"] / run_dir.name
        assert files(run_dir) == files(single_dir) == RUN_FILES, run_dir.name
        stacked, single = record(run_dir), record(single_dir)
        assert stacked["trained"] == "stacked" and stacked["stack"]["members"] == 4
        assert "trained" not in single
        assert set(stacked) - {"trained", "stack"} == set(single), run_dir.name
        assert_same_result(stacked, single, run_dir.name)
        mine, theirs = load_predictions(run_dir), load_predictions(single_dir)
        assert mine.keys() == theirs.keys() and all(
            np.array_equal(mine[k], theirs[k]) for k in mine
        ), run_dir.name
        said = (run_dir / "train.log").read_text()
        assert "stack of 4 runs done" in said
        # composed once per norm (hydra_plugins/normzoo_stacked_launcher/compose_once.py)
        assert "stack of 4 runs: 2 compositions, 4 configs derived, 0 composed in full" in said


def test_resume_of_a_stacked_sweep_redoes_only_unfinished_members(sweeps, tmp_path) -> None:
    sweep = sweeps["stacked"]
    dirs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    before = {d: (d / "metrics.json").read_bytes() for d in dirs}
    (dirs[0] / "metrics.json").unlink()  # a member killed before its record
    proc = cli(tmp_path, "hydra/launcher=stacked", *SWEEP, *TINY, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "kept from before" in said and "+3 finished before this sweep" in said, said[-2000:]
    assert all((d / "metrics.json").read_bytes() == before[d] for d in dirs[1:])
    redone, old = record(dirs[0]), json.loads(before[dirs[0]])
    assert redone["stack"]["members"] == 1 and old["stack"]["members"] == 4
    assert_same_result(redone, old, dirs[0].name)


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def test_ghost_batches_and_renorm_clip_curve_equal_single_runs(tmp_path, hydra_conf) -> None:
    """Members that differ in ``norm.ghost_batch_size`` are separate segments with their own
    option (the default study sweeps it); Batch Renorm's per-member clip curve is its own."""
    jobs = [("batchnorm", 2), ("batchnorm", 4), ("batchnorm", None), ("batchrenorm", 2),
            ("batchrenorm", None)]  # fmt: skip
    cfgs, dirs, overrides = [], [], []
    for seed, (norm, ghost) in enumerate(jobs):
        ov = [*(o for o in TINY if not o.startswith("model")), "model=cnn", "model.channels=[8,8]", "model.strides=[1,2]",
              "diagnostics.enabled=false", f"norm={norm}", f"seed={seed}",
              *([f"norm.ghost_batch_size={ghost}"] if ghost else [])]  # fmt: skip
        cfgs.append(compose("config", overrides=ov))
        dirs.append(tmp_path / f"{norm}_{ghost}")
        overrides.append(ov)
    results = train_stacked(cfgs, dirs, task_overrides=overrides)
    assert [r["status"] for r in results] == ["ok"] * len(jobs)
    for cfg, d, ov in zip(cfgs, dirs, overrides, strict=True):
        runner.run(cfg, tmp_path / "single" / d.name, task_overrides=ov)
        stacked, single = record(d), record(tmp_path / "single" / d.name)
        assert stacked["norm_layer_options"] == single["norm_layer_options"], d.name
        assert_same_result(stacked, single, d.name)
        for a, b in zip(stacked["curves"], single["curves"], strict=True):
            assert {k for k in a if k.startswith("brn_")} == {k for k in b if k.startswith("brn_")}
            for key in ("brn_clip_r", "brn_clip_d"):
                if key in b:
                    assert a[key] == b[key], (d.name, a["epoch"], key)
    assert "brn_clip_r" in record(dirs[3])["curves"][-1]


def test_plan_buckets_by_non_member_overrides_and_fills_the_workers() -> None:
    jobs = [[f"model={m}", f"norm={n}", f"seed={s}", f"norm.ghost_batch_size={g}"]
            for m in ("cnn", "mlp") for n in ("bn", "brn") for g in (2, 4) for s in (0, 1, 2)]  # fmt: skip
    assert bucket_key(jobs[0]) == ("model=cnn",) == bucket_key(jobs[11])
    stacks = plan_stacks(jobs, workers=2, max_members=32, stacks_per_worker=1)
    assert sorted(map(len, stacks)) == [12, 12]
    assert all(len({bucket_key(jobs[i]) for i in s}) == 1 for s in stacks)
    stacks = plan_stacks(jobs, workers=2, max_members=5, stacks_per_worker=2)
    assert max(map(len, stacks)) <= 5 and sorted(i for s in stacks for i in s) == list(range(24))
    assert len(plan_stacks(jobs[:3], workers=8)) == 3  # never below one job a stack


def test_a_diverged_member_is_recorded_as_its_single_run_and_the_others_go_on(
    tmp_path, hydra_conf
) -> None:
    base = [*TINY, "diagnostics.enabled=false", "train.grad_clip=0"]
    jobs = [["norm=bn", "seed=0"], ["norm=none", "seed=1", "optim.base_lr=1e6"]]
    cfgs = [compose("config", overrides=[*base, *j]) for j in jobs]
    dirs = [tmp_path / "ok", tmp_path / "diverged"]
    overrides = [[*base, *j] for j in jobs]
    train_stacked(cfgs, dirs, task_overrides=overrides)
    for cfg, d, ov in zip(cfgs, dirs, overrides, strict=True):
        runner.run(cfg, tmp_path / "single" / d.name, task_overrides=ov)
    ok, diverged = record(dirs[0]), record(dirs[1])
    single_ok, single_diverged = (record(tmp_path / "single" / d.name) for d in dirs)
    assert diverged["status"] == single_diverged["status"] == "diverged"
    for key in ("error_step", "steps", "error"):
        assert diverged[key] == single_diverged[key], key
    assert diverged["curves"] == single_diverged["curves"] == []  # it diverged in epoch 1
    assert (
        not (dirs[1] / "model.pt").exists() and not (tmp_path / "single/diverged/model.pt").exists()
    )
    assert ok["status"] == "ok"
    assert_same_result(ok, single_ok, "ok")
