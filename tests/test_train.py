"""normzoo.train.run in-process: metrics.json and its statuses, the schedule, determinism."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import normzoo
import normzoo.train as train
from normzoo import sweep
from normzoo.config import CONF_DIR, ConfigError
from normzoo.run import loop, runner
from normzoo.sweep import callbacks

TINY = [
    "data.train_subset=240",
    "data.test_subset=100",
    "train.epochs=2",
    "train.progress=none",
    "diagnostics.enabled=false",
    "device=cpu",
]
KEYS = {
    "schema_version", "status", "error", "error_step", "norm", "norm_kind", "uses_batch_stats",
    "reference", "model", "data", "batch_size", "seed", "base_lr", "lr", "epochs", "optimizer",
    "device", "threads", "config", "train_loss", "train_error", "test_loss", "test_error",
    "curves", "steps", "wall_time_s", "train_time_s", "eval_time_s", "steps_per_s", "versions",
    "git_rev", "hostname", "cpu", "command", "started_at", "finished_at", "git_dirty", "task_overrides", "rerun_command",
}  # fmt: skip
TIMING = {"wall_time_s", "train_time_s", "eval_time_s", "steps_per_s", "started_at",
          "finished_at", "diagnostics_seconds"}  # fmt: skip


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


SMALL_CNN = ["model.channels=[8,8]", "model.strides=[1,2]"]


def run(tmp_path: Path, *overrides: str) -> dict:
    model = [] if any(o.startswith("model=") for o in overrides) else SMALL_CNN
    cfg = compose("config", overrides=[*TINY, *model, *overrides])
    out = train.run(cfg, out_dir=tmp_path)
    assert out["dir"] == str(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == out["status"]
    return metrics


def test_ok_run_writes_the_full_record(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "norm=bn", "data.batch_size=16", "seed=3")
    assert m["status"] == "ok" and m["error"] is None
    assert set(m) >= KEYS
    assert m["norm"] == "batchnorm" and m["norm_kind"] == "activation" and m["uses_batch_stats"]
    assert (
        m["model"] == "cnn" and m["data"] == "digits" and m["batch_size"] == 16 and m["seed"] == 3
    )
    assert m["lr"] == pytest.approx(0.1 * 16 / 32)  # linear scaling rule
    assert m["steps"] == 2 * (240 // 16) and len(m["curves"]) == 2
    assert set(m["curves"][0]) >= {
        "epoch",
        "train_loss",
        "train_error",
        "test_loss",
        "test_error",
        "lr",
    }
    assert m["test_error"] == m["curves"][-1]["test_error"] < 0.9
    assert m["config"]["data.batch_size"] == 16 and m["config"]["norm.name"] == "batchnorm"
    assert (
        m["versions"]["torch"] == torch.__version__
        and m["versions"]["normzoo"] == normzoo.__version__
    )
    assert m["steps_per_s"] > 0 and m["wall_time_s"] >= m["train_time_s"] > 0
    # no temp file left behind; the kept model and the per-sample predictions beside the record
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "model.pt",
        "predictions.npz",
    ]
    # outside Hydra there are no task overrides to rerun with; the config is still all there
    assert m["task_overrides"] is None and m["rerun_command"] is None
    assert m["git_dirty"] is None or all(
        p.startswith(("normzoo/", "conf/")) for p in m["git_dirty"]
    )


def test_same_config_and_seed_give_identical_metrics(hydra_conf, tmp_path: Path) -> None:
    args = ["norm=bn", "data.batch_size=4", "diagnostics.enabled=true",
            "diagnostics.precise_samples=64"]  # fmt: skip
    a = run(tmp_path / "a", *args)
    b = run(tmp_path / "b", *args)
    c = run(tmp_path / "c", *args, "seed=1")
    assert a["status"] == "ok" and "test_error_precise" in a  # the diagnostics are merged in
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
    assert strip(a) == strip(b)
    assert a["curves"] != c["curves"]


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine() -> None:
    lrs = train.lr_schedule(100, 0.4, 10, 0.1)
    assert lrs[:10] == pytest.approx([0.04 * (i + 1) for i in range(10)])
    assert max(lrs) == pytest.approx(0.4) and lrs[-1] == pytest.approx(0.04)
    tail = lrs[10:]
    assert all(x >= y for x, y in itertools.pairwise(tail))
    assert lrs[55] == pytest.approx(
        0.04 + 0.36 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 45 / 89)).item())
    )


def test_invalid_combination_is_recorded_before_training(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "norm=in", "model=mlp")
    assert m["status"] == "invalid" and "spatial" in m["error"]
    assert m["steps"] == 0 and m["curves"] == [] and m["test_error"] is None


def test_groups_not_dividing_a_width_are_invalid_before_training(hydra_conf, tmp_path) -> None:
    m = run(tmp_path, "norm=gn", "norm.num_groups=3")  # the widths are 8
    assert m["status"] == "invalid" and "num_groups=3 must divide num_channels=8" in m["error"]
    assert m["steps"] == 0 and m["curves"] == [] and m["test_error"] is None


def test_batch_larger_than_the_training_set_is_invalid(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "norm=ln", "data.batch_size=512")
    assert m["status"] == "invalid" and "exceeds" in m["error"]


def test_divergence_is_caught_at_its_step(hydra_conf, tmp_path: Path) -> None:
    m = run(
        tmp_path, "norm=none", "optim.base_lr=1e8", "train.warmup_fraction=0", "data.batch_size=8"
    )
    assert m["status"] == "diverged"
    assert isinstance(m["error_step"], int) and 0 < m["error_step"] < 60
    assert "nan" in m["error"] or "inf" in m["error"]
    assert m["steps"] == m["error_step"]  # the diverging step itself did not count as done


def test_an_exception_is_recorded_as_failed(hydra_conf, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom in the training loop")

    monkeypatch.setattr(loop, "evaluate", broken)
    m = run(tmp_path, "norm=ln")
    assert m["status"] == "failed" and m["error"] == "RuntimeError: boom in the training loop"
    assert "boom" in m["traceback"] and "evaluate" in m["traceback"]
    assert m["error_step"] == 240 // 32  # failed after the first epoch's steps


def test_progress_drives_batch_renorm_schedule(hydra_conf, tmp_path: Path, monkeypatch) -> None:
    import normzoo.norms.batch as batch

    seen: dict[int, list[float]] = {}
    real = batch.BatchRenorm.set_progress

    def record(layer: batch.BatchRenorm, p: float) -> None:
        seen.setdefault(id(layer), []).append(p)
        real(layer, p)

    monkeypatch.setattr(batch.BatchRenorm, "set_progress", record)
    m = run(tmp_path, "norm=brn", "data.batch_size=32")
    total = m["steps"]
    assert len(seen) >= 2  # every Batch Renorm layer of the model is told, every step
    for progress in seen.values():
        assert progress == [i / total for i in range(total)]
    assert {"brn_clip_r", "brn_clip_d"} <= set(m["curves"][-1])


def test_config_errors_raise_before_anything_runs(hydra_conf, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        train.run(compose("config", overrides=[*TINY, "data.batch_size=0"]), out_dir=tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda"):
        train.run(compose("config", overrides=[*TINY, "device=cuda"]), out_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_weight_norm_runs_with_its_data_dependent_init(
    hydra_conf, tmp_path: Path, monkeypatch
) -> None:
    import normzoo.norms.weight as weight

    calls = []
    real = weight.data_dependent_init
    monkeypatch.setattr(
        weight, "data_dependent_init", lambda model, x: calls.append(len(x)) or real(model, x)
    )
    m = run(tmp_path, "norm=wn", "data.batch_size=8", "data.train_subset=300")
    assert m["status"] == "ok" and m["norm"] == "weightnorm" and m["norm_kind"] == "weight"
    assert calls == [256]  # norm.data_init_samples, independent of the batch size


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    train.write_json_atomic(path, {"a": 1})
    train.write_json_atomic(path, {"b": float("nan")})
    assert path.read_text().strip().endswith("}") and "NaN" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def sweep_config(*task: str, params: dict | None = None):
    cfg = compose("config", overrides=TINY, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = list(task)
        cfg.hydra.sweeper.params = params or {}
    return cfg


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        (["data.batch_size=8,0"], "data.batch_size=0 is out of range"),
        (["optim.base_lr=0.1,-1"], "optim.base_lr=-1"),
        (["data.batch_size=2,foo"], "data.batch_size='foo'"),
        (["norm=bn,batchnrm"], "Did you mean norm=batchnorm?"),
        (["model=mlp,cnnn"], "model=cnnn: no such option"),
        (["data=digits,mnist", "data.root=/nowhere"], "data.download=true"),
        (["train.epochs=0"], "train.epochs=0 is out of range"),
    ],
)
def test_sweep_guard_refuses_a_bad_value_before_the_first_job(hydra_conf, task, needle) -> None:
    with pytest.raises((ConfigError, FileNotFoundError)) as err:
        train.check_sweep(sweep_config(*task))
    assert needle in str(err.value)
    guard = train.SweepGuard()
    with pytest.raises(SystemExit) as stop:  # Hydra would turn an Exception into a warning
        guard.on_multirun_start(sweep_config(*task))
    assert stop.value.code.startswith("normzoo-train: error:")


def test_sweep_guard_passes_good_sweeps_and_studies(hydra_conf) -> None:
    train.check_sweep(sweep_config("norm=bn,gn,ln", "data.batch_size=2,8", "seed=range(0,3)"))
    train.check_sweep(sweep_config(params={"norm": "in,ln", "data.batch_size": "2,4"}))
    # norm-specific options ride along with a sweep over norms
    train.check_sweep(sweep_config("norm=gn,bn", "+norm_options.groupnorm.num_groups=4"))
    for study in ("digits", "digits_reference", "digits_noniid", "digits_v1", "cifar10_resnet"):
        cfg = compose("config", overrides=[f"experiment={study}"], return_hydra_config=True)
        if study == "cifar10_resnet":  # its data is not here: that is exactly what is refused
            with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
                train.check_sweep(cfg)
        else:
            train.check_sweep(cfg)


def test_unknown_norm_on_the_command_line_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="Did you mean norm=layernorm"):
        sweep.check_argv(["-m", "norm=bn,layernrm", "seed=0"])
    sweep.check_argv(["norm=bn,gn,native_ln", "norm=choice(bn,gn)"])


@pytest.mark.parametrize(
    ("task", "params", "key"),
    [
        (["threads=1,2"], None, "threads"),
        (["diagnostics.enabled=true,false"], None, "diagnostics.enabled"),
        (["data.download=true,false"], None, "data.download"),
        ([], {"device": "cpu,auto"}, "device"),
        (["norm=bn", "resume=true,false"], None, "resume"),
    ],
)
def test_sweep_guard_refuses_a_sweep_over_a_key_left_out_of_dir_names(
    hydra_conf, task, params, key
) -> None:
    """Those jobs would all write into one run dir (the second overwriting the first)."""
    with pytest.raises(ConfigError, match=f"{key} is left out of the run-directory names"):
        train.check_sweep(sweep_config(*task, params=params))


@pytest.mark.parametrize(
    ("task", "params", "needle"),
    [
        (["model=cnn,mlp", "model.channels=[8,8,8]"], None,
         "model.channels: no such key for model=mlp"),
        (["model.channels=[8,8,8]"], {"model": "mlp,cnn"},
         "model.channels: no such key for model=mlp"),
        (["model=mlp,cnn", "model.widths=[8]"], None, "model.widths: no such key for model=cnn"),
        (["model.channels=[8,8,8],[8,8]"], None,
         "model=cnn: model.strides=[1, 2, 2] must give one stride per conv layer"),
        (["model=cnn,mlp", "model.strides=[1]"], None, "model.strides: no such key for model=mlp"),
    ],
)  # fmt: skip
def test_sweep_guard_checks_every_swept_model_against_its_schema(hydra_conf, task, params, needle):
    """A model.* key that one swept model lacks aborted the sweep at that model's first job, after
    the others had trained, with no report."""
    with pytest.raises(ConfigError) as err:
        train.check_sweep(sweep_config(*task, params=params))
    assert needle in str(err.value)


def test_sweep_guard_passes_model_keys_that_fit_every_swept_model(hydra_conf) -> None:
    train.check_sweep(sweep_config("model=cnn,mlp", "norm=bn,ln"))
    train.check_sweep(
        sweep_config("model=cnn", "model.channels=[8,8],[4,4]", "model.strides=[1,2]")
    )
    cfg = compose("config", overrides=[*TINY, "model=mlp"], return_hydra_config=True)
    with open_dict(cfg):  # the shared config of `-m model=mlp model.widths=[8],[16,16]`
        cfg.hydra.overrides.task = ["model=mlp", "model.widths=[8],[16,16]"]
        cfg.hydra.sweeper.params = {}
    train.check_sweep(cfg)


def test_command_line_check_knows_every_model_of_a_sweep() -> None:
    with pytest.raises(ConfigError, match="no such key for model=mlp"):
        sweep.check_argv(["-m", "model=cnn,mlp", "model.channels=[8,8,8]", "norm=bn"])
    sweep.check_argv(["-m", "model=cnn,mlp", "norm=bn"])
    sweep.check_argv(["-m", "model=cnn", "model.channels=[8,8,8]"])


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        (["norm=bn", "norm.momentum=0.1,2"], "momentum must be in [0, 1] or None, got 2"),
        (["norm=bn", "norm.eps=-1"], "eps must be > 0"),
        (
            ["norm=bn,brn", "norm.momentum=0.1,foo"],
            "(in the jobs with norm=batchnorm norm.momentum=foo)",
        ),
        (["norm=bn,gn", "norm.momentum=0.2"], "'groupnorm' has no option 'momentum'"),
        (["norm=bn,gn", "+norm_options.gn.num_groups=-2"], "num_groups must be a positive int"),
        (["norm=gn,ln", "data.batch_size=2,4", "device=cuda"], "device=cuda but no CUDA GPU"),
    ],
)
def test_sweep_guard_refuses_norm_values_and_device_before_the_first_job(
    hydra_conf, monkeypatch, task, needle
):
    """They were recorded per run (`invalid` or `failed`) with the sweep exiting 0 or 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fixed = [t for t in task if "," not in t]  # the shared config holds the non-swept overrides
    cfg = compose("config", overrides=[*TINY, *fixed], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = list(task)
        cfg.hydra.sweeper.params = {}
    with pytest.raises(ConfigError) as err:
        train.check_sweep(cfg)
    assert needle in str(err.value)


def test_a_norm_value_the_layer_refuses_is_a_config_error(hydra_conf, tmp_path: Path) -> None:
    for bad, needle in (
        ("norm.momentum=foo", "is not allowed for norm=batchnorm"),  # its type
        ("norm.momentum=2", "norm=batchnorm cannot be built"),
    ):  # its range
        with pytest.raises(ConfigError, match=needle):
            train.run(compose("config", overrides=[*TINY, "norm=bn", bad]), out_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("norm", ["bn", "brn", "native_bn"])
def test_batch_statistics_at_batch_size_one_on_the_mlp_are_invalid_before_training(
    hydra_conf, tmp_path: Path, norm: str
) -> None:
    """It was recorded `failed` with a traceback ("Expected more than 1 value per channel")."""
    m = run(tmp_path, f"norm={norm}", "model=mlp", "model.widths=[8]", "data.batch_size=1")
    assert m["status"] == "invalid" and m["steps"] == 0 and "traceback" not in m
    assert "at data.batch_size=1 its layer fc1_norm sees a single value per channel" in m["error"]


def test_count_jobs_is_the_product_of_the_sweeps(hydra_conf) -> None:
    study = compose("config", overrides=["experiment=digits_v1"], return_hydra_config=True)
    assert train.count_jobs(study) == 7 * 7 * 2 * 3  # the 294-job default study
    assert train.count_jobs(sweep_config("norm=bn,gn", "seed=range(0,3)", "data.batch_size=8")) == 6
    assert train.count_jobs(sweep_config(params={"norm": "bn,gn"})) == 2


def test_sweep_guard_logs_one_progress_line_per_finished_job(hydra_conf, tmp_path, caplog):
    """The 294-job study printed only per-epoch lines: no way to tell how far it was."""
    from hydra.core.utils import JobReturn, JobStatus

    cfg = sweep_config("norm=bn,ln", "data.batch_size=8,16")
    with open_dict(cfg):
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    guard = train.SweepGuard()
    guard.on_multirun_start(cfg)
    assert (tmp_path / "sweep" / train.PROGRESS_FILE).read_text() == "4\n"
    results = [{"status": "ok"}, {"status": "invalid", "skipped": True}, RuntimeError("x"), None]
    caplog.set_level("INFO", logger="normzoo.sweep")  # the launching process's [k/N] lines
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks, "is_multirun", lambda: True)
        for i, value in enumerate(results):  # train.epochs: not swept, left out of the line
            job = JobReturn(overrides=["norm=bn", f"data.batch_size={i}", "train.epochs=1"])
            job.status = JobStatus.FAILED if isinstance(value, Exception) else JobStatus.COMPLETED
            job.return_value = value
            guard.on_job_start(cfg)
            guard.on_job_end(cfg, job_return=job)  # in a worker: appends to the progress file
    guard.on_multirun_end(cfg)  # the launching process's printer prints what is left
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    first = "[1/4] norm=bn data.batch_size=0: ok ("
    assert lines[0].startswith(first) and lines[0].endswith("s) ETA 0m00s")
    assert lines[1].startswith("[2/4] norm=bn data.batch_size=1: invalid, kept from before (")
    assert lines[2].startswith("[3/4] norm=bn data.batch_size=2: error (RuntimeError) (")
    assert lines[3].startswith("[4/4] norm=bn data.batch_size=3: config error (")


def test_the_command_line_replaces_a_studys_swept_values(hydra_conf) -> None:
    """`-m experiment=digits_v1 model=mlp model.widths=[8]`: model=mlp replaces the study's
    `model: mlp,cnn` (as Hydra's sweeper does), so cnn's schema does not apply."""
    study = ["experiment=digits_v1", "model=mlp", "model.widths=[8]", "seed=0,1", "norm=bn,ln"]
    cfg = compose("config", overrides=[*TINY, "experiment=digits_v1", "model=mlp", "model.widths=[8]"],
                  return_hydra_config=True)  # fmt: skip
    with open_dict(cfg):
        cfg.hydra.overrides.task = study
    train.check_sweep(cfg)
    assert train.count_jobs(cfg) == 7 * 2 * 2  # the study's 7 batch sizes, 2 seeds, 2 norms


def _untracked_bn_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        normzoo.build_norm("batchnorm", 16, track_running_stats=False),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )


