"""load_sweep on synthetic Hydra sweep dirs: ok, failed, missing, corrupt and never-started runs."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from normzoo.analysis.provenance import provenance_lines
from normzoo.results import (
    aggregate_seeds,
    expected_jobs,
    find_run_dirs,
    load_layers,
    load_sweep,
    ok_runs,
    write_csv,
)

NORMS = ("batchnorm", "layernorm")
BATCHES = (2, 4)
SEEDS = (0, 1)


BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _multirun_yaml(root: Path, task: list[str], target: str = BASIC) -> None:
    conf = {
        "norm": "batchnorm",
        "batch_size": 32,
        "hydra": {
            "sweep": {"dir": str(root), "subdir": "${hydra.job.override_dirname}"},
            "sweeper": {
                "_target_": target,
                "max_batch_size": None,
                "params": {"norm": "bn,layernorm", "data.batch_size": "2,4"},
            },
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump(conf))


def _run_dir(root: Path, overrides: list[str], metrics: dict | str | None) -> Path:
    """A Hydra job dir: .hydra/overrides.yaml and, unless None, metrics.json (dict or raw text)."""
    d = root / ",".join(overrides)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if isinstance(metrics, dict):
        (d / "metrics.json").write_text(json.dumps(metrics))
    elif isinstance(metrics, str):
        (d / "metrics.json").write_text(metrics)
    return d


def _metrics(norm: str, batch: int, seed: int, status: str = "ok") -> dict:
    """A metrics.json as normzoo.train writes it: run keys and diagnostics at the top level."""
    err = 0.05 + (0.3 / batch if norm == "batchnorm" else 0.0) + 0.01 * seed
    return {
        "status": status,
        "error": None if status == "ok" else "RuntimeError: boom",
        "norm": norm,
        "batch_size": batch,
        "seed": seed,
        "lr": 0.1,
        "config": {"norm.name": norm, "data.batch_size": batch, "seed": seed, "model.name": "mlp"},
        "test_error": err,
        "test_loss": 2 * err,
        "curves": [{"epoch": 1, "train_loss": 1.0}],  # lists stay out of the frame
        "command": ["normzoo-train", "-m"],
        "test_error_batch_stats": err + 0.01,
        "batch_dependence": 0.1 if norm == "batchnorm" else 0.0,
        "layers": [{"name": "1", "mean_gap": 0.2}, {"name": "4", "mean_gap": 0.3}],
        "versions": {"torch": "2.x"},
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "study"
    _multirun_yaml(root, ["seed=0,1", "epochs=1"])
    jobs = list(itertools.product(NORMS, BATCHES, SEEDS))
    for i, (norm, batch, seed) in enumerate(jobs):
        ov = [f"norm={norm}", f"data.batch_size={batch}", f"seed={seed}", "epochs=1"]
        ov[0] = "norm=bn" if norm == "batchnorm" else ov[0]  # an alias, as typed on a command line
        if i == 1:
            _run_dir(root, ov, _metrics(norm, batch, seed, status="failed"))
        elif i == 2:
            _run_dir(root, ov, None)  # killed: no metrics.json
        elif i == 3:
            _run_dir(root, ov, '{"status": "ok", "test_err')  # half-written
        elif i == 4:
            pass  # never started
        else:
            d = _run_dir(root, ov, _metrics(norm, batch, seed))
            (d / "checkpoints").mkdir()  # not a run
            (d / "checkpoints" / "metrics.json").write_text("{}")
    return root


def test_each_expected_run_appears_exactly_once(sweep: Path) -> None:
    df = load_sweep(sweep)
    assert len(df) == len(NORMS) * len(BATCHES) * len(SEEDS)
    assert df["overrides"].is_unique
    counts = df["status"].value_counts().to_dict()
    assert counts == {"ok": 4, "failed": 1, "missing": 1, "corrupt": 1, "not_started": 1}
    assert not df["superseded"].any()
    # every job can be named, including the ones that never wrote anything
    assert df[["norm", "batch_size", "seed"]].notna().all().all()
    assert set(zip(df["norm"], df["batch_size"], df["seed"], strict=True)) == set(
        itertools.product(NORMS, BATCHES, SEEDS)
    )


def test_reasons_are_recorded(sweep: Path) -> None:
    df = load_sweep(sweep).set_index("status")
    assert "does not parse" in df.loc["corrupt", "error"]
    assert "never finished" in df.loc["missing", "error"]
    assert "multirun.yaml" in df.loc["not_started", "error"]
    assert df.loc["failed", "error"] == "RuntimeError: boom"
    assert pd.isna(df.loc["not_started", "run_dir"])


def test_columns_are_tidy(sweep: Path) -> None:
    df = load_sweep(sweep)
    ok = ok_runs(df)
    assert {"norm", "batch_size", "seed", "lr", "test_error", "versions.torch"} <= set(df.columns)
    assert {"test_error_batch_stats", "data.batch_size", "model.name", "model"} <= set(df.columns)
    assert "config.seed" in df.columns  # a nested key that collides keeps its section prefix
    assert "curves" not in df.columns and "command" not in df.columns and "layers" not in df.columns
    assert ok["batch_size"].dtype.kind == "i"
    assert list(df.columns[:5]) == ["norm", "batch_size", "seed", "status", "error"]


@pytest.mark.parametrize(
    "target", [BASIC, "hydra_plugins.normzoo_sweeper.NormzooSweeper", "some.optuna.Sweeper"]
)
def test_expected_jobs_follow_hydra_basic_sweeper(tmp_path: Path, target: str) -> None:
    _multirun_yaml(tmp_path, ["seed=range(3)", "data.batch_size=8"], target)  # command line wins
    jobs = expected_jobs(tmp_path)
    if target.endswith("optuna.Sweeper"):  # not a grid: its jobs are not known in advance
        assert jobs is None
        return
    assert jobs is not None and len(jobs) == 2 * 3
    assert all("data.batch_size=8" in job for job in jobs)
    assert expected_jobs(tmp_path / "nowhere") is None


def test_no_multirun_yaml_lists_the_run_dirs(tmp_path: Path) -> None:
    _run_dir(tmp_path, ["norm=layernorm", "seed=0"], _metrics("layernorm", 2, 0))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.json").write_text(json.dumps(_metrics("batchnorm", 4, 1)))
    df = load_sweep(tmp_path)
    assert len(df) == 2 and set(df["status"]) == {"ok"}
    assert df["overrides"].isna().sum() == 1


def test_the_same_job_twice_is_counted_once(tmp_path: Path) -> None:
    ov = ["norm=batchnorm", "seed=0"]
    old = _run_dir(tmp_path / "a", ov, _metrics("batchnorm", 2, 0, status="failed"))
    new = _run_dir(tmp_path / "b", ov, _metrics("batchnorm", 2, 0))
    os.utime(old / "metrics.json", (1, 1))
    df = load_sweep(tmp_path)
    assert len(df) == 2 and df["superseded"].sum() == 1
    assert ok_runs(df)["run_dir"].tolist() == [str(new)]
    assert aggregate_seeds(df, ["test_error"])["n_runs"].tolist() == [1]


def test_corrupt_shapes_never_raise(tmp_path: Path) -> None:
    for name, text in {"list": "[1, 2]", "empty": "", "binary": b"\xff\xfe\x00"}.items():
        d = tmp_path / name
        d.mkdir()
        path = d / "metrics.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "tmp_only" / ".hydra").mkdir(parents=True)
    (tmp_path / "tmp_only" / ".metrics.json.x1y2.tmp").write_text("{")  # a killed atomic write
    df = load_sweep(tmp_path).set_index("run_dir")
    assert sorted(df["status"]) == ["corrupt", "corrupt", "corrupt", "missing"]
    assert ".metrics.json.x1y2.tmp" in df.loc[str(tmp_path / "tmp_only"), "error"]


def test_missing_sweep_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep(tmp_path / "nope")


def test_empty_sweep_gives_an_empty_frame(tmp_path: Path) -> None:
    df = load_sweep(tmp_path)
    assert df.empty and "status" in df.columns
    assert ok_runs(df).empty


def test_aggregate_over_seeds(sweep: Path) -> None:
    df = load_sweep(sweep)
    agg = aggregate_seeds(df, ["test_error"]).set_index(["norm", "batch_size"])
    # batchnorm, 2: seeds 0 (ok) and 1 (failed) -> one seed; layernorm, 4: both seeds ok
    assert agg.loc[("batchnorm", 2), "test_error_n"] == 1
    assert math.isnan(agg.loc[("batchnorm", 2), "test_error_std"])
    ln4 = ok_runs(df).query("norm == 'layernorm' and batch_size == 4")["test_error"]
    assert agg.loc[("layernorm", 4), "test_error_n"] == 2
    assert agg.loc[("layernorm", 4), "test_error_mean"] == pytest.approx(ln4.mean())
    assert agg.loc[("layernorm", 4), "test_error_std"] == pytest.approx(ln4.std(ddof=1))
    assert agg.loc[("layernorm", 4), "test_error_max"] == pytest.approx(ln4.max())


def test_layers_and_csv(sweep: Path, tmp_path: Path) -> None:
    df = load_sweep(sweep)
    layers = load_layers(df)
    assert len(layers) == 2 * len(ok_runs(df))
    assert set(layers["depth"]) == {0, 1} and set(layers["mean_gap"]) == {0.2, 0.3}
    out = write_csv(df, tmp_path / "out" / "runs.csv")
    back = pd.read_csv(out)
    assert len(back) == len(df) and list(back.columns) == list(df.columns)


def test_find_run_dirs_does_not_descend_into_runs(sweep: Path) -> None:
    dirs = find_run_dirs(sweep)
    assert len(dirs) == 7 and not any("checkpoints" in str(d) for d in dirs)


def test_nested_sections_are_hoisted(tmp_path: Path) -> None:
    data = {"status": "ok", "config": {"norm": "gn"}, "diagnostics": {"kl": 0.5, "x": {"y": 1}}}
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    row = load_sweep(tmp_path).iloc[0]
    assert row["norm"] == "gn" and row["kl"] == 0.5 and row["x.y"] == 1


def test_normzoo_report_lists_a_corrupt_metrics_json_and_does_not_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from hydra import compose, initialize_config_dir

    from normzoo.config import CONF_DIR
    from normzoo.report import main
    from normzoo.train import run

    sweep = tmp_path / "sweep"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "norm=ln", "data.batch_size=16", "data.train_subset=160", "data.test_subset=60",
            "model=mlp", "model.widths=[8]", "train.epochs=1", "train.progress=none",
            "diagnostics.precise_samples=32", "device=cpu"])  # fmt: skip
    ok = _run_dir(sweep, ["norm=ln", "seed=0"], None)
    assert run(cfg, out_dir=ok)["status"] == "ok"
    _run_dir(sweep, ["norm=ln", "seed=1"], '{"status": "ok", "test_err')  # half-written
    killed = _run_dir(sweep, ["norm=ln", "seed=2"], None)
    # what SIGKILL during the atomic write leaves: a complete-looking temp file, no metrics.json
    (killed / ".metrics.json.x1.tmp").write_text((ok / "metrics.json").read_text())
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    text = Path(capsys.readouterr().out.strip()).read_text()
    assert "corrupt" in text and "does not parse" in text and "missing" in text
    assert ".metrics.json.x1.tmp" in text  # named as a partial file, not counted as a result
    df = load_sweep(sweep)
    assert sorted(df["status"]) == ["corrupt", "missing", "ok"] and df["overrides"].is_unique


def _configured(norm: str, seed: int, batch: int = 32, error: float = 0.05, **config: Any) -> dict:
    """A metrics.json with a full ``config`` section as normzoo.train writes it (dotted keys)."""
    data = _metrics("batchnorm" if norm == "bn" else norm, batch, seed)
    data["test_error"] = error
    data["config"] = {
        "norm.name": norm,
        "norm.momentum": 0.1,
        "norm_options": {"groupnorm": {"num_groups": 8}},
        "model.name": "cnn",
        "model.channels": [8, 16],
        "data.name": "digits",
        "data.batch_size": batch,
        "data.root": "data",
        "optim.base_lr": 0.05,
        "train.epochs": 6,
        "train.progress": "auto",
        "report.out": "reports/digits",
        "seed": seed,
        "device": "cpu",
        "threads": 1,
        **config,
    }
    return data


def test_an_alias_run_is_the_same_run_not_another_seed(tmp_path: Path) -> None:
    """norm=bn and norm=batchnorm with the same seed and settings are one measurement (they
    were pooled as two seeds): one is kept, the other superseded, naming the kept one."""
    bn = _run_dir(tmp_path, ["norm=bn", "seed=0"], _configured("bn", 0, error=0.07))
    full = _run_dir(tmp_path, ["norm=batchnorm", "seed=0"], _configured("batchnorm", 0, error=0.07))
    os.utime(bn / "metrics.json", (1, 1))  # the older one goes
    df = load_sweep(tmp_path)
    assert df["config_id"].nunique() == 1 and df["superseded"].sum() == 1
    assert ok_runs(df)["run_dir"].tolist() == [str(full)]
    kept = df.set_index("run_dir").loc[str(bn), "superseded_by"]
    assert kept == f"{full} (same job)"  # norm=bn is norm=batchnorm: the same job
    agg = aggregate_seeds(df, ["test_error"])
    assert agg["n_runs"].tolist() == [1] and agg["test_error_n"].tolist() == [1]


def test_runs_that_differ_in_settings_are_separate_series(tmp_path: Path) -> None:
    """Two learning rates and a one-off 1-epoch run are not seeds of one point (they were pooled:
    n = 4 seeds at one batch size); keys that never change a result do not split a series."""
    for seed in (0, 1):
        _run_dir(tmp_path, [f"lr0.05,seed={seed}"], _configured("batchnorm", seed, error=0.07))
        _run_dir(
            tmp_path,
            [f"lr0.1,seed={seed}"],
            _configured("batchnorm", seed, **{"optim.base_lr": 0.1}),
        )
    _run_dir(tmp_path, ["oneoff"], _configured("batchnorm", 2, error=0.5, **{"train.epochs": 1}))
    # neutral keys only (threads, device, data.root, progress, report.out, the kept files): the
    # same config
    neutral = {"threads": 4, "device": "cuda", "data.root": "/x", "train.progress": "none",
               "train.keep_model": False, "train.keep_predictions": False}  # fmt: skip
    _run_dir(
        tmp_path,
        ["neutral"],
        _configured("batchnorm", 3, error=0.07, **neutral, **{"report.out": None}),
    )
    df = load_sweep(tmp_path)
    variant = df.set_index(df["run_dir"].map(lambda d: Path(d).name))["variant"]
    assert variant["lr0.05,seed=0"] == "base_lr=0.05, epochs=6"
    assert variant["lr0.1,seed=1"] == "base_lr=0.1, epochs=6"
    assert variant["oneoff"] == "base_lr=0.05, epochs=1"
    assert variant["neutral"] == variant["lr0.05,seed=0"]
    agg = aggregate_seeds(df, ["test_error"])
    assert sorted(agg["test_error_n"]) == [1, 2, 3]
    assert not df["superseded"].any()  # different seeds: nothing is a duplicate


def test_a_run_without_a_recorded_config_is_not_pooled_with_recorded_ones(tmp_path: Path) -> None:
    _run_dir(tmp_path, ["new"], _configured("batchnorm", 0))
    old = _metrics("batchnorm", 32, 1)
    del old["config"]
    _run_dir(tmp_path, ["old"], old)
    df = load_sweep(tmp_path)
    assert sorted(df["variant"]) == ["", "config not recorded"]
    assert aggregate_seeds(df, ["test_error"])["test_error_n"].tolist() == [1, 1]


def test_the_report_names_the_cpu_its_runs_ran_on() -> None:
    """A record holds the CPU model (the same code rounds differently on another CPU), and the
    report's provenance lists every one its ok runs name."""
    df = pd.DataFrame({"status": ["ok", "ok", "failed"], "cpu": ["AMD EPYC", "Intel Xeon", "Z80"]})
    assert "- cpu: `AMD EPYC`, `Intel Xeon`" in provenance_lines(df, None, None)
