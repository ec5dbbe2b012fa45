"""One answer each to "which keys make a result", "which jobs a sweep has" and "how a config is
flattened": the run-dir names, resume/checkpoints and the results table use the same ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import normzoo.analysis.record as record
import normzoo.results as results
import normzoo.train as train
from normzoo.config import CONF_DIR, flatten
from normzoo.config.grid import count_jobs, jobs
from normzoo.config.identity import (
    RESULT_NEUTRAL_KEYS,
    RUN_DIR_UNNAMED_KEYS,
    SERIES_NEUTRAL_KEYS,
    comparable_config,
)

NEUTRAL_VALUES = {
    "resume": False,
    "threads": 3,
    "train.progress": "none",
    "train.checkpoint": True,
    "train.keep_model": False,
    "train.keep_predictions": False,
    "report.out": "elsewhere",
    "data.root": "/somewhere",
    "data.download": True,
}


@pytest.fixture(scope="module")
def cfg():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield compose("config", overrides=["norm=gn", "data.batch_size=8"])


def test_run_dir_names_leave_out_exactly_the_declared_keys() -> None:
    conf = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    exclude = conf["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert set(exclude) == RUN_DIR_UNNAMED_KEYS and len(exclude) == len(set(exclude))
    assert RESULT_NEUTRAL_KEYS <= RUN_DIR_UNNAMED_KEYS  # a rerun with other values: the same dir


def test_results_and_the_trainer_use_the_same_neutral_keys() -> None:
    assert train.RESULT_NEUTRAL_KEYS is RESULT_NEUTRAL_KEYS
    assert results.NEUTRAL_CONFIG_KEYS is SERIES_NEUTRAL_KEYS
    assert {"device", "study"} == SERIES_NEUTRAL_KEYS - RESULT_NEUTRAL_KEYS


def test_neutral_keys_leave_the_identity_unchanged_and_others_change_it(cfg) -> None:
    assert set(NEUTRAL_VALUES) == RESULT_NEUTRAL_KEYS  # every declared key is exercised here
    base = comparable_config(cfg, "cpu")
    for key, value in NEUTRAL_VALUES.items():
        other = cfg.copy()
        OmegaConf.update(other, key, value, merge=True)
        assert comparable_config(other, "cpu") == base, key
    for key, value in {"seed": 9, "data.batch_size": 16, "diagnostics.enabled": False}.items():
        other = cfg.copy()
        OmegaConf.update(other, key, value, merge=True)
        assert comparable_config(other, "cpu") != base, key
    assert comparable_config(cfg, "cuda") != base  # compared as resolved


def test_the_results_table_expands_the_same_grid(tmp_path: Path) -> None:
    params = {"norm": "bn,gn", "data.batch_size": "2,4,8", "model": "mlp,cnn"}
    task = ["experiment=digits_v1", "model=mlp", "seed=0,1"]
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "sweeper": {"_target_": "x.NormzooSweeper", "params": params},
                    "overrides": {"task": task},
                }
            },
            sort_keys=False,
        )
    )
    expanded = jobs(params, task)
    assert results.expected_jobs(tmp_path) == expanded
    assert len(expanded) == count_jobs(params, task) == 2 * 3 * 2  # model=mlp replaced the sweep
    assert expanded[0] == [
        "norm=batchnorm",  # aliases resolved: the run dir names the canonical layer
        "data.batch_size=2",
        "model=mlp",
        "experiment=digits_v1",
        "seed=0",
    ]


def test_one_flatten_for_configs_and_records() -> None:
    data = {"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None, "f": {"g": {"h": "x"}}}
    assert flatten(data) == {"a.b": 1, "a.c": [1, 2], "a.d": {}, "e": None, "f.g.h": "x"}
    assert flatten(data, scalars_only=True) == {"a.b": 1, "e": None, "f.g.h": "x"}
    assert flatten(data, keep_empty=False) == {"a.b": 1, "a.c": [1, 2], "e": None, "f.g.h": "x"}
    assert record.flatten is flatten  # the results table reads records with the same function
