"""Stacked training (issue 17), opt-in: K runs that differ only in norm, seed and learning rate
trained as one stacked model (:mod:`normzoo.run.stack_model`), each member's record written as its
single run would write it.

What is each member's own, as in :func:`normzoo.run.loop.fit`: its init (its single model built
after ``torch.manual_seed(seed)``, copied into the stack), its epoch order (a generator seeded with
its seed), its loss (the mean over its batch; the stack backpropagates the sum, whose gradient in
member k's parameters is member k's gradient), its gradient clip (the norm over its own gradients),
its learning-rate schedule, its divergence (a NaN/inf loss marks that member ``diverged`` at that
step; the others go on). One SGD (momentum, weight decay, Nesterov as torch's ``SGD``) updates all
members with per-member learning rates. The per-epoch test evaluation, the diagnostics and the
record run per member on its own single model (the stack's slices copied back).

The single-run path (:func:`normzoo.run.runner.run`) is the reference and is not changed; a member
equals its single run up to float rounding (``tests/test_stack.py`` states the tolerance). Not
stacked (:func:`normzoo.run.stack_model.stack_refusal` says why; such a run goes through ``run``):
resnet, AdamW, norms without a known stacked form (WeightNorm and the other variants). A stack
writes no checkpoint: a killed stack reruns its unfinished members; finished members (a
``metrics.json`` that ``resume`` keeps) drop out of the stack before it is built. A member's
record holds ``trained: "stacked"`` and ``stack`` (members, the stack's training and wall
seconds); its ``train_time_s``/``wall_time_s`` are its 1/K share. Not yet per member: Batch
Renorm's ``brn_clip_*`` curve entries (the stacked layer's fraction mixes its members).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from normzoo.config.identity import comparable_config
from normzoo.config.options import explicit_norm_keys, norm_layer_options
from normzoo.config.validate import validate
from normzoo.data import DataBundle, batches_per_epoch, epoch_order, load_data
from normzoo.diagnostics import run_diagnostics
from normzoo.errors import Diverged
from normzoo.models import build_model, check_batch_size, count_parameters
from normzoo.provenance import now_utc
from normzoo.registry import NormSpec, get_norm
from normzoo.run.device import configure_torch, resolve_device
from normzoo.run.loop import _use_mkldnn, evaluate, lr_schedule, peak_lr
from normzoo.run.record import base_record, write_record
from normzoo.run.runner import kept_result, run
from normzoo.run.stack_model import Slot, build_stack, stack_refusal, unstack_into

__all__ = ["group_key", "train_stacked"]

log = logging.getLogger("normzoo.train")

#: config keys in which the members of one stack may differ
MEMBER_KEYS = ("seed", "optim.base_lr")


def group_key(cfg: DictConfig, overrides: list[str] | None = None) -> str:
    """What members of one stack share: the comparable config without norm, seed and base lr."""
    flat = comparable_config(cfg, None, overrides)
    shared = {
        k: v
        for k, v in flat.items()
        if k not in MEMBER_KEYS and not k.startswith(("norm.", "norm_options")) and k != "norm"
    }
    return json.dumps(shared, sort_keys=True, default=str)


@dataclass
class _Member:
    cfg: DictConfig
    out: Path
    overrides: list[str] | None
    spec: NormSpec
    options: dict[str, Any]
    record: dict[str, Any]
    model: nn.Module | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)
    diverged: tuple[int, float] | None = None  # (step, loss)


def train_stacked(
    cfgs: Sequence[DictConfig],
    out_dirs: Sequence[str | Path],
    *,
    task_overrides: Sequence[list[str] | None] | None = None,
    multirun: bool = False,
) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (into ``out_dirs``) as one stack; ``run()``'s result per run.

    Runs that cannot stack train alone through :func:`normzoo.run.runner.run`; runs whose
    finished result ``resume`` keeps are skipped (``skipped=True``). Raises ``ValueError`` when
    the stackable runs do not share their config outside norm, seed and ``optim.base_lr``, and
    a stackable run's config error (``validate``), as ``run`` outside a multirun.
    """
    overrides = list(task_overrides) if task_overrides is not None else [None] * len(cfgs)
    results: list[dict[str, Any] | None] = [None] * len(cfgs)
    members: list[tuple[int, _Member]] = []
    for i, (cfg, out, ov) in enumerate(zip(cfgs, out_dirs, overrides, strict=True)):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.get("resume", False) and (kept := kept_result(out, cfg, ov)) is not None:
            results[i] = {"status": kept["status"], "error": kept.get("error"), "dir": str(out),
                          "skipped": True}  # fmt: skip
            continue
        refusal = stack_refusal(str(cfg.model.name), str(cfg.norm.name), str(cfg.optim.name))
        if refusal is not None:
            log.info("not stacked (%s): training %s alone", refusal, out)
            results[i] = run(cfg, out, task_overrides=ov, multirun=multirun)
            continue
        explicit = explicit_norm_keys(ov)
        validate(cfg, explicit=explicit)
        spec = get_norm(str(cfg.norm.name))
        record = base_record(cfg, spec, peak_lr(cfg), ov)
        options = norm_layer_options(cfg, explicit)
        record["norm_layer_options"] = options
        members.append((i, _Member(cfg, out, ov, spec, options, record)))
    if members:
        keys = {group_key(m.cfg, m.overrides) for _, m in members}
        if len(keys) > 1:
            raise ValueError("train_stacked: the runs differ outside norm, seed and optim.base_lr")
        # members with one norm are one contiguous segment of the stack's channels
        members.sort(key=lambda im: (im[1].spec.name, json.dumps(im[1].options, sort_keys=True)))
        for (i, _), result in zip(members, _train_group([m for _, m in members]), strict=True):
            results[i] = result
    return [r for r in results if r is not None]


