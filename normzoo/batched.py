"""A data set's outputs in batches of a given size, as the diagnostics and the inference panel
evaluate it: one forward per batch (:func:`batched_logits`), or, where every batch-statistics
layer takes ghost batches, a few large forwards in which each batch is a ghost batch of its own
(:func:`grouped_forward`, :func:`batch_stat_logits`): the same numbers to float rounding, and a
few forwards instead of N / size at small batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from normzoo.layers import NormLayer, frozen_forward

__all__ = [
    "GROUPED_SAMPLES",
    "batch_stat_logits",
    "batched_logits",
    "cached_test_logits",
    "ghost_sizes",
    "grouped_forward",
]


def _chunks(order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, int]]:
    """Batches of exactly ``batch_size`` indices covering ``order`` once.

    The last, partial batch is filled up with samples from the start of ``order`` so that every
    sample is evaluated in a batch of the training batch size (a last batch of 1 sample would have
    no batch statistics at all). Yields (indices, k): only the first k entries are new samples.
    """
    n = order.numel()
    size = min(batch_size, n)
    for start in range(0, n, size):
        idx = order[start : start + size]
        k = idx.numel()
        if k < size:
            idx = torch.cat([idx, order[: size - k]])
        yield idx, k


def batched_logits(
    model: nn.Module, x: Tensor, order: Tensor, batch_size: int, volatile: list | None
) -> Tensor:
    """Logits of every sample of ``x`` (in the original order), evaluated in shuffled batches."""
    out: Tensor | None = None
    for idx, k in _chunks(order, batch_size):
        logits = frozen_forward(model, x[idx], volatile)[:k]
        if out is None:
            out = logits.new_empty((x.shape[0], *logits.shape[1:]))
        out[idx[:k]] = logits
    assert out is not None
    return out


def cached_test_logits(
    cache: dict | None,
    statistics: object,
    seed: int,
    eval_batch: int,
    compute: Callable[[], Tensor],
) -> Tensor:
    """Eval-mode test logits under ``statistics`` (``"ema"``, or the PreciseBN statistics object
    a population cache returned) in the shuffled order of ``seed`` and batches of ``eval_batch``:
    ``compute()`` once per cache. The diagnostics and the inference panel of one trained model ask
    for the same ones (EMA twice, AdaBN's EMA side, PreciseBN at a shared count): the same forwards
    on the same batches, so the cached logits are bitwise what a second pass gives. A statistics
    object is keyed by its id, which stays valid because the same cache holds that object."""
    if cache is None:
        return compute()
    key = ("test_logits", statistics if isinstance(statistics, str) else id(statistics), seed,
           eval_batch)  # fmt: skip
    if key not in cache:
        cache[key] = compute()
    return cache[key]


#: samples per forward when many batches go through together (rounded down to whole batches)
GROUPED_SAMPLES = 2048


def ghost_sizes(layers: list[NormLayer], size: int) -> dict[nn.Module, int] | None:
    """Per batch-statistics layer, the ghost size that makes one forward of many batches of
    ``size`` compute what one forward per batch computes; None where no such size exists (a layer
    without ghost batches, or an own ghost size below ``size`` that does not divide it; a batch
    of at most its own ghost size is one ghost batch)."""
    sizes = {}
    for layer in layers:
        if not layer.uses_batch_stats:
            continue
        own = getattr(layer.module, "ghost_batch_size", False)
        if own is False or (own is not None and own < size and size % own):
            return None
        sizes[layer.module] = size if own is None else min(own, size)
    return sizes


def grouped_forward(
    model: nn.Module, layers: list[NormLayer], x: Tensor, size: int, volatile: list | None
) -> Tensor | None:
    """The outputs of the consecutive batches of ``size`` rows of ``x`` (whose length is a
    multiple of ``size``), each normalised with its own batch statistics, in a few forwards of up
    to :data:`GROUPED_SAMPLES` samples with every batch-statistics layer's ghost size set to
    ``size``: a ghost batch is normalised exactly as a batch of its own (``normzoo.norms._ghost``),
    so N / size small forwards become a few large ones. None where a layer cannot (then loop)."""
    sizes = ghost_sizes(layers, size)
    if sizes is None or x.shape[0] % size:
        return None
    step = max(size, GROUPED_SAMPLES // size * size)
    saved = {m: m.ghost_batch_size for m in sizes}
    try:
        for m, g in sizes.items():
            m.ghost_batch_size = g
        outs = [frozen_forward(model, x[i : i + step], volatile) for i in range(0, len(x), step)]
    finally:
        for m, g in saved.items():
            m.ghost_batch_size = g
    return torch.cat(outs)


def batch_stat_logits(
    model: nn.Module,
    layers: list[NormLayer],
    x: Tensor,
    order: Tensor,
    size: int,
    volatile: list | None,
) -> Tensor:
    """Logits with batch statistics of shuffled test batches of ``size`` (the last one filled up
    from the start of ``order``). Where every batch-statistics layer takes ghost batches, the
    batches go through in a few grouped forwards (:func:`grouped_forward`):
    a few forwards instead of N / size is what makes the panel cheap at test batch 2. Otherwise
    (or for one batch) the per-batch loop."""
    n = order.numel()
    padded = torch.cat([order, order[: (-n) % size]])
    grouped = grouped_forward(model, layers, x[padded], size, volatile) if size < n else None
    if grouped is None:
        return batched_logits(model, x, order, size, volatile)
    logits = grouped[:n]
    out = torch.empty_like(logits)
    out[order] = logits
    return out
