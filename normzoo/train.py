"""One training run, and the Hydra entry point that sweeps runs: ``normzoo-train`` /
``python -m normzoo.train``.

::

    normzoo-train norm=gn data.batch_size=8                       # one run -> outputs/<date>/<time>/
    normzoo-train -m norm=bn,gn data.batch_size=2,8,32 seed=0,1   # a sweep -> multirun/<date>/<time>/
    normzoo-train -m experiment=digits                            # a named study (its own ranges)

A run: validate the config, load the data onto the device, build the model (a combination that
cannot apply is recorded as ``invalid`` here, before any training), train for a fixed number of
epochs with SGD (momentum 0.9) or AdamW, the linear scaling rule ``lr = base_lr * B / 32`` (Goyal et
al. 2017, as in the GN paper), a linear warm-up then a cosine decay, set per step. Batch Renorm's
(r, d) schedule is driven by the run's progress (every module's ``set_progress(p)``, as
``normzoo.norms.batch.set_progress(model, p)`` calls it, every step). At the end, the mismatch
diagnostics (``normzoo.diagnostics``).

Every run writes ``metrics.json`` in its Hydra output dir, atomically (temp file in the same dir,
fsync, ``os.replace``), with ``status`` one of ``ok``, ``failed`` (an exception: its text and
traceback tail), ``diverged`` (a NaN/inf loss: the step), ``invalid`` (the combination cannot run).

Failures and sweeps. Hydra re-raises a job's exception only after the whole batch of jobs has run,
and then ends the multirun (no ``on_multirun_end``: no report). So the task function catches every
exception, records it in ``metrics.json`` and returns: the sweep always goes on. The process exit
status still says what happened: a single run exits 1 if ``failed``, 2 if ``invalid``, 3 if
``diverged``; a multirun exits 1 if any of its runs ``failed`` (``diverged``/``invalid`` are results
of a study, not errors). A config error (out of range, unknown norm, a norm option its layer
refuses, a ``model.*`` key a swept model lacks, ``device=cuda`` without a GPU, a missing data set)
stops a single run before anything is loaded, and a multirun before its first job
(:class:`SweepGuard` checks every swept value). A job killed from outside (SIGKILL, out of
memory) leaves no ``metrics.json``; joblib's loky then aborts the remaining jobs (a crashed worker
process cannot be recovered from); a rerun into the same sweep dir redoes it.

Resume. Run dirs of a sweep are named by the job's overrides (``hydra.job.override_dirname``), so
running the same study again into the same sweep dir finds the same dirs. With ``resume=true`` (the
default) a run whose dir already holds a ``metrics.json`` with status ``ok``, ``invalid`` or
``diverged`` *for the same config* (the recorded ``config`` equals this one, keys in
:data:`RESULT_NEUTRAL_KEYS` aside) is skipped before anything is loaded and its ``metrics.json`` is
left untouched: those statuses are deterministic results of the config, rerunning would give them
again. ``failed`` runs, dirs without a ``metrics.json`` (killed) and runs whose config changed are
run again; ``resume=false`` reruns everything. The code revision is not compared: after changing
the code, rerun with ``resume=false`` (each record names its ``git_rev`` and ``git_dirty`` paths).
``metrics.json`` is written once, at the end, by an atomic rename: a run killed at any point leaves
either no ``metrics.json`` or the previous complete one, never a partial one; the temp files a
kill can leave (``.metrics.json.*.tmp``, ``.checkpoint.pt.*.tmp``) are not read by anything and
are removed when the run is started again.

Checkpoints (``train.checkpoint=auto|true|false``; ``auto``: on for every data set but digits,
and for any run longer than :data:`AUTO_CHECKPOINT_STEPS` steps). At the end of every epoch the run
writes ``checkpoint.pt`` atomically into its dir: model, optimizer, the global step (the lr
schedule and Batch Renorm's progress follow from it), the epoch-order generator and torch's RNG
states, the curves so far and the training time. Started again, it continues after the last saved
epoch; the final metrics equal an uninterrupted run's bitwise on CPU (timings aside). A checkpoint
written for another config is ignored. It is deleted when the run ends ``ok``, ``invalid`` or
``diverged``, and kept when it ``failed``.

Provenance. Every record holds the flattened config, ``command`` (``sys.argv``), the job's task
overrides (``task_overrides``) and ``rerun_command``: ``normzoo-train <overrides>`` reruns that one
row (a study's jobs include ``experiment=<study>``), at the recorded ``git_rev``, with
``git_dirty`` listing the uncommitted paths under ``normzoo/`` and ``conf/`` at run time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import itertools
import json
import logging
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import normzoo
from normzoo.config import (
    CONF_DIR,
    NORM_RESERVED_KEYS,
    ConfigError,
    InvalidCombination,
    check_override,
    check_value,
    explicit_norm_keys,
    flatten,
    layer_options_from_flat,
    model_node,
    norm_choices,
    norm_layer_options,
    norm_node,
    suggest_norm,
    validate,
    validate_model,
    validate_norm,
)
from normzoo.data import DataBundle, DataNotFoundError, batches_per_epoch, epoch_order, load_data
from normzoo.models import build_model, check_batch_size, count_parameters
from normzoo.registry import get_norm

__all__ = [
    "AUTO_CHECKPOINT_STEPS",
    "EXIT_CODES",
    "KEEP_ON_RESUME",
    "RESULT_NEUTRAL_KEYS",
    "SCHEMA_VERSION",
    "SweepGuard",
    "SweepRejected",
    "check_sweep",
    "evaluate",
    "lr_schedule",
    "main",
    "resolve_device",
    "run",
    "write_json_atomic",
]

log = logging.getLogger("normzoo.train")

#: version of the metrics.json layout; bump when a key changes meaning. 2: ``train_time_s`` (and
#: ``steps_per_s``) time the training steps only, the evaluations are ``eval_time_s``; the
#: diagnostics' eval-mode error is ``test_error_ema``/``test_loss_ema`` (it replaced ``test_error``
#: /``test_loss``, now always the last epoch's evaluation, at the training batch size for a layer
#: without running statistics).
SCHEMA_VERSION = 2
#: exit status of a single run by its status.
EXIT_CODES = {"ok": 0, "failed": 1, "config_error": 1, "invalid": 2, "diverged": 3}
METRICS_FILE = "metrics.json"
#: in the sweep dir: the number of jobs, then one line per finished job (SweepGuard's [k/N] lines)
PROGRESS_FILE = ".normzoo_progress"
CHECKPOINT_FILE = "checkpoint.pt"
#: statuses a rerun with resume=true keeps: deterministic results of the config
KEEP_ON_RESUME = ("ok", "invalid", "diverged")
#: config keys that do not change a run's result (a finished run recorded with other values counts,
#: a checkpoint written with other values is continued). ``device`` is compared as resolved
#: (``auto`` on a CPU-only machine is ``cpu``); ``diagnostics.enabled`` changes what a run records.
RESULT_NEUTRAL_KEYS = frozenset(
    {
        "resume",
        "threads",
        "train.progress",
        "train.checkpoint",
        "report.out",
        "data.root",
        "data.download",
    }
)
#: train.checkpoint=auto saves checkpoints for runs longer than this many optimizer steps
AUTO_CHECKPOINT_STEPS = 20_000

_last_status: str | None = None  # the status of the last run in this process (single-run exit code)
_sweep_failed: int = 0  # failed runs counted by SweepGuard at the end of a multirun
_multirun_seen = False  # SweepGuard ran in this process: exit by the sweep's summary


class Diverged(RuntimeError):
    """The training loss became NaN or inf at ``step`` (0-based global optimizer step)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step}")
        self.step = step


