"""Golden files for the harness (issue 12): a fixed tiny run, a fixed tiny multirun and the CLI's
answers to bad command lines must stay what they were when these files were written.

``metrics.json`` is compared without the keys that change from run to run (timings, dates, host,
versions, git state, the command with its temp paths); floats to 6 significant digits (a 1-epoch
run is bitwise deterministic on one CPU; the rounding keeps another CPU's last bits out).
``NORMZOO_UPDATE_GOLDEN=1`` rewrites the files instead of comparing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import normzoo.train as train
from normzoo.config import CONF_DIR

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("NORMZOO_UPDATE_GOLDEN") == "1"
TINY = [
    "data.train_subset=120",
    "data.test_subset=60",
    "model.channels=[4,4]",
    "model.strides=[1,2]",
    "train.epochs=1",
    "train.progress=none",
    "diagnostics.precise_samples=32",
    "device=cpu",
]
#: keys of a record that differ between two runs of one config
VOLATILE = {
    "wall_time_s", "train_time_s", "eval_time_s", "steps_per_s", "started_at", "finished_at",
    "diagnostics_seconds", "versions", "git_rev", "git_dirty", "hostname", "cpu", "command",
}  # fmt: skip


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _record(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return _rounded({k: v for k, v in data.items() if k not in VOLATILE})


def _compare(name: str, actual: Any) -> None:
    path = GOLDEN / name
    text = json.dumps(actual, indent=1, sort_keys=True, default=str) + "\n"
    if UPDATE:
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"{path} is missing: NORMZOO_UPDATE_GOLDEN=1 writes it"
    assert json.loads(text) == json.loads(path.read_text(encoding="utf-8"))


def _main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> int:
    """``normzoo-train <args>`` in this process; its exit status."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["normzoo-train", *args])
    with pytest.raises(SystemExit) as stop:
        train.main()
    code = stop.value.code
    return 0 if code is None else code if isinstance(code, int) else str(code)  # type: ignore[return-value]


def test_golden_single_run(monkeypatch, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = _main(monkeypatch, tmp_path, *TINY, "norm=gn", "norm.num_groups=2", "data.batch_size=8",
                 "seed=1",
                 f"hydra.run.dir={run_dir}")  # fmt: skip
    assert code == 0
    _compare("single_run.json", _record(run_dir / "metrics.json"))


@pytest.mark.slow
def test_golden_multirun(monkeypatch, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code = _main(monkeypatch, tmp_path, "-m", *TINY, "norm=bn,ln", "data.batch_size=4,16",
                 f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert code == 0
    records = {p.parent.name: _record(p) for p in sorted(sweep.glob("*/metrics.json"))}
    assert len(records) == 4
    _compare("multirun.json", {"exit": code, "runs": records})


#: bad command lines: the CLI refuses each with a message and an exit status
BAD = {
    "unknown_norm": ["norm=nope"],
    "misspelt_norm": ["norm=batchnrom"],
    "misspelt_norm_in_sweep": ["-m", "norm=bn,layernrm"],
    "bad_type": ["data.batch_size=foo"],
    "unknown_key": ["data.bach_size=8"],
    "unknown_top_key": ["sed=1"],
    "model_key_of_another_model": ["model.widths=[8]"],
    "unknown_group_option": ["optim=adam"],
    "out_of_range": ["data.batch_size=0"],
    "out_of_range_in_sweep": ["-m", "norm=bn,gn", "data.batch_size=8,0"],
    "bad_type_in_sweep": ["-m", "norm=bn,gn", "train.epochs=1,2.5"],
    "cuda_without_gpu": ["device=cuda"],
    "missing_data": ["data=mnist", "data.root=nowhere"],
    "option_the_norm_lacks": ["norm=ln", "norm.num_groups=4"],
    "value_the_layer_refuses": ["norm=bn", "norm.momentum=2"],
    "sweep_over_an_unnamed_key": ["-m", "threads=1,2"],
    "invalid_combination": ["norm=in", "model=mlp", "model.widths=[8]"],
}
_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]")


def _tidy_stderr(text: str, tmp_path: Path) -> list[str]:
    """stderr without Hydra's timestamped log lines, with the temp and config paths named."""
    text = text.replace(str(CONF_DIR), "<CONF>").replace(str(tmp_path), "<TMP>")
    return [
        line.rstrip() for line in text.splitlines() if line.strip() and not _LOG_LINE.match(line)
    ]


@pytest.mark.parametrize("case", sorted(BAD))
def test_golden_cli_errors(monkeypatch, capsys, tmp_path: Path, case: str) -> None:
    args = BAD[case]
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    tiny = [t for t in TINY if not (t.startswith("model.") and "model=mlp" in args)]
    code = _main(monkeypatch, tmp_path, *flags, *tiny, *overrides,
                 f"hydra.sweep.dir={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 'r'}")  # fmt: skip
    stderr = _tidy_stderr(capsys.readouterr().err, tmp_path)
    if isinstance(code, str):  # SweepRejected: SystemExit with the message as its code
        code, stderr = 1, [*stderr, *_tidy_stderr(code, tmp_path)]
    assert code != 0
    _compare(f"cli_{case}.json", {"args": args, "exit": code, "stderr": stderr})
