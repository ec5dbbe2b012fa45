"""The activation norms' small-input paths: float32/64 CPU eager inputs of at most ``_SMALL_NUMEL``
elements (:func:`normzoo.norms._base._is_small`).

At such sizes (the studies' batch-2 MLPs and 8x8 CNNs) an op costs its dispatch, 1-4 us, not its
memory traffic, and so does every line of Python around it: a ``torch.autograd.Function`` with three
outputs, ``mark_non_differentiable`` and ``once_differentiable`` costs ~12 us more per step than one
with a single output (measured with empty bodies). So each Function here computes the formulas of
its layer's general route in the fewest ops, in straight-line code, returns the output alone and
updates the layer's running statistics itself (BatchNorm, Batch Renorm). Measured on the 2-core
VM, forward+backward of the BatchNorm module at (2, 128): 132-157 us with the small-input branch
of the general Function, ~108 us with this one (torch's fused kernel: 57 us).

The statistics are centred two-pass sums (stable for any mean, no host read); the backward saves
x (and the per-channel or per-group statistics) and recomputes the centred input (BatchNorm, one
op) or x_hat (per-sample norms, two ops) from it: x is what the double backward (``create_graph``,
:func:`~normzoo.norms._backward.hand_written_backward`) differentiates, and it is alive anyway. Constants are cached 0-dim tensors (a Python number is
wrapped into a new tensor on every op). The formulas, and the papers, are those of the layers'
docstrings (:class:`~normzoo.norms.batch.BatchNorm`, :class:`~normzoo.norms.batch.BatchRenorm`,
:class:`~normzoo.norms.sample.GroupNorm`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normzoo.norms._backward import (
    batch_norm_double_backward,
    group_norm_double_backward,
    hand_written_backward,
)
from normzoo.norms._base import (
    _RENORM_DIAGNOSTICS,
    _batch_norm_scale,
    _cpu_scalar,
    _scale_and_offset,
)

__all__: list[str] = []


def _small_batch_norm_double_backward(ctx: Any, dy: Tensor | None) -> tuple[Tensor | None, ...]:
    """:class:`SmallBatchNorm`'s backward under ``create_graph`` (differentiable again)."""
    if dy is None:
        return None, None, None, None, None, None
    x, _, _, r, d, weight = ctx.saved_tensors
    return (*batch_norm_double_backward(ctx, dy, x, weight, r, d, ctx.eps), None, None, None)


def _small_group_norm_double_backward(ctx: Any, dy: Tensor | None) -> tuple[Tensor | None, ...]:
    """:class:`SmallGroupNorm`'s backward under ``create_graph`` (differentiable again)."""
    if dy is None:
        return None, None, None, None, None
    x, weight, _, _ = ctx.saved_tensors
    grads = group_norm_double_backward(ctx, dy, x, weight, ctx.num_groups, ctx.eps)
    return (*grads, None, None)


