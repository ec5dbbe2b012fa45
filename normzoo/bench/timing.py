"""The timing harness: several steps timed interleaved in one process, so noise hits all alike.

Each repeat times one block of ``number`` steps per contender (``number`` calibrated so a block
lasts ``min_time``) in ABBA order, with the garbage collector paused and CUDA synchronised around
each block. ``torch.utils.benchmark.Timer`` is not used for the blocks: its ``timeit`` runs a
warm-up of its own before every block and sets torch's thread count to its ``num_threads``
(default 1), which would break the back-to-back pairing and override ``--threads``.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["Step", "iqr", "make_step", "steady_heap", "sync", "time_interleaved"]

Step = Callable[[], None]


def make_step(
    module: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, params: list[Tensor]
) -> Step:
    def step() -> None:
        y = module(x)
        y.backward(g)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(step: Step, number: int, device: torch.device) -> float:
    """Mean seconds of one step over a block of ``number`` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        step()
    sync(device)
    return (time.perf_counter() - t0) / number


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_interleaved(
    steps: Sequence[Step | None],
    *,
    repeats: int,
    warmup: int,
    min_time: float,
    device: torch.device | str = "cpu",
    max_number: int = 10_000,
) -> tuple[list[list[float]], list[int]]:
    """Time several steps interleaved in one process.

    Each step is warmed up ``warmup`` times and given a block size ``number`` (steps per timed
    block, so that a block lasts at least ``min_time`` seconds). Then, for each of ``repeats``
    rounds, every step times one block; the order alternates between rounds (A,B then B,A), so a
    slow spell of the machine falls on both. A ``None`` step (one that failed) is skipped.

    Returns:
        per step, the list of mean seconds per step over the repeats (empty for ``None``), and the
        block sizes used.
    """
    if repeats < 1 or warmup < 0 or min_time < 0:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0, min_time >= 0; got {repeats}, {warmup}, {min_time}"
        )
    dev = torch.device(device)
    numbers = [0] * len(steps)
    for i, step in enumerate(steps):
        if step is None:
            continue
        for _ in range(warmup):
            step()
        one = _time_block(step, 1, dev)
        numbers[i] = max(1, min(max_number, math.ceil(min_time / max(one, 1e-9))))
    times: list[list[float]] = [[] for _ in steps]
    order = [i for i, s in enumerate(steps) if s is not None]
    with _gc_paused():
        for r in range(repeats):
            for i in order if r % 2 == 0 else order[::-1]:
                times[i].append(_time_block(steps[i], numbers[i], dev))  # type: ignore[arg-type]
    return times, numbers


def iqr(values: Sequence[float]) -> float:
    """Interquartile range (inclusive quartiles) of ``values``; 0 for fewer than two."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def steady_heap() -> str:
    """Stop glibc from returning freed memory to the OS between timed blocks.

    By default glibc serves large tensors with ``mmap`` and trims the heap when it shrinks, so a
    timed step can pay page faults that depend on what the previous step freed: noise that differs
    between the two contenders. Raising M_TRIM_THRESHOLD and M_MMAP_THRESHOLD to 1 GiB keeps the
    pages mapped (both contenders alike). Returns what was done, for the provenance.
    """
    if not sys.platform.startswith("linux"):
        return "default allocator (not Linux)"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1
        ok &= libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return "default allocator (no glibc mallopt)"
    return "glibc mallopt: trim and mmap thresholds 1 GiB" if ok else "mallopt refused"
