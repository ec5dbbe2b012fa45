"""``normzoo-bench``: forward+backward time and saved-for-backward bytes, from-scratch vs native.

Every from-scratch layer in the registry is measured against a baseline, in training mode, on a fixed
set of input shapes, eagerly and under ``torch.compile``, on CPU (and CUDA when present):

* **Pairs** are read from the registry: a spec's ``native`` names its torch reference
  (``batchnorm`` -> ``native_batchnorm``); a layer without one gets its natural baseline from
  :data:`NATURAL_BASELINES` (Batch Renorm -> ``native_batchnorm``: r = 1, d = 0 is BatchNorm).
  ``--norms a:b`` pairs any two registry names (``--norms none:none`` exercises the harness).
* **Modules.** An ``activation`` entry is ``build_norm(name, C)`` on an (N, C, *S) input. A ``weight``
  entry reparametrises a layer that both contenders get an identical copy of: ``Conv2d(C, C, 3,
  padding=1)`` for a conv shape, ``Linear(C, C)`` for a dense one, so its time includes the conv.
* **Time** of one step = ``y = m(x); y.backward(g)`` with a fixed random ``g`` and ``x`` requiring
  grad (as inside a network), then every ``.grad`` set to None. The two contenders are interleaved in
  one process, in ABBA order (A,B then B,A ...), so machine noise hits both alike. A repeat runs a
  block of ``number`` steps (calibrated per contender so one block lasts ``min_time``) and records the
  mean step; the reported time is the median over repeats; CUDA is synchronised around each block.
* **Saved bytes** (:func:`saved_tensor_bytes`): the tensors autograd packs during one forward, caught
  with ``torch.autograd.graph.saved_tensors_hooks``; the sum of the sizes of their *unique storages*
  (deduplicated by device and storage data pointer, a view counting its whole storage). A saved tensor
  that is the input or a parameter counts too, for both contenders alike: it is what the graph keeps.
  Measured in eager and in compiled mode (where the saved set is the compiled graph's).
* **Compiled** mode wraps each module in ``torch.compile(module, dynamic=False)``; the first step
  (compilation of forward and backward) is timed separately, then warm-up steps run before timing.
  Dynamo's caches are reset between measurements so no entry hits the recompile limit. A contender
  that fails to compile leaves its error in the row; the run goes on.

Output (``--out``, default ``reports/bench``): ``bench.csv`` (one row per layer x shape x mode x device),
``bench.md`` (provenance, per-shape table, per-layer summary against the issue-5 targets) and
``bench_ratios.png``. Ratios are from-scratch / baseline: ``ratio = scratch_ms / native_ms``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.registry import canonical_name, get_norm, list_norms

__all__ = [
    "CONV_SHAPES",
    "CSV_COLUMNS",
    "DENSE_SHAPES",
    "NATURAL_BASELINES",
    "QUICK_SHAPES",
    "TARGETS",
    "BenchConfig",
    "Pairing",
    "build_contender",
    "main",
    "measure_pair",
    "resolve_pairings",
    "run_bench",
    "saved_tensor_bytes",
    "summarise",
    "time_interleaved",
    "write_report",
]

#: the documented shape set (issue 5): conv inputs (N, C, H, W) and dense inputs (N, C)
CONV_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 32, 32),
    (128, 64, 16, 16),
    (2, 64, 32, 32),
    (8, 256, 14, 14),
)
DENSE_SHAPES: tuple[tuple[int, ...], ...] = ((256, 256), (2, 512))
#: where ``normzoo-bench`` writes without ``--out`` (``--quick``: a temporary folder instead)
DEFAULT_OUT = "reports/bench"

#: bench.md's line for a ``--quick`` run
_QUICK_NOTE = (
    "- **smoke test** (`--quick`): too few and too short repeats for the ratios to mean much; "
    "no verdicts on the targets"
)

#: ``--quick``: one tiny conv shape (C = 32 so GroupNorm's default 32 groups divide it)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((4, 32, 8, 8),)

#: baseline of a from-scratch layer that has no native twin (registry name -> baseline name)
NATURAL_BASELINES: dict[str, str] = {"batchrenorm": "native_batchnorm"}

#: issue-5 targets on the per-layer median ratio from-scratch / native over the shape set
TARGETS: dict[str, float] = {"eager": 1.3, "compiled": 1.0, "memory": 1.0}

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


# --------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class Pairing:
    """One benchmarked layer and the baseline it is measured against."""

    layer: str
    baseline: str
    #: why this baseline: "native reference", "natural baseline (no native)" or "explicit pair"
    note: str


def resolve_pairings(norms: Sequence[str] | None = None) -> list[Pairing]:
    """The (layer, baseline) pairs to benchmark.

    ``norms=None``: every non-reference registry entry with ``spec.native`` or a
    :data:`NATURAL_BASELINES` entry (so ``none`` is left out). Otherwise each item is a registry name
    (or alias), resolved the same way, or ``"layer:baseline"`` for an explicit pair.

    Raises:
        ValueError: a named layer has no baseline, or the two sides of a pair differ in kind.
    """
    if norms is None:
        names = [n for n in list_norms(references=False) if _baseline_of(n) is not None]
        return [_pair(n) for n in names]
    out: list[Pairing] = []
    for item in norms:
        if ":" in item:
            left, right = (s.strip() for s in item.split(":", 1))
            a, b = get_norm(left), get_norm(right)
            if a.kind != b.kind:
                raise ValueError(f"cannot pair {a.name!r} ({a.kind}) with {b.name!r} ({b.kind})")
            out.append(Pairing(a.name, b.name, "explicit pair"))
        else:
            out.append(_pair(get_norm(item).name))
    return out


def _baseline_of(name: str) -> tuple[str, str] | None:
    spec = get_norm(name)
    if spec.native:
        return get_norm(spec.native).name, "native reference"
    natural = NATURAL_BASELINES.get(canonical_name(spec.name))
    if natural is not None:
        return get_norm(natural).name, "natural baseline (no native)"
    return None


def _pair(name: str) -> Pairing:
    found = _baseline_of(name)
    if found is None:
        raise ValueError(
            f"norm {name!r} has no native reference and no natural baseline; "
            f"name one explicitly as '{name}:<baseline>'"
        )
    return Pairing(name, *found)


# ------------------------------------------------------------------------------------- modules
def _wrapped_layer(shape: Sequence[int]) -> nn.Module:
    """The conv/linear a ``weight`` entry reparametrises for an input of ``shape``."""
    c = shape[1]
    if len(shape) == 2:
        return nn.Linear(c, c)
    if len(shape) == 4:
        return nn.Conv2d(c, c, 3, padding=1)
    raise ValueError(f"weight norms are benchmarked on 2-D or 4-D inputs, got shape {tuple(shape)}")


def build_contender(
    name: str,
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    base: nn.Module | None = None,
) -> nn.Module:
    """The registry entry ``name`` as a module for input ``shape``, in training mode.

    ``activation`` entries get ``C = shape[1]``, ``last_dim`` entries the last dim; ``weight`` entries wrap a deep copy of ``base``
    (default: :func:`_wrapped_layer`), so both contenders of a pair start from the same weights.
    """
    from normzoo.registry import build_norm

    spec = get_norm(name)
    if spec.kind == "weight":
        layer = copy.deepcopy(base) if base is not None else _wrapped_layer(shape)
        module = build_norm(name, layer.to(device=device, dtype=dtype))
    elif spec.kind == "last_dim":  # (torch's LayerNorm / RMSNorm API: over the last dim)
        module = build_norm(name, int(shape[-1]))
    else:
        module = build_norm(name, int(shape[1]))
    return module.to(device=device, dtype=dtype).train()


def _config_of(module: nn.Module) -> str:
    """A one-line description of the module's options (its ``extra_repr`` or class name)."""
    text = module.extra_repr() or type(module).__name__
    return f"{type(module).__name__}({text})".replace("\n", " ")


