"""Resume and checkpoints (issue 6): a rerun into the same dir keeps finished results untouched and
redoes failed or killed runs; a run continued from its checkpoint ends bitwise where an
uninterrupted one does; a study sweep killed with SIGKILL and started again finds every run once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import normzoo.train as train
from normzoo.config import CONF_DIR
from normzoo.results import load_sweep
from normzoo.run import loop, runner
from normzoo.run.checkpoint import use_checkpoint

TINY = [
    "data.train_subset=240",
    "data.test_subset=100",
    "train.epochs=2",
    "train.progress=none",
    "diagnostics.enabled=false",
    "device=cpu",
]
SMALL_CNN = ["model.channels=[8,8]", "model.strides=[1,2]"]
TIMING = {"wall_time_s", "train_time_s", "eval_time_s", "steps_per_s", "started_at",
          "finished_at", "diagnostics_seconds"}  # fmt: skip


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def config(*overrides: str):
    model = [] if any(o.startswith("model=") for o in overrides) else SMALL_CNN
    return compose("config", overrides=[*TINY, *model, *overrides])


def run(out: Path, *overrides: str) -> tuple[dict, dict]:
    """(what run() returned, the metrics.json it left)."""
    result = train.run(config(*overrides), out_dir=out)
    return result, json.loads((out / "metrics.json").read_text())


def strip(m: dict, *also: str) -> dict:
    out = {k: v for k, v in m.items() if k not in TIMING | set(also)}
    out["config"] = {k: v for k, v in m["config"].items() if k not in also}
    return out


def snapshot(path: Path) -> tuple[int, bytes]:
    return path.stat().st_mtime_ns, path.read_bytes()


def no_loading(monkeypatch) -> None:
    """Make loading data fail loudly: a skipped run must not get that far."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_data called for a run that should have been skipped")

    monkeypatch.setattr(runner, "load_data", refuse)


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["norm=ln", "data.batch_size=32"], "ok"),
        (["norm=in", "model=mlp", "model.widths=[8]"], "invalid"),
        (["norm=none", "optim.base_lr=1e8", "train.warmup_fraction=0", "data.batch_size=8"],
         "diverged"),
    ],
)  # fmt: skip
def test_rerun_keeps_a_finished_result_untouched(hydra_conf, tmp_path, monkeypatch, args, status):
    first, _ = run(tmp_path, *args)
    assert first["status"] == status and "skipped" not in first
    before = snapshot(tmp_path / "metrics.json")
    time.sleep(0.01)
    with monkeypatch.context() as patch:
        no_loading(patch)  # the skip is decided before any data or model exists
        again, _ = run(tmp_path, *args, "train.progress=log")  # a result-neutral key may differ
    assert again == {**first, "skipped": True}
    assert snapshot(tmp_path / "metrics.json") == before
    # resume=false runs it again: same result, a new file
    forced, m = run(tmp_path, *args, "resume=false")
    assert forced["status"] == status and "skipped" not in forced
    assert snapshot(tmp_path / "metrics.json") != before
    assert strip(m, "resume") == strip(json.loads(before[1]), "resume")