class SmallBatchNorm(torch.autograd.Function):
    r"""Training-mode BatchNorm / Batch Renorm on a small CPU input, returning y alone.

    ``apply(x, weight, bias, eps, layer, limits) -> y``. ``layer``: the module whose running
    statistics this step updates (in place, with the batch mean and the *unbiased* variance, by
    the layer's own rule), or None. ``limits``: Batch Renorm's tensor ``[rmax, dmax]`` (``layer``
    then holds the moving statistics r and d correct towards; its ``clip_fraction_r/_d`` and
    ``last_r/_d`` are set), or None for BatchNorm. Per channel, over the m = N * prod(S) values::

        mean = sum(x) / m,  xc = x - mean,  var = sum(xc^2) / m,  invstd = 1 / sqrt(var + eps)
        r = clip(invstd_ref / invstd, 1/rmax, rmax),  d = clip((mean - mu_ref) * invstd_ref, +-dmax)
        y = xc * g + offset,  g = gamma * invstd * r,  offset = gamma * d + beta   (r = 1, d = 0: BN)

    Backward (r, d constants), with dot = invstd * sum(dy * xc)::

        dx = g * (dy - (sum(dy) + xc * invstd * dot) / m)
        dgamma = r * dot + d * sum(dy),  dbeta = sum(dy)
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        layer: Any,
        limits: Tensor | None,
    ) -> Tensor:
        dtype = x.dtype
        flat = x.dim() == 2  # (N, C): per-channel vectors broadcast as they are
        m = x.numel() // x.shape[1]
        inv_m = _cpu_scalar(1.0 / m, dtype)
        if flat:
            mean = x.sum(0).mul_(inv_m)
            xc = x - mean
            sq = torch.linalg.vecdot(xc, xc, dim=0)  # m * var
        else:
            dims = [0, *range(2, x.dim())]
            view = (-1,) + (1,) * (x.dim() - 2)
            mean = x.sum(dims).mul_(inv_m)
            xc = x - mean.view(view)
            sq = torch.mul(xc, xc).sum(dims)
        # var + eps in one op (a Python number as alpha= is free; as an operand ~1.6 us)
        eps_t = _cpu_scalar(eps, dtype)
        invstd = torch.add(eps_t, sq, alpha=1.0 / m).rsqrt_()
        ref_mean = ref_var = None
        if limits is not None:  # Batch Renorm: r, d from the moving statistics before the update
            # (buffers from the dict: Module.__getattr__ / __setattr__ cost ~1-2 us each)
            buffers = layer._buffers
            ref_mean, ref_var = buffers["running_mean"], buffers["running_var"]
        g, offset, r, d, extra = _scale_and_offset(
            invstd, mean, weight, bias, eps_t, ref_mean, ref_var, limits
        )
        if extra:
            buffers.update(zip(_RENORM_DIAGNOSTICS, extra, strict=True))
        if flat:
            y = torch.mul(xc, g) if offset is None else torch.addcmul(offset, xc, g)
        else:
            g_c = g.view(view)
            y = torch.mul(xc, g_c) if offset is None else torch.addcmul(offset.view(view), xc, g_c)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.save_for_backward(x, mean, invstd, r, d, weight)  # (g recomputed)
        if layer is not None:
            layer._update_running_stats(mean, sq.mul_(_cpu_scalar(1.0 / (m - 1), dtype)))
        return y

    @staticmethod
    @hand_written_backward(_small_batch_norm_double_backward)
    def backward(ctx: Any, dy: Tensor | None) -> tuple[Tensor | None, ...]:
        """(the formulas are in the class docstring)"""
        if dy is None:  # grads are not materialised: y did not take part in the loss
            return None, None, None, None, None, None
        x, mean, invstd, r, d, weight = ctx.saved_tensors
        g = _batch_norm_scale(invstd, weight, r)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        flat = x.dim() == 2
        if flat:
            sum_dy = dy.sum(0)
            xc = x - mean
        else:
            dims = [0, *range(2, x.dim())]
            view = (-1,) + (1,) * (x.dim() - 2)
            sum_dy = dy.sum(dims)
            xc = x - mean.view(view)
        dx = dweight = None
        if need_x or need_w:
            raw = torch.linalg.vecdot(dy, xc, dim=0) if flat else torch.mul(dy, xc).sum(dims)
            dot = raw.mul_(invstd)
            if need_w:
                dweight = dot if r is None else torch.addcmul(r * dot, d, sum_dy)
            if need_x:
                u = invstd * dot
                if flat:
                    t = torch.addcmul(sum_dy, xc, u)
                else:
                    t = torch.addcmul(sum_dy.view(view), xc, u.view(view))
                dx = torch.add(dy, t, alpha=-xc.shape[1] / xc.numel(), out=t)
                dx.mul_(g if flat else g.view(view))
        return dx, dweight, sum_dy if need_b else None, None, None, None


class SmallGroupNorm(torch.autograd.Function):
    """GroupNorm (LayerNorm: 1 group, InstanceNorm: C groups) on a small CPU input, returning y.

    ``apply(x, weight, bias, num_groups, eps) -> y``. Per (sample, group) over its m values::

        x_hat = (x - mean) * rstd,  rstd = 1 / sqrt(mean((x - mean)^2) + eps),
        y = x_hat * gamma + beta

    Backward, with g = dy * gamma and sums over the group::

        dx = rstd * (g - (sum(g) + x_hat * sum(g * x_hat)) / m)
        dgamma = sum_{n, S} dy * x_hat,  dbeta = sum_{n, S} dy

    LayerNorm (one group) and InstanceNorm (C groups, input with spatial dims) reduce x itself
    over (C, *S) resp. S, so x_hat, dy and dx keep x's shape (no view op in either direction:
    ~0.75 us each, plus its Python call); other group counts work on x viewed as (N, G, C/G, S).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
    ) -> Tensor:
        dtype = x.dtype
        n, c = x.shape[0], x.shape[1]
        cg, s = c // num_groups, math.prod(x.shape[2:])
        inv_m = 1.0 / (cg * s)  # (a Python number as alpha= costs nothing; as an operand ~1.6 us)
        # LayerNorm (one group) and InstanceNorm (a group per channel, spatial dims) reduce x
        # itself over (C, *S) resp. S: no views in or out; other groups on (N, G, C/G, S)
        direct = num_groups == 1 or (num_groups == c and x.dim() > 2)
        if direct:
            dims = tuple(range(1 if num_groups == 1 else 2, x.dim()))
            xg = x
        else:
            dims = (2, 3)
            xg = x.reshape(n, num_groups, cg, s)
        total = xg.sum(dims, keepdim=True)  # m * mean
        xc = torch.add(xg, total, alpha=-inv_m)  # x - mean
        sq = torch.mul(xc, xc).sum(dims, keepdim=True)
        rstd = torch.add(_cpu_scalar(eps, dtype), sq, alpha=inv_m).rsqrt_()
        x_hat = xc.mul_(rstd)
        flat = x_hat if direct else x_hat.view(x.shape)  # (y below is a new tensor, not a view)
        w_c, b_c = weight, bias  # per channel, broadcasting against x
        if x.dim() > 2 and (weight is not None or bias is not None):
            per_channel = (c,) + (1,) * (x.dim() - 2)
            w_c = None if weight is None else weight.view(per_channel)
            b_c = None if bias is None else bias.view(per_channel)
        if w_c is None and b_c is None:
            y = flat.clone()
        elif w_c is None:
            y = torch.add(flat, b_c)
        elif b_c is None:
            y = torch.mul(flat, w_c)
        else:
            y = torch.addcmul(b_c, flat, w_c)
        ctx.set_materialize_grads(False)
        # (x rather than x_hat: the double backward recomputes the layer from x)
        ctx.save_for_backward(x, weight, total, rstd)
        ctx.inv_m, ctx.dims, ctx.direct = inv_m, dims, direct
        ctx.num_groups, ctx.eps = num_groups, eps
        return y

    @staticmethod
    @hand_written_backward(_small_group_norm_double_backward)
    def backward(ctx: Any, dy: Tensor | None) -> tuple[Tensor | None, ...]:
        """(the formulas are in the class docstring)"""
        if dy is None:
            return None, None, None, None, None
        # x_hat: like x (LayerNorm, InstanceNorm) or (N, G, C/G, S); rstd: one per group
        x, weight, total, rstd = ctx.saved_tensors
        if not ctx.direct:
            groups = ctx.num_groups
            x = x.reshape(x.shape[0], groups, x.shape[1] // groups, math.prod(x.shape[2:]))
        x_hat = torch.add(x, total, alpha=-ctx.inv_m).mul_(rstd)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if ctx.direct:  # the forward reduced x itself: x_hat, dy and dx have x's shape
            flat = x_hat.dim() == 2
            per_channel = (0,) if flat else (0, *range(2, x_hat.dim()))  # gamma's, beta's sums
            if weight is not None and need_w:
                if flat:
                    grad_w = torch.linalg.vecdot(dy, x_hat, dim=0)
                else:
                    grad_w = torch.mul(dy, x_hat).sum(per_channel)
            if need_b:
                grad_b = dy.sum(per_channel)
            if need_x:
                if weight is None:
                    g = dy
                else:
                    g = dy * (weight if flat else weight.view(-1, *[1] * (x_hat.dim() - 2)))
                sum_gx = torch.mul(g, x_hat).sum(ctx.dims, keepdim=True)
                t = torch.addcmul(g.sum(ctx.dims, keepdim=True), x_hat, sum_gx)
                grad_x = torch.add(g, t, alpha=-ctx.inv_m, out=t).mul_(rstd)
            return grad_x, grad_w, grad_b, None, None
        _, groups, cg, _ = x_hat.shape
        dy4 = dy.reshape(x_hat.shape)
        if weight is not None and need_w:
            grad_w = torch.mul(dy4, x_hat).sum((0, 3)).view(-1)
        if need_b:
            grad_b = dy4.sum((0, 3)).view(-1)
        if need_x:
            g = dy4 if weight is None else dy4 * weight.view(groups, cg, 1)
            sum_gx = torch.mul(g, x_hat).sum((2, 3), keepdim=True)
            t = torch.addcmul(g.sum((2, 3), keepdim=True), x_hat, sum_gx)
            grad_x = torch.add(g, t, alpha=-ctx.inv_m, out=t).mul_(rstd).view(dy.shape)
        return grad_x, grad_w, grad_b, None, None