# ---------------------------------------------------------------------------------- measuring
def saved_tensor_bytes(forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs.

    Every tensor packed by autograd (``ctx.save_for_backward``, built-in ops' saved inputs/outputs)
    is caught with ``torch.autograd.graph.saved_tensors_hooks``; the result is the sum of
    ``untyped_storage().nbytes()`` over the distinct storages (keyed by device and storage pointer).
    So a view counts its whole storage, two views of one storage count once, and a saved tensor that
    is the caller's input or a parameter counts too.
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (
            RuntimeError,
            NotImplementedError,
        ):  # a tensor without storage (e.g. some subclasses)
            return t
        nbytes = storage.nbytes()
        if nbytes:
            storages[(str(t.device), storage.data_ptr())] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


Step = Callable[[], None]


def _make_step(
    module: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, params: list[Tensor]
) -> Step:
    def step() -> None:
        y = module(x)
        y.backward(g)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(step: Step, number: int, device: torch.device) -> float:
    """Mean seconds of one step over a block of ``number`` steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        step()
    _sync(device)
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


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


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
        return _Prepared(module, _make_step(module, x, g, params), module)
    try:
        call = torch.compile(module, backend=backend, dynamic=False)
        step = _make_step(call, x, g, params)
        dev = x.device
        _sync(dev)
        t0 = time.perf_counter()
        step()  # compiles forward and backward
        _sync(dev)
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
    base = _wrapped_layer(shape) if kind == "weight" else None
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
        row[f"{side}_config"] = _config_of(module)
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
        row[f"{side}_iqr_ms"] = 1e3 * _iqr(ts) if ts else math.nan
    row["ratio"] = row["scratch_ms"] / row["native_ms"]
    paired = [a / b for a, b in zip(times[0], times[1], strict=False)]
    row["paired_ratio"] = statistics.median(paired) if paired else math.nan
    row["bytes_ratio"] = (
        row["saved_bytes_scratch"] / row["saved_bytes_native"]
        if row["saved_bytes_native"] and not math.isnan(row["saved_bytes_native"])
        else math.nan
    )
    row["error"] = "; ".join(errors)
    if mode == "compiled":
        torch._dynamo.reset()  # fresh caches: no entry ever reaches dynamo's recompile limit
    return {c: row.get(c, math.nan) for c in CSV_COLUMNS}


# ----------------------------------------------------------------------------------- the run
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
    threads: int | None = None
    seed: int = 0
    #: a ``--quick`` smoke test: too few repeats for a verdict on the targets
    quick: bool = False


def _shapes_for(pairing: Pairing, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    spatial = get_norm(pairing.layer).needs_spatial or get_norm(pairing.baseline).needs_spatial
    return [s for s in shapes if not (spatial and len(s) < 3)]


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
        for s in _shapes_for(p, config.shapes)
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


# ---------------------------------------------------------------------------------- reporting
def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def summarise(rows: Sequence[dict[str, Any]], *, verdicts: bool = True) -> list[dict[str, Any]]:
    """Per (device, layer): median ratios over shapes and pass/fail against :data:`TARGETS`.

    ``memory`` is the median over shapes of the eager saved-bytes ratio (``memory_max`` the worst
    shape). A target is ``pass``/``FAIL``, or ``n/a`` when nothing was measured (``smoke`` for
    every target with ``verdicts=False``: a ``--quick`` run is too short to judge).

    ``native_fused`` is a reference, not a target: the median over shapes of the *baseline's*
    compiled time over its eager time (matched by shape), i.e. how torch's own decomposition of the
    layer into tensor ops fares against its hand-fused eager kernel once inductor fuses it.
    """
    keys = list(dict.fromkeys((r["device"], r["layer"], r["baseline"], r["pairing"]) for r in rows))
    out = []
    for dev, layer, baseline, note in keys:
        mine = [r for r in rows if r["device"] == dev and r["layer"] == layer]
        eager = [r for r in mine if r["mode"] == "eager"]
        comp = [r for r in mine if r["mode"] == "compiled"]
        native_eager = {r["shape"]: r["native_ms"] for r in eager if r["native_ms"] > 0}
        s: dict[str, Any] = {
            "device": dev,
            "layer": layer,
            "baseline": baseline,
            "pairing": note,
            "shapes": len(eager) or len(comp),
            "eager": _median([r["ratio"] for r in eager]),
            "compiled": _median([r["ratio"] for r in comp]),
            "memory": _median([r["bytes_ratio"] for r in eager]),
            "memory_max": max(
                (r["bytes_ratio"] for r in eager if not math.isnan(r["bytes_ratio"])),
                default=math.nan,
            ),
            "memory_compiled": _median([r["bytes_ratio"] for r in comp]),
            "native_fused": _median(
                [
                    r["native_ms"] / native_eager[r["shape"]]
                    for r in comp
                    if r["shape"] in native_eager
                ]
            ),
            "errors": sum(1 for r in mine if r["error"]),
        }
        for metric, target in TARGETS.items():
            v = s[metric]
            s[f"{metric}_ok"] = (
                "n/a"
                if math.isnan(v)
                else ("smoke" if not verdicts else ("pass" if v <= target else "FAIL"))
            )
        out.append(s)
    return out


def _git_rev() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not dirty.strip():
        return rev
    paths = [line[3:] for line in dirty.splitlines() if line.strip()]
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return f"{rev} (uncommitted changes in {', '.join(paths[:5])}{more})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str) -> dict[str, str]:
    """Machine and software facts recorded at the top of ``bench.md``."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "git revision": _git_rev(),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        info["cuda"] = "not available"
    return info


def _fmt(v: Any, spec: str = ".2f") -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else format(v, spec)
    return str(v)


def _md_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per metric: bars from 1.0 to the per-layer median ratio (one colour per device),
    dots for the single shapes, the issue-5 target as a dashed line. Time panels use a log2 axis
    (a ratio is multiplicative: 2x slower and 2x faster sit equally far from 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    titles = {"eager": "eager fwd+bwd time", "compiled": "compiled fwd+bwd time",
              "memory": "saved-for-backward bytes (eager)"}  # fmt: skip
    per_shape = {"eager": ("eager", "ratio"), "compiled": ("compiled", "ratio"),
                 "memory": ("eager", "bytes_ratio")}  # fmt: skip
    metrics = [m for m in TARGETS if any(not math.isnan(s[m]) for s in summary)] or ["eager"]
    layers = list(dict.fromkeys(s["layer"] for s in summary))
    devices = list(dict.fromkeys(s["device"] for s in summary))
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(1.2 + 0.75 * max(len(layers), 3) * len(metrics), 4.0),
        squeeze=False,
    )
    width = 0.8 / max(len(devices), 1)
    for ax, metric in zip(axes[0], metrics, strict=True):
        mode, column = per_shape[metric]
        if metric != "memory":
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        for j, dev in enumerate(devices):
            offset = (j - (len(devices) - 1) / 2) * width
            vals = [
                next(
                    (s[metric] for s in summary if (s["layer"], s["device"]) == (lay, dev)),
                    math.nan,
                )
                for lay in layers
            ]
            bars = ax.bar([i + offset for i in range(len(layers))], [v - 1 for v in vals],
                          bottom=1.0, width=width, color=f"C{j}", alpha=0.75)  # fmt: skip
            labels = [_fmt(v, ".3f" if metric == "memory" else ".2f") for v in vals]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
            for i, lay in enumerate(layers):
                pts = [r[column] for r in rows
                       if (r["layer"], r["device"], r["mode"]) == (lay, dev, mode)]  # fmt: skip
                ax.plot([i + offset] * len(pts), pts, "k.", ms=3, alpha=0.6)
        ax.axhline(TARGETS[metric], color="crimson", ls="--", lw=1.2)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
        ax.set_title(f"{titles[metric]} (target <= {TARGETS[metric]}x)", fontsize=9)
        ax.set_ylabel("from-scratch / native")
        ax.margins(y=0.12)
        lo, hi = ax.get_ylim()
        if metric == "memory":  # room above 1.0 for the bar labels
            ax.set_ylim(min(lo, 0.95), max(hi, 1.0) + 0.06 * (max(hi, 1.0) - min(lo, 0.95)))
        else:  # readable ticks on the log axis, also when the range is narrow
            ticks = [0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32, 64]
            ax.set_yticks([t for t in ticks if lo <= t <= hi])
            ax.yaxis.set_minor_locator(NullLocator())
    handles: list[Any] = [
        plt.Rectangle((0, 0), 1, 1, color=f"C{j}", alpha=0.75) for j in range(len(devices))
    ]
    handles += [plt.Line2D([], [], color="crimson", ls="--"),
                plt.Line2D([], [], color="k", ls="", marker=".")]  # fmt: skip
    fig.legend(handles, [*devices, "target", "single shapes"], loc="upper right", fontsize=8,
               ncol=len(devices) + 2, frameon=False)  # fmt: skip
    fig.suptitle("from-scratch / native: median over shapes (bars from 1.0)", fontsize=10, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    info: dict[str, str],
    config: BenchConfig,
    wall_s: float,
) -> dict[str, Path]:
    """Write ``bench.csv``, ``bench_ratios.png`` and ``bench.md`` into ``out_dir``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "bench.csv", "md": out / "bench.md", "png": out / "bench_ratios.png"}
    pd.DataFrame(list(rows), columns=list(CSV_COLUMNS)).to_csv(paths["csv"], index=False)
    summary = summarise(rows, verdicts=not config.quick)
    _plot(rows, summary, paths["png"])

    md = ["# normzoo-bench: from-scratch layers vs native torch", ""]
    md += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in info.items()]
    md += [
        f"- **settings**: dtype {config.dtype}, repeats {config.repeats}, warm-up {config.warmup}, "
        f"min block time {config.min_time} s, compile {'on (' + config.backend + ')' if config.compile else 'off'}",
        f"- **wall time of the run**: {wall_s:.0f} s",
        *([_QUICK_NOTE] if config.quick else []),
        "",
        "## What is measured",
        "",
        "One step = forward + backward in training mode: `y = m(x); y.backward(g)` with `x` requiring grad "
        "and a fixed random `g`, grads set to None after each step. The from-scratch layer and its "
        "baseline are timed interleaved in one process (ABBA order), each repeat a block of steps "
        "lasting at least the min block time; times are medians over repeats. "
        "`ratio` = from-scratch median / baseline median; `paired` = median of the per-repeat ratios. "
        "Saved bytes = sum of the distinct storages autograd packs for backward in one forward "
        "(`saved_tensors_hooks`, deduplicated by storage pointer; a saved input or parameter counts too), "
        "the same rule for both contenders. Weight norms are timed on the layer they reparametrise "
        "(`Conv2d(C, C, 3, padding=1)` for conv shapes, `Linear(C, C)` for dense), so the conv's own cost "
        "is in both times. Layers that need spatial dims skip the dense shapes. Compiled: "
        "`torch.compile(m, dynamic=False)`, the first step (compilation) timed separately.",
        "",
        "## Summary per layer (median over shapes; targets of issue 5)",
        "",
    ]
    md.append(
        _md_table(
            [
                "device",
                "layer",
                "baseline",
                "shapes",
                f"eager (<= {TARGETS['eager']})",
                f"compiled (<= {TARGETS['compiled']})",
                f"memory (<= {TARGETS['memory']})",
                "memory worst shape",
                "memory compiled",
                "rows with errors",
                "baseline compiled / eager (reference)",
            ],
            [
                [
                    s["device"],
                    s["layer"],
                    s["baseline"]
                    + ("" if s["pairing"] == "native reference" else f" — {s['pairing']}"),
                    s["shapes"],
                    f"{_fmt(s['eager'], '.3f')} {s['eager_ok']}",
                    f"{_fmt(s['compiled'], '.3f')} {s['compiled_ok']}",
                    f"{_fmt(s['memory'], '.3f')} {s['memory_ok']}",
                    _fmt(s["memory_max"], ".3f"),
                    _fmt(s["memory_compiled"], ".3f"),
                    s["errors"],
                    _fmt(s["native_fused"]),
                ]
                for s in summary
            ],
        )
    )
    md += [
        "",
        "The last column is a reference, not a target: the baseline's own compiled time over its "
        "eager time (median over shapes), i.e. torch's decomposition of the layer into tensor ops, "
        "fused by inductor, against torch's hand-written eager kernel. Where it is well above the "
        "eager target, even a fused composition of tensor ops is that much slower than the eager "
        "kernel on this machine; an eager from-scratch layer runs one kernel per op, unfused.",
        "",
        f"![ratios per layer]({paths['png'].name})",
        "",
        "## Per shape",
        "",
    ]
    md.append(
        _md_table(
            [
                "device",
                "mode",
                "layer",
                "baseline",
                "shape",
                "scratch ms",
                "native ms",
                "ratio",
                "paired",
                "saved KiB scratch",
                "saved KiB native",
                "bytes ratio",
                "compile s (scratch/native)",
                "error",
            ],
            [
                [
                    r["device"],
                    r["mode"],
                    r["layer"],
                    r["baseline"],
                    r["shape"],
                    _fmt(r["scratch_ms"], ".3f"),
                    _fmt(r["native_ms"], ".3f"),
                    _fmt(r["ratio"]),
                    _fmt(r["paired_ratio"]),
                    _fmt(r["saved_bytes_scratch"] / 1024, ".0f"),
                    _fmt(r["saved_bytes_native"] / 1024, ".0f"),
                    _fmt(r["bytes_ratio"], ".3f"),
                    ""
                    if r["mode"] == "eager"
                    else f"{_fmt(r['compile_s_scratch'], '.1f')} / {_fmt(r['compile_s_native'], '.1f')}",
                    str(r["error"]).replace("|", "/"),
                ]
                for r in rows
            ],
        )
    )
    md += [
        "",
        "Raw numbers (with IQRs, block sizes and module configs): [bench.csv](bench.csv).",
        "",
    ]
    paths["md"].write_text("\n".join(md))
    return paths


# ----------------------------------------------------------------------------------------- CLI
def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: use N,C[,H,W] or NxCxHxW") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: need at least (N, C), all positive")
    return shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normzoo-bench",
        description="Forward+backward time and saved-for-backward bytes of every from-scratch norm "
        "vs its native torch reference (eager and torch.compile). Writes bench.csv, bench.md and a PNG.",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="auto: CPU, plus CUDA when present (default)",
    )
    p.add_argument(
        "--norms",
        nargs="+",
        metavar="NAME[:BASELINE]",
        help="layers to benchmark (default: every from-scratch norm with a baseline)",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_parse_shape,
        metavar="N,C[,H,W]",
        help="input shapes (default: conv 32,64,32,32 128,64,16,16 2,64,32,32 8,256,14,14; "
        "dense 256,256 2,512)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed blocks per contender (default 20)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds a timed block lasts at least (default 0.02)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile'd modules (default on; off with --quick)",
    )
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text recorded in bench.md (e.g. machine load)")
    p.add_argument(
        "--out",
        default=None,
        help=f"output folder (default {DEFAULT_OUT}; with --quick <temp dir>/normzoo-bench-quick, "
        "so a smoke test never overwrites the shipped benchmark)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: shape 4,32,8,8, 2 repeats, 1 warm-up, 1 step per block, no compile; "
        "no pass/FAIL verdicts",
    )
    return p


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("normzoo-bench: --device cuda but CUDA is not available")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"]}.get(
        args.device, ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    )
    quick = args.quick
    cfg = BenchConfig(
        devices=devices,
        norms=args.norms,
        shapes=list(args.shapes or (QUICK_SHAPES if quick else [*CONV_SHAPES, *DENSE_SHAPES])),
        dtype=args.dtype,
        repeats=args.repeats if args.repeats is not None else (2 if quick else 20),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        min_time=args.min_time if args.min_time is not None else (0.0 if quick else 0.02),
        compile=args.compile if args.compile is not None else not quick,
        backend=args.backend,
        threads=args.threads,
        seed=args.seed,
        quick=quick,
    )
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.min_time < 0:
        raise SystemExit("normzoo-bench: need --repeats >= 1, --warmup >= 0, --min-time >= 0")
    return cfg


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``normzoo-bench`` and ``python -m normzoo.bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    config = _config_from_args(args)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info = provenance(shlex.join(["normzoo-bench", *argv]))
    info["heap"] = steady_heap()
    t0 = time.perf_counter()
    try:
        rows = run_bench(config)
    except ValueError as exc:  # an unknown name or a layer without a baseline
        print(f"normzoo-bench: {exc}", file=sys.stderr)
        return 2
    if hasattr(os, "getloadavg"):
        info["load average at end (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.note:
        info["note"] = args.note
    out = args.out
    if out is None:
        out = Path(tempfile.gettempdir(), "normzoo-bench-quick") if config.quick else DEFAULT_OUT
    paths = write_report(rows, out, info=info, config=config, wall_s=time.perf_counter() - t0)
    print(f"normzoo-bench: wrote {paths['md']}, {paths['csv']}, {paths['png']}", file=sys.stderr)
    for s in summarise(rows, verdicts=not config.quick):
        print(
            f"{s['device']} {s['layer']:>12s} vs {s['baseline']:<17s} eager {_fmt(s['eager'], '.3f')} "
            f"({s['eager_ok']}), compiled {_fmt(s['compiled'], '.3f')} ({s['compiled_ok']}), "
            f"memory {_fmt(s['memory'], '.3f')} ({s['memory_ok']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
