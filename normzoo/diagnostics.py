"""Train/inference mismatch diagnostics, computed at the end of every run.

A layer that normalises with batch statistics (BatchNorm, Batch Renorm) computes different functions
in training (statistics of the current batch) and at inference (running EMA statistics). This module
measures that mismatch on the test set, the same way for every layer, so that layers without batch
statistics are *measured* to have none rather than assumed to:

* ``test_error_ema`` / ``test_loss_ema`` — eval mode: every norm layer uses its running (EMA)
  statistics (in batches of ``eval_batch_size``: eval-mode outputs do not depend on the batch; a
  layer without running statistics normalises with those of the test batches, of the training
  batch size). Named apart from a run's own ``test_error``/``test_loss`` (``normzoo.train``'s
  evaluation after the last epoch), which these never replace: the two agree (up to float
  rounding) when every layer has running statistics, and are two measurements where eval mode
  still depends on the batch composition (this one uses shuffled test batches, ``seed``).
* ``test_error_batch_stats`` / ``test_loss_batch_stats`` — the norm layers in training mode, i.e.
  normalising with the statistics of test batches of the training batch size. Nothing is learnt: the
  forward runs under ``no_grad`` and every buffer is restored after each batch.
* ``test_error_precise`` / ``test_loss_precise`` — PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch'
  in BatchNorm", arXiv:2105.07576): the running statistics are replaced by population statistics
  recomputed over >= ``precise_samples`` training samples in batches of the training batch size,
  size-weighted: ``mu_pop = E[mu_B]``, ``var_pop = E[mu_B^2 + var_B] - mu_pop^2``; then eval mode.
  The original buffers are restored afterwards. Up to ``GHOST_SAMPLES`` samples (whole batches)
  go through one forward, each batch normalised on its own (:func:`population_stats`).
* ``kl_batch_vs_ema`` — mean over test samples of ``KL(p_batch || p_ema)`` between the two predictive
  distributions (nats).
* ``batch_dependence`` — how far one sample's output moves when its batch companions are replaced:
  mean over probe samples x of ``||f(x|B1) - f(x|B2)|| / (0.5 (||f(x|B1)|| + ||f(x|B2)||))`` where
  B1, B2 hold x plus ``batch_size - 1`` different random training samples, norm layers in training
  mode. ``batch_dependence_floor`` is the same measurement in eval mode, where no layer depends on its
  companions mathematically: it is the numerical floor of batched float arithmetic (usually exactly 0
  on CPU, since a matmul's row does not depend on the other rows). A layer has no measurable batch
  dependence when ``batch_dependence <= batch_dependence_floor``; both are reported, raw
  (:mod:`normzoo.batch_dependence`).
* ``ema_mean_gap`` / ``ema_log_std_gap`` — over the layers with running statistics, the mean over
  channels of ``|mu_ema - mu_pop| / sigma_pop`` and ``|log(sigma_ema / sigma_pop)|`` with
  ``sigma = sqrt(var + eps)`` (the layer's own eps, as it divides by it), averaged over layers.
* ``brn_clip_r`` / ``brn_clip_d`` — mean over Batch Renorm layers of the fraction of r and d clipped
  in the last training step (``None`` without Batch Renorm).

Norm layers are found by :func:`normzoo.layers.find_norm_layers` (instances of the registered
classes, and foreign layers such as ``nn.BatchNorm2d`` by their ``running_mean``/``running_var``
buffers); PreciseBN's population statistics come from :mod:`normzoo.precise_bn`. Only norm layers
are switched to training mode for the batch-statistics forwards; dropout and the like stay in eval
mode. The model's parameters, buffers, tensor/scalar attributes of its norm layers and the training
flags of all its modules are bitwise unchanged afterwards.

:func:`inference_panel` (test error under each source of statistics: PreciseBN at several sample
counts, batch statistics at several test batch sizes, the EMA) and :func:`variance_shift` (dropout's
train/eval variance shift at each batch-statistics layer) are evaluation-only measurements of the
same kind, in :mod:`normzoo.inference`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normzoo.batch_dependence import dependence_and_floor
from normzoo.batched import batch_stat_logits, batched_logits, cached_test_logits
from normzoo.layers import (
    NormLayer,
    VolatileState,
    find_norm_layers,
    preserved_state,
    set_norm_mode,
)
from normzoo.precise_bn import has_population_stats, population_stats, precise_statistics

__all__ = [
    "NormLayer",
    "find_norm_layers",
    "population_stats",
    "preserved_state",
    "run_diagnostics",
]

_SCALAR_TYPES = (bool, int, float)


def error_and_loss(logits: Tensor, y: Tensor) -> tuple[float, float]:
    """(error rate, mean cross-entropy) of ``logits`` against the labels ``y``."""
    logits = logits.float()
    err = (logits.argmax(dim=1) != y).float().mean().item()
    loss = F.cross_entropy(logits, y).item()
    return err, loss


def _gaps(layer: NormLayer, mean_pop: Tensor, var_pop: Tensor) -> tuple[float | None, float]:
    """(mean gap, log-std gap) EMA vs population; no mean gap without a running mean (EvoNorm-B0)."""
    eps = float(getattr(layer.module, "eps", 1e-5))
    var_ema = layer.module.running_var.double()
    sigma_pop = (var_pop.double() + eps).sqrt()
    mean_gap = None
    if layer.has_running_stats:
        mu_ema = layer.module.running_mean.double()
        mean_gap = ((mu_ema - mean_pop.double()).abs() / sigma_pop).mean().item()
    log_std_gap = (0.5 * ((var_ema + eps) / (var_pop.double() + eps)).log()).abs().mean().item()
    return mean_gap, log_std_gap


def _scalar(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value.detach().float().mean().item()) if value.numel() else None
    if isinstance(value, _SCALAR_TYPES):
        return float(value)
    return None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _check_arguments(
    data: Any, batch_size: int, precise_samples: int, eval_batch_size: int | None
) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if precise_samples < 1:
        raise ValueError(f"precise_samples must be >= 1, got {precise_samples!r}")
    if eval_batch_size is not None and (
        isinstance(eval_batch_size, bool)
        or not isinstance(eval_batch_size, int)
        or eval_batch_size < 1
    ):
        raise ValueError(f"eval_batch_size must be a positive int, got {eval_batch_size!r}")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        if not isinstance(getattr(data, key, None), Tensor):
            raise TypeError(f"data must have a tensor attribute {key!r} (e.g. a DataBundle)")
    if data.test_x.shape[0] < 1 or data.train_x.shape[0] < 1:
        raise ValueError("run_diagnostics needs a non-empty training and test set")


def _ema_and_batch_stats(
    model: nn.Module,
    layers: list[NormLayer],
    data: Any,
    order: Tensor,
    sizes: tuple[int, int],
    volatile: VolatileState,
    seed: int,
    cache: dict | None,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Eval mode (EMA statistics) against batch statistics on the same shuffled test batches:
    their errors, losses and the mean KL between the two predictive distributions. ``sizes``:
    (eval batch size, training batch size). Also returns the EMA and the batch-stats logits."""
    x, y = data.test_x, data.test_y
    result: dict[str, Any] = {}
    set_norm_mode(model, layers, norm_training=False)
    ema_logits = cached_test_logits(
        cache, "ema", seed, sizes[0], lambda: batched_logits(model, x, order, sizes[0], volatile)
    )
    result["test_error_ema"], result["test_loss_ema"] = error_and_loss(ema_logits, y)
    set_norm_mode(model, layers, norm_training=True)
    batch_logits = batch_stat_logits(model, layers, x, order, sizes[1], volatile)
    err, loss = error_and_loss(batch_logits, y)
    result["test_error_batch_stats"], result["test_loss_batch_stats"] = err, loss
    lp_b = F.log_softmax(batch_logits.double(), dim=1)
    lp_e = F.log_softmax(ema_logits.double(), dim=1)
    result["kl_batch_vs_ema"] = (lp_b.exp() * (lp_b - lp_e)).sum(dim=1).mean().item()
    return result, ema_logits, batch_logits


