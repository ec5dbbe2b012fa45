"""Hand-derived backwards that stay differentiable: the decorator every Function of
:mod:`normzoo.norms` puts on its backward, and the autograd recomputations that serve a second
derivative (a gradient penalty, a Hessian-vector product) for BatchNorm/Batch Renorm and GroupNorm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from normzoo.norms._base import _under_transform

__all__ = [
    "batch_norm_double_backward",
    "group_norm_double_backward",
    "hand_written_backward",
    "vjp_by_autograd",
]


def hand_written_backward(
    reference: Callable[..., tuple[Tensor | None, ...]],
) -> Callable[[Callable[..., tuple[Tensor | None, ...]]], Callable[..., tuple[Tensor | None, ...]]]:
    """Decorate a Function's hand-derived backward; ``reference(ctx, *grads)`` serves double
    backward.

    Without grad mode (a plain ``backward()``: the common case) the hand-derived backward runs.
    With grad mode on (``create_graph=True``: a gradient penalty, a Hessian-vector product) the
    grads come from ``reference``, which recomputes the layer's formula from the saved inputs with
    differentiable tensor ops and differentiates it with autograd (:func:`vjp_by_autograd`), so
    the grads are themselves differentiable, to any order, as torch's native layers' are. (A
    ``once_differentiable`` backward would either refuse the second derivative or, when the
    incoming gradient is a constant, return grads without a graph and let a penalty through them
    silently drop the layer's second-order term.)
    """

    def deco(
        backward: Callable[..., tuple[Tensor | None, ...]],
    ) -> Callable[..., tuple[Tensor | None, ...]]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
            # (torch.func runs every backward with grad mode on; its transforms differentiate
            # the hand-derived backward's tensor ops themselves where a higher order is taken)
            if torch.is_grad_enabled() and not _under_transform():
                return reference(ctx, *grads)
            return backward(ctx, *grads)

        return wrapper

    return deco


def vjp_by_autograd(
    forward: Callable[[], Tensor], inputs: Sequence[Tensor | None], grad_output: Tensor
) -> list[Tensor | None]:
    """``grad_output``'s vector-Jacobian product with ``forward()`` for each of ``inputs`` (None:
    not wanted), through autograd with ``create_graph=True`` (so differentiable again).
    ``forward`` must compute the output from the ``inputs`` (saved inputs of a Function keep their
    autograd history); an input the output does not depend on gets zeros."""
    wanted = [t for t in inputs if t is not None]
    with torch.enable_grad():
        y = forward()
        grads = iter(
            torch.autograd.grad(y, wanted, grad_output, create_graph=True, allow_unused=True)
            if wanted
            else ()
        )
    out: list[Tensor | None] = []
    for t in inputs:
        if t is None:
            out.append(None)
            continue
        g = next(grads)
        out.append(torch.zeros_like(t) if g is None else g)
    return out


def batch_norm_double_backward(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    r: Tensor | None,
    d: Tensor | None,
    eps: float,
    grouped: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dgamma, dbeta) of training-mode BatchNorm / Batch Renorm, differentiable again: the
    forward y = gamma * ((x - mean) / sqrt(var + eps) * r + d) + beta (batch mean and biased
    variance over N and the spatial dims; r, d constants, absent for BatchNorm) recomputed with
    autograd ops (in float32 for half-precision input). ``ctx.needs_input_grad`` picks the grads.
    ``grouped``: x is a (K, G, C, R) view of K ghost batches, statistics over G and R, r and d
    (K, C), gamma (C,)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dims = [1, 3] if grouped else [0, *range(2, x.dim())]
    view = (-1, 1, x.shape[2], 1) if grouped else (-1,) + (1,) * (x.dim() - 2)

    def forward() -> Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        xc = xf - xf.mean(dims, keepdim=True)
        y = xc * torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
        if r is not None and d is not None:
            y = y * r.view(view) + d.view(view)
        if weight is not None:
            y = y * weight.view(view)
        return y.to(x.dtype)

    wanted = [x if need_x else None, weight if need_w else None]
    dx, dweight = vjp_by_autograd(forward, wanted, dy)
    dbias = (dy.sum(dims).sum(0) if grouped else dy.sum(dims)) if need_b else None
    return dx, dweight, dbias


def group_norm_double_backward(
    ctx: Any, dy: Tensor, x: Tensor, weight: Tensor | None, num_groups: int, eps: float
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dgamma, dbeta) of GroupNorm (LayerNorm: 1 group, InstanceNorm: C), differentiable
    again: y = gamma * (x - mean) / sqrt(var + eps) + beta with statistics per (sample, group),
    recomputed with autograd ops (in float32 for half-precision input)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    n = x.shape[0]
    view = (-1,) + (1,) * (x.dim() - 2)

    def forward() -> Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        xg = xf.reshape(n, num_groups, xf.numel() // max(n * num_groups, 1))
        xc = xg - xg.mean(-1, keepdim=True)
        y = (xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)).reshape(x.shape)
        if weight is not None:
            y = y * weight.view(view)
        return y.to(x.dtype)

    wanted = [x if need_x else None, weight if need_w else None]
    dx, dweight = vjp_by_autograd(forward, wanted, dy)
    return dx, dweight, dy.sum([0, *range(2, x.dim())]) if need_b else None