def _segments(members: Sequence[_Member]) -> list[tuple[str, dict[str, Any], int]]:
    out: list[tuple[str, dict[str, Any], int]] = []
    for m in members:
        if out and out[-1][0] == m.spec.name and out[-1][1] == m.options:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((m.spec.name, m.options, 1))
    return out


def _train_group(members: list[_Member]) -> list[dict[str, Any]]:
    """Build, train, evaluate and record one stack of stackable members."""
    t_start = time.perf_counter()
    cfg0 = members[0].cfg
    device = resolve_device(cfg0.device)
    configure_torch(cfg0, device)
    data = load_data(cfg0.data, device)
    batch_size = int(cfg0.data.batch_size)
    for m in members:
        torch.manual_seed(int(m.cfg.seed))  # as run(): the member's init from its seed
        m.model = build_model(
            m.cfg.model, m.spec.name, m.options, data.input_shape, data.num_classes
        ).to(device)
        check_batch_size(m.model, m.spec.name, data.input_shape, batch_size)
        m.record.update(device=str(device), num_params=count_parameters(m.model))
    stacked, slots = build_stack([m.model for m in members], _segments(members))
    stacked.to(device)
    log.info("stack of %d runs (%s) B=%d on %s", len(members),
             ", ".join(f"{m.spec.name}/{m.cfg.seed}" for m in members), batch_size, device)  # fmt: skip
    train_time, steps = _fit_stack(stacked, slots, members, data, device)
    wall = time.perf_counter() - t_start
    return [_finish_member(m, data, batch_size, train_time, steps, wall, len(members))
            for m in members]  # fmt: skip


class _StackedSGD:
    """SGD (torch's update: weight decay, momentum, Nesterov, no dampening) and gradient-norm
    clipping, both per member: each stacked tensor's rows ``view(rows, -1)`` map to members."""

    def __init__(self, slots: Sequence[Slot], cfg_optim: DictConfig, k: int) -> None:
        self.params: list[Tensor] = []
        self.member_of: list[Tensor] = []  # per param: the member of each leading row
        for slot in slots:
            for p in slot.module.parameters():
                rows_per_member = p.shape[0] // slot.count
                idx = torch.arange(slot.first, slot.first + slot.count, device=p.device)
                self.params.append(p)
                self.member_of.append(idx.repeat_interleave(rows_per_member))
        self.shapes = [(-1,) + (1,) * (p.dim() - 1) for p in self.params]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.k = k
        self.momentum = float(cfg_optim.momentum)
        self.nesterov = bool(cfg_optim.nesterov) and self.momentum > 0
        self.weight_decay = float(cfg_optim.weight_decay)

    def _per_param(self, values: Tensor) -> list[Tensor]:
        return [values[i].view(s) for i, s in zip(self.member_of, self.shapes, strict=True)]

    def clip_(self, max_norm: float) -> None:
        """``clip_grad_norm_`` per member: coef = min(max_norm / (||g_k|| + 1e-6), 1)."""
        grads = [p.grad for p in self.params]
        sq = torch.zeros(self.k, device=grads[0].device)
        for g, idx in zip(grads, self.member_of, strict=True):
            sq.index_add_(0, idx, g.view(g.shape[0], -1).pow(2).sum(1))
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, self._per_param(coef))

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        """One SGD step; ``lr``: (K,) per-member learning rates."""
        grads = [p.grad for p in self.params]
        d_p = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum > 0:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, d_p)
            if self.nesterov:
                torch._foreach_add_(d_p, self.bufs, alpha=self.momentum)
            else:
                d_p = self.bufs
        torch._foreach_addcmul_(self.params, d_p, self._per_param(lr), value=-1.0)


