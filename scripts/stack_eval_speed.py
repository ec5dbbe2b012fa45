"""Would stacking the post-training work pay? K trained-shape cnn16 members evaluated one by one
against as one stacked model (``normzoo.run.stack_model.build_stack``), at the diagnostics' batch.

Two passes, as the diagnostics and the inference panel make them: eval mode (running statistics,
batch ``--batch``) and train-mode batch statistics in ghost batches of 2 (``frozen_forward``, the
grouped form the panel uses). One process, one thread, the sides interleaved, medians. From the
checkout's root::

    python -m scripts.stack_eval_speed
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from normzoo.layers import frozen_forward
from normzoo.models import build_model
from normzoo.run.stack_model import build_stack

CNN16 = {"name": "cnn", "channels": [16, 32, 32], "strides": [2, 2, 2], "kernel_size": 3,
         "head": "flatten", "hidden": []}  # fmt: skip


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, the callables interleaved."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            since = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - since)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k, options = args.members, {"ghost_batch_size": 2}
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(OmegaConf.create(CNN16), "batchnorm", options, (1, 16, 16), 10))
    stacked, _ = build_stack(models, [("batchnorm", options, k)])
    x = torch.randn(args.batch, 1, 16, 16)
    xs = x.repeat(1, k, 1, 1)  # every member's slice is x
    for mode, training in (("eval", False), ("train-mode ghost 2", True)):
        for m in (*models, stacked):
            m.train(training)
        got = median_ms({
            "one by one": lambda: [frozen_forward(m, x, None) for m in models],
            "stacked": lambda: frozen_forward(stacked, xs, None),
        }, args.repeats)  # fmt: skip
        mine = torch.stack([frozen_forward(m, x, None) for m in models], 1)
        diff = frozen_forward(stacked, xs, None).view(args.batch, k, -1) - mine
        print(f"{mode}, K={k}, batch {args.batch}: one by one {got['one by one']:.1f} ms, stacked "
              f"{got['stacked']:.1f} ms ({got['one by one'] / got['stacked']:.2f}x), "
              f"max |diff| {diff.abs().max():.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
