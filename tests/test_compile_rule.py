"""``train.compile=auto`` (issue 17): runs of at least ``AUTO_COMPILE_STEPS`` optimizer steps train
through ``torch.compile``, shorter ones eagerly; a stack whose budget would compile trains its
members alone (a stack runs eagerly). ``torch.compile`` is replaced by a recorder here: what is
tested is the decision, not inductor (the compiled layers' own tests cover that)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from normzoo.config import CONF_DIR
from normzoo.config.validate import validate
from normzoo.errors import ConfigError
from normzoo.run import budget, loop, runner
from normzoo.run.budget import AUTO_COMPILE_STEPS, compiles
from normzoo.run.stack import stack_refusal, train_stacked

TINY = ["data.train_subset=240", "data.test_subset=100", "data.batch_size=32", "train.epochs=2",
        "train.progress=none", "diagnostics.enabled=false", "device=cpu", "model=mlp",
        "model.widths=[16]"]  # fmt: skip
STEPS = 14  # 240 // 32 = 7 steps an epoch, 2 epochs


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


@pytest.fixture
def compiled(monkeypatch) -> list:
    """The models handed to torch.compile (which returns them unchanged)."""
    seen: list = []
    monkeypatch.setattr(loop.torch, "compile", lambda model, **_: seen.append(model) or model)
    return seen


@pytest.mark.parametrize(
    ("setting", "steps", "expected"),
    [("auto", AUTO_COMPILE_STEPS - 1, False), ("auto", AUTO_COMPILE_STEPS, True),
     ("true", 1, True), ("false", 10 * AUTO_COMPILE_STEPS, False)],
)  # fmt: skip
def test_auto_compiles_from_the_measured_step_count_on(hydra_conf, setting, steps, expected):
    assert compiles(compose("config", overrides=[f"train.compile={setting}"]), steps) is expected


def test_another_value_is_refused_by_name(hydra_conf) -> None:
    with pytest.raises(ConfigError, match=r"train.compile.*one of auto, true, false"):
        validate(compose("config", overrides=["train.compile=sometimes"]))


@pytest.mark.parametrize(("threshold", "calls"), [(STEPS, 1), (STEPS + 1, 0)])
def test_a_run_compiles_exactly_when_its_budget_reaches_the_threshold(
    hydra_conf, tmp_path: Path, monkeypatch, compiled, threshold, calls
) -> None:
    monkeypatch.setattr(budget, "AUTO_COMPILE_STEPS", threshold)
    cfg = compose("config", overrides=[*TINY, "norm=batchnorm", "train.compile=auto"])
    assert runner.run(cfg, tmp_path)["status"] == "ok"
    assert len(compiled) == calls
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == STEPS


@pytest.mark.parametrize(("threshold", "stacked"), [(STEPS, False), (STEPS + 1, True)])
def test_a_stack_that_would_compile_trains_its_members_alone(
    hydra_conf, tmp_path: Path, monkeypatch, compiled, threshold, stacked
) -> None:
    monkeypatch.setattr(budget, "AUTO_COMPILE_STEPS", threshold)
    cfgs = [compose("config", overrides=[*TINY, "norm=batchnorm", f"seed={s}",
                                         "train.compile=auto"]) for s in (0, 1)]  # fmt: skip
    assert all(stack_refusal(c) is None for c in cfgs)  # auto alone does not refuse a stack
    results = train_stacked(cfgs, [tmp_path / "a", tmp_path / "b"])
    assert [r["status"] for r in results] == ["ok", "ok"]
    records = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab"]
    assert [r.get("trained") == "stacked" for r in records] == [stacked, stacked]
    assert len(compiled) == (0 if stacked else 2)


def test_compile_true_refuses_a_stack(hydra_conf) -> None:
    assert "train.compile=true" in stack_refusal(
        compose("config", overrides=[*TINY, "train.compile=true"])
    )
