"""The ghost-batch formulas that normzoo's fast path replaced (normzoo 867afca), verbatim: the
reference ``tests/test_ghost_fast_path.py`` checks the fast path against and
``scripts/bench_ghost.py`` times it against. Not used by the layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normzoo.norms._ghost import check_ghost_values, ghost_dims, pooled_ghost_stats

__all__ = ["composed_ghost_batch_norm", "var_mean_batch_moments"]


def ghost_views(x: Tensor, size: int) -> list[Tensor]:
    """``normzoo.norms._ghost.ghost_views`` at 867afca, verbatim (it sliced x even when G divides
    N; the same views)."""
    n = x.shape[0]
    full = (n // size) * size
    views = []
    if full:
        views.append(x[:full].reshape(n // size, size, *x.shape[1:]))
    if n > full:
        views.append(x[full:].unsqueeze(0))
    return views


def composed_ghost_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    size: int,
    moving: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """``ghost_batch_norm`` before the pairs path (normzoo 867afca), verbatim: var_mean and
    autograd on the (K, G, C, *S) views."""
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


def var_mean_batch_moments(x: Tensor, size: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batch_moments`` with ``torch.var_mean`` on the views (normzoo 867afca), verbatim."""
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
