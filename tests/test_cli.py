"""The command line as a user meets it (issue 14): typed layer options, misspelt options and
studies refused with "did you mean", Hydra's shell completion, aliases resolved to one run, the
progress and summary lines, exit statuses and resume across code revisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import normzoo
import normzoo.train as train
from normzoo.config import CONF_DIR, ConfigError
from normzoo.config.grid import canonical_jobs
from normzoo.config.option_types import option_types
from normzoo.config.validate import validate_norm
from normzoo.registry import get_norm
from normzoo.run import runner
from normzoo.sweep import check_argv, run_summary
from normzoo.sweep.progress import eta_text

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.train_subset=64", "data.test_subset=64", "train.epochs=1", "device=cpu",
        "model.channels=[4,4]", "model.strides=[1,2]"]  # fmt: skip
#: a value of each type, with the types that would accept it
_VALUES = [("maybe", {"str"}), (True, {"bool"}), (3, {"int", "float"}), (0.5, {"float"})]


def cli(cwd: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "normzoo.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _typed_options() -> list[tuple[str, str, frozenset[str]]]:
    out = []
    for name in normzoo.list_norms():
        for option, kinds in option_types(get_norm(name)).items():
            out.append((name, option, kinds))
    return out


def test_the_option_parametrisation_covers_every_type() -> None:
    kinds = {k for _, _, ks in _typed_options() for k in ks}
    assert {"bool", "int", "float", "str", "None"} <= kinds
    assert option_types(get_norm("batchnorm"))["momentum"] == {"float", "None"}


@pytest.mark.parametrize(("name", "option", "kinds"), _typed_options())
def test_a_wrongly_typed_layer_option_is_refused(name: str, option: str, kinds) -> None:
    wrong = next(v for v, accepted_by in _VALUES if not accepted_by & kinds)
    node = OmegaConf.create({"name": name, option: wrong})
    with pytest.raises(ConfigError) as err:
        validate_norm(node, {})
    message = str(err.value)
    assert f"norm.{option}={wrong!r}" in message and "allowed" in message, message


@pytest.mark.parametrize(
    ("node", "needle"),
    [
        ({"name": "batchnorm", "track_running_stats": "no"}, "allowed true or false"),
        ({"name": "batchnorm", "momentum": True}, "allowed a number or null"),
        ({"name": "batchrenorm", "rmax": True}, "norm.rmax=True"),
        ({"name": "instancenorm", "affine": "false"}, "norm.affine='false'"),
        ({"name": "weightnorm", "data_init": "no"}, "norm.data_init='no'"),
    ],
)
def test_the_issues_accepted_values_are_refused(node: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate_norm(OmegaConf.create(node), {})


def test_well_typed_options_pass() -> None:
    validate_norm(OmegaConf.create({"name": "batchnorm", "momentum": None, "eps": 1e-3}), {})
    validate_norm(OmegaConf.create({"name": "groupnorm", "num_groups": 4, "eps": 1}), {})


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["norm.momentm=0.2"], "norm.momentm: norm=batchnorm has no option 'momentm'. Did you "
                               "mean norm.momentum?"),
        (["norm=gn", "norm.num_group=4"], "Did you mean norm.num_groups?"),
        (["experiment=cifar10_resnt"], "Did you mean experiment=cifar10_resnet?"),
        (["-m", "experiment=digitz"], "unknown experiment 'digitz'"),
        (["resume=maybe"], "resume='maybe' is out of range: allowed true, false or "
                           "keep_any_revision"),
    ],
)  # fmt: skip
def test_bad_command_lines_refused_before_hydra(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_argv(argv)
    assert needle in str(err.value)


def test_an_experiment_of_a_user_config_dir_passes_the_guard(tmp_path: Path) -> None:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nseed: 3\n")
    check_argv(["--config-dir", str(tmp_path), "experiment=mine"])
    check_argv([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"])
    with pytest.raises(ConfigError, match="Did you mean experiment=mine"):
        check_argv(["--config-dir", str(tmp_path), "experiment=mien"])


def test_completion_arguments_are_not_overrides() -> None:
    check_argv(["-sc", "install=bash"])  # would be "install: no such key"


def test_glob_over_norms_lists_each_layer_once_under_its_canonical_name() -> None:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.normzoo_sweeper import NormzooSweeper

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(
            ["norm=glob(*)", "seed=0,1"]
        )
        batches = NormzooSweeper.split_arguments(parsed, 5)
    job_list = [job for batch in batches for job in batch]
    norms = [o.split("=", 1)[1] for job in job_list for o in job if o.startswith("norm=")]
    assert sorted(set(norms)) == sorted(normzoo.list_norms())  # every layer, no alias
    assert len(job_list) == 2 * len(normzoo.list_norms())  # each (layer, seed) once
    assert all(len(batch) <= 5 for batch in batches)


def test_canonical_jobs_drop_alias_repeats() -> None:
    assert canonical_jobs([["norm=bn", "seed=0"], ["norm=batchnorm", "seed=0"], ["norm=gn"]]) == [
        ["norm=batchnorm", "seed=0"],
        ["norm=groupnorm"],
    ]


def test_a_glob_sweep_trains_each_layer_once(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    proc = cli(tmp_path, "-m", "norm=glob(b*)", *TINY, "diagnostics.enabled=false",
               f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    names = [d.split("norm=")[1].split(",")[0] for d in dirs]
    assert names == ["batchchannelnorm", "batchinstancenorm", "batchnorm", "batchrenorm"]
    out = proc.stdout + proc.stderr
    assert "[4/4]" in out and "[1/4]" in out and "ETA" in out  # progress lines with an ETA


def test_an_external_experiment_runs_in_a_multirun(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\ntrain:\n  epochs: 1\nseed: 5\n")
    sweep = tmp_path / "s"
    proc = cli(tmp_path, "-m", "--config-dir", str(tmp_path / "conf"), "experiment=mine",
               "norm=ln,bn", *TINY, "diagnostics.enabled=false",
               f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted(r["status"] for r in records) == ["ok", "ok"]
    assert {r["config"]["seed"] for r in records} == {5}  # the user's experiment applied


def test_single_run_logs_diagnostics_and_ends_with_a_summary(tmp_path: Path) -> None:
    proc = cli(tmp_path, *TINY, "diagnostics.precise_samples=32", f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "diagnostics: mismatch, PreciseBN (32 samples)" in out and "diagnostics done in" in out
    assert "result: ok (batchnorm) in " in out
    assert "EMA statistics" in out and "batch statistics" in out and "PreciseBN statistics" in out


def test_run_summary_states_status_errors_and_time(tmp_path: Path) -> None:
    record = {"status": "ok", "norm": "groupnorm", "wall_time_s": 12.34, "test_error": 0.1,
              "test_error_ema": 0.1, "test_error_precise": 0.125, "error": None}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    lines = run_summary(tmp_path)
    assert lines[0] == "result: ok (groupnorm) in 12.3s"
    assert (
        lines[1]
        == "test error: last epoch 10.00%, EMA statistics 10.00%, PreciseBN statistics 12.50%"
    )
    assert run_summary(tmp_path / "nowhere") == []


def test_eta_from_the_mean_time_per_run() -> None:
    assert eta_text(60.0, 2, 6) == " ETA 2m00s"
    assert eta_text(3600.0, 1, 3) == " ETA 2h00m"
    assert eta_text(5.0, 3, 3) == ""


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def test_a_result_of_another_revision_is_redone(hydra_conf, tmp_path: Path) -> None:
    args = [*TINY, "norm=ln", "train.progress=none", "diagnostics.enabled=false"]
    first = train.run(compose("config", overrides=args), out_dir=tmp_path)
    assert first["status"] == "ok"
    assert train.run(compose("config", overrides=args), out_dir=tmp_path).get("skipped")
    path = tmp_path / "metrics.json"
    record = json.loads(path.read_text())
    record["git_rev"] = "0" * 40  # as if recorded before a code change
    path.write_text(json.dumps(record))
    cfg = compose("config", overrides=args)
    assert runner.kept_result(tmp_path, cfg) is None  # not silently kept
    keep = compose("config", overrides=[*args, "resume=keep_any_revision"])
    assert runner.kept_result(tmp_path, keep) is not None
    again = train.run(cfg, out_dir=tmp_path)
    assert again["status"] == "ok" and "skipped" not in again
    assert json.loads(path.read_text())["git_rev"] != "0" * 40


def test_the_report_states_mixed_revisions_on_top() -> None:
    import pandas as pd

    from normzoo.analysis.report import _mixed_revisions

    assert _mixed_revisions(pd.DataFrame({"git_rev": ["a" * 40, "a" * 40]})) == []
    lines = _mixed_revisions(pd.DataFrame({"git_rev": ["a" * 40, "b" * 40, "b" * 40]}))
    assert lines[0].startswith("**Mixed code revisions:** these runs come from 2 git revisions")
    assert "`bbbbbbbbbb` (2 runs)" in lines[0]


def test_unknown_group_options_and_empty_globs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnte' .*Did you mean model=resnet\?"):
        check_argv(["model=resnte"])
    with pytest.raises(ConfigError, match=r"Did you mean data=mnist\?"):
        check_argv(["-m", "data=digits,mnits"])
    with pytest.raises(ConfigError, match=r"norm=glob\(xyz\*\) matches no norm option"):
        check_argv(["-m", "norm=glob(xyz*)"])
    check_argv(["-m", "norm=glob(b*)"])  # matches: left to the sweeper
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: cnn\n")
    check_argv(["--config-dir", str(tmp_path), "model=mine"])  # the user's own option
