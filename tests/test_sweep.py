"""The command line for real, as subprocesses: multirun sweeps through the joblib and submitit
launchers, and config errors refused at start with the problem named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "data.train_subset=120",
    "data.test_subset=60",
    "model.channels=[4,4]",
    "model.strides=[1,2]",
    "train.epochs=1",
    "diagnostics.precise_samples=32",
    "device=cpu",
]


def cli(tmp_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # no GPU visible, whatever the machine: device=cuda must be refused the same way everywhere
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "0",
        "CUDA_VISIBLE_DEVICES": "",
        # the checkout under test, not whatever normzoo the interpreter has installed
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    return subprocess.run(
        [sys.executable, "-m", "normzoo.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def statuses(sweep: Path) -> dict[str, str]:
    return {
        p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")
    }


@pytest.mark.parametrize("launcher", ["local_joblib", "local_submitit"])
def test_multirun_sweep_writes_one_ok_metrics_per_job(tmp_path: Path, launcher: str) -> None:
    sweep = tmp_path / "sweep"
    proc = cli(
        tmp_path,
        "-m",
        f"hydra/launcher={launcher}",
        "norm=native_bn,ln",
        "data.batch_size=4,16",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = statuses(sweep)
    assert len(found) == 4 and set(found.values()) == {"ok"}, found
    # one run dir per job, named by its overrides (a rerun finds the same dirs)
    for norm in ("native_batchnorm", "layernorm"):  # aliases resolved in the run dir names
        for batch in (4, 16):
            assert any(f"data.batch_size={batch}," in d and f"norm={norm}," in d for d in found)
    for path in sweep.glob("*/metrics.json"):
        m = json.loads(path.read_text())
        assert m["norm"] in ("native_batchnorm", "layernorm") and m["batch_size"] in (4, 16)
        assert m["threads"] == 1 and "test_error_precise" in m
    assert "sweep" in proc.stderr + proc.stdout and "4 ok" in proc.stderr + proc.stdout
    if launcher == "local_joblib":  # one progress line per finished job, from the workers
        assert "[4/4] " in proc.stderr + proc.stdout, proc.stderr[-3000:]
    # the sweep ran through normzoo's sweeper plugin (found by Hydra's plugin scan)
    sweeper = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["sweeper"]
    assert sweeper["_target_"] == "hydra_plugins.normzoo_sweeper.NormzooSweeper"


@pytest.mark.parametrize("validate_all", [False, True])
def test_sweeper_composes_only_the_first_job_up_front(validate_all: bool) -> None:
    """Hydra's own check composes every job (0.1 s each); SweepGuard has checked every value."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    # the class Hydra's plugin scan found and will instantiate (its scan loads the module itself)
    found = {f"{c.__module__}.{c.__name__}": c for c in Plugins.instance().discover(Sweeper)}
    NormzooSweeper = found["hydra_plugins.normzoo_sweeper.NormzooSweeper"]
    composed = []

    class Loader:
        def load_sweep_config(self, master_config, sweep_overrides):
            composed.append(sweep_overrides)

    sweeper = NormzooSweeper(max_batch_size=None, params=None, validate_all=validate_all)
    sweeper.config, sweeper.hydra_context = object(), None
    sweeper.config_loader = Loader()
    batch = [["norm=bn", "seed=0"], ["norm=gn", "seed=0"], ["norm=ln", "seed=0"]]
    sweeper.validate_batch_is_legal(batch)
    assert composed == (batch if validate_all else batch[:1])


