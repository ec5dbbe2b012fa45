"""Ghost batches on CPU: the current code vs the routes it replaced, forward + backward.

``ghost_batch_norm`` (BatchNorm / Batch Renorm over ghost batches: BatchNorm's Function on the
(K, G, C, R) view) against the route before it (the same Function over (ghost batch, channel)
pairs, a rearranged copy: ``ghost_batch_norm(..., _pairs_only=True)``), and ``batch_moments``
(mean-only BN, BatchInstanceNorm, SwitchableNorm) against its var_mean form
(``normzoo.testing.ghost_reference``). One process, float32, one thread, the two sides
interleaved (the order alternating), medians of ``--repeats`` timed calls; also the max
absolute difference of the outputs and the grads (input, gamma, beta) in float32 and float64.
Writes markdown to ``--out``. From the checkout's root (``-m``: the checkout's own normzoo,
which the script checks)::

    python -m scripts.bench_ghost
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.norms._ghost import batch_moments, ghost_batch_norm
from normzoo.provenance import cpu_model, git_dirty, git_revision, now_utc, source_root
from normzoo.testing.ghost_reference import var_mean_batch_moments

#: one model's layer inputs in the default study, and a stack of models trained as one (K * C)
SHAPES = [(32, 16, 8, 8), (32, 32, 4, 4), (32, 32, 2, 2), (32, 128)]
STACKED = [(32, 480, 8, 8), (32, 960, 4, 4), (32, 960, 2, 2), (32, 3840)]
GHOSTS = (2, 8)
EPS = 1e-5


Step = Callable[[], list[Tensor]]


def norm_step(fn: Callable, x: Tensor, size: int, renorm: bool) -> Step:
    """One forward + backward of ``fn`` (a ghost_batch_norm) on x; returns y and the grads."""
    c = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    weight = torch.rand(c, generator=gen, dtype=x.dtype) + 0.5
    bias = torch.randn(c, generator=gen, dtype=x.dtype)
    dy = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    moving = None
    if renorm:  # moving statistics off the batches' and limits that clip part of the pairs
        ref_mean = torch.randn(c, generator=gen, dtype=x.dtype) * 0.2 + 1
        ref_var = torch.rand(c, generator=gen, dtype=x.dtype) * 4 + 2
        moving = (ref_mean, ref_var, torch.tensor([1.2, 0.3], dtype=x.dtype))

    def step() -> list[Tensor]:
        inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        y = fn(*inputs, EPS, size, moving)[0]
        y.backward(dy)
        return [y.detach(), *(t.grad for t in inputs)]

    return step


def moments_step(fn: Callable, x: Tensor, size: int) -> Step:
    """One forward + backward of ``fn`` (a batch_moments); the loss weighs its mean and var."""
    gen = torch.Generator().manual_seed(2)
    shape = (x.shape[0], x.shape[1], *[1] * (x.dim() - 2))
    a, b = (torch.randn(shape, generator=gen, dtype=x.dtype) for _ in range(2))

    def step() -> list[Tensor]:
        inp = x.clone().requires_grad_(True)
        mean, var, _, _ = fn(inp, size)
        (mean * a + var * b).sum().backward()
        return [mean.detach(), var.detach(), inp.grad]

    return step


def timed(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def compare(old: Step, new: Step, repeats: int) -> tuple[float, float]:
    """Median seconds of ``old`` and ``new``, interleaved (order alternating), after a warm-up."""
    for _ in range(3):
        old(), new()
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            times[side].append(timed((old, new)[side]))
    return statistics.median(times[0]), statistics.median(times[1])


def max_diff(old: Step, new: Step) -> float:
    return max((a - b).abs().max().item() for a, b in zip(old(), new(), strict=True))


def row(
    shape: tuple[int, ...], size: int, label: str, make: Callable, fns: tuple, repeats: int
) -> list:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 1
    old, new = make(fns[0], x), make(fns[1], x)
    t_old, t_new = compare(old, new, repeats)
    diff64 = max_diff(make(fns[0], x.double()), make(fns[1], x.double()))
    return [
        "x".join(map(str, shape)),
        size,
        label,
        f"{t_old * 1e3:.2f}",
        f"{t_new * 1e3:.2f}",
        f"{t_old / t_new:.2f}x",
        f"{max_diff(old, new):.1e}",
        f"{diff64:.1e}",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", default="reports/bench/ghost_fast_path.md")
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1]
    if source_root() != here:
        p.error(
            f"normzoo is imported from {source_root()}, not {here}: run python -m scripts.bench_ghost there"
        )
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    norm_rows, moment_rows = [], []
    for shape in SHAPES + STACKED:
        for size in GHOSTS:
            for label, renorm in (("BN", False), ("BRN", True)):
                make = functools.partial(norm_step, size=size, renorm=renorm)
                fns = (functools.partial(ghost_batch_norm, _pairs_only=True), ghost_batch_norm)
                norm_rows.append(row(shape, size, label, make, fns, args.repeats))
                print(*norm_rows[-1], flush=True)
            make = functools.partial(moments_step, size=size)
            fns = (var_mean_batch_moments, batch_moments)
            moment_rows.append(row(shape, size, "moments", make, fns, args.repeats))
            print(*moment_rows[-1], flush=True)
    header = ["input", "ghost", "layer", "before ms", "now ms", "speed-up", "max diff f32",
              "max diff f64"]  # fmt: skip
    dirty = git_dirty()
    text = "\n".join(
        [
            "# Ghost batches on CPU: forward + backward, before and now",
            "",
            f"`python -m scripts.bench_ghost --repeats {args.repeats}`, {now_utc()}, revision "
            f"{git_revision(short=True)}{' (dirty: ' + ', '.join(dirty) + ')' if dirty else ''}, "
            f"torch {torch.__version__}, {cpu_model()}, 1 thread, float32; load average "
            f"{load:.2f} at the start (a shared 2-core VM: medians, not minima, and the ratios "
            "move by ~10% between runs).",
            "",
            "One process; each row times the two sides interleaved (order alternating) and gives "
            "the medians of the timed calls (one forward + backward each, from a clone of x with "
            "requires_grad). The first four inputs are the default study's layer inputs of one "
            "model (batch 32), the last four a stack of models trained as one (K * C channels). "
            "max diff: the largest absolute difference of the outputs and the grads between the "
            "two sides (x ~ N(1, 4)).",
            "",
            "## ghost_batch_norm: BatchNorm (BN) and Batch Renorm (BRN)",
            "",
            "Before: BatchNorm's Function over the (ghost batch, channel) pairs, a rearranged copy "
            "(G, K * C, *S) of x with gamma, beta and the moving statistics repeated K times "
            "(normzoo b5c7d5c; `ghost_batch_norm(..., _pairs_only=True)`, the route channels-last "
            "input still takes). Now: the same Function on the (K, G, C, R) view of x, the "
            "vectors (C,) broadcast (`normzoo.norms._ghost`). (The pairs route against the "
            "composed var_mean and autograd before it: this file at b5c7d5c.) Grads: x, gamma, "
            "beta; Batch Renorm with limits (1.2, 0.3) that clip part of the pairs. At ghost "
            "size 2 on "
            "(32, 128), (32, 960, 2, 2) and (32, 3840) (2 to 8 values per pair) some pair has "
            "mean^2 / var > 64, so the Function takes its centred fallback (one more pass each "
            "way); the smallest inputs pay the Function's fixed per-call cost.",
            "",
            md_table(header, norm_rows),
            "",
            "## batch_moments (mean-only BN, BatchInstanceNorm, SwitchableNorm)",
            "",
            "Before: var_mean on the views (867afca, with its ghost_views). Now: centred two-pass "
            "moments (`normzoo.norms._ghost.batch_moments`). "
            "Loss: sum(mean * a + var * b) over the per-sample (N, C, 1..) moments, so the time is "
            "the moments' alone; max diff over mean, var and the grad of x.",
            "",
            md_table(header, moment_rows),
            "",
        ]
    )
    write_text_atomic(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
