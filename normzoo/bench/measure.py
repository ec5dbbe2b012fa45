"""One measured row: a layer against its baseline on one input shape, in one mode; and the run.

One step = ``y = m(x); y.backward(g)`` in training mode, ``x`` requiring grad (as inside a network)
and a fixed random ``g``, every ``.grad`` set to None after it. Both contenders are timed by
:func:`~normzoo.bench.timing.time_interleaved`; the reported time is the median over repeats.
Compiled mode wraps each module in ``torch.compile(module, dynamic=False)``: the first step
(compiling forward and backward) is timed separately, dynamo's caches are reset after each row,
and a contender that fails to compile leaves its error in the row while the run goes on.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.bench.memory import saved_tensor_bytes
from normzoo.bench.pairs import (
    Pairing,
    build_contender,
    config_of,
    resolve_pairings,
    shapes_for,
    wrapped_layer,
)
from normzoo.bench.timing import Step, iqr, make_step, sync, time_interleaved
from normzoo.registry import get_norm

__all__ = ["CONV_SHAPES", "CSV_COLUMNS", "DENSE_SHAPES", "QUICK_SHAPES", "BenchConfig",
           "measure_pair", "run_bench"]  # fmt: skip

#: the documented shape set (issue 5): conv inputs (N, C, H, W) and dense inputs (N, C)
CONV_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 32, 32),
    (128, 64, 16, 16),
    (2, 64, 32, 32),
    (8, 256, 14, 14),
)
DENSE_SHAPES: tuple[tuple[int, ...], ...] = ((256, 256), (2, 512))
#: ``--quick``: one tiny conv shape (C = 32 so GroupNorm's default 32 groups divide it)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((4, 32, 8, 8),)

CSV_COLUMNS: tuple[str, ...] = (
    "device",
    "mode",
    "layer",
    "baseline",
    "pairing",
    "kind",
    "shape",
    "dtype",
    "threads",
    "repeats",
    "number_scratch",
    "number_native",
    "scratch_ms",
    "native_ms",
    "ratio",
    "paired_ratio",
    "ratio_q1",
    "ratio_q3",
    "ratio_min",
    "ratio_max",
    "scratch_iqr_ms",
    "native_iqr_ms",
    "saved_bytes_scratch",
    "saved_bytes_native",
    "bytes_ratio",
    "compile_s_scratch",
    "compile_s_native",
    "scratch_config",
    "native_config",
    "error",
)

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short_error(exc: BaseException) -> str:
    """``Type: message`` on one line: the first two non-empty lines of the message, at most 300 chars."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:2])}"[:300]


@dataclass
class _Prepared:
    module: nn.Module
    step: Step | None
    call: Callable[[Tensor], Tensor] | None
    compile_s: float = math.nan
    error: str = ""