def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # Hydra's basic launcher (jobs in this process) re-raises a job's exception as joblib does:
    # the same test of the runner's catch-and-record, without starting worker processes
    sweep = tmp_path / "sweep"
    proc = cli(
        tmp_path,
        "-m",
        "norm=in,ln,bn",
        "model=mlp",
        "model.widths=[8]",
        "data.batch_size=8",
        "optim.base_lr=1e9",
        "train.warmup_fraction=0",
        *[t for t in TINY if not t.startswith("model.")],
        f"hydra.sweep.dir={sweep}",
    )
    found = statuses(sweep)
    # InstanceNorm on the dense model cannot apply; the huge lr makes the others diverge
    assert sorted(found.values()) == ["diverged", "diverged", "invalid"], found
    # results of a study, not errors; but a sweep with no ok run is not a success (exit 2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no run ended ok" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["norm=nope"], "Did you mean norm=none?"),  # refused before Hydra starts
        (["data.batch_size=0"], "data.batch_size=0 is out of range"),  # refused by run()
        (["-m", "norm=bn,gn", "data.batch_size=8,0"], "data.batch_size=0 is out of range"),
    ],
)
def test_config_errors_fail_at_start_naming_the_problem(tmp_path, args, needle) -> None:
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    proc = cli(tmp_path, *flags, *TINY, *overrides, f"hydra.sweep.dir={tmp_path / 's'}",
               timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert needle in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))  # nothing ran


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data.batch_size=foo"], "data.batch_size='foo' is not an integer: allowed >= 1"),
        (["data.bach_size=8"], "data.bach_size: no such key. Did you mean data.batch_size?"),
        (["model.widths=[8]"], "model.widths: no such key for model=cnn. Allowed: model.channels"),
        (["device=cuda"], "device=cuda but no CUDA GPU is visible"),
        (["data=mnist", "data.root=nowhere"], "data=mnist: not found under data.root='nowhere'"),
        (["-m", "data=digits,cifar10", "data.root=nowhere"], "data=cifar10: not found"),
        (["-m", "norm=bn,gn", "train.epochs=1,2.5"], "train.epochs=2.5 is not an integer"),
    ],
)
def test_config_errors_in_process_main(tmp_path, monkeypatch, capsys, args, needle) -> None:
    """The same entry point as the console script, in this process (no interpreter start-up)."""
    import torch

    import normzoo.train as train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    monkeypatch.setattr(sys, "argv", ["normzoo-train", *flags, *TINY, *overrides,
                                      f"hydra.sweep.dir={tmp_path / 's'}",
                                      f"hydra.run.dir={tmp_path / 'r'}"])  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train.main()
    code = stop.value.code  # a multirun refused by SweepGuard exits with the message as its code
    assert code == 1 or str(code).startswith("normzoo-train: error:"), code
    assert needle in f"{code} {capsys.readouterr().err}"
    assert not list(tmp_path.rglob("metrics.json"))  # nothing ran


def test_single_run_exit_status_says_invalid(tmp_path: Path) -> None:
    proc = cli(tmp_path, "norm=in", "model=mlp", *[t for t in TINY if not t.startswith("model.")],
               f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert proc.returncode == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "invalid"
    assert (
        "normzoo-train: error: invalid combination, nothing trained: instancenorm needs "
        "spatial dims" in proc.stderr
    )


def test_an_explicit_norm_option_wins_over_a_studys_norm_options(tmp_path, monkeypatch) -> None:
    """`experiment=digits_v1 norm=gn norm.num_groups=4`: the study's norm_options (8 groups) yield to
    the option given on the command line; `norm=gn` alone builds the default cnn (16, 32, 32)."""
    import normzoo.train as train

    monkeypatch.chdir(tmp_path)
    tiny = [t for t in TINY if not t.startswith("model.")]
    for name, extra, groups in [
        ("explicit", ["experiment=digits_v1", "norm=gn", "norm.num_groups=4"], 4),
        ("study", ["experiment=digits_v1", "norm=gn"], 8),
        ("default", ["norm=gn", "data.batch_size=8"], 8),
    ]:
        run_dir = tmp_path / name
        monkeypatch.setattr(sys, "argv", ["normzoo-train", *tiny, *extra,
                                          f"hydra.run.dir={run_dir}"])  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            train.main()
        assert stop.value.code == 0, name
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["status"] == "ok" and m["norm_layer_options"]["num_groups"] == groups, name


def test_sweeper_composes_the_first_job_of_every_model_up_front() -> None:
    from hydra_plugins.normzoo_sweeper import _one_per_model

    batch = [["model=cnn", "seed=0"], ["model=cnn", "seed=1"], ["model=mlp", "seed=0"],
             ["model=mlp", "seed=1"]]  # fmt: skip
    assert _one_per_model(batch) == [batch[0], batch[2]]
    assert _one_per_model([["seed=0"], ["seed=1"]]) == [["seed=0"]]