def _precise(
    model: nn.Module,
    layers: list[NormLayer],
    data: Any,
    order: Tensor,
    sizes: tuple[int, int],
    precise_samples: int,
    seed: int,
    cache: dict | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[float, float]], Tensor]:
    """Test error and loss with PreciseBN statistics (eval mode), the number of training samples
    they came from, each running-statistics layer's (mean gap, log-std gap) EMA vs population,
    and the logits. Only called with at least one layer with running statistics."""
    eval_batch, batch_size = sizes
    running = [layer for layer in layers if has_population_stats(layer)]
    pop = population_stats(
        model,
        data.train_x,
        batch_size=batch_size,
        num_samples=precise_samples,
        seed=seed + 1,
        layers=layers,
        cache=cache,
    )
    gaps = {layer.name: _gaps(layer, *pop[layer.name][:2]) for layer in running}
    with precise_statistics(model, pop, layers):
        set_norm_mode(model, layers, norm_training=False)
        logits = cached_test_logits(cache, pop, seed, eval_batch,
                                    lambda: batched_logits(model, data.test_x, order, eval_batch,
                                                           None))  # fmt: skip
    result: dict[str, Any] = {}
    batch = min(batch_size, data.train_x.shape[0])
    result["precise_samples"] = math.ceil(precise_samples / batch) * batch
    result["test_error_precise"], result["test_loss_precise"] = error_and_loss(logits, data.test_y)
    return result, gaps, logits


