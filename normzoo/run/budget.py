"""A run's budget: its optimizer steps, its learning rate at each step, whether it compiles.

Shared by the single-run path (:mod:`normzoo.run.loop`) and the stack (:mod:`normzoo.run.stack`),
so a stacked member is given exactly what its single run would be given.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

__all__ = ["AUTO_COMPILE_STEPS", "compiles", "lr_schedule", "peak_lr", "total_steps"]


def lr_schedule(
    total_steps: int, peak: float, warmup_steps: int, final_fraction: float = 0.0
) -> list[float]:
    """Per-step learning rates: linear warm-up from peak/warmup to ``peak`` over ``warmup_steps``,
    then a cosine decay to ``final_fraction * peak`` at the last step."""
    out = []
    floor = final_fraction * peak
    decay = max(total_steps - warmup_steps, 1)
    for step in range(total_steps):
        if step < warmup_steps:
            out.append(peak * (step + 1) / warmup_steps)
        else:
            t = (step - warmup_steps) / max(decay - 1, 1)
            out.append(floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    return out


def peak_lr(cfg: DictConfig) -> float:
    """The peak learning rate: ``optim.lr_scale`` times the rule's rate. ``optim.lr_rule``:
    ``linear`` (default) is ``base_lr * batch_size / reference_batch_size`` (``base_lr`` with
    ``optim.scale_lr=false``), ``constant`` is ``base_lr`` at every batch size."""
    lr = float(cfg.optim.base_lr)
    if str(cfg.optim.get("lr_rule", "linear")) == "linear" and cfg.optim.scale_lr:
        lr = lr * int(cfg.data.batch_size) / int(cfg.optim.reference_batch_size)
    return lr * float(cfg.optim.get("lr_scale", 1.0))


def total_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps: ``train.steps`` when > 0, else ``train.epochs`` whole epochs."""
    budget = int(cfg.train.get("steps", 0))
    return budget if budget > 0 else steps_per_epoch * int(cfg.train.epochs)


#: ``train.compile=auto`` compiles the training forward of runs of at least this many optimizer
#: steps: where torch.compile's one-off cost (a cold inductor cache, 22-25 s) is paid back by its
#: faster steps; the largest break-even of the study's models on the 2-core VM (cnn16: 16k-61k
#: steps over two runs) rounded up (reports/bench/compile_rule.md, ``python -m scripts.bench_compile``)
AUTO_COMPILE_STEPS = 65_000


def compiles(cfg: DictConfig, total_steps: int) -> bool:
    """Whether a run of ``total_steps`` steps trains through ``torch.compile`` (``train.compile``:
    true, false, or ``auto``: runs of at least :data:`AUTO_COMPILE_STEPS` steps)."""
    setting = cfg.train.get("compile", False)
    if setting == "auto":
        return total_steps >= AUTO_COMPILE_STEPS
    return bool(setting)
