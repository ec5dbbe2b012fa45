"""Ghost batches (Hoffer et al. 2017, arXiv:1705.08741): batch statistics over virtual sub-batches.

A layer with batch statistics and ``ghost_batch_size = G`` splits its input (N, C, *S) along N into
consecutive ghost batches of G samples (the last one smaller when G does not divide N) and
normalises each with its own per-channel statistics, exactly as if the layer had been run on each
chunk separately. The running statistics get ONE update per forward (the shared rule of every
ghost-batch layer, :func:`pooled_ghost_stats`)::

    mean_target = sum_k m_k * mean_k / sum_k m_k          (= the whole batch's mean)
    var_target  = sum_k m_k * var_k_unbiased / sum_k m_k  (the ghost batches' unbiased variances)

with m_k = N_k * prod(S) the values per channel of ghost batch k. Why one update of the averaged
statistics and not one EMA step per ghost batch: ``momentum`` keeps its per-optimizer-step meaning,
so the EMA's horizon in steps (and its lag behind the weights) is the same at every ghost size, and
the target is the expectation of the statistics a ghost batch normalises with (the unbiased
variance, as BatchNorm stores). Hoffer et al. fold the ghost batches into the EMA sequentially; with
momentum ``m`` that is close to one update with ``1 - (1 - m)^K``, i.e. a K-times faster EMA.

All ghost batches of the full size are handled as one (K, G, C, *S) view (a constant number of ops
whatever K), the smaller last one as a second view; autograd differentiates the tensor ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__: list[str] = []


def check_ghost_batch_size(size: int | None) -> int | None:
    """``size`` if it is None or a positive int, else a ValueError."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int or None, got {size!r}")
    return size