def _layer_rows(
    layers: list[NormLayer], gaps: dict[str, tuple[float, float]], dep: dict[str, float]
) -> list[dict[str, Any]]:
    """One JSON row per norm layer: what it is, its gaps, batch dependence and BRN clipping."""
    return [
        {
            "name": layer.name,
            "class": type(layer.module).__name__,
            "norm": layer.spec.name if layer.spec is not None else None,
            "uses_batch_stats": layer.uses_batch_stats,
            "has_running_stats": layer.has_running_stats,
            "mean_gap": gaps.get(layer.name, (None, None))[0],
            "log_std_gap": gaps.get(layer.name, (None, None))[1],
            "batch_dependence": dep.get(layer.name),
            "clip_fraction_r": _scalar(getattr(layer.module, "clip_fraction_r", None)),
            "clip_fraction_d": _scalar(getattr(layer.module, "clip_fraction_d", None)),
            "rmax": _scalar(getattr(layer.module, "current_rmax", None)),
            "dmax": _scalar(getattr(layer.module, "current_dmax", None)),
        }
        for layer in layers
    ]


def run_diagnostics(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int,
    precise_samples: int = 4096,
    seed: int = 0,
    probe_samples: int = 64,
    eval_batch_size: int | None = None,
    predictions: dict[str, Tensor] | None = None,
    with_variance_shift: bool = False,
    population_cache: dict | None = None,
) -> dict[str, Any]:
    """Measure the train/inference mismatch of a trained classifier (see the module docstring).

    Args:
        model: maps ``data.test_x`` batches to logits of shape (N, num_classes).
        data: anything with ``train_x``, ``train_y``, ``test_x``, ``test_y`` tensors (on the model's
            device), e.g. :class:`normzoo.data.DataBundle`.
        batch_size: the training batch size (the normalisation batch size used throughout).
        precise_samples: PreciseBN uses at least this many training samples (rounded up to whole
            batches; the training set is cycled through in fresh permutations if it is smaller).
        seed: seeds the test-batch composition, the PreciseBN batches and the probe companions.
        probe_samples: at most this many test samples are probed for batch dependence (and at
            most ``max(16, PROBE_BUDGET // batch_size)``, since each costs two forwards of a
            full batch); the eval-mode floor uses the first ``FLOOR_PROBES`` of them.
        eval_batch_size: the batch size of the eval-mode passes (EMA and PreciseBN statistics),
            whose outputs do not depend on the batch (default: ``batch_size``). Ignored, i.e.
            ``batch_size`` is used, when a layer normalises with batch statistics even in eval
            mode (one without running statistics).
        predictions: a dict to receive the per-sample test predictions (class indices, test
            order) with batch statistics (``test_pred_batch``) and PreciseBN statistics
            (``test_pred_precise``; eval mode where no layer has running statistics).
        with_variance_shift: also measure dropout's variance shift
            (:func:`normzoo.inference.variance_shift` on the test set in batches of
            ``batch_size``): ``variance_shift`` in each batch-statistics layer's row, their mean
            as ``variance_shift_mean`` (None without batch-statistics layers).
        population_cache: shared with :func:`normzoo.inference.inference_panel` of the same
            trained model (``cache`` of :func:`normzoo.precise_bn.population_stats`; it also
            keeps the eval-mode test logits both ask for, :func:`normzoo.batched.cached_test_logits`).

    Returns:
        A JSON-serialisable dict (floats, ints, None, a list of per-layer dicts).
    """
    _check_arguments(data, batch_size, precise_samples, eval_batch_size)
    started = time.perf_counter()
    layers = find_norm_layers(model)
    eval_batch = eval_batch_size or batch_size
    if any(layer.uses_batch_stats and not has_population_stats(layer) for layer in layers):
        eval_batch = batch_size  # eval mode still normalises with batch statistics
    sizes = (eval_batch, batch_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.test_x.shape[0], generator=gen).to(data.test_x.device)

    with preserved_state(model, layers) as volatile:
        result, ema_logits, batch_logits = _ema_and_batch_stats(
            model, layers, data, order, sizes, volatile, seed, population_cache
        )
        gaps: dict[str, tuple[float, float]] = {}
        precise_logits = ema_logits  # nothing to recompute: eval mode is already "precise"
        if any(has_population_stats(layer) for layer in layers):
            precise, gaps, precise_logits = _precise(
                model, layers, data, order, sizes, precise_samples, seed, population_cache
            )
        else:
            err, loss = error_and_loss(ema_logits, data.test_y)
            precise = {"precise_samples": 0, "test_error_precise": err, "test_loss_precise": loss}
        if predictions is not None:
            predictions["test_pred_batch"] = batch_logits.argmax(dim=1)
            predictions["test_pred_precise"] = precise_logits.argmax(dim=1)
        result.update(precise)
        dependence, dep_layers = dependence_and_floor(
            model, layers, data, batch_size, probe_samples, gen, volatile
        )
        result.update(dependence)

    brn = [layer for layer in layers if hasattr(layer.module, "clip_fraction_r")]
    result["brn_clip_r"] = _mean([_scalar(layer.module.clip_fraction_r) for layer in brn])
    result["brn_clip_d"] = _mean(
        [_scalar(getattr(layer.module, "clip_fraction_d", None)) for layer in brn]
    )
    result["ema_mean_gap"] = _mean([g[0] for g in gaps.values()])
    result["ema_log_std_gap"] = _mean([g[1] for g in gaps.values()])
    result["layers"] = _layer_rows(layers, gaps, dep_layers)
    if with_variance_shift:
        from normzoo.inference import variance_shift  # inference imports this module

        shifts = variance_shift(model, data.test_x, batch_size=batch_size, seed=seed)
        for row in result["layers"]:
            row["variance_shift"] = shifts.get(row["name"])
        result["variance_shift_mean"] = _mean(list(shifts.values()))
    result["num_norm_layers"] = len(layers)
    result["diagnostics_batch_size"] = batch_size
    result["diagnostics_eval_batch_size"] = eval_batch
    result["diagnostics_seconds"] = time.perf_counter() - started
    return result