def _prepare(
    module: nn.Module,
    x: Tensor,
    g: Tensor,
    *,
    compiled: bool,
    backend: str | Callable[..., Any],
) -> _Prepared:
    """Wrap (and for compiled mode compile, timing the first step) one contender."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not compiled:
        return _Prepared(module, make_step(module, x, g, params), module)
    try:
        call = torch.compile(module, backend=backend, dynamic=False)
        step = make_step(call, x, g, params)
        dev = x.device
        sync(dev)
        t0 = time.perf_counter()
        step()  # compiles forward and backward
        sync(dev)
        return _Prepared(module, step, call, compile_s=time.perf_counter() - t0)
    except Exception as exc:  # a layer that does not compile is a finding, not a crash
        return _Prepared(module, None, None, error=_short_error(exc))


def measure_pair(
    pairing: Pairing,
    shape: Sequence[int],
    *,
    mode: str = "eager",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 20,
    warmup: int = 3,
    min_time: float = 0.02,
    backend: str | Callable[..., Any] = "inductor",
    seed: int = 0,
) -> dict[str, Any]:
    """One CSV row: ``pairing.layer`` vs ``pairing.baseline`` on one input shape in one mode."""
    if mode not in ("eager", "compiled"):
        raise ValueError(f"mode must be 'eager' or 'compiled', got {mode!r}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=dtype).to(dev).requires_grad_(True)
    g = torch.randn(tuple(shape), generator=gen, dtype=dtype).to(dev)
    kind = get_norm(pairing.layer).kind
    torch.manual_seed(seed)
    base = wrapped_layer(shape) if kind == "weight" else None
    row: dict[str, Any] = {
        "device": dev.type,
        "mode": mode,
        "layer": pairing.layer,
        "baseline": pairing.baseline,
        "pairing": pairing.note,
        "kind": kind,
        "shape": "x".join(str(s) for s in shape),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    errors: list[str] = []
    prepared: list[_Prepared] = []
    for side, name in (("scratch", pairing.layer), ("native", pairing.baseline)):
        try:
            module = build_contender(name, shape, device=dev, dtype=dtype, base=base)
        except Exception as exc:
            errors.append(f"{side}: {_short_error(exc)}")
            prepared.append(_Prepared(nn.Identity(), None, None))
            row[f"{side}_config"] = ""
            continue
        row[f"{side}_config"] = config_of(module)
        p = _prepare(module, x, g, compiled=mode == "compiled", backend=backend)
        if p.error:
            errors.append(f"{side}: {p.error}")
        prepared.append(p)
        row[f"compile_s_{side}"] = p.compile_s

    # saved bytes before timing (a fresh forward each; the graph is freed right after)
    for side, p in zip(("scratch", "native"), prepared, strict=True):
        nbytes: float = math.nan
        if p.call is not None:
            try:
                nbytes = saved_tensor_bytes(lambda p=p: p.call(x))  # type: ignore[misc]
            except Exception as exc:
                errors.append(f"{side} saved bytes: {_short_error(exc)}")
        row[f"saved_bytes_{side}"] = nbytes

    try:
        times, numbers = time_interleaved(
            [p.step for p in prepared],
            repeats=repeats,
            warmup=warmup,
            min_time=min_time,
            device=dev,
        )
    except Exception as exc:
        errors.append(f"timing: {_short_error(exc)}")
        times, numbers = [[], []], [0, 0]
    for side, ts, n in zip(("scratch", "native"), times, numbers, strict=True):
        row[f"number_{side}"] = n
        row[f"{side}_ms"] = 1e3 * statistics.median(ts) if ts else math.nan
        row[f"{side}_iqr_ms"] = 1e3 * iqr(ts) if ts else math.nan
    row["ratio"] = row["scratch_ms"] / row["native_ms"]
    row.update(ratio_spread([a / b for a, b in zip(times[0], times[1], strict=False)]))
    row["bytes_ratio"] = (
        row["saved_bytes_scratch"] / row["saved_bytes_native"]
        if row["saved_bytes_native"] and not math.isnan(row["saved_bytes_native"])
        else math.nan
    )
    row["error"] = "; ".join(errors)
    if mode == "compiled":
        torch._dynamo.reset()  # fresh caches: no entry ever reaches dynamo's recompile limit
    return {c: row.get(c, math.nan) for c in CSV_COLUMNS}


def ratio_spread(paired: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of the per-repeat ratios (one block of each side per repeat)."""
    if not paired:
        return {
            k: math.nan for k in ("paired_ratio", "ratio_q1", "ratio_q3", "ratio_min", "ratio_max")
        }
    q1 = q3 = paired[0]
    if len(paired) > 1:
        quartiles = statistics.quantiles(paired, n=4, method="inclusive")
        q1, q3 = quartiles[0], quartiles[2]
    return {"paired_ratio": statistics.median(paired), "ratio_q1": q1, "ratio_q3": q3,
            "ratio_min": min(paired), "ratio_max": max(paired)}  # fmt: skip


@dataclass
class BenchConfig:
    """What ``normzoo-bench`` measures (the command-line options)."""

    devices: list[str] = field(default_factory=lambda: ["cpu"])
    norms: list[str] | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=lambda: [*CONV_SHAPES, *DENSE_SHAPES])
    dtype: str = "float32"
    repeats: int = 20
    warmup: int = 3
    min_time: float = 0.02
    compile: bool = True
    backend: str = "inductor"
    #: torch threads; 1 by default (more threads on a shared machine: stalls in every parallel region)
    threads: int | None = 1
    seed: int = 0
    #: a ``--quick`` smoke test: too few and too short repeats to be a measurement
    quick: bool = False


def run_bench(config: BenchConfig, *, log: Log = _stderr) -> list[dict[str, Any]]:
    """Every (device, layer, shape, mode) row of ``config``; one progress line per row to ``log``."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"--dtype must be a floating torch dtype, got {config.dtype!r}")
    pairings = resolve_pairings(config.norms)
    modes = ["eager", "compiled"] if config.compile else ["eager"]
    plan = [
        (dev, p, s, m)
        for dev in config.devices
        for p in pairings
        for s in shapes_for(p, config.shapes)
        for m in modes
    ]
    rows = []
    for i, (dev, pairing, shape, mode) in enumerate(plan, 1):
        t0 = time.perf_counter()
        row = measure_pair(
            pairing,
            shape,
            mode=mode,
            device=dev,
            dtype=dtype,
            repeats=config.repeats,
            warmup=config.warmup,
            min_time=config.min_time,
            backend=config.backend,
            seed=config.seed,
        )
        rows.append(row)
        msg = (
            f"[{i}/{len(plan)}] {dev} {mode:8s} {pairing.layer:>12s} vs {pairing.baseline:<17s} "
            f"{row['shape']:>14s}: {row['scratch_ms']:8.3f} ms / {row['native_ms']:8.3f} ms = "
            f"{row['ratio']:.2f}x, bytes {row['bytes_ratio']:.3f}x ({time.perf_counter() - t0:.1f} s)"
        )
        if row["error"]:
            msg += f"  ERROR {row['error']}"
        log(msg)
    return rows