def test_rerun_redoes_failed_runs_and_runs_of_another_config(hydra_conf, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", broken)
        failed, _ = run(tmp_path, "norm=ln")
    assert failed["status"] == "failed"
    redone, m = run(tmp_path, "norm=ln")
    assert redone["status"] == "ok" and "skipped" not in redone and m["epochs"] == 2
    changed, m = run(tmp_path, "norm=ln", "train.epochs=1")  # same dir, another config
    assert "skipped" not in changed and m["status"] == "ok" and len(m["curves"]) == 1


def test_what_a_killed_run_leaves_reads_as_unfinished(hydra_conf, tmp_path, monkeypatch) -> None:
    # a sweep dir with one run dir as SIGKILL leaves it: the config Hydra wrote, a complete-looking
    # temp file of the atomic metrics write, a half-written checkpoint temp file
    run_dir = tmp_path / "sweep" / "norm=ln"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- norm=ln\n")
    _, good = run(tmp_path / "elsewhere", "norm=ln")
    (run_dir / ".metrics.json.k1ll3d.tmp").write_text(json.dumps(good))
    (run_dir / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 torn")
    df = load_sweep(tmp_path / "sweep")
    assert df["status"].tolist() == ["missing"] and ".metrics.json.k1ll3d.tmp" in df["error"][0]
    result, m = run(run_dir, "norm=ln")  # resume does not take the temp file for a result
    assert "skipped" not in result and result["status"] == "ok"
    assert strip(m) == strip(good)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        "metrics.json",
        "model.pt",
        "predictions.npz",
    ]


def test_checkpoint_resume_matches_an_uninterrupted_run_bitwise(
    hydra_conf, tmp_path, monkeypatch
) -> None:
    args = ["norm=brn", "data.batch_size=16", "seed=4", "diagnostics.enabled=true",
            "diagnostics.precise_samples=64"]  # fmt: skip
    _, plain = run(tmp_path / "plain", *args, "train.checkpoint=false")
    _, whole = run(tmp_path / "whole", *args, "train.checkpoint=true")
    assert plain["status"] == "ok" and not (tmp_path / "whole" / "checkpoint.pt").exists()
    assert strip(whole, "train.checkpoint") == strip(plain, "train.checkpoint")

    calls: list[int] = []
    real = loop.evaluate

    def interrupted(*a, **kw):  # the second epoch's evaluation never returns
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after epoch 1") from None
        return real(*a, **kw)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):  # not caught by run(): as a kill, no metrics.json
            train.run(config(*args, "train.checkpoint=true"), out)
    assert not (out / "metrics.json").exists() and (out / "checkpoint.pt").is_file()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 240 // 16

    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        result, resumed = run(out, *args, "train.checkpoint=true")
    assert result["status"] == "ok" and calls == [1]  # only epoch 2 was trained and evaluated
    assert strip(resumed, "train.checkpoint") == strip(plain, "train.checkpoint")
    assert resumed["steps"] == 2 * (240 // 16)
    assert not (out / "checkpoint.pt").exists()  # deleted once the run is ok


def test_a_checkpoint_of_another_config_is_ignored(hydra_conf, tmp_path, monkeypatch) -> None:
    args = ["norm=gn", "norm.num_groups=2", "data.batch_size=16", "train.checkpoint=true"]
    with monkeypatch.context() as patch:  # leave a checkpoint behind: fail in epoch 2's evaluation
        real, calls = loop.evaluate, []
        patch.setattr(
            loop,
            "evaluate",
            lambda *a, **k: real(*a, **k) if calls.append(1) or len(calls) < 2 else 1 / 0,
        )
        first, _ = run(tmp_path, *args)  # fmt: skip
    assert first["status"] == "failed" and (tmp_path / "checkpoint.pt").is_file()
    _, other = run(tmp_path, *args, "seed=1")  # same dir, another seed: starts from scratch
    _, fresh = run(tmp_path / "fresh", *args, "seed=1")
    assert strip(other) == strip(fresh)


@pytest.mark.parametrize(
    ("args", "steps", "expected"),
    [
        (["train.checkpoint=auto"], 4000, False),  # digits: short runs, no checkpoints
        (["train.checkpoint=auto"], train.AUTO_CHECKPOINT_STEPS + 1, True),
        (["train.checkpoint=auto", "data=cifar10"], 100, True),  # any other data set
        (["train.checkpoint=true"], 1, True),
        (["train.checkpoint=false", "data=cifar10"], 10**6, False),
    ],
)
def test_checkpoint_auto_is_on_for_long_runs_only(hydra_conf, args, steps, expected) -> None:
    assert use_checkpoint(compose("config", overrides=args), steps) is expected


# ----------------------------------------------------------------------------- the study, killed

STUDY = [
    "-m",
    "experiment=digits_v1",
    # shrink the study to 2 x 2 x 2 tiny runs; the command line replaces the study's swept values
    "data.batch_size=4,8",
    "model=mlp",
    "model.widths=[8]",
    "norm=bn,ln",
    "seed=0,1",
    "data.train_subset=200",
    "data.test_subset=100",
    "train.epochs=2",
    "train.checkpoint=true",
    "diagnostics.precise_samples=32",
    "report.out=null",
    "hydra.launcher.n_jobs=1",  # sequential: no worker start-up on a shared 2-core CI box
]


def cli(cwd: Path, *args: str, **kw) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parent.parent)  # the checkout under test
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-m", "normzoo.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_a_killed_study_sweep_resumes_and_counts_every_run_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*STUDY, f"hydra.sweep.dir={sweep}"]
    proc = cli(tmp_path, *args, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(sweep.glob("*/metrics.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no run finished in 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its loky workers, mid-way
    proc.wait(timeout=30)
    proc.stdout.close()
    done = {p.parent.name: snapshot(p) for p in sweep.glob("*/metrics.json")}
    assert 2 <= len(done) < 8, f"the kill came too late: {len(done)} of 8 runs finished"
    before = load_sweep(sweep)
    assert len(before) == 8 and before["overrides"].is_unique
    assert set(before["status"]) <= {"ok", "missing", "not_started"}
    assert (before["status"] == "ok").sum() == len(done)

    again = cli(tmp_path, *args)
    log_text, _ = again.communicate(timeout=240)
    assert again.returncode == 0, log_text[-3000:]
    df = load_sweep(sweep)
    assert len(df) == 8 and df["overrides"].is_unique and not df["superseded"].any()
    assert set(df["status"]) == {"ok"}, df[["overrides", "status", "error"]]
    assert sorted(zip(df["norm"], df["batch_size"], df["seed"], strict=True)) == sorted(
        (n, b, s) for n in ("batchnorm", "layernorm") for b in (4, 8) for s in (0, 1)
    )
    for name, snap in done.items():  # finished before the kill: not rerun, not rewritten
        assert snapshot(sweep / name / "metrics.json") == snap, name
    assert f"(+{len(done)} finished before this sweep, not rerun)" in log_text
    leftovers = [p.name for p in sweep.glob("*/*") if p.name != "metrics.json" and p.is_file()]
    assert not [n for n in leftovers if "checkpoint" in n or n.endswith(".tmp")], leftovers

    # provenance: a row's rerun_command, run as a single run, gives the same record
    row = json.loads(next(iter(sweep.glob("*/metrics.json"))).read_text())
    assert "experiment=digits_v1" in row["task_overrides"] and "norm=" in row["rerun_command"]
    command = shlex.split(row["rerun_command"])
    assert command[0] == "normzoo-train"
    single = cli(tmp_path, *command[1:], f"hydra.run.dir={tmp_path / 'rerun'}")
    single_log, _ = single.communicate(timeout=120)
    assert single.returncode == 0, single_log[-3000:]
    rerun = json.loads((tmp_path / "rerun" / "metrics.json").read_text())
    provenance = ("command", "git_rev", "git_dirty")  # argv differs; others may commit meanwhile
    assert strip(rerun, *provenance) == strip(row, *provenance)


# ----------------------------------------------------------------------------- result-neutral keys


@pytest.mark.parametrize(
    "neutral",
    [["threads=2"], ["data.download=true"], ["data.root=elsewhere"], ["device=auto"],
     ["train.keep_model=false"], ["train.keep_predictions=false", "train.keep_model=false"]],
)  # fmt: skip
def test_keys_left_out_of_dir_names_that_cannot_change_a_result_keep_it(
    hydra_conf, tmp_path, monkeypatch, neutral
):
    """The run-dir names leave out threads, data.root, data.download, device and which files a
    run keeps: a rerun with another value finds the same dir, and must keep its result (device
    compared as resolved; a flipped ``train.keep_*`` writes no file it did not write before)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    first, _ = run(tmp_path, "norm=ln")
    before = snapshot(tmp_path / "metrics.json")
    with monkeypatch.context() as patch:
        no_loading(patch)
        again, _ = run(tmp_path, "norm=ln", *neutral)
    assert again == {**first, "skipped": True}
    assert snapshot(tmp_path / "metrics.json") == before


def test_keys_that_change_what_a_run_records_are_not_result_neutral(hydra_conf, tmp_path):
    run(tmp_path, "norm=ln")  # diagnostics.enabled=false, device=cpu
    assert runner.kept_result(tmp_path, config("norm=ln")) is not None
    assert runner.kept_result(tmp_path, config("norm=ln", "diagnostics.enabled=true")) is None
    assert runner.kept_result(tmp_path, config("norm=ln", "device=cuda")) is None


def _kill_after_the_first_epoch(monkeypatch, cfg, run_dir) -> None:
    """Run ``cfg`` into ``run_dir`` and interrupt it (KeyboardInterrupt) right after epoch 1's
    checkpoint, at the second evaluation."""
    real, calls = loop.evaluate, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after epoch 1") from None
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg, run_dir)


def test_a_checkpoint_continues_under_result_neutral_changes(hydra_conf, tmp_path, monkeypatch):
    """A killed checkpointed run started again with data.download=true (as the cifar10_resnet
    study's header suggests) or threads=2 continues from its checkpoint."""
    args = ["norm=ln", "data.batch_size=16", "train.checkpoint=true"]
    _kill_after_the_first_epoch(monkeypatch, config(*args), tmp_path)
    assert (tmp_path / "checkpoint.pt").is_file()
    real, calls = loop.evaluate, []
    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        result = train.run(config(*args, "data.download=true", "threads=2"), tmp_path)
    assert result["status"] == "ok" and calls == [1]  # only epoch 2 was trained


def test_resume_compares_the_layer_options_a_run_used(hydra_conf, tmp_path):
    """A result recorded before conf/norm/groupnorm.yaml's num_groups changed (32 -> 8), with a
    study's norm_options giving the groups either way, is the same result; another norm's
    norm_options do not matter; other groups do."""
    study = "+norm_options.groupnorm.num_groups=2"
    _, m = run(tmp_path, "norm=gn", study)
    assert m["status"] == "ok" and m["norm_layer_options"]["num_groups"] == 2
    m["config"]["norm.num_groups"] = 32  # as recorded with the old default
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    assert runner.kept_result(tmp_path, config("norm=gn", study)) is not None
    assert runner.kept_result(tmp_path, config("norm=gn", "+norm_options.gn.num_groups=2"))
    other = config("norm=gn", study, "+norm_options.bn.momentum=0.3")
    assert runner.kept_result(tmp_path, other) is not None
    assert runner.kept_result(tmp_path, config("norm=gn", "norm.num_groups=2")) is not None
    assert runner.kept_result(tmp_path, config("norm=gn", "+norm_options.gn.num_groups=4")) is None
    assert runner.kept_result(tmp_path, config("norm=gn")) is None  # 8 groups


def test_a_resumed_run_continues_the_timings(hydra_conf, tmp_path, monkeypatch) -> None:
    """train_time_s/eval_time_s of a resumed run: the checkpoint's plus the epochs run after it."""
    args = ["norm=ln", "data.batch_size=16", "train.checkpoint=true"]
    _kill_after_the_first_epoch(monkeypatch, config(*args), tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["train_time_s"] > 0 and saved["eval_time_s"] > 0
    saved["train_time_s"], saved["eval_time_s"] = 100.0, 50.0  # what a long epoch 1 took
    torch.save(saved, tmp_path / "checkpoint.pt")
    _, resumed = run(tmp_path, *args)
    assert resumed["status"] == "ok" and resumed["steps"] == 2 * (240 // 16)
    assert 100.0 < resumed["train_time_s"] < 110.0
    assert 50.0 < resumed["eval_time_s"] < 60.0
    assert resumed["steps_per_s"] == pytest.approx(resumed["steps"] / resumed["train_time_s"])
