"""Resume across a code change, as a user meets it (issue 14, item 7): a finished sweep is rerun
by the command line from a git checkout of its own (a copy of the package under test) after
``normzoo/`` changed; its runs are redone, with a log line naming ``resume=keep_any_revision``,
unless that switch is given; a commit outside ``normzoo/`` keeps them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.train_subset=64", "data.test_subset=64", "train.epochs=1", "device=cpu",
        "model.channels=[4,4]", "model.strides=[1,2]", "diagnostics.enabled=false"]  # fmt: skip
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    out = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git repository holding a copy of the package under test, one commit."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("normzoo", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    (src / "README.md").write_text("copy\n")
    (src / ".gitignore").write_text("__pycache__/\n")
    git(src, "init", "-q")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "the code of the first sweep")
    return src


def sweep(src: Path, out: Path, *extra: str) -> tuple[str, dict[str, tuple[int, str]]]:
    """Run ``-m norm=bn,ln`` from ``src`` into ``out``: (its output, per run dir the record's
    mtime and git_rev)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(src)}
    proc = subprocess.run(
        [sys.executable, "-m", "normzoo.train", "-m", "norm=bn,ln", *TINY, *extra,
         f"hydra.sweep.dir={out}"],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    records = {}
    for path in sorted(out.glob("*/metrics.json")):
        records[path.parent.name] = (
            path.stat().st_mtime_ns,
            json.loads(path.read_text())["git_rev"],
        )
    assert len(records) == 2, text[-3000:]
    return text, records


@pytest.mark.slow
def test_a_rerun_after_a_code_change_redoes_the_sweep_unless_told_to_keep_it(
    checkout: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    _, first = sweep(checkout, out)
    assert {rev for _, rev in first.values()} == {git(checkout, "rev-parse", "HEAD")}

    (checkout / "README.md").write_text("a change outside normzoo/\n")
    git(checkout, "commit", "-qam", "docs only")
    text, again = sweep(checkout, out)
    assert again == first, "a commit outside normzoo/ redid finished runs"
    assert "(+2 finished before this sweep, not rerun)" in text

    layer = checkout / "normzoo" / "norms" / "batch.py"
    layer.write_text(layer.read_text() + "\n# a code change\n")
    git(checkout, "commit", "-qam", "a layer changed")
    head = git(checkout, "rev-parse", "HEAD")
    text, redone = sweep(checkout, out)
    assert "running again (resume=keep_any_revision keeps it)" in text
    assert f"the checkout is at {head[:10]} (normzoo/ differs)" in text
    assert {rev for _, rev in redone.values()} == {head}
    assert all(redone[d][0] > first[d][0] for d in first)  # rewritten, not kept

    layer.write_text(layer.read_text() + "# uncommitted\n")  # dirty normzoo/: another version
    _, kept = sweep(checkout, out, "resume=keep_any_revision")
    assert kept == redone  # the switch keeps them, untouched
    text, _ = sweep(checkout, out)
    assert "recorded with uncommitted normzoo/ paths none, the checkout has" in text