def _fit_stack(
    stacked: nn.Module, slots: list[Slot], members: list[_Member], data: DataBundle, device
) -> tuple[float, int]:
    """The epochs of the stack (fit's loop per member); (training seconds, steps done)."""
    cfg0 = members[0].cfg
    k = len(members)
    batch_size, grouped = int(cfg0.data.batch_size), int(cfg0.data.classes_per_batch)
    epochs, steps_per_epoch = int(cfg0.train.epochs), batches_per_epoch(data, batch_size, grouped)
    total = steps_per_epoch * epochs
    warmup = round(float(cfg0.train.warmup_fraction) * total)
    final = float(cfg0.train.final_lr_fraction)
    lrs = (
        torch.tensor(
            [lr_schedule(total, peak_lr(m.cfg), warmup, final) for m in members], device=device
        )
        .t()
        .contiguous()
    )  # (steps, K)
    opt = _StackedSGD(slots, cfg0.optim, k)
    smoothing, clip = float(cfg0.train.label_smoothing), float(cfg0.train.grad_clip)
    hooks = [f for mod in stacked.modules() if callable(f := getattr(mod, "set_progress", None))]
    generators = [torch.Generator().manual_seed(int(m.cfg.seed)) for m in members]
    alive = torch.ones(k, dtype=torch.bool, device=device)
    sample_shape = tuple(data.input_shape)
    stacked_shape = (batch_size, k * sample_shape[0], *sample_shape[1:])
    mkldnn_before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = _use_mkldnn(cfg0, device)
    stacked.train()
    step, train_time = 0, 0.0
    try:
        for epoch in range(1, epochs + 1):
            since = time.perf_counter()
            orders = [epoch_order(data, batch_size, g, grouped) for g in generators]
            xs = torch.stack([data.train_x[o] for o in orders], 1)  # (n, K, *S)
            ys = torch.stack([data.train_y[o] for o in orders], 1)  # (n, K)
            loss_sum = torch.zeros(k, dtype=torch.float64)
            correct = torch.zeros(k, dtype=torch.long, device=device)
            for i in range(steps_per_epoch):
                for hook in hooks:
                    hook(step / total)
                xb = xs[i * batch_size : (i + 1) * batch_size].reshape(stacked_shape)
                yb = ys[i * batch_size : (i + 1) * batch_size]
                out = stacked(xb).view(batch_size, k, -1)  # (B, K, classes)
                losses = F.cross_entropy(
                    out.permute(0, 2, 1), yb, reduction="none", label_smoothing=smoothing
                ).mean(0)  # (K,): each member's mean loss
                values = losses.detach().cpu()
                _mark_diverged(members, values, alive, step)
                loss_sum += values.double()
                for p in opt.params:
                    p.grad = None
                torch.where(alive, losses, 0.0).sum().backward()
                if clip > 0:
                    opt.clip_(clip)
                opt.step(lrs[step] * alive)
                correct += (out.detach().argmax(2) == yb).sum(0)
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - since
            _epoch_rows(members, stacked, slots, data, epoch, loss_sum, correct,
                        steps_per_epoch, lrs[step - 1])  # fmt: skip
    finally:
        torch.backends.mkldnn.enabled = mkldnn_before
    unstack_into([m.model for m in members], slots)
    return train_time, step


def _mark_diverged(members: list[_Member], values: Tensor, alive: Tensor, step: int) -> None:
    for j, m in enumerate(members):
        if m.diverged is None and not math.isfinite(float(values[j])):
            m.diverged = (step, float(values[j]))
            alive[j] = False


def _epoch_rows(members, stacked, slots, data, epoch, loss_sum, correct, steps, lr_now) -> None:
    """Each living member's curve row: its own model evaluated as fit() evaluates it."""
    unstack_into([m.model for m in members], slots)
    batch_size = int(members[0].cfg.data.batch_size)
    for j, m in enumerate(members):
        if m.diverged is not None:
            continue
        test_loss, test_error = evaluate(
            m.model, data.test_x, data.test_y, int(m.cfg.data.eval_batch_size), batch_size
        )
        m.curves.append({
            "epoch": epoch,
            "train_loss": float(loss_sum[j]) / steps,
            "train_error": 1.0 - float(correct[j]) / (steps * batch_size),
            "test_loss": test_loss,
            "test_error": test_error,
            "lr": float(lr_now[j]),
        })  # fmt: skip
    stacked.train()


def _finish_member(
    m: _Member,
    data: DataBundle,
    batch_size: int,
    train_time: float,
    steps: int,
    wall: float,
    k: int,
) -> dict[str, Any]:
    """Diagnostics and the record of one member, written as a single run writes it."""
    record = m.record
    record["curves"] = m.curves
    record["stack"] = {"members": k, "train_time_s": train_time, "wall_time_s": wall}
    record["trained"] = "stacked"
    if m.diverged is not None:
        step, value = m.diverged
        record.update(status="diverged", error=str(Diverged(step, value)), error_step=step,
                      steps=step)  # fmt: skip
    else:
        last = m.curves[-1]
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            record[key] = last[key]
        if m.cfg.diagnostics.enabled:
            record.update(
                run_diagnostics(
                    m.model, data, batch_size=batch_size,
                    precise_samples=int(m.cfg.diagnostics.precise_samples),
                    seed=int(m.cfg.seed), eval_batch_size=int(m.cfg.data.eval_batch_size),
                )
            )  # fmt: skip
        record.update(status="ok", steps=steps)
    record["train_time_s"] = train_time / k  # the member's share of the stack's training
    record["steps_per_s"] = record["steps"] / record["train_time_s"] if train_time > 0 else None
    record["wall_time_s"] = wall / k
    record["finished_at"] = now_utc()
    write_record(m.out, record)
    return {"status": record["status"], "error": record["error"], "dir": str(m.out)}
