"""Population statistics of the batch-statistics layers: PreciseBN, and AdaBN on target data.

* :func:`population_stats` — PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
  arXiv:2105.07576): the statistics each layer sees in training, averaged over many batches of the
  training batch size with the network frozen, instead of the EMA of the training steps.
* :func:`precise_statistics` — a context in which every layer with running statistics holds given
  population statistics (eval mode then uses them); the EMA is back on exit.
* :func:`adapt_bn` — AdaBN (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain
  Adaptation", arXiv:1603.04779): the population statistics re-estimated on target-domain inputs
  and written into the running buffers, so eval mode normalises with the target's statistics.

Many small batches go through one forward as ghost batches (:class:`_GhostBatches`): a widened copy
of each batch-statistics layer normalises each batch of the stack on its own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.layers import (
    NormLayer,
    find_norm_layers,
    frozen_forward,
    preserved_state,
    set_norm_mode,
)

__all__ = [
    "GHOST_SAMPLES",
    "adapt_bn",
    "has_population_stats",
    "population_stats",
    "precise_statistics",
]

#: per layer name: (mean, unbiased variance, number of values per channel)
PopulationStats = dict[str, tuple[Tensor, Tensor, int]]


def has_population_stats(layer: NormLayer) -> bool:
    """Whether ``layer`` keeps running statistics that PreciseBN / AdaBN can re-estimate: a
    ``running_mean`` and ``running_var`` (BatchNorm and kin), or a ``running_var`` alone
    (EvoNorm-B0, which divides by the batch variance but never centres)."""
    return layer.has_running_stats or isinstance(getattr(layer.module, "running_var", None), Tensor)


def _reduce_dims(x: Tensor, per_instance: bool) -> tuple[int, ...]:
    return tuple(range(2, x.dim())) if per_instance else (0, *range(2, x.dim()))


def _draw(n: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` indices into range(n): successive seeded permutations, concatenated."""
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))]
    return torch.cat(perms)[:count]


#: PreciseBN puts up to this many samples (whole batches of the batch size) through one forward
GHOST_SAMPLES = 512
#: the per-channel tensors of a batch-statistics layer that its widened copy repeats G times
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _widenable(module: nn.Module) -> bool:
    """Whether ``module`` normalises per channel over (N, *S) with per-channel state only:
    normzoo's BatchNorm (and Batch Renorm), its native reference, torch's BatchNorm1d/2d/3d --
    and has no hooks of its own (a widened copy would call them with (B, G * C, *S) input, or
    skip them: either way not what their owner registered them for)."""
    from normzoo.norms.batch import BatchNorm
    from normzoo.norms.native import NativeBatchNorm

    if not isinstance(module, BatchNorm | NativeBatchNorm | nn.modules.batchnorm._BatchNorm):
        return False
    if (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    ):
        return False
    if isinstance(module, nn.SyncBatchNorm | nn.modules.lazy.LazyModuleMixin):
        return False
    c = getattr(module, "num_features", None)
    return isinstance(c, int) and all(
        getattr(module, key, None) is None or tuple(getattr(module, key).shape) == (c,)
        for key in _PER_CHANNEL
    )


class _GhostBatches(nn.Module):
    """Normalises G batches of ``size`` samples, stacked along dim 0, each with its own statistics:
    (G * size, C, *S) is rearranged to (size, G * C, *S) for a fresh copy of the layer whose
    per-channel tensors are repeated G times, and back. (Fresh for every forward: a training
    forward updates the copy's running statistics, which Batch Renorm's output depends on.)"""

    def __init__(self, layer: nn.Module, size: int) -> None:
        super().__init__()
        self.size = size
        self._layer = (layer,)  # (a tuple: not registered as a submodule)

    def forward(self, x: Tensor) -> Tensor:
        layer = self._layer[0]
        g, c = x.shape[0] // self.size, x.shape[1]
        wide = copy.deepcopy(layer)
        with torch.no_grad():
            for key in _PER_CHANNEL:
                t = getattr(wide, key, None)
                if t is not None:
                    t.data = t.data.repeat(g)
        wide.num_features = g * c
        spatial = x.shape[2:]
        xw = x.reshape(g, self.size, c, *spatial).transpose(0, 1)
        y = wide(xw.reshape(self.size, g * c, *spatial))
        return y.reshape(self.size, g, c, *spatial).transpose(0, 1).reshape(x.shape)


