"""Evaluation-only measurements of a trained model under the sources of statistics it can use.

* :func:`inference_panel` — the test error of one trained model with each source of normalisation
  statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, Sec. 3-4):
  PreciseBN population statistics from 16 ... 4096 training samples (its error against its sample
  count), batch statistics of test batches of 2, 8, 32 samples and of the whole test set, and the
  EMA of training (plain eval mode); and AdaBN (Li et al. 2016, "Revisiting Batch Normalization
  For Practical Domain Adaptation", arXiv:1603.04779): the statistics re-estimated on the inputs
  being classified, on the test set itself (``adabn``: what the training-set statistics miss on
  test data of the same distribution) and on a shifted view of it (:func:`shifted_view`: halved
  contrast plus Gaussian noise), next to the EMA on that view (``ema_shifted``, ``adabn_shifted``:
  how much of the shift's damage re-estimating the statistics undoes; Schneider et al. 2020,
  arXiv:2006.16971, measure the same on ImageNet-C).
* :func:`variance_shift` — the "variance shift" of dropout before BatchNorm (Li et al. 2019,
  "Understanding the Disharmony between Dropout and Batch Normalization by Variance Shift",
  arXiv:1801.05134): at each batch-statistics layer, the variance of its input in train mode
  (dropout active, batch statistics) over that in eval mode (dropout off, running statistics).
  Inverted dropout with keep rate 1 - p on a zero-mean input x scales ``Var[x]`` by ``1 / (1 - p)``
  in training only, so the running variance a BN layer learnt does not fit its eval-mode input.

Neither learns anything: every forward runs under ``no_grad`` and the model's parameters, buffers,
norm-layer attributes and training flags are bitwise what they were afterwards.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.batched import batch_stat_logits, batched_logits, cached_test_logits
from normzoo.diagnostics import error_and_loss
from normzoo.layers import (
    NormLayer,
    find_norm_layers,
    frozen_forward,
    preserved_state,
    set_norm_mode,
)
from normzoo.precise_bn import adapt_bn, has_population_stats, population_stats, precise_statistics

__all__ = [
    "PRECISE_COUNTS",
    "SHIFT_CONTRAST",
    "SHIFT_NOISE",
    "TEST_BATCH_SIZES",
    "inference_panel",
    "shifted_view",
    "variance_shift",
]

#: PreciseBN sample counts of the panel (Wu & Johnson 2021 sweep the same range)
PRECISE_COUNTS = (16, 64, 256, 1024, 4096)
#: test batch sizes of the batch-statistics rows; None is the whole test set in one batch
TEST_BATCH_SIZES: tuple[int | None, ...] = (2, 8, 32, None)


#: the shifted test view: contrast scaled by this about the mean ...
SHIFT_CONTRAST = 0.5
#: ... plus Gaussian noise of this many pixel standard deviations
SHIFT_NOISE = 0.5


def shifted_view(x: Tensor, seed: int = 0) -> Tensor:
    """A covariate-shifted copy of ``x`` (same labels): ``m + SHIFT_CONTRAST * (x - m) +
    SHIFT_NOISE * s * z`` with m, s the mean and std over all of ``x`` and z ~ N(0, 1) drawn from a
    generator seeded with ``seed`` (the global RNG does not move)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    m, s = x.mean(), x.std()
    return m + SHIFT_CONTRAST * (x - m) + SHIFT_NOISE * s * z


def _row(statistics: str, logits: Tensor, y: Tensor, **where: Any) -> dict[str, Any]:
    err, loss = error_and_loss(logits, y)
    return {"statistics": statistics, **where, "test_error": err, "test_loss": loss}


def _precise_rows(
    model: nn.Module,
    layers: list[NormLayer],
    data: Any,
    order: Tensor,
    sizes: tuple[int, int],
    counts: tuple[int, ...],
    seed: int,
    cache: dict | None = None,
) -> list[dict[str, Any]]:
    """One row per PreciseBN sample count (capped at the training set; whole batches)."""
    eval_batch, batch_size = sizes
    n_train = data.train_x.shape[0]
    size = min(batch_size, n_train)
    rows = []
    for requested in counts:
        count = min(int(requested), n_train)
        pop = population_stats(
            model,
            data.train_x,
            batch_size=batch_size,
            num_samples=count,
            seed=seed + 1,
            layers=layers,
            cache=cache,
        )
        with precise_statistics(model, pop, layers):
            set_norm_mode(model, layers, norm_training=False)
            logits = cached_test_logits(cache, pop, seed, eval_batch,
                                        lambda: batched_logits(model, data.test_x, order,
                                                               eval_batch, None))  # fmt: skip
        used = math.ceil(count / size) * size
        rows.append(_row("precise", logits, data.test_y, requested_samples=requested, samples=used))
    return rows