def ghost_views(x: Tensor, size: int) -> list[Tensor]:
    """``x`` (N, C, *S) as views (K, G, C, *S) of consecutive ghost batches, in order: the full
    ghost batches of ``size`` samples, then (when ``size`` does not divide N) the remainder."""
    n = x.shape[0]
    full = (n // size) * size
    views = []
    if full:
        views.append(x[:full].reshape(n // size, size, *x.shape[1:]))
    if n > full:
        views.append(x[full:].unsqueeze(0))
    return views


def ghost_dims(view: Tensor) -> list[int]:
    """The axes of a (K, G, C, *S) view one ghost batch's per-channel statistics reduce over."""
    return [1, *range(3, view.dim())]


def check_ghost_values(view: Tensor, x: Tensor) -> int:
    """Values per channel of each ghost batch in ``view``; torch's error when that is 1."""
    m = view[0].numel() // view.shape[2]
    if m == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{x.size()} with a ghost batch of size {tuple(view.shape[1:])}"
        )
    return m


def pooled_ghost_stats(
    means: list[Tensor], variances: list[Tensor], counts: list[int]
) -> tuple[Tensor, Tensor]:
    """The running-statistics targets of one forward (module docstring): per channel (C,), the
    ghost batches' means and *unbiased* variances averaged with weights m_k. ``means`` and
    ``variances`` (biased) are (K, C) per view, ``counts`` the values per channel m of each view's
    ghost batches."""
    total = sum(v.shape[0] * m for v, m in zip(means, counts, strict=True))
    mean = sum(mu.sum(0) * (m / total) for mu, m in zip(means, counts, strict=True))
    var = sum(
        var.sum(0) * (m / (m - 1) * m / total) for var, m in zip(variances, counts, strict=True)
    )
    assert isinstance(mean, Tensor) and isinstance(var, Tensor)
    return mean, var


def ghost_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    size: int,
    moving: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    r"""BatchNorm (``moving`` None) or Batch Renorm over ghost batches of ``size`` samples.

    Per ghost batch k and channel, with its batch mean mu_k and biased variance s2_k::

        y = gamma * ((x - mu_k) / sqrt(s2_k + eps) * r_k + d_k) + beta

    r_k = 1, d_k = 0 for BatchNorm; for Batch Renorm (``moving`` = (running_mean, running_var,
    [rmax, dmax])) r_k = clip(sqrt(s2_k + eps) / sigma, 1/rmax, rmax) and
    d_k = clip((mu_k - mu) / sigma, -dmax, dmax), stop-gradient, sigma = sqrt(running_var + eps).
    Returns (y, mean_target, var_target, extra): the running-statistics targets of
    :func:`pooled_ghost_stats` and, for Batch Renorm, ``extra`` = (clip_fraction_r,
    clip_fraction_d, r, d) over all (ghost batch, channel) pairs, r and d averaged over the ghost
    batches (BatchNorm: ``extra`` = ()). Half-precision input is computed in float32.
    """
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    outs, means, variances, counts, corrections = [], [], [], [], []
    for view in ghost_views(xf, size):
        counts.append(check_ghost_values(view, x))
        var, mean = torch.var_mean(view, dim=ghost_dims(view), correction=0, keepdim=True)
        z = (view - mean) * torch.rsqrt(var + eps)  # (K, G, C, *S)
        if moving is not None:
            r, d, clipped = _renorm_correction(mean, var, eps, moving)
            z = z * r + d
            corrections.append((r, d, clipped))
        outs.append(z.reshape(-1, *x.shape[1:]))
        means.append(mean.reshape(mean.shape[0], -1).detach())  # (K, C)
        variances.append(var.reshape(var.shape[0], -1).detach())
    z = torch.cat(outs) if len(outs) > 1 else outs[0]
    view = (-1,) + (1,) * (x.dim() - 2)
    y = z if weight is None else z * weight.view(view)
    y = y if bias is None else y + bias.view(view)
    mean, var = pooled_ghost_stats(means, variances, counts)
    extra: tuple[Tensor, ...] = ()
    if corrections:
        c = x.shape[1]
        r = torch.cat([t[0].reshape(-1, c) for t in corrections])  # (K_total, C)
        d = torch.cat([t[1].reshape(-1, c) for t in corrections])
        clip_r, clip_d = torch.cat([t[2].reshape(-1, c, 2) for t in corrections]).mean((0, 1))
        extra = (clip_r, clip_d, r.mean(0), d.mean(0))
    return y.to(x.dtype), mean, var, extra


def _renorm_correction(
    mean: Tensor, var: Tensor, eps: float, moving: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch Renorm's (r, d) per (ghost batch, channel), shaped like ``mean`` (K, 1, C, 1..),
    detached, and whether each was clipped (K, 1, C, 1.., 2) as 0/1 in ``mean``'s dtype."""
    ref_mean, ref_var, limits = moving
    shape = (1, 1, -1) + (1,) * (mean.dim() - 3)
    ref_invstd = torch.rsqrt(ref_var.to(mean.dtype) + eps).view(shape)
    rmax, dmax = limits.to(mean.dtype).unbind()
    r_raw = torch.sqrt(var.detach() + eps) * ref_invstd
    d_raw = (mean.detach() - ref_mean.to(mean.dtype).view(shape)) * ref_invstd
    r = torch.clamp(r_raw, rmax.reciprocal(), rmax)
    d = torch.clamp(d_raw, -dmax, dmax)
    clipped = torch.stack([torch.ne(r, r_raw), torch.ne(d, d_raw)], -1).to(mean.dtype)
    return r, d, clipped


def batch_moments(x: Tensor, size: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel batch statistics for the autograd layers (mean-only BN, BIN, SN), over ghost
    batches of ``size`` samples (None: the whole batch).

    Returns (mean, var, mean_target, var_target): each sample's ghost-batch mean and biased
    variance, shaped (N, C, 1, ..) to broadcast against x (differentiable), and the running
    targets (C,) of :func:`pooled_ghost_stats` (detached; var_target unbiased).
    """
    views = ghost_views(x, x.shape[0] if size is None else size)
    means, variances, counts, per_sample_mean, per_sample_var = [], [], [], [], []
    for view in views:
        counts.append(check_ghost_values(view, x))
        var, mean = torch.var_mean(view, dim=ghost_dims(view), correction=0, keepdim=True)
        shape = (-1, *mean.shape[2:])  # (K, 1, C, 1..) -> one row per sample
        per_sample_mean.append(mean.expand(-1, view.shape[1], *mean.shape[2:]).reshape(shape))
        per_sample_var.append(var.expand(-1, view.shape[1], *var.shape[2:]).reshape(shape))
        means.append(mean.reshape(mean.shape[0], -1).detach())
        variances.append(var.reshape(var.shape[0], -1).detach())
    mean_target, var_target = pooled_ghost_stats(means, variances, counts)
    mean = torch.cat(per_sample_mean) if len(views) > 1 else per_sample_mean[0]
    var = torch.cat(per_sample_var) if len(views) > 1 else per_sample_var[0]
    return mean, var, mean_target, var_target


def unit_count(x: Tensor) -> int:
    """prod(S): the values per (sample, channel) of an (N, C, *S) input."""
    return math.prod(x.shape[2:])
