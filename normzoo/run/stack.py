"""Stacked training (issue 17): K runs that differ only in norm, layer options, seed and
learning rate trained as one stacked model (:mod:`normzoo.run.stack_model`), each member's
record and files written as its single run writes them.

What is each member's own, as in :func:`normzoo.run.loop.fit`: its init (its single model built
after ``torch.manual_seed(seed)``, copied into the stack), its epoch order (a generator seeded with
its seed), its loss (the mean over its batch; the stack backpropagates the sum, whose gradient in
member k's parameters is member k's gradient), its gradient clip (the norm over its own gradients),
its learning-rate schedule, its divergence (a NaN/inf loss marks that member ``diverged`` at that
step; the others go on), Batch Renorm's ``brn_clip_*`` (the member's own layer run on its slice
of the last step's input). One SGD (:mod:`normzoo.run.stack_sgd`) updates all members with
per-member learning rates. The per-epoch test/validation evaluation, the diagnostics, the
inference panel, ``predictions.npz`` and ``model.pt`` run per member on its own single model (the
stack's slices copied back) through the single run's own code (:func:`runner.keep_outputs`).

The single-run path (:func:`normzoo.run.runner.run`) is the reference; a member equals its single
run up to float rounding (``tests/test_stack.py`` states the tolerance). Not stacked
(:func:`stack_refusal` says why; such a run goes through ``run``): resnet/transformer, AdamW,
``train.compile=true`` (and ``auto`` where it compiles), norms without a known stacked form (WeightNorm and most variants). A stack
writes no checkpoint: a killed stack reruns its unfinished members; finished members (a
``metrics.json`` that ``resume`` keeps) drop out before it is built. A member's record holds
``trained: "stacked"`` and ``stack`` (members, the stack's training and wall seconds); its
``train_time_s`` is its 1/K share of the stack's steps, ``wall_time_s`` that share of the shared
work plus its own evaluations, diagnostics and files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
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
from normzoo.errors import Diverged, InvalidCombination
from normzoo.models import build_model, check_batch_size, count_parameters
from normzoo.provenance import now_utc
from normzoo.registry import NormSpec, get_norm
from normzoo.run import stack_model
from normzoo.run.budget import compiles, lr_schedule, peak_lr
from normzoo.run.budget import total_steps as budget_steps
from normzoo.run.device import configure_torch, resolve_device
from normzoo.run.loop import _use_mkldnn, batch_stats_in_eval, evaluate_splits
from normzoo.run.record import base_record, write_record
from normzoo.run.runner import keep_outputs, kept_result, run
from normzoo.run.stack_model import Slot, build_stack, unstack_into
from normzoo.run.stack_sgd import StackedSGD

__all__ = ["MEMBER_KEYS", "group_key", "stack_refusal", "train_stacked"]

log = logging.getLogger("normzoo.train")

#: config keys in which the members of one stack may differ (besides norm and its options)
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


def stack_refusal(cfg: DictConfig) -> str | None:
    """Why the run ``cfg`` cannot train in a stack (None: it can)."""
    if cfg.train.get("compile", False) is True:
        return "train.compile=true: a stack runs eagerly"
    return stack_model.stack_refusal(str(cfg.model.name), str(cfg.norm.name), str(cfg.optim.name))


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
    eval_time_s: float = 0.0
    predictions: dict[str, Tensor] = field(default_factory=dict)  # the last epoch's classes


def train_stacked(
    cfgs: Sequence[DictConfig],
    out_dirs: Sequence[str | Path],
    *,
    task_overrides: Sequence[list[str] | None] | None = None,
    multirun: bool = False,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (into ``out_dirs``) as one stack; ``run()``'s result per run.
    ``on_result(i, result)`` is called as soon as run i's record is written (progress lines).

    Runs that cannot stack, and every run of a stack that cannot start (an invalid combination,
    an error while building it), train alone through :func:`normzoo.run.runner.run`; runs whose
    finished result ``resume`` keeps are skipped (``skipped=True``). Raises ``ValueError`` when
    the stackable runs do not share their config outside norm, seed and ``optim.base_lr``, and
    a stackable run's config error (``validate``) outside a multirun, as ``run`` does.
    """
    overrides = list(task_overrides) if task_overrides is not None else [None] * len(cfgs)
    results: list[dict[str, Any] | None] = [None] * len(cfgs)

    def done(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        if on_result is not None:
            on_result(i, result)

    members: list[tuple[int, _Member]] = []
    alone: list[int] = []
    for i, (cfg, out, ov) in enumerate(zip(cfgs, out_dirs, overrides, strict=True)):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.get("resume", False) and (kept := kept_result(out, cfg, ov)) is not None:
            done(i, {"status": kept["status"], "error": kept.get("error"), "dir": str(out),
                     "skipped": True})  # fmt: skip
            continue
        member = _prepare(cfg, out, ov, multirun)
        if member is None:
            alone.append(i)
        else:
            members.append((i, member))
    if members:
        keys = {group_key(m.cfg, m.overrides) for _, m in members}
        if len(keys) > 1:
            raise ValueError("train_stacked: the runs differ outside norm, seed and optim.base_lr")
        # members with one norm (and layer options) are one contiguous segment of the channels
        members.sort(key=lambda im: (im[1].spec.name, json.dumps(im[1].options, sort_keys=True)))
        try:
            for (i, _), result in zip(members, _train_group([m for _, m in members]), strict=True):
                done(i, result)
        except _CannotStack as exc:
            log.warning("stack not trained (%s): its %d runs train alone", exc, len(members))
            alone.extend(i for i, _ in members)
    for i in sorted(alone):
        done(i, run(cfgs[i], out_dirs[i], task_overrides=overrides[i], multirun=multirun))
    return [r for r in results if r is not None]


def _prepare(
    cfg: DictConfig, out: Path, overrides: list[str] | None, multirun: bool
) -> _Member | None:
    """The member of a stack for ``cfg``, or None when it trains alone (``run`` records why)."""
    refusal = stack_refusal(cfg)
    if refusal is not None:
        log.info("not stacked (%s): training %s alone", refusal, out)
        return None
    explicit = explicit_norm_keys(overrides)
    try:
        validate(cfg, explicit=explicit)
    except Exception:
        if not multirun:
            raise
        return None  # run() records the config error as failed
    spec = get_norm(str(cfg.norm.name))
    record = base_record(cfg, spec, peak_lr(cfg), overrides)
    options = norm_layer_options(cfg, explicit)
    record["norm_layer_options"] = options
    return _Member(cfg, out, overrides, spec, options, record)


class _CannotStack(Exception):
    """The stack cannot start (every member then trains alone and records its own outcome)."""


def _segments(members: Sequence[_Member]) -> list[tuple[str, dict[str, Any], int]]:
    out: list[tuple[str, dict[str, Any], int]] = []
    for m in members:
        if out and out[-1][0] == m.spec.name and out[-1][1] == m.options:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((m.spec.name, m.options, 1))
    return out


def _train_group(members: list[_Member]) -> Iterator[dict[str, Any]]:
    """Build, train, evaluate and record one stack of stackable members; each member's result
    as its record is written (a generator: the first ``next`` builds and trains the stack)."""
    t_start = time.perf_counter()
    cfg0 = members[0].cfg
    device = resolve_device(cfg0.device)
    configure_torch(cfg0, device)
    data = load_data(cfg0.data, device)
    batch_size = int(cfg0.data.batch_size)
    steps_per_epoch = batches_per_epoch(data, batch_size, int(cfg0.data.classes_per_batch))
    if steps_per_epoch < 1:
        raise _CannotStack("no training step at this batch size")
    if compiles(cfg0, budget_steps(cfg0, steps_per_epoch)):  # (train.compile=auto, a long run)
        raise _CannotStack("train.compile=auto compiles runs this long; a stack runs eagerly")
    try:
        for m in members:
            torch.manual_seed(int(m.cfg.seed))  # as run(): the member's init from its seed
            m.model = build_model(
                m.cfg.model, m.spec.name, m.options, data.input_shape, data.num_classes
            ).to(device)
            check_batch_size(m.model, m.spec.name, data.input_shape, batch_size)
            m.record.update(device=str(device), num_params=count_parameters(m.model))
        stacked, slots = build_stack([m.model for m in members], _segments(members))
    except (InvalidCombination, ValueError) as exc:
        raise _CannotStack(str(exc)) from exc
    stacked.to(device)
    log.info("stack of %d runs (%s) B=%d on %s", len(members),
             ", ".join(f"{m.spec.name}/{m.cfg.seed}" for m in members), batch_size, device)  # fmt: skip
    train_time, steps = _fit_stack(stacked, slots, members, data, device)
    shared = time.perf_counter() - t_start - sum(m.eval_time_s for m in members)
    for m in members:
        yield _finish_member(m, data, train_time, steps, shared, len(members))


def _fit_stack(
    stacked: nn.Module, slots: list[Slot], members: list[_Member], data: DataBundle, device
) -> tuple[float, int]:
    """The epochs of the stack (fit's loop per member); (training seconds, steps done)."""
    cfg0 = members[0].cfg
    k = len(members)
    batch_size, grouped = int(cfg0.data.batch_size), int(cfg0.data.classes_per_batch)
    steps_per_epoch = batches_per_epoch(data, batch_size, grouped)
    total = budget_steps(cfg0, steps_per_epoch)
    epochs = math.ceil(total / steps_per_epoch)  # a step budget's last epoch is partial
    warmup = round(float(cfg0.train.warmup_fraction) * total)
    final = float(cfg0.train.final_lr_fraction)
    lrs = torch.tensor(
        [lr_schedule(total, peak_lr(m.cfg), warmup, final) for m in members], device=device
    ).t().contiguous()  # (steps, K)  # fmt: skip
    opt = StackedSGD(slots, cfg0.optim, k)
    smoothing, clip = float(cfg0.train.label_smoothing), float(cfg0.train.grad_clip)
    hooks = [f for mod in stacked.modules() if callable(f := getattr(mod, "set_progress", None))]
    renorm = [s for s in slots if hasattr(s.module, "clip_fraction_r")]
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
            n_steps = min(steps_per_epoch, total - step)
            loss_sum = torch.zeros(k, dtype=torch.float64)
            correct = torch.zeros(k, dtype=torch.long, device=device)
            for i in range(n_steps):
                for hook in hooks:
                    hook(step / total)
                capture = _RenormCapture(renorm) if renorm and i == n_steps - 1 else None
                xb = xs[i * batch_size : (i + 1) * batch_size].reshape(stacked_shape)
                yb = ys[i * batch_size : (i + 1) * batch_size]
                out, losses = stacked_losses(stacked, xb, yb, smoothing)
                values = losses.detach().cpu()
                _mark_diverged(members, values, alive, step)
                loss_sum += values.double()
                stacked_update(opt, losses, alive, clip, lrs[step])
                correct += (out.detach().argmax(2) == yb).sum(0)
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - since
            clips = capture.per_member(members, (step - 1) / total) if capture else None
            _epoch_rows(members, stacked, slots, data, epoch, loss_sum, correct, n_steps,
                        lrs[step - 1], clips)  # fmt: skip
            if not bool(alive.any()):  # every member diverged: nothing left to train
                break
    finally:
        torch.backends.mkldnn.enabled = mkldnn_before
    unstack_into([m.model for m in members], slots)
    return train_time, step


def stacked_losses(
    stacked: nn.Module, xb: Tensor, yb: Tensor, smoothing: float
) -> tuple[Tensor, Tensor]:
    """The stack's logits (B, K, classes) on ``xb`` (B, K * C, *S) and each member's mean
    cross-entropy against ``yb`` (B, K): (K,)."""
    out = stacked(xb).view(yb.shape[0], yb.shape[1], -1)
    losses = F.cross_entropy(
        out.permute(0, 2, 1), yb, reduction="none", label_smoothing=smoothing
    ).mean(0)
    return out, losses


def stacked_update(opt: StackedSGD, losses: Tensor, alive: Tensor, clip: float, lr: Tensor) -> None:
    """One SGD step of the members still ``alive`` (K,): backward of their summed losses (member
    k's gradient in its own rows), clip per member, per-member learning rates ``lr`` (K,)."""
    opt.zero_grad()
    torch.where(alive, losses, 0.0).sum().backward()
    if clip > 0:
        opt.clip_(clip)
    opt.step(lr * alive)


class _RenormCapture:
    """Batch Renorm segments' input and state at one step (forward pre-hooks, removed after one
    call), to give each member the ``brn_clip_*`` its own layer reports on its slice."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.seen: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        self.handles = [s.module.register_forward_pre_hook(self._hook(j)) for j, s in
                        enumerate(slots)]  # fmt: skip

    def _hook(self, j: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.seen[j] = (args[0].detach(), state)
            self.handles[j].remove()

        return hook

    @torch.no_grad()
    def per_member(self, members: list[_Member], progress: float) -> list[dict[str, float]]:
        """Each member's mean over its Batch Renorm layers of r's and d's clipped fraction."""
        fractions: list[dict[str, list[float]]] = [{} for _ in members]
        for j, slot in enumerate(self.slots):
            x, state = self.seen[j]
            for offset, xj in enumerate(torch.chunk(x, slot.count, dim=1)):
                m = slot.first + offset
                own = members[m].model.get_submodule(slot.member_name)  # type: ignore[union-attr]
                _load_row(own, state, offset, slot.count)
                own.train()
                own.set_progress(progress)
                own(xj)
                for key, name in (
                    ("brn_clip_r", "clip_fraction_r"),
                    ("brn_clip_d", "clip_fraction_d"),
                ):
                    fractions[m].setdefault(key, []).append(float(getattr(own, name)))
        return [{k: sum(v) / len(v) for k, v in f.items()} for f in fractions]


def _load_row(own: nn.Module, state: dict[str, Tensor], row: int, count: int) -> None:
    """Member ``row``'s slice of a stacked layer's ``state`` into its own layer."""
    mine = own.state_dict(keep_vars=True)
    for key, value in state.items():
        target = mine[key]
        with torch.no_grad():
            target.copy_(value if value.dim() == 0 else value.view(count, -1)[row].view_as(target))


def _mark_diverged(members: list[_Member], values: Tensor, alive: Tensor, step: int) -> None:
    for j, m in enumerate(members):
        if m.diverged is None and not math.isfinite(float(values[j])):
            m.diverged = (step, float(values[j]))
            alive[j] = False


def _epoch_rows(
    members, stacked, slots, data, epoch, loss_sum, correct, steps, lr_now, clips
) -> None:
    """Each living member's curve row: its own model evaluated as fit() evaluates it."""
    unstack_into([m.model for m in members], slots)
    batch_size = int(members[0].cfg.data.batch_size)
    for j, m in enumerate(members):
        if m.diverged is not None:
            continue
        since = time.perf_counter()
        sizes = (int(m.cfg.data.eval_batch_size), batch_size)
        batch_stats = batch_stats_in_eval(m.model)
        scores, m.predictions = evaluate_splits(m.model, data, *sizes, batch_stats=batch_stats)
        row = {
            "epoch": epoch,
            "train_loss": float(loss_sum[j]) / steps,
            "train_error": 1.0 - float(correct[j]) / (steps * batch_size),
            **scores,
        }
        row["lr"] = float(lr_now[j])
        if clips is not None:
            row.update(clips[j])
        m.curves.append(row)
        m.eval_time_s += time.perf_counter() - since
    stacked.train()


def _finish_member(
    m: _Member, data: DataBundle, train_time: float, steps: int, shared: float, k: int
) -> dict[str, Any]:
    """Diagnostics, files and the record of one member, written as a single run writes them."""
    since = time.perf_counter()
    record = m.record
    record["curves"] = m.curves
    record["stack"] = {"members": k, "train_time_s": train_time, "wall_time_s": shared}
    record["trained"] = "stacked"
    if m.diverged is not None:
        step, value = m.diverged
        record.update(status="diverged", error=str(Diverged(step, value)), error_step=step,
                      steps=step)  # fmt: skip
    else:
        last = m.curves[-1]
        for key in (
            "train_loss",
            "train_error",
            "test_loss",
            "test_error",
            "val_loss",
            "val_error",
        ):
            record[key] = last.get(key)
        assert m.model is not None
        keep_outputs(m.model, data, m.cfg, m.spec, m.options, record, m.out, m.predictions)
        record.update(status="ok", steps=steps)
    batch = record["batch_size"]
    record["epochs_run"] = len(m.curves)
    record["samples_seen"] = record["steps"] * batch if isinstance(batch, int) else None
    record["train_time_s"] = train_time / k  # the member's share of the stack's training
    record["eval_time_s"] = m.eval_time_s
    record["steps_per_s"] = record["steps"] / record["train_time_s"] if train_time > 0 else None
    record["wall_time_s"] = shared / k + m.eval_time_s + time.perf_counter() - since
    record["finished_at"] = now_utc()
    write_record(m.out, record)
    return {"status": record["status"], "error": record["error"], "dir": str(m.out)}
