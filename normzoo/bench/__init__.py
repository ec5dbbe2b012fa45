"""``normzoo-bench``: forward+backward time and saved-for-backward bytes, from-scratch vs native.

Every from-scratch layer in the registry is measured against a baseline, in training mode, on a fixed
set of input shapes, eagerly and under ``torch.compile``, on CPU (and CUDA when present). The parts:

| module | its concern |
|---|---|
| :mod:`~normzoo.bench.pairs` | which layer against which baseline (from the registry), the modules |
| :mod:`~normzoo.bench.timing` | the interleaved (ABBA) timing harness, the steady heap |
| :mod:`~normzoo.bench.memory` | the saved-for-backward bytes probe |
| :mod:`~normzoo.bench.measure` | one measured row (layer x shape x mode x device), the whole run |
| :mod:`~normzoo.bench.summary` | per-layer medians over shapes, the spread, the sentences |
| :mod:`~normzoo.bench.report`, :mod:`~normzoo.bench.figure` | ``bench.md`` / ``bench.csv``, the PNG |
| :mod:`~normzoo.bench.cli` | the command line (``normzoo-bench``, ``python -m normzoo.bench``) |
| :mod:`~normzoo.bench.overhead`, :mod:`~normzoo.bench.overhead_report` | ``--overhead``: a
  training step of each model with each layer against no norm; ``overhead.md`` / ``.csv`` |
| :mod:`~normzoo.bench.study_speed`, :mod:`~normzoo.bench.study_speed_report` | a whole study's
  wall time, from-scratch vs native (``normzoo-study-speed``) |

Output (``--out``, default ``reports/bench``): ``bench.csv`` (one row per layer x shape x mode x
device), ``bench.md`` and ``bench_ratios.png``; a layer's time is stated as a multiple of torch's
with the spread over repeats (see :mod:`~normzoo.bench.summary`).
"""

from normzoo.bench.cli import DEFAULT_OUT, main
from normzoo.bench.measure import (
    CONV_SHAPES,
    CSV_COLUMNS,
    DENSE_SHAPES,
    QUICK_SHAPES,
    BenchConfig,
    measure_pair,
    run_bench,
)
from normzoo.bench.memory import saved_tensor_bytes
from normzoo.bench.overhead import OverheadConfig, run_overhead
from normzoo.bench.pairs import NATURAL_BASELINES, Pairing, build_contender, resolve_pairings
from normzoo.bench.report import provenance, write_report
from normzoo.bench.summary import findings, summarise, time_phrase
from normzoo.bench.timing import steady_heap, time_interleaved

__all__ = [
    "CONV_SHAPES",
    "CSV_COLUMNS",
    "DEFAULT_OUT",
    "DENSE_SHAPES",
    "NATURAL_BASELINES",
    "QUICK_SHAPES",
    "BenchConfig",
    "OverheadConfig",
    "Pairing",
    "build_contender",
    "findings",
    "main",
    "measure_pair",
    "provenance",
    "resolve_pairings",
    "run_bench",
    "run_overhead",
    "saved_tensor_bytes",
    "steady_heap",
    "summarise",
    "time_interleaved",
    "time_phrase",
    "write_report",
]