def _adabn_rows(
    model: nn.Module,
    layers: list[NormLayer],
    x: Tensor,
    y: Tensor,
    order: Tensor,
    sizes: tuple[int, int],
    seed: int,
    suffix: str,
    cache: dict | None = None,
) -> list[dict[str, Any]]:
    """``ema<suffix>`` on ``x`` and, with statistics to re-estimate, ``adabn<suffix>``: eval mode
    after :func:`~normzoo.precise_bn.adapt_bn` on ``x`` itself (batches of the training batch
    size, all of ``x`` once), with the per-sample discordance against the EMA (McNemar's counts).
    ``sizes``: (eval-mode batch size, training batch size); ``cache``: the test set's EMA logits
    (only for ``x`` the test set itself)."""
    eval_batch, batch_size = sizes
    set_norm_mode(model, layers, norm_training=False)
    ema = cached_test_logits(cache, "ema", seed, eval_batch,
                             lambda: batched_logits(model, x, order, eval_batch, None))  # fmt: skip
    rows = [_row("ema" + suffix, ema, y)] if suffix else []
    if not any(has_population_stats(layer) for layer in layers):
        return rows
    with preserved_state(model, layers):
        adapt_bn(model, x, batch_size=min(batch_size, x.shape[0]), seed=seed + 2)
        set_norm_mode(model, layers, norm_training=False)
        adapted = batched_logits(model, x, order, eval_batch, None)
    ema_ok, ada_ok = ema.argmax(dim=1) == y, adapted.argmax(dim=1) == y
    counts = {
        "ema_wrong_only": int((~ema_ok & ada_ok).sum().item()),
        "adabn_wrong_only": int((ema_ok & ~ada_ok).sum().item()),
    }
    return [*rows, _row("adabn" + suffix, adapted, y, **counts)]


def inference_panel(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int,
    precise_counts: tuple[int, ...] = PRECISE_COUNTS,
    test_batch_sizes: tuple[int | None, ...] = TEST_BATCH_SIZES,
    seed: int = 0,
    eval_batch_size: int | None = None,
    population_cache: dict | None = None,
) -> list[dict[str, Any]]:
    """Test error of a trained classifier under each source of normalisation statistics.

    Args:
        model: maps ``data.test_x`` batches to logits (N, num_classes).
        data: anything with ``train_x``, ``test_x``, ``test_y`` tensors on the model's device.
        batch_size: the training (normalisation) batch size: PreciseBN's batches, and the batch
            size of the eval-mode passes unless ``eval_batch_size`` is given.
        precise_counts: PreciseBN sample counts; each is capped at the training set's size and
            rounded up to whole batches (``samples`` in its row says how many were used).
        test_batch_sizes: batch sizes of the batch-statistics rows (each capped at the test set;
            None: the whole test set as one batch). A last partial batch is filled up with samples
            from the start of the shuffled order, so every batch has exactly that size.
        seed: the shuffled test order (as :func:`normzoo.diagnostics.run_diagnostics` draws it
            from the same seed) and the PreciseBN batches (``seed + 1``, likewise).
        eval_batch_size: the batch size of the eval-mode passes (EMA, PreciseBN), as in
            :func:`normzoo.diagnostics.run_diagnostics`: their outputs do not depend on the batch,
            so fewer, larger batches; ignored where a layer has no running statistics.
        population_cache: shared with :func:`normzoo.diagnostics.run_diagnostics` of the same
            trained model, so a PreciseBN count both ask for is computed once, and the test
            logits both take with the EMA and with it (:func:`normzoo.batched.cached_test_logits`).

    Returns:
        Rows ``{"statistics": "ema" | "precise" | "batch" | "adabn" | "ema_shifted" |
        "adabn_shifted", ..., "test_error", "test_loss"}``; ``precise`` rows carry
        ``requested_samples`` and ``samples``, ``batch`` rows ``test_batch_size``, ``adabn*`` rows
        ``ema_wrong_only`` / ``adabn_wrong_only`` (samples only the EMA / only AdaBN gets wrong
        on that view). No ``precise`` or ``adabn*`` rows without a layer with running statistics
        (eval mode has nothing to re-estimate). The shifted view is :func:`shifted_view` of the
        test set with ``seed``. The model's state is unchanged afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if any(b is not None and b < 1 for b in test_batch_sizes) or any(c < 1 for c in precise_counts):
        raise ValueError("test batch sizes and PreciseBN sample counts must be >= 1")
    layers = find_norm_layers(model)
    n_test = data.test_x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_test, generator=gen).to(data.test_x.device)
    x, y = data.test_x, data.test_y
    eval_batch = eval_batch_size or batch_size
    if any(layer.uses_batch_stats and not layer.has_running_stats for layer in layers):
        eval_batch = batch_size  # eval mode still normalises with batch statistics
    sizes = (eval_batch, batch_size)
    with preserved_state(model, layers) as volatile:
        set_norm_mode(model, layers, norm_training=False)
        ema = cached_test_logits(population_cache, "ema", seed, eval_batch,
                                 lambda: batched_logits(model, x, order, eval_batch, volatile))  # fmt: skip
        rows = [_row("ema", ema, y)]
        if any(has_population_stats(layer) for layer in layers):
            rows += _precise_rows(
                model, layers, data, order, sizes, precise_counts, seed, population_cache
            )
        rows += _adabn_rows(model, layers, x, y, order, sizes, seed, "", population_cache)
        shifted = shifted_view(x, seed)
        rows += _adabn_rows(model, layers, shifted, y, order, sizes, seed, "_shifted")
        set_norm_mode(model, layers, norm_training=True)
        for b in test_batch_sizes:
            size = n_test if b is None else min(int(b), n_test)
            logits = batch_stat_logits(model, layers, x, order, size, volatile)
            rows.append(_row("batch", logits, y, test_batch_size=size))
    return rows


def _pooled_variance(sums: list[Any]) -> Tensor:
    """Per-channel variance over every value seen, from [count, sum, sum of squares]."""
    count, s1, s2 = sums
    mean = s1 / count
    return (s2 / count - mean**2).clamp_min(0.0)


def _variance_hook(sums: dict[str, list[Any]], name: str):
    """A forward pre-hook adding a layer's input to per-channel [count, sum, sum of squares]."""

    def fn(_: nn.Module, args: tuple[Any, ...]) -> None:
        a = args[0].detach().double().transpose(0, 1).flatten(1)  # (C, N * prod(S))
        s = sums.setdefault(name, [0, 0.0, 0.0])
        s[0] += a.shape[1]
        s[1] = s[1] + a.sum(1)
        s[2] = s[2] + (a**2).sum(1)

    return fn


