"""The shared GroupNorm computation of :mod:`normzoo.norms.sample` (Wu & He 2018, Eqs. 3-7).

For an input (N, C, *S) in G groups, per (sample, group) over its m = (C / G) * prod(S) values::

    mu_ng = mean(x_ng),  sigma2_ng = mean((x_ng - mu_ng)^2)      (biased variance)
    y_nc  = gamma_c * (x_nc - mu_ng) / sqrt(sigma2_ng + eps) + beta_c

:class:`GroupNormFunction` is the ``torch.autograd.Function``: a forward in two passes over
memory (one reduction for the sums of x and x^2, one affine ``x * scale + shift``) and a
hand-derived backward that saves what torch's native kernel saves (input, gamma, and one mean and
one 1/sigma per (sample, group)). On CPU the statistics are two vectorised one-pass sums, with a
centred two-pass fallback when mu^2 / sigma2 is large enough for the one-pass formula to cancel.
:func:`group_norm` is the functional form, :func:`normalise` the layers' entry point.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normzoo.norms._backward import group_norm_double_backward, hand_written_backward
from normzoo.norms._base import _graph_mode, _is_small, _under_transform
from normzoo.norms._small import SmallGroupNorm

__all__ = ["GroupNormFunction", "GroupNormFunctionForTransforms", "group_norm", "normalise"]


#: One-pass sums lose about log2(1 + mu^2 / sigma2) bits to cancellation; above this ratio in any
#: group the statistics are recomputed from the centred input (64: at most ~6 of 24 bits in float32).
_CANCELLATION_LIMIT = 64.0


def _group_stats(x4: Tensor, m: int, functional: bool = False) -> tuple[Tensor, Tensor, bool]:
    """Mean and biased variance per (sample, group), (N, G, 1, 1) each, and whether they were centred.

    ``x4`` is the input viewed as (N, G, C/G, S) (S = prod of the spatial dims, 1 for 2-D input),
    ``m = C/G * S`` the values per group. CPU eager: two vectorised one-pass reductions, sum(x)
    and ||x||^2 (torch's ``var_mean`` is a scalar Welford loop there, ~10-20x slower),
    var = E[x^2] - mu^2; a batch with mu^2 / var above ``_CANCELLATION_LIMIT`` in any group falls
    back to the centred two-pass form (the check reads one number, free on CPU). CUDA and
    ``torch.compile`` (and ``functional``, torch.func): ``torch.var_mean``, one stable fused
    reduction. Half-precision input is
    accumulated in float32. The statistics keep their reduced dims so that they broadcast against
    ``x4`` without reshapes. (Small inputs do not come here: the modules give them to
    :class:`~normzoo.norms._small.SmallGroupNorm`.)
    """
    if x4.dtype not in (torch.float32, torch.float64):
        x4 = x4.float()
    if functional or x4.device.type != "cpu" or torch.compiler.is_compiling():
        if x4.shape[0] == 0:  # an empty batch: nothing to reduce (var_mean would warn)
            empty = x4.new_zeros(0, x4.shape[1], 1, 1)
            return empty, empty.clone(), True
        var, mean = torch.var_mean(x4, dim=(2, 3), correction=0, keepdim=True)
        return mean, var, True
    mean = x4.sum((2, 3), keepdim=True).div_(m)
    var = torch.linalg.vector_norm(x4, dim=(2, 3), keepdim=True).square_().div_(m)
    var.addcmul_(mean, mean, value=-1.0)
    # var - mu^2 / L < 0  <=>  mu^2 / var > L (also catches a var < 0 from rounding)
    margin = torch.addcmul(var, mean, mean, value=-1.0 / _CANCELLATION_LIMIT)
    if margin.numel() == 0 or margin.min().item() >= 0:  # (an empty batch has nothing to check)
        return mean, var, False
    centred = torch.linalg.vector_norm(x4 - mean, dim=(2, 3), keepdim=True)
    return mean, centred.square_().div_(m), True


def _compiled_views(x4: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` (each shaped like x) as the compiled backward computes on them: rows (N * C, S)
    when x has spatial dims and all are contiguous, else like ``x4`` (N, G, C/G, S).

    Under ``torch.compile`` the loop shape of a pointwise op is its tensor shape (inductor merges
    dims only where every operand's index allows it, and gamma's index per channel keeps N apart
    from C). On rows, the dx pass iterates as the per-(sample, channel) sums do, so inductor can
    fuse it with them (InstanceNorm: one loop per row). On 2-D input (S = 1) the (N, G, C/G) view
    keeps the per-group terms' index affine in the vectorised dim (C/G), which flat (N, C) does not
    (c // (C/G): a scalar loop; the forward's y pass was 2.9x slower so at (256, 256)).
    """
    n, g, cg, s = x4.shape
    rows = s > 1
    for t in tensors:  # (a loop: dynamo cannot trace a generator inside all())
        rows = rows and t.is_contiguous()
    if rows:
        return tuple(t.view(n * g * cg, s) for t in tensors)
    return tuple(t.reshape(x4.shape) for t in tensors)


def _per_nc(t4: Tensor, like: Tensor) -> Tensor:
    """A per-(sample, channel) term ((N, G, C/G, 1) or broadcastable to it) shaped to broadcast
    against ``like``, a :func:`_compiled_views` view."""
    if like.dim() == 4:
        return t4
    n, g = t4.shape[0], t4.shape[1]
    cg = like.shape[0] // (n * g)
    return t4.expand(n, g, cg, 1).reshape(n * g * cg, 1)


#: In the backward, inputs of at least this many bytes get their dx buffer allocated first (see
#: :func:`_empty_like_viewed`); below it the allocation order does not matter and the extra ops
#: would only add per-call cost. (The eager forward always allocates y first: its output must not
#: be a view.)
_PREALLOCATE_BYTES = 1 << 20


def _is_large(x: Tensor) -> bool:
    """Eager inputs of ``_PREALLOCATE_BYTES`` or more (a compiled graph plans its own buffers)."""
    return x.numel() * x.element_size() >= _PREALLOCATE_BYTES and not (
        torch.compiler.is_compiling()
    )


def _empty_like_viewed(x: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """An uninitialised tensor like ``x`` and its view as ``shape`` ((N, G, C/G, S)).

    ``x``'s layout is kept where that view exists (contiguous, channels_last); other layouts get a
    contiguous tensor. The layers allocate their one input-sized buffer with this *before* any
    small temporary: with glibc's allocator a large block allocated after the temporaries lands at
    the top of the heap, is trimmed when freed, and every later step page-faults it back in
    (measured: ~700 faults and +2-4 ms per fwd+bwd on a (32, 64, 32, 32) input).
    """
    out = torch.empty_like(x)
    try:
        return out, out.view(shape)
    except RuntimeError:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, out.view(shape)


def _group_norm_function_double_backward(
    ctx: Any, dy: Tensor | None, *_: Any
) -> tuple[Tensor | None, ...]:
    """:class:`GroupNormFunction`'s backward under ``create_graph`` (differentiable again)."""
    if dy is None:
        return None, None, None, None, None, None
    x, weight, _, _ = ctx.saved_tensors
    grads = group_norm_double_backward(ctx, dy, x, weight, ctx.num_groups, ctx.eps)
    return (*grads, None, None, None)


def _group_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    functional: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """:class:`GroupNormFunction`'s forward: y, mean, var, rstd ((N, G, 1, 1) each) and whether
    the statistics were centred. ``functional``: no ``out=`` and no host read (torch.func: vmap
    has no batching rule for them, and under ``grad`` the forward runs with autograd on)."""
    n, c = x.shape[0], x.shape[1]
    cg = c // num_groups
    s = math.prod(x.shape[2:])
    x4 = x.reshape(n, num_groups, cg, s)  # a view for contiguous and channels_last input
    # eager: y is allocated first and written through its view y4, so the output is not a view
    # (a view output of a Function refuses in-place ops such as ReLU(inplace=True))
    compiling = torch.compiler.is_compiling()
    y, y4 = (None, None) if compiling or functional else _empty_like_viewed(x, x4.shape)
    mean, var, centred = _group_stats(x4, cg * s, functional)  # (N, G, 1, 1) each
    rstd = var.add(eps).rsqrt_()
    if weight is None:  # scale, shift: (N, G, C/G, 1)
        scale = rstd.expand(n, num_groups, cg, 1)
    else:
        scale = rstd * weight.view(num_groups, cg, 1)
    if bias is None:
        shift = torch.mul(scale, mean).neg_()
    else:
        shift = torch.addcmul(bias.view(num_groups, cg, 1), scale, mean, value=-1.0)
    # half-precision input: scale and shift stay in float32 (the statistics' dtype) and y is
    # computed in float32 and rounded once (rounding the shift ~ -mu * scale first would lose
    # what x * scale + shift keeps of a large mean)
    low = x.dtype != scale.dtype
    # (N, C): one addcmul of same-shape operands; else two passes beat one addcmul (torch
    # vectorises an op with one broadcast operand, not two)
    if compiling and s == 1 and not functional:  # (see _compiled_views) written through a
        # view of y, which keeps y itself a base (in-place ops such as ReLU(inplace=True) need it)
        y = torch.empty_like(x)
        y.view(x4.shape).copy_(torch.addcmul(shift, x4, scale))
    elif compiling or functional:  # y in x's shape, so it is not a view of y4
        per_channel = (n, c) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.reshape(per_channel), x, scale.reshape(per_channel))
        y = y.to(x.dtype)
    elif s == 1 or low:
        torch.addcmul(shift, x4, scale, out=y4)
    else:
        torch.mul(x4, scale, out=y4).add_(shift)
    assert y is not None
    return y, mean, var, rstd, centred


def _save_for_group_norm_backward(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    eps: float,
    centred: bool,
) -> None:
    """What :func:`_group_norm_backward` reads: x, gamma, mean and rstd per (sample, group)."""
    ctx.set_materialize_grads(False)  # mean and var get no gradient: skip their zeros
    ctx.centred, ctx.num_groups, ctx.eps = centred, num_groups, eps
    ctx.save_for_backward(x, weight, mean, rstd)


class GroupNormFunction(torch.autograd.Function):
    """y = gamma * (x - mu) / sqrt(sigma2 + eps) + beta with statistics per (sample, group).

    ``apply(x, weight, bias, num_groups, eps) -> (y, mean, var)``; ``mean`` and ``var`` (biased),
    of shape (N, G, 1, 1), are returned for running statistics and are not differentiable (no
    output is a view, so in-place ops on ``y`` such as ``ReLU(inplace=True)`` work).
    ``apply(x, weight, bias, num_groups, eps, False) -> y`` leaves the statistics out.

    Every step works on the input viewed as (N, G, C/G, S) (S = prod of the spatial dims; a view
    for contiguous and channels_last input), so per-(sample, group) and per-(sample, channel)
    terms broadcast without reshapes. Forward: the statistics (:func:`_group_stats`: two
    vectorised reductions on CPU), then y = x * scale + shift with scale, shift per (sample,
    channel): on 2-D input one ``addcmul`` of same-shape operands, else a multiply and an in-place
    add (torch vectorises an op with one broadcast operand, not two). Saved for backward: x, gamma,
    and mean and rstd = 1 / sqrt(sigma2 + eps) per (sample, group) -- what torch's native kernel
    saves.

    Backward, with x_hat = (x - mu) * rstd over a group's m values and g = dy * gamma::

        dx     = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (means over the group)
        dgamma = sum_{n, S} dy * x_hat,    dbeta = sum_{n, S} dy

    Both group means need only the per-(sample, channel) sums ``db = sum_S dy`` and
    ``dot = sum_S dy * (x - mu)`` (taken as ``sum_S dy * x - mu * db`` unless the forward had to
    centre), so dx = a * dy + b * x + c with a = rstd * gamma per (n, c) and b, c per (n, g): two
    reductions and the dx passes. The buffer that holds dy * x for ``dot`` becomes dx, so backward
    allocates one input-sized tensor, as the native kernel does; for inputs of 1 MiB and more, y
    and that buffer are allocated before any small temporary (:func:`_empty_like_viewed`).
    Half-precision input: the statistics, scale, shift and the backward's terms are float32, the
    backward works on the centred input upcast to float32, and y and dx are rounded once (as
    accurate as torch's kernels; rounding the shift first lost what a large mean leaves of y).
    (The modules give small CPU inputs to :class:`~normzoo.norms._small.SmallGroupNorm`.) Under
    ``torch.compile`` the backward is :func:`_group_norm_backward_compiled` (the same formulas,
    arranged for inductor's loops). Under ``create_graph`` the backward differentiates the same
    formula with autograd instead, so the grads are differentiable again.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
        stats: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        y, mean, var, rstd, centred = _group_norm_forward(x, weight, bias, num_groups, eps)
        _save_for_group_norm_backward(ctx, x, weight, mean, rstd, num_groups, eps, centred)
        if not stats:
            return y
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var  # mean, var: (N, G, 1, 1), viewed as (N, G) by group_norm()

    @staticmethod
    @hand_written_backward(_group_norm_function_double_backward)
    def backward(ctx: Any, dy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        return _group_norm_backward(ctx, dy)


class GroupNormFunctionForTransforms(GroupNormFunction):
    """:class:`GroupNormFunction` in the ``forward`` + ``setup_context`` form that torch.func
    transforms need (a generated vmap rule: there the forward is plain tensor ops): always
    ``(y, mean, var, rstd, centred)``; the backward is the same hand-derived one. Eager calls keep
    the ctx form (torch binds a ``setup_context`` Function's signature with ``inspect`` on every
    call: ~35 us more per forward + backward, measured on the 2-core VM)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float
    ) -> tuple[Any, ...]:
        return _group_norm_forward(x, weight, bias, num_groups, eps, functional=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, _, num_groups, eps = inputs
        _, mean, var, rstd, centred = output
        _save_for_group_norm_backward(ctx, x, weight, mean, rstd, num_groups, eps, centred)
        ctx.mark_non_differentiable(mean, var, rstd)


def _group_norm_apply(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``GroupNormFunction.apply``'s (y, mean, var), through its torch.func form in a transform;
    its forward's tensor ops alone under ``torch.jit.trace`` and the legacy ONNX exporter (a
    traced graph of aten ops saves, loads and exports; autograd differentiates them)."""
    if torch.jit.is_tracing():
        return _group_norm_forward(x, weight, bias, num_groups, eps, functional=True)[:3]
    if _under_transform():
        y, mean, var, _, _ = GroupNormFunctionForTransforms.apply(x, weight, bias, num_groups, eps)
        return y, mean, var
    return GroupNormFunction.apply(x, weight, bias, num_groups, eps)  # type: ignore[no-any-return]


def _group_norm_backward(ctx: Any, dy: Tensor | None) -> tuple[Tensor | None, ...]:
    """:meth:`GroupNormFunction.backward` (see its class docstring for the formulas)."""
    if dy is None:
        return None, None, None, None, None, None
    if _graph_mode():  # (torch.compile, torch.func: the same formulas without out=)
        return _group_norm_backward_compiled(ctx, dy)
    x, weight, mean, rstd = ctx.saved_tensors  # mean, rstd: (N, G, 1, 1)
    n, c = x.shape[0], x.shape[1]
    groups = mean.shape[1]
    cg = c // groups
    s = math.prod(x.shape[2:])
    x4, dy4 = x.reshape(n, groups, cg, s), dy.reshape(n, groups, cg, s)
    centred = ctx.centred
    dx = dx4 = None
    low = x.dtype != mean.dtype  # half-precision input, float32 statistics
    if low:  # computed in float32 on the centred input, dx rounded once at the end
        x4, dy4, centred = x4.to(mean.dtype), dy4.to(mean.dtype), True
    elif _is_large(x):  # the product's buffer becomes dx (allocated first: _empty_like_viewed)
        dx, dx4 = _empty_like_viewed(x, x4.shape)
    # dot = sum_S dy * (x - mu) per (n, c), db = sum_S dy: (N, G, C/G, 1)
    prod = dx4 = torch.mul(dy4, x4 - mean if centred else x4, out=dx4)
    if s > 1:
        dot, db = prod.sum(-1, keepdim=True), dy4.sum(-1, keepdim=True)
    else:  # 2-D input: one value per (n, c), nothing to sum; prod is dot itself
        dot, db = prod, dy4
    if not centred:
        dot = dot.addcmul_(mean, db, value=-1.0)
    grad_x = grad_w = grad_b = None
    if weight is not None and ctx.needs_input_grad[1]:  # (before dx overwrites a 2-D dot)
        grad_w = (dot * rstd).sum(0).view(c).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = db.sum(0).view(c).to(dy.dtype)
    if ctx.needs_input_grad[0]:
        w3 = None if weight is None else weight.view(groups, cg, 1).to(mean.dtype)
        # dx = a * dy + b * x + c0 with a = rstd * gamma, b = -rstd^3 / m * sum_c gamma * dot,
        # c0 = -rstd / m * sum_c gamma * db - b * mu (b * (x - mu) + c0 if centred)
        sum_gd = (dot if w3 is None else dot * w3).sum(2, keepdim=True)  # (N, G, 1, 1)
        sum_g = (db if w3 is None else db * w3).sum(2, keepdim=True)
        rk = rstd * (-1.0 / (cg * s))
        b = sum_gd.mul_(rk).mul_(rstd).mul_(rstd)
        c0 = sum_g.mul_(rk)
        if not centred:
            c0 = c0.addcmul_(b, mean, value=-1.0)
        a = rstd.expand(n, groups, cg, 1) if w3 is None else rstd * w3
        # written over the product: first b * x (or b * (x - mu)), then + c0, + a * dy
        # (no out= under torch.compile: dynamo rejects a non-contiguous out, e.g. channels_last)
        out = None if torch.compiler.is_compiling() else dx4
        centred_b = torch.sub(x4, mean, out=out).mul_(b) if centred else None
        dx4 = torch.mul(x4, b, out=out) if centred_b is None else centred_b
        dx4.add_(c0).addcmul_(dy4, a)
        grad_x = dx4.view(x.shape) if dx is None else dx
        if low:
            grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w, grad_b, None, None, None


def _group_norm_backward_compiled(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    """:meth:`GroupNormFunction.backward` under ``torch.compile``: the class docstring's
    dx = a * dy + b * x + c with ``dot = sum_S dy * x - mu * db`` (as torch's own decomposition),
    so that inductor takes ``sum_S dy * x`` and ``db`` in one loop over dy and x (centring inside
    it, ``dy * (x - mu)`` with mu per group, gives that product another loop shape and costs a
    second pass over dy; with C/G = 1, mu per row, it does not, and dot is centred); then one dx
    pass. The passes run on the views of
    :func:`_compiled_views`. With C/G > 1, b and c are (N, G) terms that inductor computes once
    (b is read twice, so it is stored) instead of per vector of the dx loop. With C/G = 1
    (InstanceNorm) every per-(n, c) term is read once and in the row shape, so inductor inlines it
    and runs each row's dx right after that row's sums, the row still in cache; there
    dx = a * dy + b * (x - mu) + c' (c' = c + b * mu). a, b, c stay in float32 for half-precision
    input (dx is rounded once).
    """
    x, weight, mean, rstd = ctx.saved_tensors  # mean, rstd: (N, G, 1, 1)
    n, c = x.shape[0], x.shape[1]
    groups = mean.shape[1]
    cg = c // groups
    s = math.prod(x.shape[2:])
    m = cg * s
    acc = mean.dtype
    x4 = x.reshape(n, groups, cg, s)  # (not -1: an empty batch has no size to infer)
    xw, dyw = _compiled_views(x4, x, dy)
    # sum_S dy * (x - mu) and sum_S dy per (n, c) in one loop, viewed as (N, G, C/G, 1); with
    # C/G = 1 mu is per row and centring is free, else dot = sum_S dy * x - mu * db
    xc = xw - _per_nc(mean, xw) if cg == 1 else xw
    dot = torch.mul(dyw, xc).sum(-1, keepdim=True, dtype=acc).view(n, groups, cg, 1)
    db = dyw.sum(-1, keepdim=True, dtype=acc).view(n, groups, cg, 1)
    if cg > 1:
        dot = dot - mean * db
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        w3 = None if weight is None else weight.view(groups, cg, 1).to(acc)
        sum_gd = (dot if w3 is None else dot * w3).sum(2, keepdim=True)  # (N, G, 1, 1)
        sum_g = (db if w3 is None else db * w3).sum(2, keepdim=True)
        a = _per_nc(rstd if w3 is None else rstd * w3, xw)
        if cg == 1:
            rstd_w, rk = _per_nc(rstd, xw), _per_nc(rstd * (-1.0 / m), xw)
            b = _per_nc(sum_gd, xw) * rk * rstd_w * rstd_w
            dx = a * dyw + b * (xw - _per_nc(mean, xw)) + _per_nc(sum_g, xw) * rk
        else:
            rk = rstd * (-1.0 / m)
            b = sum_gd * rk * rstd * rstd
            c0 = sum_g * rk - b * mean
            dx = a * dyw + _per_nc(b, xw) * xw + _per_nc(c0, xw)
        grad_x = dx.to(x.dtype).reshape(x.shape)
    if weight is not None and ctx.needs_input_grad[1]:
        grad_w = (dot * rstd).sum(0).view(c).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = db.sum(0).view(c).to(dy.dtype)
    return grad_x, grad_w, grad_b, None, None, None


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Functional form: ``(y, mean, var)`` with mean and biased var of shape (N, num_groups).

    Raises:
        ValueError: if a group would hold no values (an empty spatial dim).
    """
    _check_spatial(x)
    y, mean, var = _group_norm_apply(x, weight, bias, num_groups, eps)
    return y, mean.view(x.shape[0], num_groups), var.view(x.shape[0], num_groups)


def _check_spatial(x: Tensor) -> None:
    if x.dim() > 2 and math.prod(x.shape[2:]) == 0:
        raise ValueError(
            f"expected non-empty spatial dims (each group needs values to normalise), "
            f"got input of shape {tuple(x.shape)}"
        )


def normalise(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """:func:`group_norm`'s output alone (the statistics are not returned: fewer ops)."""
    _check_spatial(x)
    if _is_small(x):
        return SmallGroupNorm.apply(x, weight, bias, num_groups, eps)
    if _under_transform() or torch.jit.is_tracing():
        return _group_norm_apply(x, weight, bias, num_groups, eps)[0]
    return GroupNormFunction.apply(x, weight, bias, num_groups, eps, False)  # type: ignore[no-any-return]