# ----------------------------------------------------------------------------- small pieces


def resolve_device(name: Any) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a :class:`ConfigError`."""
    name = getattr(name, "name", name)  # the Device enum or a plain string
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda but no CUDA GPU is visible to torch (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}); use device=cpu or "
            "device=auto"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: allowed auto, cpu, cuda")
    return torch.device(name)


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


def batch_stats_in_eval(model: nn.Module) -> bool:
    """Whether some norm layer of ``model`` normalises with batch statistics even in eval mode: a
    batch-statistics layer (registered with ``uses_batch_stats``, or a torch BatchNorm) without
    running statistics (``track_running_stats=False``)."""
    classes: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
    for name in normzoo.list_norms():
        spec = get_norm(name)
        if spec.uses_batch_stats and isinstance(spec.cls, type):
            classes += (spec.cls,)
    for m in model.modules():
        if isinstance(m, classes) and (
            not getattr(m, "track_running_stats", True)
            or not isinstance(getattr(m, "running_mean", None), Tensor)
            or not isinstance(getattr(m, "running_var", None), Tensor)
        ):
            return True
    return False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 1000,
    train_batch_size: int | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` in eval mode (running statistics).

    Eval-mode outputs do not depend on the batch, so the samples go through in batches of
    ``batch_size``. Except when a layer normalises with batch statistics in eval mode too
    (:func:`batch_stats_in_eval`): then each sample is evaluated in a batch of
    ``train_batch_size`` (the batch size the model trained with; required then), in the data's
    order, and the last partial batch is filled up with samples from the start of ``x`` (only its
    own samples are counted), so that no batch is larger or smaller than in training (one large
    batch would normalise with the whole test set's statistics, transductively, and a last batch
    of one sample has no batch statistics at all).
    """
    n = len(y)
    fill = False
    if batch_stats_in_eval(model):
        if train_batch_size is None:
            raise ValueError(
                "evaluate: the model normalises with batch statistics in eval mode (a layer "
                "without running statistics); pass train_batch_size"
            )
        batch_size, fill = min(int(train_batch_size), max(n, 1)), True
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    wrong = torch.zeros((), device=x.device, dtype=torch.long)
    try:
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            k = len(yb)
            if fill and k < batch_size:
                xb = torch.cat([xb, x[: batch_size - k]])
            out = model(xb)[:k]
            loss_sum += F.cross_entropy(out.float(), yb, reduction="sum").double()
            wrong += (out.argmax(1) != yb).sum()
    finally:
        model.train(was_training)
    n = max(n, 1)
    return float(loss_sum) / n, float(wrong) / n


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that ``path`` is either absent, the old file, or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normzoo": normzoo.__version__,
        "hydra": hydra.__version__,
        "numpy": version("numpy"),
        "sklearn": version("scikit-learn"),
        "torchvision": version("torchvision"),
    }