def _input_variances(
    model: nn.Module,
    layers: list[NormLayer],
    x: Tensor,
    batch_size: int,
    volatile: list,
    *,
    training: bool,
) -> dict[str, Tensor]:
    """Per-channel variance of each layer's input over ``x``, the whole model in train or eval."""
    sums: dict[str, list[Any]] = {}
    model.train(training)
    handles = []
    for layer in layers:
        handles.append(layer.module.register_forward_pre_hook(_variance_hook(sums, layer.name)))
    try:
        for start in range(0, x.shape[0], batch_size):
            frozen_forward(model, x[start : start + batch_size], volatile)
    finally:
        for h in handles:
            h.remove()
    return {name: _pooled_variance(s) for name, s in sums.items()}


def variance_shift(
    model: nn.Module, x: Tensor, *, batch_size: int = 32, seed: int = 0
) -> dict[str, float]:
    """Dropout's variance shift at every batch-statistics layer (Li et al. 2019, arXiv:1801.05134).

    For each layer that normalises with batch statistics, in module order::

        shift = mean over channels c of  Var_train[a_c] / Var_eval[a_c]

    where ``a`` is the layer's input over all samples (and positions) of ``x``, fed in batches of
    ``batch_size`` (whole batches: a last partial one is left out); ``Var_train`` with the whole model in train mode (dropout active, batch
    statistics upstream), ``Var_eval`` in eval mode (dropout off, running statistics). Dropout with
    rate p right before the layer on a zero-mean input gives ``1 / (1 - p)``; 1 means no shift.
    Dropout's masks come from a forked RNG seeded with ``seed`` (the global RNG does not move).
    Channels with zero eval-mode variance are left out of the mean. The model's state is unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = find_norm_layers(model)
    batch = [layer for layer in layers if layer.uses_batch_stats]
    n = x.shape[0]
    x = x[: n if n <= batch_size else n - n % batch_size]  # whole batches only: no batch of 1
    on_cpu = x.device.type == "cpu"
    rng = torch.random.fork_rng(devices=[] if on_cpu else None, device_type=x.device.type)
    with preserved_state(model, layers) as volatile, rng:
        torch.manual_seed(seed)
        train = _input_variances(model, batch, x, batch_size, volatile, training=True)
        evaluation = _input_variances(model, batch, x, batch_size, volatile, training=False)
    shifts = {}
    for layer in batch:
        keep = evaluation[layer.name] > 0
        ratio = train[layer.name][keep] / evaluation[layer.name][keep]
        shifts[layer.name] = float(ratio.mean().item()) if ratio.numel() else math.nan
    return shifts