def test_evaluate_with_batch_statistics_in_eval_mode_uses_the_training_batch_size() -> None:
    """It went through eval_batch_size (1000) at once: the whole test set normalised with its own
    statistics, at a batch size the model never trained with."""
    model = _untracked_bn_mlp()
    assert loop.batch_stats_in_eval(model)
    x, y = torch.randn(10, 6) * 2 + 1, torch.arange(10) % 3
    loss, err = loop.evaluate(model, x, y, 1000, 4)
    # by hand: batches of 4 in order, the last (2 samples) filled up with the first 2
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[0:4]), model(x[4:8]), model(torch.cat([x[8:10], x[0:2]]))[:2]])
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert err == int((logits.argmax(1) != y).sum()) / 10
    with torch.no_grad():
        whole = float(torch.nn.functional.cross_entropy(model(x), y))
    assert loss != pytest.approx(whole, rel=1e-6)  # not the one-batch number
    assert model.training is False  # evaluate leaves the mode as it found it (eval here)
    with pytest.raises(ValueError, match="train_batch_size"):
        train.evaluate(model, x, y, 1000)
    # with running statistics eval mode does not depend on the batch: eval_batch_size it is
    tracked = torch.nn.Sequential(
        torch.nn.Linear(6, 16), normzoo.build_norm("batchnorm", 16), torch.nn.Linear(16, 3)
    )
    assert not loop.batch_stats_in_eval(tracked)
    tracked.eval()
    assert train.evaluate(tracked, x, y, 1000, 4)[1] == loop.evaluate(tracked, x, y, 1000)[1]
    assert loop.batch_stats_in_eval(torch.nn.BatchNorm1d(4, track_running_stats=False))
    assert not loop.batch_stats_in_eval(torch.nn.InstanceNorm2d(4))  # per-sample statistics