@contextmanager
def _ghost_batches(
    model: nn.Module, layers: list[NormLayer], size: int
) -> Iterator[dict[str, nn.Module] | None]:
    """Swap every batch-statistics layer of ``model`` for a :class:`_GhostBatches` wrapper for the
    duration; yields ``{layer name: the module now in its place}``, or None (nothing swapped) when
    a batch-statistics layer cannot be widened, is the model itself or appears twice."""
    batch = [layer for layer in layers if layer.uses_batch_stats]
    everywhere = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    if (
        size < 1
        or not batch
        or any(not layer.name or not _widenable(layer.module) for layer in batch)
        or any(everywhere.count(id(layer.module)) != 1 for layer in batch)
    ):
        yield None
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for layer in batch:
            parent_name, _, attr = layer.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attr, layer.module))
            setattr(parent, attr, _GhostBatches(layer.module, size))
        yield {
            layer.name: model.get_submodule(layer.name) if layer.uses_batch_stats else layer.module
            for layer in layers
        }
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)


def _var_mean(a: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over ``dims``, centred two-pass: on CPU ``torch.var_mean`` over
    strided dims is a scalar Welford loop, 3-70x slower than these sums for a (G, size, C, *S)
    view (measured on the 2-core VM); elsewhere var_mean's one fused kernel."""
    if a.device.type != "cpu":
        return torch.var_mean(a, dim=dims, correction=0)
    mean = a.mean(dims, keepdim=True)
    var = (a - mean).square_().mean(dims)
    return var, mean.reshape(var.shape)


def _stats_hook(sums: dict[str, list[Any]], name: str, per_instance: bool, size: int):
    """A forward pre-hook accumulating one layer's per-batch statistics into ``sums[name]``
    (in the input's precision per batch, accumulated in float64)."""

    def fn(_: nn.Module, args: tuple[Any, ...]) -> None:
        a = args[0].detach()
        if per_instance:  # one (mu, unbiased var) per (sample, channel), averaged
            dims = _reduce_dims(a, per_instance)
            m = math.prod(a.shape[d] for d in dims)
            var, mu = torch.var_mean(a, dim=dims, correction=1 if m > 1 else 0)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += mu.shape[0]
            s[1] = s[1] + mu.double().sum(0)
            s[2] = s[2] + var.double().sum(0)
            return
        # (G * size, C, *S) holds G batches of `size` (G = 1 without ghost batches)
        a = a.reshape(a.shape[0] // size, size, *a.shape[1:])
        dims = (1, *range(3, a.dim()))
        m = math.prod(a.shape[d] for d in dims)
        var_b, mu_b = (t.double() for t in _var_mean(a, dims))
        s = sums.setdefault(name, [0, 0.0, 0.0])
        s[0] += m * a.shape[0]
        s[1] = s[1] + m * mu_b.sum(0)
        s[2] = s[2] + m * (mu_b**2 + var_b).sum(0)

    return fn


def _combined(sums: dict[str, list[Any]], running: list[NormLayer]) -> PopulationStats:
    """The accumulated sums as (mean, unbiased variance, count) in each buffer's dtype."""
    out: PopulationStats = {}
    for layer in running:
        total, s1, s2 = sums[layer.name]
        buf = layer.module.running_var
        if layer.per_instance:
            mean, var = s1 / total, s2 / total
        else:
            mean = s1 / total
            var = (s2 / total - mean**2).clamp_min(0.0)
            var = var * (total / (total - 1)) if total > 1 else var
        out[layer.name] = (mean.to(buf.dtype), var.to(buf.dtype), int(total))
    return out


def population_stats(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int,
    num_samples: int | None = None,
    seed: int = 0,
    layers: list[NormLayer] | None = None,
    ghost: bool = True,
    cache: dict[tuple[int, int, int], PopulationStats] | None = None,
) -> PopulationStats:
    """PreciseBN population statistics of every layer with running statistics.

    Runs the model frozen (``no_grad``, buffers restored after every batch) with its norm layers in
    training mode — so each layer sees the activations it sees in training — over
    ``ceil(num_samples / batch_size)`` batches of exactly ``batch_size`` training samples drawn from
    seeded permutations of ``x`` (the whole set once when ``num_samples == len(x)`` is a multiple of
    the batch size), and combines the per-batch statistics size-weighted (as PreciseBN, Wu & Johnson 2021)::

        mu_pop = sum_B n_B mu_B / sum_B n_B
        var_pop = sum_B n_B (mu_B^2 + var_B) / sum_B n_B - mu_pop^2     (var_B biased)

    which is exactly the mean and (biased) variance over all M values seen per channel. Returned as
    ``{layer name: (mean, unbiased variance = var_pop * M / (M - 1), M)}``, matching the convention of
    ``running_var``. Layers whose running statistics average per-instance statistics (InstanceNorm
    with ``track_running_stats``) get the mean of the per-instance means and unbiased variances.
    Layers with a ``running_var`` alone (EvoNorm-B0) get the same variance; their mean is unused.
    The model's state is unchanged afterwards.

    With ``ghost=True`` (default) up to ``GHOST_SAMPLES // batch_size`` batches go through the
    model in one forward, each batch-statistics layer replaced for the pass by a widened copy that
    normalises them separately (:func:`_ghost_batches`): the same statistics, to float rounding,
    in far fewer forwards (2048 batches of 2 samples become 8 forwards). Models with a
    batch-statistics layer that cannot be widened take one forward per batch.

    ``cache``: a dict the caller keeps for one model in one state and one ``x`` (the diagnostics
    and the inference panel of a run ask for the same 4096 samples); keyed by (samples, batch
    size, seed), it returns a repeated request's statistics without recomputing them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = find_norm_layers(model) if layers is None else layers
    running = [layer for layer in layers if has_population_stats(layer)]
    n = x.shape[0]
    size = min(batch_size, n)
    count = n if num_samples is None else max(int(num_samples), 1)
    count = math.ceil(count / size) * size
    if cache is not None and (count, size, seed) in cache:
        return cache[(count, size, seed)]
    gen = torch.Generator().manual_seed(seed)
    order = _draw(n, count, gen).to(x.device)

    sums: dict[str, list[Any]] = {}
    widened = _ghost_batches(model, layers, size) if ghost else nullcontext(None)
    with preserved_state(model, layers) as volatile, widened as wide:
        per_forward = size if wide is None else size * max(1, GHOST_SAMPLES // size)
        hooked = wide or {layer.name: layer.module for layer in layers}
        handles = [
            hooked[layer.name].register_forward_pre_hook(
                _stats_hook(sums, layer.name, layer.per_instance, size)
            )
            for layer in running
        ]
        try:
            set_norm_mode(model, layers, norm_training=True)
            for start in range(0, count, per_forward):
                frozen_forward(model, x[order[start : start + per_forward]], volatile)
        finally:
            for h in handles:
                h.remove()
    stats = _combined(sums, running)
    if cache is not None:
        cache[(count, size, seed)] = stats
    return stats


def _load_stats(layers: list[NormLayer], stats: PopulationStats) -> None:
    """Copy ``stats`` into the running buffers of the layers it names."""
    with torch.no_grad():
        for layer in layers:
            if layer.name in stats:
                if layer.has_running_stats:  # (a running_var-only layer has no mean to load)
                    layer.module.running_mean.copy_(stats[layer.name][0])
                layer.module.running_var.copy_(stats[layer.name][1])


@contextmanager
def precise_statistics(
    model: nn.Module, stats: PopulationStats, layers: list[NormLayer] | None = None
) -> Iterator[None]:
    """Context: the running buffers of the layers named in ``stats`` hold those statistics (eval
    mode normalises with them); on exit the model's whole state is what it was on entry."""
    layers = find_norm_layers(model) if layers is None else layers
    with preserved_state(model, layers):
        _load_stats(layers, stats)
        yield


def adapt_bn(
    model: nn.Module,
    target_x: Tensor,
    *,
    batch_size: int,
    num_samples: int | None = None,
    seed: int = 0,
) -> PopulationStats:
    """AdaBN (Li et al. 2016, arXiv:1603.04779): re-estimate the statistics on the target domain.

    For every layer with running statistics, ``running_mean`` and ``running_var`` are replaced, in
    place, by the population statistics of its input on ``target_x`` (:func:`population_stats`:
    batches of ``batch_size`` target samples with the norm layers in training mode, ``num_samples``
    of them, default the whole set once)::

        running_mean = mu_target,    running_var = sigma^2_target (unbiased)

    Nothing else changes (weights, training flags, other buffers). Eval mode then normalises each
    layer with the target's statistics, which undoes a shift of the input distribution that a
    layer's affine map carries into its statistics. Returns the statistics it wrote.
    """
    layers = find_norm_layers(model)
    stats = population_stats(
        model, target_x, batch_size=batch_size, num_samples=num_samples, seed=seed, layers=layers
    )
    _load_stats(layers, stats)
    return stats
