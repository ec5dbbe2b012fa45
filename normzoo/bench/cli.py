"""The ``normzoo-bench`` command line: options -> :class:`BenchConfig` -> rows -> report."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from normzoo.bench.measure import CONV_SHAPES, DENSE_SHAPES, QUICK_SHAPES, BenchConfig, run_bench
from normzoo.bench.overhead import OverheadConfig, run_overhead
from normzoo.bench.overhead_report import write_overhead_report
from normzoo.bench.report import SMOKE, load_average, provenance, write_report
from normzoo.bench.summary import findings, summarise
from normzoo.bench.timing import steady_heap

__all__ = ["DEFAULT_OUT", "main"]

#: where ``normzoo-bench`` writes without ``--out`` (``--quick``: a temporary folder instead)
DEFAULT_OUT = "reports/bench"


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
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared machine more threads swing the "
        "timings by several times, a pre-empted OpenMP worker stalling every parallel region)",
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
        "a smoke test, not a measurement (labelled so in bench.md and the PNG)",
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="instead: the cost of normalising, one training step of each model with each layer "
        "against the same model with no norm (writes overhead.md and overhead.csv)",
    )
    p.add_argument(
        "--models",
        default="mlp,cnn",
        help="--overhead: comma-separated models (default mlp,cnn; resnet is resnet18 on 3x32x32)",
    )
    p.add_argument(
        "--batch-sizes",
        default="8,128",
        help="--overhead: comma-separated batch sizes (default 8,128)",
    )
    return p


def _overhead_config(args: argparse.Namespace, devices: list[str]) -> OverheadConfig:
    quick = args.quick
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"normzoo-bench: bad --batch-sizes {args.batch_sizes!r}") from None
    return OverheadConfig(
        devices=devices,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        batch_sizes=batches,
        norms=args.norms,
        repeats=args.repeats if args.repeats is not None else (2 if quick else 20),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        min_time=args.min_time if args.min_time is not None else (0.0 if quick else 0.02),
        threads=args.threads,
        seed=args.seed,
        quick=quick,
    )


def _main_overhead(args: argparse.Namespace, devices: list[str], info: dict[str, str]) -> int:
    """``--overhead``: measure, write overhead.md / .csv, print where."""
    config = _overhead_config(args, devices)
    t0 = time.perf_counter()
    try:
        rows = run_overhead(config, log=_stderr)
    except ValueError as exc:  # an unknown model or norm name
        print(f"normzoo-bench: {exc}", file=sys.stderr)
        return 2
    _finish_info(info, args)
    paths = write_overhead_report(rows, _out_dir(args), info=info, config=config,
                                  wall_s=time.perf_counter() - t0)  # fmt: skip
    print(f"normzoo-bench: wrote {paths['md']}, {paths['csv']}", file=sys.stderr)
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _finish_info(info: dict[str, str], args: argparse.Namespace) -> None:
    load = load_average()
    if load is not None:
        info["load average at end (1/5/15 min)"] = load
    if args.note:
        info["note"] = args.note


def _out_dir(args: argparse.Namespace) -> str | Path:
    if args.out is not None:
        return args.out
    return Path(tempfile.gettempdir(), "normzoo-bench-quick") if args.quick else DEFAULT_OUT


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
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.min_time < 0 or args.threads < 1:
        raise SystemExit(
            "normzoo-bench: need --repeats >= 1, --warmup >= 0, --min-time >= 0, --threads >= 1"
        )
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``normzoo-bench`` and ``python -m normzoo.bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    config = _config_from_args(args)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info = provenance(shlex.join(["normzoo-bench", *argv]))
    info["heap"] = steady_heap()
    if args.overhead:
        return _main_overhead(args, config.devices, info)
    t0 = time.perf_counter()
    try:
        rows = run_bench(config)
    except ValueError as exc:  # an unknown name or a layer without a baseline
        print(f"normzoo-bench: {exc}", file=sys.stderr)
        return 2
    _finish_info(info, args)
    paths = write_report(
        rows, _out_dir(args), info=info, config=config, wall_s=time.perf_counter() - t0
    )
    print(f"normzoo-bench: wrote {paths['md']}, {paths['csv']}, {paths['png']}", file=sys.stderr)
    if config.quick:
        print(f"normzoo-bench: {SMOKE}", file=sys.stderr)
    for line in findings(summarise(rows), smoke=config.quick):
        print(line)
    return 0