def test_test_error_is_the_last_epochs_whether_or_not_diagnostics_run(hydra_conf, tmp_path) -> None:
    """The diagnostics overwrote test_error/test_loss with their own eval-mode numbers (B=4, bn
    without running statistics: 0.047 with diagnostics on, 0.053 = curves[-1] with them off)."""
    common = ["norm=bn", "norm.track_running_stats=false", "data.batch_size=4", "train.epochs=1"]
    on = run(tmp_path / "on", *common, "diagnostics.enabled=true", "diagnostics.precise_samples=64")
    off = run(tmp_path / "off", *common)
    assert on["status"] == off["status"] == "ok"
    for key in ("test_error", "test_loss"):
        assert on[key] == on["curves"][-1][key] == off[key] == off["curves"][-1][key], key
    assert {"test_error_ema", "test_loss_ema", "test_error_batch_stats"} <= set(on)
    assert "test_error_ema" not in off


def test_train_time_is_the_training_steps_only(hydra_conf, tmp_path, monkeypatch) -> None:
    """train_time_s (and steps_per_s) took in the per-epoch test evaluation and checkpoint writes:
    the clock started before the first epoch was never paused."""
    real_evaluate, real_save = loop.evaluate, loop.save_checkpoint
    pause = 0.4

    def slow_evaluate(*a, **kw):
        time.sleep(pause)
        return real_evaluate(*a, **kw)

    def slow_save(*a, **kw):
        time.sleep(pause)
        return real_save(*a, **kw)

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    m = run(tmp_path, "norm=ln", "data.batch_size=16", "train.checkpoint=true")
    assert m["status"] == "ok"
    assert 0 < m["train_time_s"] < pause  # 2 x 15 small steps; 4 pauses were outside them
    assert m["eval_time_s"] >= 2 * pause
    assert m["train_time_s"] + m["eval_time_s"] + 2 * pause <= m["wall_time_s"]
    assert m["steps_per_s"] == pytest.approx(m["steps"] / m["train_time_s"])


def test_predictions_npz_keeps_the_classes_the_last_epoch_counted(
    hydra_conf, tmp_path: Path, monkeypatch
) -> None:
    """``predictions.npz`` holds the last epoch's eval-mode classes (not predicted again): its
    test and validation errors are the record's, exactly."""

    def no_second_pass(*args, **kwargs):
        raise AssertionError("predict() ran again after the last epoch's evaluation")

    monkeypatch.setattr(runner, "predict", no_second_pass)
    m = run(tmp_path, "norm=bn", "data.val_fraction=0.2")
    assert m["status"] == "ok"
    saved = np.load(tmp_path / "predictions.npz")
    assert (saved["test_pred"] != saved["test_y"]).mean() == m["test_error"]
    assert (saved["val_pred"] != saved["val_y"]).mean() == m["val_error"]
