"""Design evidence for Study v2 (issue 13): validation error per layer x batch at equal steps.

Every number comes from the *validation* split: the runs go through the study's own harness
(``normzoo.train.run``, the ``digits`` experiment's optimizer, schedule and clip), but the bundle
handed to it carries the validation split in its test slots, so the test split is never evaluated.

Equal steps with today's epoch-based harness: a run of S steps at batch B trains E = ceil(S * B / N)
epochs on a seeded random subset of (S // E) * B of the N training samples (at E = 1 the same draw as
the first S batches of a full epoch; at E > 1 a few samples are left out, under one epoch's share).

``--sgd-batch B`` keeps the SGD batch B fixed; ``--batches`` are then BatchNorm's ghost batches
(statistics over chunks of G samples, Hoffer et al. 2017): :class:`GhostBatch` stands in for the
harness's ``norm.ghost_batch_size`` until it has one.

    python reports/digits/design/sweep.py --norms bn,gn --batches 2,4,32,128 --steps 400 \\
        --seeds 0,1 --out /tmp/design.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

import normzoo.config
import normzoo.models
import normzoo.train
from normzoo.config import CONF_DIR
from normzoo.data import DataBundle, load_data
from normzoo.registry import get_norm

normzoo.config.DATASETS = (*normzoo.config.DATASETS, "digits_hard")  # until the schema has it


class GhostBatch(nn.Module):
    """BatchNorm ``layer`` with statistics per chunk of ``size`` samples in training.

    y = (x - mu_k) / sqrt(sigma2_k + eps) * gamma + beta, (mu_k, sigma2_k) over chunk k's samples
    and spatial dims; one running-stat update per step with the chunks' mean mu_k and mean
    unbiased sigma2_k. Eval: ``layer`` itself (its running statistics).
    """

    def __init__(self, layer: nn.Module, size: int) -> None:
        super().__init__()
        self.layer, self.size = layer, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.layer
        if not self.training or len(x) <= self.size:
            return bn(x)
        chunks = x.unflatten(0, (-1, self.size))  # (K, g, C, *S)
        dims = (1, *range(3, chunks.dim()))
        mean = chunks.mean(dim=dims, keepdim=True)
        var = chunks.var(dim=dims, unbiased=False, keepdim=True)
        shape = (1, 1, -1, *[1] * (chunks.dim() - 3))
        y = (chunks - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape)
        y = y + bn.bias.view(shape)
        m = chunks[0, :, 0].numel()  # values per chunk and channel
        with torch.no_grad():
            momentum = bn.momentum
            bn.running_mean.lerp_(mean.mean(dim=0).flatten(), momentum)
            bn.running_var.lerp_(var.mean(dim=0).flatten() * m / (m - 1), momentum)
            bn.num_batches_tracked += 1
        return y.flatten(0, 1)


def _patch(cfg_data, steps: int, seed: int, val_fraction: float, ghost: int) -> int:
    """Point the harness at the validation split and an S-step budget; returns the epochs."""
    full, batch = load_data(cfg_data, val_fraction=val_fraction), int(cfg_data.batch_size)
    n = len(full.train_y)
    epochs = -(-steps * batch // n)  # the fewest epochs that fit S steps, each of S / epochs
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))
    keep = keep[: steps // epochs * batch]

    def validation_as_test(cfg_data, device="cpu") -> DataBundle:
        return DataBundle(
            train_x=full.train_x[keep].to(device),
            train_y=full.train_y[keep].to(device),
            test_x=full.val_x.to(device),
            test_y=full.val_y.to(device),
            num_classes=full.num_classes,
            input_shape=full.input_shape,
            name=full.name,
            val_x=full.val_x[:0],
            val_y=full.val_y[:0],
        )

    normzoo.train.load_data = validation_as_test
    build = normzoo.models.__dict__.setdefault("_build_norm", normzoo.models.build_norm)

    def build_norm(name, num_features, /, **kw):
        layer = build(name, num_features, **kw)
        spec = get_norm(name)
        if ghost and spec.uses_batch_stats and spec.name != "batchnorm":
            raise SystemExit(f"--sgd-batch: the ghost stand-in is BatchNorm's only, not {name}")
        return GhostBatch(layer, ghost) if ghost and spec.uses_batch_stats else layer

    normzoo.models.build_norm = build_norm
    return epochs


def one_run(args: argparse.Namespace, norm: str, batch: int, seed: int) -> dict:
    overrides = [
        "experiment=digits", f"norm={norm}", f"data.name={args.data}", f"seed={seed}",
        f"data.batch_size={args.sgd_batch or batch}", f"optim.base_lr={args.base_lr}",
        f"optim.scale_lr={args.lr_rule == 'linear'}", "diagnostics.enabled=false",
        "train.progress=none", "train.checkpoint=false", "device=cpu", "threads=1", "resume=false",
        *args.override,
    ]  # fmt: skip
    cfg = compose("config", overrides=overrides)
    ghost = batch if args.sgd_batch else 0
    epochs = _patch(cfg.data, args.steps, seed, args.val_fraction, ghost)
    cfg.train.epochs = epochs
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), time.process_time()
        normzoo.train.run(cfg, out_dir=out)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # cpu: less load-bound
        m = json.loads((Path(out) / "metrics.json").read_text())
    return {
        "data": args.data, "model": args.tag, "norm": norm, "norm_batch": batch,
        "sgd_batch": int(cfg.data.batch_size), "seed": seed, "steps": m["steps"],
        "epochs": epochs, "lr": m["lr"], "status": m["status"],
        "val_error": m["test_error"], "val_loss": m["test_loss"],
        "train_error": m["train_error"], "train_s": m["train_time_s"], "wall_s": wall, "cpu_s": cpu,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits_hard")
    p.add_argument("--norms", default="batchnorm,groupnorm")
    p.add_argument("--batches", default="2,4,8,32,128")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--base-lr", type=float, default=0.05)
    p.add_argument("--lr-rule", choices=["linear", "fixed"], default="linear")
    p.add_argument("--sgd-batch", type=int, default=0, help="fixed SGD batch: --batches are ghost")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--tag", default="cnn", help="a name for the model overrides, in the CSV")
    p.add_argument("--override", action="append", default=[], help="a Hydra override")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    new = not args.out.exists()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"), open(args.out, "a") as f:
        writer = None
        for batch in batches:
            for norm in args.norms.split(","):
                for seed in seeds:
                    row = one_run(args, norm, batch, seed)
                    if writer is None:
                        writer = csv.DictWriter(f, fieldnames=list(row))
                        if new:
                            writer.writeheader()
                    writer.writerow(row)
                    f.flush()
                    print(
                        f"{norm:10s} B={batch:<4d} seed={seed} steps={row['steps']:<5d} "
                        f"lr={row['lr']:.4g} val={row['val_error']:.4f} "
                        f"train_s={row['train_s']:.2f} {row['status']}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
