"""The training loop of one run: the learning-rate schedule, the optimizer, the epochs of SGD
steps with a NaN/inf check, the per-epoch evaluation, gradient clipping and Batch Renorm's
progress.

SGD (momentum 0.9) or AdamW, the peak lr by ``optim.lr_rule`` (``linear``: ``base_lr * B / 32``,
Goyal et al. 2017, as in the GN paper; ``constant``) times ``optim.lr_scale``, a linear warm-up
then a cosine decay, set per step, over ``train.steps`` steps (the last epoch partial) or
``train.epochs`` whole epochs. Batch Renorm's (r, d)
schedule is driven by the run's progress (every module's ``set_progress(p)``, as
``normzoo.norms.batch.set_progress(model, p)`` calls it, every step).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from normzoo.config.identity import comparable_config
from normzoo.data import DataBundle, batches_per_epoch, epoch_order
from normzoo.errors import ConfigError, Diverged
from normzoo.layers import uses_batch_stats_in_eval
from normzoo.norms import weight as weight_norms
from normzoo.registry import NormSpec
from normzoo.run import budget
from normzoo.run.budget import compiles, lr_schedule, peak_lr, total_steps
from normzoo.run.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "FitState",
    "batch_stats_in_eval",
    "evaluate",
    "evaluate_splits",
    "fit",
    "lr_schedule",
    "peak_lr",
    "predict",
    "total_steps",
]

log = logging.getLogger("normzoo.train")  # the name the run's log lines always had


def make_optimizer(cfg_optim: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, fused where torch can."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg_optim.name == "sgd":
        kw: dict[str, Any] = {
            "lr": lr,
            "momentum": float(cfg_optim.momentum),
            "nesterov": bool(cfg_optim.nesterov) and float(cfg_optim.momentum) > 0,
            "weight_decay": float(cfg_optim.weight_decay),
        }
        cls: type[torch.optim.Optimizer] = torch.optim.SGD
    elif cfg_optim.name == "adamw":
        kw = {
            "lr": lr,
            "betas": tuple(float(b) for b in cfg_optim.betas),
            "eps": float(cfg_optim.eps),
            "weight_decay": float(cfg_optim.weight_decay),
        }
        cls = torch.optim.AdamW
    else:
        raise ConfigError(f"optim.name={cfg_optim.name!r}: allowed sgd, adamw")
    try:  # fused: one kernel for the whole update (CPU and CUDA); measured 2x faster than foreach
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, foreach=True, **kw)


def batch_stats_in_eval(model: nn.Module, spec: NormSpec | None = None) -> bool:
    """Whether some norm layer of ``model`` normalises with batch statistics even in eval mode
    (:func:`normzoo.layers.uses_batch_stats_in_eval`, the one definition; ``spec`` is accepted for
    the callers that pass the run's layer and not needed: the class lookup is cached)."""
    del spec
    return uses_batch_stats_in_eval(model)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 1000,
    train_batch_size: int | None = None,
    *,
    batch_stats: bool | None = None,
    predictions: list[Tensor] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` in eval mode (running statistics); each
    batch's predicted classes appended to ``predictions`` when given (what :func:`predict` gives).

    Eval-mode outputs do not depend on the batch, so the samples go through in batches of
    ``batch_size``. Except when a layer normalises with batch statistics in eval mode too
    (:func:`batch_stats_in_eval`; ``batch_stats`` gives its answer when known): then each sample
    is evaluated in a batch of ``train_batch_size`` (the batch size the model trained with;
    required then), in the data's order, and the last partial batch is filled up with samples from
    the start of ``x`` (only its own samples are counted), so that no batch is larger or smaller
    than in training (one large batch would normalise with the whole test set's statistics,
    transductively, and a last batch of one sample has no batch statistics at all).
    """
    n = len(y)
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    wrong = torch.zeros((), device=x.device, dtype=torch.long)
    for out, yb in _eval_outputs(model, x, y, batch_size, train_batch_size, batch_stats):
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum").double()
        classes = out.argmax(1)
        wrong += (classes != yb).sum()
        if predictions is not None:
            predictions.append(classes)
    n = max(n, 1)
    return float(loss_sum) / n, float(wrong) / n


@torch.no_grad()
def predict(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 1000,
    train_batch_size: int | None = None,
    *,
    batch_stats: bool | None = None,
) -> Tensor:
    """The class :func:`evaluate` counts for each sample of ``x`` (eval mode, in ``x``'s order)."""
    dummy = torch.zeros(len(x), dtype=torch.long, device=x.device)
    outs = _eval_outputs(model, x, dummy, batch_size, train_batch_size, batch_stats)
    preds = [out.argmax(1) for out, _ in outs]
    return torch.cat(preds) if preds else dummy


def evaluate_splits(
    model: nn.Module,
    data: DataBundle,
    batch_size: int,
    train_batch_size: int,
    *,
    batch_stats: bool | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """An epoch's evaluation, as every run (single or stacked member) takes it: :func:`evaluate`
    on the test split and, where the data has one, the validation split (``test_loss``,
    ``test_error``, ``val_loss``, ``val_error``, in that order), and the classes it predicted
    (``test_pred``, ``val_pred``: what those errors counted, kept for ``predictions.npz``)."""
    scores: dict[str, float] = {}
    classes: dict[str, Tensor] = {}
    splits = [("test", data.test_x, data.test_y)]
    if data.val_y.numel() > 0:
        splits.append(("val", data.val_x, data.val_y))
    for split, x, y in splits:
        predicted: list[Tensor] = []
        scores[f"{split}_loss"], scores[f"{split}_error"] = evaluate(
            model, x, y, batch_size, train_batch_size, batch_stats=batch_stats,
            predictions=predicted,
        )  # fmt: skip
        if predicted:
            classes[f"{split}_pred"] = torch.cat(predicted)
    return scores, classes


def _eval_outputs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    train_batch_size: int | None,
    batch_stats: bool | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(logits, labels) of each eval-mode batch of :func:`evaluate`, in order."""
    n = len(y)
    fill = False
    if batch_stats is None:
        batch_stats = batch_stats_in_eval(model)
    if batch_stats:
        if train_batch_size is None:
            raise ValueError(
                "evaluate: the model normalises with batch statistics in eval mode (a layer "
                "without running statistics); pass train_batch_size"
            )
        batch_size, fill = min(int(train_batch_size), max(n, 1)), True
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            k = len(yb)
            if fill and k < batch_size:
                xb = torch.cat([xb, x[: batch_size - k]])
            yield model(xb)[:k], yb
    finally:
        model.train(was_training)


def clip_fractions(model: nn.Module) -> dict[str, float]:
    """Mean over Batch Renorm layers of the fraction of r and d clipped at the last step."""
    r = [float(m.clip_fraction_r) for m in model.modules() if hasattr(m, "clip_fraction_r")]
    d = [float(m.clip_fraction_d) for m in model.modules() if hasattr(m, "clip_fraction_d")]
    out = {}
    if r:
        out["brn_clip_r"] = sum(r) / len(r)
    if d:
        out["brn_clip_d"] = sum(d) / len(d)
    return out


@dataclass
class FitState:
    """What a fit has done so far (a resumed run continues it from the checkpoint)."""

    steps: int = 0
    #: seconds in the training (each epoch's shuffle and steps, epoch 1's data-dependent init)
    train_time_s: float = 0.0
    #: seconds in the per-epoch test evaluations
    eval_time_s: float = 0.0
    curves: list[dict[str, Any]] = field(default_factory=list)
    #: the last evaluated epoch's eval-mode classes (``test_pred``, ``val_pred``): what its
    #: ``test_error`` counted, kept for ``predictions.npz`` (not in the checkpoint)
    predictions: dict[str, Tensor] = field(default_factory=dict)


def progress_mode(cfg: DictConfig, multirun: bool = False) -> str:
    """``train.progress``; ``auto``: a bar on a terminal outside a multirun, else log lines."""
    mode = getattr(cfg.train.progress, "name", str(cfg.train.progress))
    if mode == "auto":
        return "bar" if sys.stderr.isatty() and not multirun else "log"
    return mode


def _use_mkldnn(cfg: DictConfig, device: torch.device) -> bool:
    """oneDNN conv kernels on CPU: ``auto`` turns them off at batch size <= 8, where torch's native
    kernels were measured faster for the small models here (1.0 vs 1.7 ms per step at B=2,
    2.2 vs 2.6 ms at B=8, slower from B=16 on; cnn default, 1 thread)."""
    setting = str(cfg.train.mkldnn)
    if device.type != "cpu" or setting == "on":
        return torch.backends.mkldnn.is_available()
    if setting == "off":
        return False
    return int(cfg.data.batch_size) > 8 and torch.backends.mkldnn.is_available()


def _check_finite(losses: Tensor, start: int, stop: int, epoch_start_step: int) -> None:
    chunk = losses[start:stop]
    finite = torch.isfinite(chunk)
    if not bool(finite.all()):
        first = int(torch.nonzero(~finite)[0, 0])
        raise Diverged(epoch_start_step + start + first, float(chunk[first]))


def _open_bar(mode: str, total: int, step: int) -> tuple[str, Any]:
    """(the progress mode actually used, a tqdm bar or None)."""
    if mode != "bar":
        return mode, None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a declared dependency, but a missing bar must not fail a run
        log.warning("tqdm is not installed: plain log lines instead of a progress bar")
        return "log", None
    return mode, tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=False)


def _restore(saved: dict[str, Any], model, opt, generator, device, state: FitState) -> int:
    """Load a checkpoint's states into the run; the global step it ended at."""
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    state.curves = list(saved["curves"])
    state.train_time_s = float(saved["train_time_s"])
    state.eval_time_s = float(saved.get("eval_time_s", 0.0))  # absent before it was recorded
    return int(saved["step"])


def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: DictConfig,
    device: torch.device,
    state: FitState,
    checkpoint: Path | None = None,
    *,
    spec: NormSpec | None = None,
    identity: dict[str, Any] | None = None,
    multirun: bool = False,
) -> None:
    """Train ``model`` in place; append one dict per epoch to ``state.curves``.

    ``checkpoint``: a path to continue from when it holds a checkpoint of this config
    (``identity``, :func:`normzoo.config.identity.comparable_config`), and to write (atomically)
    at the end of every epoch. ``spec``: the run's norm (which layers may use batch statistics in
    eval mode). ``multirun``: the run is one job of a sweep (log lines, not a bar).

    Timing: ``state.train_time_s`` sums the time of each epoch's shuffle and training steps (and
    of the data-dependent init, if any) only: the per-epoch test evaluation, logging and
    checkpoint writes are left out (on a GPU the clock is read after a synchronisation);
    ``state.eval_time_s`` sums the evaluations. A resumed run continues both from the checkpoint.

    Raises:
        Diverged: at the first step whose loss is NaN/inf.
    """
    batch_size = int(cfg.data.batch_size)
    grouped = int(cfg.data.classes_per_batch)
    steps_per_epoch = batches_per_epoch(data, batch_size, grouped)
    total = total_steps(cfg, steps_per_epoch)
    epochs = math.ceil(total / steps_per_epoch)  # a step budget's last epoch is partial
    warmup = round(float(cfg.train.warmup_fraction) * total)
    lrs = lr_schedule(total, peak_lr(cfg), warmup, float(cfg.train.final_lr_fraction))
    opt = make_optimizer(cfg.optim, model, lrs[0])
    check_every = int(cfg.train.check_every) or 50
    smoothing = float(cfg.train.label_smoothing)
    clip = float(cfg.train.grad_clip)
    params = [p for p in model.parameters() if p.requires_grad]
    # the layers that follow the run's progress (Batch Renorm's limits), told every step; the
    # list is made once (what normzoo.norms.batch.set_progress(model, p) would walk each step)
    progress_hooks = [
        method for m in model.modules() if callable(method := getattr(m, "set_progress", None))
    ]
    eval_batch_stats = batch_stats_in_eval(model, spec)  # the layers do not change in training
    compiled = compiles(cfg, total)
    if cfg.train.get("compile") == "auto":
        log.info("train.compile=auto: %d steps %s %d: %s", total, ">=" if compiled else "<",
                 budget.AUTO_COMPILE_STEPS, "compiled" if compiled else "eager")  # fmt: skip
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator().manual_seed(int(cfg.seed))
    on_cpu = device.type == "cpu"
    step, first_epoch = 0, 1
    if checkpoint is not None:
        if identity is None:
            identity = comparable_config(cfg, device)
        saved = load_checkpoint(checkpoint, identity)
        if saved is not None:
            step, first_epoch = (
                _restore(saved, model, opt, generator, device, state),
                saved["epoch"] + 1,
            )
            log.info("resuming from %s: epoch %d done, step %d", checkpoint, saved["epoch"], step)

    mode, bar = _open_bar(progress_mode(cfg, multirun), total, step)
    model.train()
    stepping_since: float | None = None  # perf_counter at the start of the steps being timed
    mkldnn_before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = _use_mkldnn(cfg, device)
    try:
        for epoch in range(first_epoch, epochs + 1):
            stepping_since = time.perf_counter()
            order = epoch_order(data, batch_size, generator, grouped)
            xs, ys = data.train_x[order], data.train_y[order]  # one gather per epoch, then views
            # On CPU loss.item() costs no sync (0.3 us, less than any tensor op): every step is
            # checked. On a GPU the losses stay on the device, checked every `check_every` steps.
            n_steps = min(steps_per_epoch, total - step)  # this epoch's steps
            losses = torch.zeros(n_steps, device=device)
            loss_sum = 0.0
            correct = torch.zeros(n_steps, device=device, dtype=torch.long)
            checked = 0
            if epoch == 1 and cfg.norm.get("data_init", False):
                count = max(int(cfg.norm.get("data_init_samples", batch_size)), batch_size)
                weight_norms.data_dependent_init(model, xs[:count])
            for i in range(n_steps):
                lr = lrs[step]
                for group in opt.param_groups:
                    group["lr"] = lr
                for hook in progress_hooks:
                    hook(step / total)
                xb = xs[i * batch_size : (i + 1) * batch_size]
                yb = ys[i * batch_size : (i + 1) * batch_size]
                out = forward(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=smoothing)
                if on_cpu:
                    value = loss.item()
                    if not math.isfinite(value):
                        raise Diverged(step, value)
                    loss_sum += value
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
                opt.step()
                correct[i] = (out.detach().argmax(1) == yb).sum()
                step += 1
                if not on_cpu:
                    losses[i] = loss.detach()
                    if (i + 1) % check_every == 0 or i + 1 == n_steps:
                        _check_finite(losses, checked, i + 1, step - (i + 1))
                        checked = i + 1
                if bar is not None:
                    bar.update(1)
            state.steps = step
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the steps' queued kernels are training time
            state.train_time_s += time.perf_counter() - stepping_since
            stepping_since = None
            evaluating_since = time.perf_counter()
            scores, state.predictions = evaluate_splits(
                model, data, int(cfg.data.eval_batch_size), batch_size,
                batch_stats=eval_batch_stats,
            )  # fmt: skip
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / n_steps if on_cpu else float(losses.mean()),
                "train_error": 1.0 - float(correct.sum()) / (n_steps * batch_size),
                **scores,  # eval mode: test, then validation where the data has it
            }
            state.eval_time_s += time.perf_counter() - evaluating_since
            row.update(lr=lrs[step - 1], **clip_fractions(model))
            state.curves.append(row)
            _report_epoch(row, epochs, step, total, mode, bar)
            if checkpoint is not None:
                save_checkpoint(checkpoint, identity, model, opt, generator, device, epoch, state)
    finally:
        torch.backends.mkldnn.enabled = mkldnn_before
        state.steps = step
        if stepping_since is not None:  # stopped in the middle of an epoch's steps
            state.train_time_s += time.perf_counter() - stepping_since
        if bar is not None:
            bar.close()


def _report_epoch(row: dict[str, Any], epochs: int, step: int, total: int, mode: str, bar) -> None:
    """The epoch's line: on the bar, as a log line, or nowhere (``train.progress=none``)."""
    msg = (
        f"epoch {row['epoch']}/{epochs} step {step}/{total} train_loss {row['train_loss']:.4f} "
        f"train_error {row['train_error']:.4f} test_loss {row['test_loss']:.4f} "
        f"test_error {row['test_error']:.4f} lr {row['lr']:.4g}"
    )
    if bar is not None:
        bar.set_postfix(epoch=row["epoch"], test_error=f"{row['test_error']:.4f}")
        bar.write(msg)
    elif mode == "log":
        log.info(msg)
