"""Where the stacked launcher's stacks run (normzoo.sweep.workers): forked workers where safe,
loky elsewhere, this process for one task; the results in task order either way."""

from __future__ import annotations

import os

import pytest

from normzoo.sweep import workers


def _task(item: int, offset: int) -> tuple[int, int]:
    return item + offset, os.getpid()


@pytest.mark.parametrize("method", ["fork", "loky"])
def test_tasks_run_in_other_processes_and_come_back_in_order(method, monkeypatch) -> None:
    monkeypatch.setenv("NORMZOO_WORKERS", "loky" if method == "loky" else "")
    if workers.start_method() != method:
        pytest.skip(f"{method} is not this platform's start method")  # (fork: Linux only)
    out = workers.run_tasks(_task, [3, 1, 2, 5], (10,), workers=2)
    assert [value for value, _ in out] == [13, 11, 12, 15]
    assert os.getpid() not in {pid for _, pid in out}


def test_one_task_or_one_worker_runs_here() -> None:
    assert workers.run_tasks(_task, [1], (0,), workers=2) == [(1, os.getpid())]
    assert [pid for _, pid in workers.run_tasks(_task, [1, 2], (0,), workers=1)] == [
        os.getpid()
    ] * 2


def test_no_fork_once_cuda_is_initialised_here(monkeypatch) -> None:
    import torch

    monkeypatch.setenv("NORMZOO_WORKERS", "")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert workers.start_method() == "loky"
