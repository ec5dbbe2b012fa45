"""Where the stacked launcher's stacks run (issue 17): forked workers when that is safe.

A loky worker (joblib's default) is a fresh interpreter that imports torch, Hydra and normzoo
again before its first task: ~4 s per sweep on the 2-core VM, measured as the wait between the
launch and a 0.7 s job's end, against a default study of three sweeps that trains in about a
minute. A forked worker inherits the launching process's imports and starts at once. Fork is used
on Linux when CUDA is not initialised in this process (a forked child cannot use a CUDA context
its parent holds; it may initialise its own) and ``NORMZOO_WORKERS`` is not ``loky``; elsewhere
loky, as before. One task or one worker runs in this process: nothing to spread.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_tasks", "start_method"]

_TASK: dict[str, Any] = {}  # what forked workers inherit: the function and its shared arguments


def start_method() -> str:
    """``fork`` where it is safe (module docstring), else ``loky``."""
    if os.environ.get("NORMZOO_WORKERS", "") == "loky" or not sys.platform.startswith("linux"):
        return "loky"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "loky"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "loky"
    return "fork"


def _call(index: int) -> bytes:
    import cloudpickle  # (by value what pickle cannot name, as loky does)

    return cloudpickle.dumps(_TASK["fn"](_TASK["tasks"][index], *_TASK["args"]))


def run_tasks(
    fn: Callable[..., Any], tasks: Sequence[Any], args: tuple[Any, ...], workers: int
) -> list[Any]:
    """``[fn(task, *args) for task in tasks]``, spread over ``workers`` processes in the order
    given (each worker takes the next task when it is free), results in task order."""
    if len(tasks) <= 1 or workers <= 1:
        return [fn(task, *args) for task in tasks]
    if start_method() == "loky":
        from joblib import Parallel, delayed

        return list(
            Parallel(n_jobs=workers, backend="loky", batch_size=1)(
                delayed(fn)(task, *args) for task in tasks
            )
        )
    _TASK.update(fn=fn, tasks=list(tasks), args=args)
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(tasks))) as pool:
            return [pickle.loads(r) for r in pool.map(_call, range(len(tasks)), chunksize=1)]
    finally:
        _TASK.clear()
