"""The run side of Study v2: step budgets, the explicit lr rule, the validation split, per-sample
predictions, the inference panel in the record, kept models and ``normzoo-eval``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import normzoo.train as train
from normzoo import evaluate as evaluate_cli
from normzoo.config import CONF_DIR, ConfigError
from normzoo.config.validate import validate
from normzoo.run.checkpoint import MODEL_FILE, use_checkpoint
from normzoo.run.loop import peak_lr
from normzoo.run.predictions import PREDICTIONS_FILE, load_predictions

TINY = [
    "data.train_subset=240",  # 7 steps per epoch at batch 32
    "data.test_subset=100",
    "train.epochs=2",
    "train.progress=none",
    "diagnostics.enabled=false",
    "device=cpu",
    "model.channels=[8,8]",
    "model.strides=[1,2]",
]


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def run(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose("config", overrides=[*TINY, *overrides])
    train.run(cfg, out_dir=tmp_path)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_a_step_budget_makes_exactly_that_many_steps(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "train.steps=10", "train.epochs=1")  # epochs is ignored under a budget
    assert m["status"] == "ok"
    assert (m["steps"], m["epochs_run"], m["samples_seen"]) == (10, 2, 320)  # 7 + a partial 3
    assert [row["epoch"] for row in m["curves"]] == [1, 2]
    assert m["curves"][-1]["lr"] == 0.0  # the cosine ends at the budget's last step


def test_batch_renorm_progress_follows_the_step_budget(hydra_conf, tmp_path, monkeypatch) -> None:
    import normzoo.norms.batch as batch

    seen: list[float] = []
    real = batch.BatchRenorm.set_progress

    def spy(layer: batch.BatchRenorm, p: float) -> None:
        seen.append(p)
        real(layer, p)

    monkeypatch.setattr(batch.BatchRenorm, "set_progress", spy)
    m = run(tmp_path, "norm=brn", "train.steps=9")
    layers = len(seen) // 9
    assert m["steps"] == 9 and layers >= 2
    assert seen[::layers] == [i / 9 for i in range(9)]


def test_lr_rule_and_scale(hydra_conf) -> None:
    def lr(*overrides: str) -> float:
        return peak_lr(compose("config", overrides=["data.batch_size=8", *overrides]))

    assert lr() == 0.1 * 8 / 32  # linear: the default, today's rule
    assert lr("optim.lr_rule=constant") == 0.1
    assert lr("optim.lr_scale=2") == 2 * 0.1 * 8 / 32
    assert lr("optim.lr_rule=constant", "optim.lr_scale=0.5") == 0.05
    for bad in ("optim.lr_rule=sqrt", "optim.lr_scale=0", "train.steps=-1", "data.val_fraction=1"):
        with pytest.raises(ConfigError):
            validate(compose("config", overrides=[bad]))


def test_the_record_states_the_lr_rule(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "optim.lr_rule=constant", "optim.lr_scale=2", "train.epochs=1")
    assert (m["lr_rule"], m["lr_scale"], m["lr"]) == ("constant", 2.0, 0.2)
    assert max(row["lr"] for row in m["curves"]) <= m["lr"]


def test_validation_split_is_evaluated_and_kept(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "data.val_fraction=0.25")
    assert all({"val_loss", "val_error"} <= set(row) for row in m["curves"])
    assert m["val_error"] == m["curves"][-1]["val_error"]
    pred = load_predictions(tmp_path)
    # a quarter of digits' 1437 training images, held out before train_subset draws from the rest
    assert pred is not None and abs(len(pred["val_y"]) - 0.25 * 1437) < 10
    assert np.mean(pred["val_pred"] != pred["val_y"]) == pytest.approx(m["val_error"], abs=1e-12)


def test_no_validation_split_by_default(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "train.epochs=1")
    assert m["val_error"] is None and "val_error" not in m["curves"][-1]
    assert "val_y" not in load_predictions(tmp_path)


def test_digits_hard_is_a_small_data_set_with_a_validation_split(hydra_conf) -> None:
    cfg = compose("config", overrides=["data=digits_hard"])
    validate(cfg)
    assert cfg.data.val_fraction == 0.2
    assert not use_checkpoint(cfg, 1000)


def test_predictions_match_the_recorded_errors(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "norm=bn", "diagnostics.enabled=true", "diagnostics.precise_samples=64")
    assert m["predictions"] == PREDICTIONS_FILE
    pred = load_predictions(tmp_path)
    assert set(pred) == {"test_y", "test_pred", "test_pred_batch", "test_pred_precise"}
    wrong = {key: np.mean(pred[key] != pred["test_y"]) for key in pred if key != "test_y"}
    assert wrong["test_pred"] == pytest.approx(m["test_error"], abs=1e-12)
    assert wrong["test_pred_batch"] == pytest.approx(m["test_error_batch_stats"], abs=1e-6)
    assert wrong["test_pred_precise"] == pytest.approx(m["test_error_precise"], abs=1e-6)


def test_a_layer_without_batch_statistics_keeps_eval_predictions_only(hydra_conf, tmp_path) -> None:
    run(tmp_path, "norm=gn", "diagnostics.enabled=true", "train.epochs=1")
    assert set(load_predictions(tmp_path)) == {"test_y", "test_pred"}


def test_the_switches_turn_the_kept_files_off(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "train.keep_predictions=false", "train.keep_model=false", "train.epochs=1")
    assert m["predictions"] is None and m["model_file"] is None
    assert not (tmp_path / PREDICTIONS_FILE).exists() and not (tmp_path / MODEL_FILE).exists()


def test_the_inference_panel_goes_into_the_record(hydra_conf, tmp_path: Path) -> None:
    m = run(tmp_path, "norm=bn", "diagnostics.panel=true", "train.epochs=1")
    kinds = {row["statistics"] for row in m["inference_panel"]}
    assert kinds == {"ema", "precise", "batch", "adabn", "ema_shifted", "adabn_shifted"}
    ema = next(row for row in m["inference_panel"] if row["statistics"] == "ema")
    assert ema["test_error"] == pytest.approx(m["test_error"], abs=1e-6)
    assert "inference_panel" not in run(tmp_path / "off", "train.epochs=1")


def test_a_kept_model_re_evaluates_to_the_recorded_test_error(hydra_conf, tmp_path) -> None:
    runs = {name: tmp_path / "sweep" / name for name in ("bn", "gn")}
    records = {name: run(d, f"norm={name}", "norm.ghost_batch_size=4" if name == "bn" else "seed=1")
               for name, d in runs.items()}  # fmt: skip
    assert all(r["model_file"] == MODEL_FILE for r in records.values())
    out = tmp_path / "eval.csv"
    assert evaluate_cli.main([str(tmp_path / "sweep"), "--precise-samples", "64",
                              "--out", str(out)]) == 0  # fmt: skip
    rows = {Path(r["run_dir"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"bn", "gn"}
    for name, row in rows.items():
        assert float(row["test_error"]) == records[name]["test_error"]  # exactly, not retrained
        assert math.isfinite(float(row["test_error_precise"]))
    assert rows["bn"]["precise_samples"] == "64"


def test_normzoo_eval_without_kept_models_fails(tmp_path: Path) -> None:
    assert evaluate_cli.main([str(tmp_path)]) == 1


def test_ghost_batch_size_needs_no_plus(hydra_conf) -> None:
    for norm in ("bn", "brn"):
        cfg = compose("config", overrides=[f"norm={norm}", "norm.ghost_batch_size=4"])
        validate(cfg, explicit={"ghost_batch_size"})
        assert cfg.norm.ghost_batch_size == 4


def test_a_step_budget_resumes_from_its_checkpoint_to_the_same_result(
    hydra_conf, tmp_path, monkeypatch
) -> None:
    from normzoo.run import loop

    args = ("norm=brn", "train.steps=10", "train.checkpoint=true")  # epochs of 7 + 3 steps
    whole = run(tmp_path / "whole", *args)
    real, calls = loop.evaluate, []

    def killed_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after epoch 1")
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", killed_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed", *args)
    resumed = run(tmp_path / "resumed", *args)
    assert resumed["steps"] == 10 and resumed["epochs_run"] == 2
    timing = ("wall_time_s", "train_time_s", "eval_time_s", "steps_per_s", "started_at",
              "finished_at", "command")  # fmt: skip
    assert resumed["curves"] == whole["curves"]
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in whole.items() if k not in timing
    }