@functools.lru_cache(maxsize=1)
def _git_rev() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding the normzoo sources, or None."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(normzoo.__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _git_dirty() -> list[str] | None:
    """Uncommitted paths under ``normzoo/`` and ``conf/`` of the source checkout, or None."""
    root = Path(normzoo.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "normzoo", "conf"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return sorted(line[3:] for line in out.stdout.splitlines() if line.strip())


def _task_overrides() -> list[str] | None:
    """The job's command-line overrides (``hydra.overrides.task``), or None outside Hydra."""
    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra (a test calling run() directly)
        return False


def _output_dir(out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        path = Path(out_dir)
    else:
        try:
            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:
            path = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _optional(module: str, name: str) -> Any:
    """``module.name`` if both exist (the layer files land independently), else None."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _make_optimizer(cfg_optim: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
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


def _clip_fractions(model: nn.Module) -> dict[str, float]:
    """Mean over Batch Renorm layers of the fraction of r and d clipped at the last step."""
    r = [float(m.clip_fraction_r) for m in model.modules() if hasattr(m, "clip_fraction_r")]
    d = [float(m.clip_fraction_d) for m in model.modules() if hasattr(m, "clip_fraction_d")]
    out = {}
    if r:
        out["brn_clip_r"] = sum(r) / len(r)
    if d:
        out["brn_clip_d"] = sum(d) / len(d)
    return out


# ----------------------------------------------------------------------------- training


@dataclass
class _Fit:
    steps: int = 0
    #: seconds in the training (each epoch's shuffle and steps, epoch 1's data-dependent init)
    train_time_s: float = 0.0
    #: seconds in the per-epoch test evaluations
    eval_time_s: float = 0.0
    curves: list[dict[str, Any]] = field(default_factory=list)


def _progress_mode(cfg: DictConfig) -> str:
    mode = getattr(cfg.train.progress, "name", str(cfg.train.progress))
    if mode == "auto":
        return "bar" if sys.stderr.isatty() and not _is_multirun() else "log"
    return mode


def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: DictConfig,
    device: torch.device,
    state: _Fit,
    checkpoint: Path | None = None,
) -> None:
    """Train ``model`` in place; append one dict per epoch to ``state.curves``.

    ``checkpoint``: a path to continue from when it holds a checkpoint of this config, and to
    write (atomically) at the end of every epoch.

    Timing: ``state.train_time_s`` sums the time of each epoch's shuffle and training steps (and
    of the data-dependent init, if any) only: the per-epoch test evaluation, logging and
    checkpoint writes are left out (on a GPU the clock is read after a synchronisation);
    ``state.eval_time_s`` sums the evaluations. A resumed run continues both from the checkpoint.

    Raises:
        Diverged: at the first step whose loss is NaN/inf.
    """
    batch_size = int(cfg.data.batch_size)
    grouped = int(cfg.data.classes_per_batch)
    epochs = int(cfg.train.epochs)
    steps_per_epoch = batches_per_epoch(data, batch_size, grouped)
    total = steps_per_epoch * epochs
    peak = _peak_lr(cfg)
    warmup = round(float(cfg.train.warmup_fraction) * total)
    lrs = lr_schedule(total, peak, warmup, float(cfg.train.final_lr_fraction))
    opt = _make_optimizer(cfg.optim, model, lrs[0])
    check_every = int(cfg.train.check_every) or 50
    smoothing = float(cfg.train.label_smoothing)
    clip = float(cfg.train.grad_clip)
    params = [p for p in model.parameters() if p.requires_grad]
    # the layers that follow the run's progress (Batch Renorm's limits), told every step; the
    # list is made once (what normzoo.norms.batch.set_progress(model, p) would walk each step)
    progress_hooks = [
        method for m in model.modules() if callable(method := getattr(m, "set_progress", None))
    ]
    forward = torch.compile(model) if cfg.train.compile else model
    generator = torch.Generator().manual_seed(int(cfg.seed))
    on_cpu = device.type == "cpu"
    step, first_epoch = 0, 1
    saved = _load_checkpoint(checkpoint, cfg, device) if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        state.curves = list(saved["curves"])
        step, first_epoch = saved["step"], saved["epoch"] + 1
        state.train_time_s = float(saved["train_time_s"])
        state.eval_time_s = float(saved.get("eval_time_s", 0.0))  # absent before it was recorded
        log.info("resuming from %s: epoch %d done, step %d", checkpoint, saved["epoch"], step)

    mode = _progress_mode(cfg)
    bar = None
    if mode == "bar":
        try:
            from tqdm.auto import tqdm
        except ImportError:  # a declared dependency, but a missing bar must not fail a run
            log.warning("tqdm is not installed: plain log lines instead of a progress bar")
            mode = "log"
        else:
            bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=False)

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
            losses = torch.zeros(steps_per_epoch, device=device)
            loss_sum = 0.0
            correct = torch.zeros(steps_per_epoch, device=device, dtype=torch.long)
            checked = 0
            if epoch == 1 and cfg.norm.get("data_init", False):
                count = max(int(cfg.norm.get("data_init_samples", batch_size)), batch_size)
                _data_dependent_init(model, xs[:count])
            for i in range(steps_per_epoch):
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
                    if (i + 1) % check_every == 0 or i + 1 == steps_per_epoch:
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
            test_loss, test_error = evaluate(
                model, data.test_x, data.test_y, int(cfg.data.eval_batch_size), batch_size
            )
            state.eval_time_s += time.perf_counter() - evaluating_since
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / steps_per_epoch if on_cpu else float(losses.mean()),
                "train_error": 1.0 - float(correct.sum()) / (steps_per_epoch * batch_size),
                "test_loss": test_loss,
                "test_error": test_error,
                "lr": lrs[step - 1],
                **_clip_fractions(model),
            }
            state.curves.append(row)
            msg = (
                f"epoch {epoch}/{epochs} step {step}/{total} train_loss {row['train_loss']:.4f} "
                f"train_error {row['train_error']:.4f} test_loss {test_loss:.4f} "
                f"test_error {test_error:.4f} lr {row['lr']:.4g}"
            )
            if bar is not None:
                bar.set_postfix(epoch=epoch, test_error=f"{test_error:.4f}")
                bar.write(msg)
            elif mode == "log":
                log.info(msg)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, cfg, model, opt, generator, device, epoch, state)
    finally:
        torch.backends.mkldnn.enabled = mkldnn_before
        state.steps = step
        if stepping_since is not None:  # stopped in the middle of an epoch's steps
            state.train_time_s += time.perf_counter() - stepping_since
        if bar is not None:
            bar.close()


def _comparable_config(
    cfg: DictConfig | dict[str, Any],
    device: str | torch.device | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The flattened config as JSON stores it, without :data:`RESULT_NEUTRAL_KEYS`, with
    ``device`` replaced by the resolved device type when given, and the ``norm.<option>`` and
    ``norm_options.*`` keys replaced by the layer options the run uses (``norm.layer_options``;
    ``overrides``: the job's task overrides, default this job's): two runs with equal values here
    give the same result."""
    if isinstance(cfg, DictConfig):
        flat = flatten(cfg)
        if overrides is None:
            overrides = _task_overrides()
    else:
        flat = dict(cfg)
    flat = json.loads(json.dumps(flat, default=str))
    if device is not None:
        with contextlib.suppress(RuntimeError, TypeError):
            flat["device"] = torch.device(device).type
    layer = layer_options_from_flat(flat, overrides)
    if layer is not None:
        flat = {
            k: v
            for k, v in flat.items()
            if not (k == "norm_options" or k.startswith("norm_options."))
            and not (k.startswith("norm.") and k.split(".")[1] not in NORM_RESERVED_KEYS)
        }
        flat["norm.layer_options"] = layer
    return {k: v for k, v in flat.items() if k not in RESULT_NEUTRAL_KEYS}


def _resolved_device(cfg: DictConfig) -> str | None:
    """The device type a run of ``cfg`` uses, or None if it cannot run here."""
    try:
        return resolve_device(cfg.device).type
    except ConfigError:
        return None


def _save_checkpoint(
    path: Path,
    cfg: DictConfig,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    epoch: int,
    state: _Fit,
) -> None:
    """Everything the next epoch depends on, written to a temp file and renamed over ``path``."""
    payload = {
        "format": 1,
        "config": json.dumps(_comparable_config(cfg, device), sort_keys=True),
        "epoch": epoch,
        "step": state.steps,
        "train_time_s": state.train_time_s,
        "eval_time_s": state.eval_time_s,
        "curves": json.dumps(state.curves, allow_nan=True),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_checkpoint(
    path: Path, cfg: DictConfig, device: torch.device | None = None
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists, loads, and was written for this config."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved["curves"] = json.loads(saved["curves"])
        same = json.loads(saved["config"]) == _comparable_config(cfg, device)
    except Exception as exc:  # a damaged checkpoint costs the epochs it held, not the run
        log.warning("ignoring unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if not same:
        log.warning("ignoring checkpoint %s: written for another config", path)
        return None
    return saved


def _use_checkpoint(cfg: DictConfig, total_steps: int) -> bool:
    setting = cfg.train.get("checkpoint", "auto")
    if setting == "auto":
        return str(cfg.data.name) != "digits" or total_steps > AUTO_CHECKPOINT_STEPS
    return bool(setting)


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


def _data_dependent_init(model: nn.Module, x: Tensor) -> None:
    init = _optional("normzoo.norms.weight", "data_dependent_init")
    if init is None:
        raise RuntimeError(
            "norm.data_init=true but normzoo.norms.weight has no data_dependent_init(model, x)"
        )
    init(model, x)


def _peak_lr(cfg: DictConfig) -> float:
    base = float(cfg.optim.base_lr)
    if not cfg.optim.scale_lr:
        return base
    return base * int(cfg.data.batch_size) / int(cfg.optim.reference_batch_size)


# ----------------------------------------------------------------------------- one run


def _base_record(cfg: DictConfig) -> dict[str, Any]:
    try:
        spec = get_norm(str(cfg.norm.name))
        norm = {
            "norm": spec.name,
            "norm_kind": spec.kind,
            "uses_batch_stats": spec.uses_batch_stats,
            "reference": spec.reference,
        }
    except Exception:  # an unknown name is reported by validate(); keep what was asked for
        norm = {
            "norm": str(cfg.norm.get("name")),
            "norm_kind": None,
            "uses_batch_stats": None,
            "reference": None,
        }
    try:
        lr = _peak_lr(cfg)
    except Exception:
        lr = None
    overrides = _task_overrides()
    return {
        "schema_version": SCHEMA_VERSION,
        "status": None,
        "error": None,
        "error_step": None,
        **norm,
        "norm_layer_options": None,
        "model": str(cfg.model.get("name")),
        "data": str(cfg.data.name),
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "base_lr": cfg.optim.base_lr,
        "lr": lr,
        "epochs": cfg.train.epochs,
        "optimizer": str(cfg.optim.name),
        "device": getattr(cfg.device, "name", str(cfg.device)),
        "threads": cfg.threads,
        "study": cfg.get("study"),
        "config": flatten(cfg),
        "train_loss": None,
        "train_error": None,
        "test_loss": None,
        "test_error": None,
        "curves": [],
        "steps": 0,
        "num_params": None,
        "wall_time_s": None,
        "train_time_s": None,
        "eval_time_s": None,
        "steps_per_s": None,
        "versions": _versions(),
        "git_rev": _git_rev(),
        "git_dirty": _git_dirty(),
        "hostname": socket.gethostname(),
        "command": list(sys.argv),
        "task_overrides": overrides,
        "rerun_command": (
            shlex.join(["normzoo-train", *overrides]) if overrides is not None else None
        ),
        "started_at": _now(),
        "finished_at": None,
    }


def _start_errors(cfg: DictConfig) -> tuple[torch.device, Any]:
    """Everything that must fail before any data is loaded: ranges, registry, device, diagnostics."""
    validate(cfg, explicit=explicit_norm_keys(_task_overrides()))
    device = resolve_device(cfg.device)
    diagnose = None
    if cfg.diagnostics.enabled:
        try:
            diagnose = importlib.import_module("normzoo.diagnostics").run_diagnostics
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"diagnostics.enabled=true but normzoo.diagnostics.run_diagnostics cannot be "
                f"imported ({type(exc).__name__}: {exc}); fix the install or set "
                f"diagnostics.enabled=false"
            ) from exc
    return device, diagnose


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """One run of ``cfg``; writes ``metrics.json`` into ``out_dir`` (default: Hydra's output dir).

    Never raises for a failure of the run itself (it is recorded); a config error raises
    :class:`ConfigError` outside a multirun (in a multirun it is recorded as ``failed``).
    With ``cfg.resume`` a finished result of the same config already in ``out_dir`` is kept and
    nothing runs (the returned dict then has ``skipped=True``).
    """
    global _last_status
    t_start = time.perf_counter()
    out = _output_dir(out_dir)
    if cfg.get("resume", False):
        kept = _kept_result(out, cfg)
        if kept is not None:
            _last_status = kept["status"]
            log.info("resume: %s is already %s; kept (resume=false reruns it)", out, kept["status"])
            return {"status": kept["status"], "error": kept.get("error"), "dir": str(out),
                    "skipped": True}  # fmt: skip
    _remove_temp_files(out)
    record = _base_record(cfg)
    checkpoint: Path | None = None
    fit_state = _Fit()
    model: nn.Module | None = None
    try:
        device, diagnose = _start_errors(cfg)
        record["device"] = str(device)
        if int(cfg.threads) > 0:
            torch.set_num_threads(int(cfg.threads))
        if device.type == "cuda":  # CPU kernels are deterministic at a fixed thread count already
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(bool(cfg.train.deterministic), warn_only=True)
            torch.backends.cudnn.benchmark = not bool(cfg.train.deterministic)
        torch.manual_seed(int(cfg.seed))

        data = load_data(cfg.data, device)
        spec = get_norm(str(cfg.norm.name))
        steps_per_epoch = batches_per_epoch(
            data, int(cfg.data.batch_size), int(cfg.data.classes_per_batch)
        )
        if steps_per_epoch < 1:
            raise InvalidCombination(
                f"data.batch_size={cfg.data.batch_size} exceeds the {len(data.train_y)} training "
                f"samples (partial batches are dropped): no training step"
            )
        torch.manual_seed(int(cfg.seed))  # the model's init does not depend on the data loading
        layer_options = norm_layer_options(cfg, explicit_norm_keys(_task_overrides()))
        record["norm_layer_options"] = layer_options
        model = build_model(
            cfg.model, spec.name, layer_options, data.input_shape, data.num_classes
        ).to(device)
        check_batch_size(model, spec.name, data.input_shape, int(cfg.data.batch_size))
        record["num_params"] = count_parameters(model)
        log.info(
            "run %s on %s: %s/%s B=%d seed=%d lr=%.4g epochs=%d (%d steps) -> %s",
            spec.name, device, cfg.model.name, data.name, cfg.data.batch_size, cfg.seed,
            record["lr"], cfg.train.epochs, steps_per_epoch * int(cfg.train.epochs), out,
        )  # fmt: skip

        if _use_checkpoint(cfg, steps_per_epoch * int(cfg.train.epochs)):
            checkpoint = out / CHECKPOINT_FILE
        fit(model, data, cfg, device, fit_state, checkpoint)
        last = fit_state.curves[-1]
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            record[key] = last[key]
        if diagnose is not None:  # its own keys: the run's test_error/test_loss stay the curves'
            record.update(
                diagnose(
                    model,
                    data,
                    batch_size=int(cfg.data.batch_size),
                    precise_samples=int(cfg.diagnostics.precise_samples),
                    seed=int(cfg.seed),
                    eval_batch_size=int(cfg.data.eval_batch_size),
                )
            )
        record["status"] = "ok"
    except InvalidCombination as exc:
        record.update(status="invalid", error=str(exc))
        log.warning("invalid combination: %s", exc)
    except Diverged as exc:
        record.update(status="diverged", error=str(exc), error_step=exc.step)
        log.warning("diverged: %s", exc)
    except (ConfigError, DataNotFoundError) as exc:
        if not _is_multirun():
            raise
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        log.error("config error: %s", exc)
    except Exception as exc:
        tail = traceback.format_exc().strip().splitlines()[-30:]
        record.update(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            error_step=fit_state.steps if fit_state.steps else None,
            traceback="\n".join(tail),
        )
        log.error("run failed: %s\n%s", exc, "\n".join(tail))
    finally:
        record["curves"] = fit_state.curves
        record["steps"] = fit_state.steps
        record["train_time_s"] = fit_state.train_time_s
        record["eval_time_s"] = fit_state.eval_time_s
        record["steps_per_s"] = (
            fit_state.steps / fit_state.train_time_s if fit_state.train_time_s > 0 else None
        )
        record["wall_time_s"] = time.perf_counter() - t_start
        record["finished_at"] = _now()
        if record["status"] is not None:
            write_json_atomic(out / METRICS_FILE, record)
            _last_status = record["status"]
        if record["status"] in KEEP_ON_RESUME:  # a finished result: nothing left to continue
            with contextlib.suppress(OSError):
                (out / CHECKPOINT_FILE).unlink()
    if record["status"] != "ok":
        log.info("status %s -> %s", record["status"], out / METRICS_FILE)
    return {"status": record["status"], "error": record["error"], "dir": str(out)}


def _kept_result(out: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The ``metrics.json`` in ``out`` if a rerun keeps it: a status in :data:`KEEP_ON_RESUME`
    recorded for the same config (up to :data:`RESULT_NEUTRAL_KEYS`)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("status") not in KEEP_ON_RESUME:
            return None
        mine = _comparable_config(cfg, _resolved_device(cfg))
        theirs = _comparable_config(
            old.get("config") or {}, old.get("device"), old.get("task_overrides")
        )
        if theirs != mine:
            log.info("resume: %s holds a result of another config; running again", out)
            return None
    except (OSError, ValueError, AttributeError):
        return None  # unreadable or not an object: run again
    return old


def _remove_temp_files(out: Path) -> None:
    """Temp files of an atomic write killed mid-way (never read; a rerun writes new ones)."""
    for name in (METRICS_FILE, CHECKPOINT_FILE):
        for tmp in out.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


# ----------------------------------------------------------------------------- sweeps


class SweepRejected(SystemExit):
    """A multirun refused before its first job. A ``SystemExit`` (exit status 1, the message on
    stderr) because Hydra turns an ``Exception`` raised in a callback into a warning and goes on."""

    def __init__(self, message: str) -> None:
        super().__init__(f"normzoo-train: error: {message}")


class SweepGuard(Callback):
    """Hydra callback for multiruns (wired in ``conf/config.yaml``).

    ``on_multirun_start``: before the first job, check every swept value (and the shared config)
    with :func:`normzoo.config.validate` / :func:`normzoo.config.check_value`: an out-of-range or
    mistyped value or an unknown group option stops the sweep before any training, and so does a
    sweep over a key left out of the run-directory names (``threads``, ``device``, ...: its jobs
    would share one dir).
    ``on_job_end`` (in the process that ran the job: a joblib/submitit worker, whose output the
    console does not show, or this one) appends ``<overrides>: <status> (<seconds>)`` to
    :data:`PROGRESS_FILE` in the sweep dir, and a thread of the launching process prints each new
    line as ``[k/N] ...`` (it reads the small file once a second).
    ``on_multirun_end``: count this sweep's ``metrics.json`` by status (and those older than the
    sweep, kept by ``resume``), log failed ones, and make the process exit non-zero if any run of
    this sweep ``failed``.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.job_started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _multirun_seen
        _multirun_seen = True
        self.started = time.time()
        try:
            check_sweep(config)
        except (ConfigError, DataNotFoundError) as exc:
            raise SweepRejected(str(exc)) from None
        global _progress
        with contextlib.suppress(OSError, ValueError):  # progress lines are a courtesy
            sweep_dir = Path(str(config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            path = sweep_dir / PROGRESS_FILE
            path.write_text(f"{count_jobs(config)}\n", encoding="utf-8")
            _progress = _ProgressPrinter(path)
            _progress.start()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not _is_multirun():
            return
        try:
            seconds = time.perf_counter() - self.job_started if self.job_started else None
            # JobReturn.return_value re-raises a failed job's exception: read what it holds
            value = getattr(job_return, "_return_value", None)
            if isinstance(value, dict):
                status = str(value.get("status"))
                if value.get("skipped"):
                    status += ", kept from before"
            elif isinstance(value, BaseException):
                status = f"error ({type(value).__name__})"
            else:
                status = "config error" if value is None else str(value)
            overrides = " ".join(getattr(job_return, "overrides", None) or []) or "(no overrides)"
            took = f" ({seconds:.1f}s)" if seconds is not None else ""
            _append_line(Path(str(config.hydra.sweep.dir)) / PROGRESS_FILE,
                         f"{overrides}: {status}{took}".replace("\n", " "))  # fmt: skip
        except Exception as exc:  # never let the progress line break a job
            log.debug("progress line: %s: %s", type(exc).__name__, exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_failed, _progress
        if _progress is not None:
            _progress.stop()
            _progress = None
        sweep_dir = Path(str(config.hydra.sweep.dir))
        counts: dict[str, int] = {}
        failed = []
        kept = 0
        for path in sorted(sweep_dir.glob(f"**/{METRICS_FILE}")):
            if path.stat().st_mtime < self.started - 1:
                kept += 1  # written before this sweep started: kept by resume, or another sweep's
                continue
            try:
                status = json.loads(path.read_text()).get("status", "unreadable")
            except (OSError, ValueError):
                status = "unreadable"
            counts[status] = counts.get(status, 0) + 1
            if status in ("failed", "unreadable"):
                failed.append(str(path.parent))
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"
        if kept:
            summary += f" (+{kept} finished before this sweep, not rerun)"
        log.info("sweep %s: %s", sweep_dir, summary)
        for path in failed:
            log.error("failed run: %s", path)
        _sweep_failed = len(failed)


def _append_line(path: Path, line: str) -> None:
    """Append one line to the progress file (if the sweep started one), under a lock."""
    if not path.is_file():
        return
    with open(path, "a", encoding="utf-8") as f:
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")


class _ProgressPrinter(threading.Thread):
    """In the launching process: print each job line the workers append to the progress file as
    ``[k/N] <line>``, polling once a second (a daemon thread; :meth:`stop` prints the rest)."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        super().__init__(name="normzoo-progress", daemon=True)
        self.path, self.interval = path, interval
        self.printed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.drain()

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=5)
        self.drain()

    def drain(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except OSError:
            return
        total = lines[0].strip() or "?"
        done = lines[1:-1]  # the last item: after the final newline (or a line being written)
        for line in done[self.printed :]:
            self.printed += 1
            log.info("[%d/%s] %s", self.printed, total, line)


_progress: _ProgressPrinter | None = None


def _sweep_overrides(config: DictConfig) -> list[Any]:
    """The overrides a multirun's jobs get, parsed: the sweeper's ``params`` then the command line,
    a later override of a key replacing an earlier one in its place (as Hydra's basic sweeper
    does: ``-m experiment=digits model=mlp`` replaces the study's ``model: mlp,cnn``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()]
    args += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    final: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(args):
        final[override.get_key_element()] = override
    return list(final.values())


def count_jobs(config: DictConfig) -> int:
    """The number of jobs a multirun launches: the product of its sweeps' lengths."""
    from hydra.core.override_parser.types import Transformer

    return math.prod(
        len(list(o.sweep_iterator(transformer=Transformer.identity)))
        for o in _sweep_overrides(config)
        if o.is_sweep_override()
    )


def _groups() -> dict[str, list[str]]:
    out = {"norm": norm_choices()}
    for path in CONF_DIR.iterdir():
        if path.is_dir() and path.name not in ("norm", "hydra"):
            out[path.name] = sorted(p.stem for p in path.glob("*.yaml"))
    return out


def check_sweep(config: DictConfig) -> None:
    """Check every value a multirun will use, before it starts.

    Raises:
        ConfigError: naming the key and the value.
    """
    from hydra.core.override_parser.types import Transformer

    overrides = _sweep_overrides(config)
    args = [o.input_line for o in overrides]
    groups = _groups()
    probe = copy.deepcopy(config)
    swept: set[str] = set()
    unnamed = set(
        OmegaConf.select(config, "hydra.job.config.override_dirname.exclude_keys", default=None)
        or []
    )
    model_options: list[str] = []  # the swept model options, in order
    model_overrides = []
    norm_options: list[str] = []  # the swept norm options, in order
    norm_overrides = []
    for override in overrides:
        key = override.key_or_group
        if key.startswith("model.") and not override.is_delete():
            model_overrides.append(override)
        if key.startswith("norm.") and not override.is_delete():
            norm_overrides.append(override)
        if override.is_sweep_override() and key in unnamed:
            raise ConfigError(
                f"{override.input_line}: {key} is left out of the run-directory names "
                f"(hydra.job.config.override_dirname.exclude_keys), so the jobs of a sweep over it "
                f"would all write into the same directories; run one sweep per value of {key}, "
                f"each with its own hydra.sweep.dir"
            )
        if override.is_hydra_override() or key.startswith("hydra") or override.is_delete():
            continue
        if override.is_sweep_override():
            values = list(override.sweep_iterator(transformer=Transformer.identity))
            if key in groups:  # the shared config does not know which option a job gets
                swept.add(key)
                if key == "model":
                    model_options += [str(v) for v in values if str(v) not in model_options]
                if key == "norm":
                    norm_options += [str(v) for v in values if str(v) not in norm_options]
        else:
            values = [override.value()]
        for value in values:
            if key in groups:
                if str(value) not in groups[key]:
                    if key == "norm":
                        raise ConfigError(suggest_norm(str(value)))
                    raise ConfigError(
                        f"{key}={value}: no such option; choices: {', '.join(groups[key])}"
                    )
                if key == "data" and override.is_sweep_override():
                    from normzoo.data import check_available

                    # the root/download the jobs will use: the shared config's (command line)
                    check_available(OmegaConf.merge(config.data, {"name": str(value)}))
                continue
            if not override.is_add() and OmegaConf.select(probe, key, default=None) is not None:
                try:
                    OmegaConf.update(probe, key, value, merge=True)
                except Exception as exc:
                    raise ConfigError(f"{key}={value!r}: {exc}".split("\n")[0]) from None
            check_value(key, value)
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    explicit = explicit_norm_keys(args)
    validate(task, skip=tuple(sorted(swept)), explicit=explicit)
    if "model" in swept or model_overrides:
        _check_models(config, model_options, model_overrides)
    if "norm" in swept or any(o.is_sweep_override() for o in norm_overrides):
        _check_norms(config, norm_options, norm_overrides, explicit)
    if "data" not in swept:
        from normzoo.data import check_available

        check_available(task.data)
    resolve_device(task.device)  # device=cuda without a GPU: before the first job, not in each


def _job_nodes(
    base: DictConfig, overrides: list[Any], where: str = ""
) -> Iterator[tuple[DictConfig, tuple[tuple[str, Any], ...]]]:
    """A group's node (``model`` / ``norm``) as each job of a sweep gets it: ``base`` with the
    plain ``overrides`` applied, once per combination of the swept ones, with that combination."""
    from hydra.core.override_parser.types import Transformer

    base = copy.deepcopy(base)
    for override in overrides:
        if not override.is_sweep_override():
            _update_node(base, override.key_or_group, override.value(), where)
    sweeps = [
        [(o.key_or_group, v) for v in o.sweep_iterator(transformer=Transformer.identity)]
        for o in overrides
        if o.is_sweep_override()
    ]
    for combination in itertools.product(*sweeps):
        node = copy.deepcopy(base)
        for key, value in combination:
            _update_node(node, key, value, where)
        yield node, combination


def _check_models(config: DictConfig, swept: list[str], overrides: list[Any]) -> None:
    """Every model a sweep trains, with the ``model.*`` overrides applied to it (every combination
    of the swept ones): a key that one of the swept models lacks, or a value its builder refuses,
    stops the sweep before its first job (it would abort the sweep at that model's first job)."""
    names = swept or [str(config.model.name)]
    where = f" (the sweep over model={','.join(swept)} applies it to every model)" if swept else ""
    for name in names:
        for override in overrides:
            try:
                check_override(override.input_line, name)
            except ConfigError as exc:
                raise ConfigError(f"{exc}{where}") from None
    for name in names:
        base = model_node(name) if swept else config.model
        for node, _ in _job_nodes(base, overrides, where):
            try:
                validate_model(node)
            except ConfigError as exc:
                raise ConfigError(f"model={name}: {exc}{where}") from None


def _check_norms(
    config: DictConfig, swept: list[str], overrides: list[Any], explicit: set[str]
) -> None:
    """Every norm a sweep trains, with the ``norm.*`` overrides applied to it (every combination of
    the swept ones) and the shared ``norm_options``: an option a swept norm does not take, or a
    value its layer refuses (``norm.momentum=0.1,2``), stops the sweep before its first job."""
    norm_options = config.get("norm_options") or {}
    for name in swept or [str(config.norm.name)]:
        base = norm_node(name) if swept else config.norm
        for node, combination in _job_nodes(base, overrides):
            try:
                validate_norm(node, norm_options, explicit)
            except ConfigError as exc:
                job = [f"norm={name}"] if swept else []
                job += [f"{key}={value}" for key, value in combination]
                raise ConfigError(
                    f"{exc}" + (f" (in the jobs with {' '.join(job)})" if job else "")
                ) from None


def _update_node(node: DictConfig, key: str, value: Any, where: str = "") -> None:
    """Set ``key`` (``model.x`` / ``norm.x``: below the node) on a group's node."""
    try:
        OmegaConf.update(node, key.split(".", 1)[1], value, merge=False)
    except Exception as exc:
        raise ConfigError(f"{key}={value!r}: {exc}".split("\n")[0] + where) from None


def _check_argv(argv: list[str]) -> None:
    """Before Hydra starts: refuse an unknown ``norm=`` value (suggesting the closest name), and
    unknown keys or mistyped values (:func:`normzoo.config.check_override`, naming what is
    allowed)."""
    choices = set(norm_choices())
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    models = [a.split("=", 1)[1] for a in overrides if a.startswith("model=")]
    if not models:  # the model a study or the defaults choose
        studies = [a.split("=", 1)[1] for a in overrides if a.startswith("experiment=")]
        models = [_default_model(studies[-1] if studies else None)]
    chosen = models[-1] or ""
    if not chosen or any(ch in chosen for ch in "()[]{}$"):  # sweep syntax: SweepGuard checks
        candidates: list[str | None] = [None]
    else:  # model=cnn,mlp: every model.* key must fit every model of the sweep
        candidates = [m.strip() for m in chosen.split(",") if m.strip()] or [None]
    for arg in overrides:
        for model in candidates:
            try:
                check_override(arg, model)
            except ConfigError as exc:
                if len(candidates) < 2:
                    raise
                raise ConfigError(
                    f"{exc} (the sweep over model={chosen} applies it to every model)"
                ) from None
    for arg in argv:
        if not arg.startswith("norm="):
            continue
        value = arg.split("=", 1)[1]
        if any(ch in value for ch in "()[]{}$"):
            continue  # Hydra's sweep syntax (choice(...), glob(...)): checked by SweepGuard
        for name in value.split(","):
            if name.strip() and name.strip() not in choices:
                raise ConfigError(suggest_norm(name.strip()))


def _default_model(study: str | None) -> str | None:
    """The ``model`` option the defaults lists choose (a study's ``override /model`` first)."""
    files = ([CONF_DIR / "experiment" / f"{study}.yaml"] if study else []) + [
        CONF_DIR / "config.yaml"
    ]
    for path in files:
        try:
            defaults = OmegaConf.load(path).get("defaults") or []
        except Exception:
            continue
        for entry in defaults:
            if isinstance(entry, DictConfig):
                for key, value in entry.items():
                    if str(key).removeprefix("override ").strip("/") == "model":
                        return str(value)
    return None


# ``../conf`` next to this package, as an absolute path: Hydra resolves a relative config_path
# against the *module* (``pkg://conf``, not a package) when the task function is not in __main__,
# which is the case for the ``normzoo-train`` console script.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    global _last_status
    try:
        result = run(cfg)
        if result["status"] == "invalid" and not _is_multirun():  # say it where errors are said
            print(
                f"normzoo-train: error: invalid combination, nothing trained: {result['error']} "
                f"(recorded in {Path(result['dir']) / METRICS_FILE})",
                file=sys.stderr,
            )
        return result
    except (ConfigError, DataNotFoundError) as exc:  # single run: refuse before anything ran
        print(f"normzoo-train: error: {exc}", file=sys.stderr)
        _last_status = "config_error"
        return None


def main() -> None:
    """Console entry point ``normzoo-train`` (Hydra's command line)."""
    global _last_status, _sweep_failed, _multirun_seen
    _last_status, _sweep_failed, _multirun_seen = None, 0, False
    try:
        _check_argv(sys.argv[1:])
    except ConfigError as exc:
        print(f"normzoo-train: error: {exc}", file=sys.stderr)
        sys.exit(1)
    _hydra_main()
    if _multirun_seen:
        sys.exit(1 if _sweep_failed else 0)
    if _last_status is not None:
        sys.exit(EXIT_CODES.get(_last_status, 1))


if __name__ == "__main__":
    # Run the copy imported as ``normzoo.train``: launchers pickle the task function by reference
    # to its module, and ``__main__`` would be pickled by value (with all its globals).
    from normzoo.train import main as _main

    _main()
