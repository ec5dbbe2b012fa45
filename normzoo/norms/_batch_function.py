"""BatchNorm's autograd Function: batch statistics with a hand-derived backward.

:class:`_BatchNormFunction` (and its torch.func twin :class:`_BatchNormFunctionForTransforms`),
entered through :func:`_batch_norm_apply`, is the training-mode core of BatchNorm and Batch Renorm
(``normzoo.norms.batch``) and of their ghost batches (``normzoo.norms._ghost``): the per-channel
statistics over N and the spatial dims, the output, and the gradients of x, gamma and beta.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normzoo.norms._backward import batch_norm_double_backward, hand_written_backward
from normzoo.norms._base import _batch_norm_scale, _graph_mode, _scale_and_offset, _under_transform

__all__: list[str] = []


def _reduce_dims(x: Tensor, grouped: bool = False) -> list[int]:
    """The axes a batch-statistics layer reduces over: N and every spatial dim; for a
    ``grouped`` (K, G, C, R) view of K ghost batches, G and R (statistics per (K, C))."""
    return [1, 3] if grouped else [0, *range(2, x.dim())]


def _values_per_channel(x: Tensor, grouped: bool = False) -> int:
    """m = N * prod(S) (``grouped``: G * R), the values each channel's statistics are over."""
    if grouped:
        return x.shape[1] * x.shape[3]
    return x.numel() // x.shape[1] if x.numel() else 0


def _channel_view(t: Tensor, x: Tensor, grouped: bool = False) -> Tensor:
    """A per-channel vector (C,) shaped (C, 1, ..., 1) to broadcast against (N, C, *S); for a
    ``grouped`` (K, G, C, R) view a (K, C) statistic shaped (K, 1, C, 1), a parameter (C,)
    (1, 1, C, 1)."""
    if grouped:
        return t.view(-1, 1, x.shape[2], 1)
    return t.view(-1, *([1] * (x.dim() - 2)))


def _summed_over_ghosts(t: Tensor, grouped: bool) -> Tensor:
    """A parameter's grad (C,) from its (K, C) per-(ghost batch, channel) terms (``grouped``)."""
    return t.sum(0) if grouped else t


def _channels_inner(x: Tensor, grouped: bool) -> bool:
    """Whether the channels are innermost in memory (then addcmul's broadcast vectorises)."""
    if grouped:
        return x.shape[3] == 1 or x.stride(2) == 1
    return x.dim() == 2 or x.stride(1) == 1


def _affine_into(
    out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, grouped: bool = False
) -> Tensor:
    """out = x * scale + shift with per-channel (C,) ``scale`` and ``shift``, written into ``out``."""
    s, b = _channel_view(scale, x, grouped), _channel_view(shift, x, grouped)
    if _channels_inner(x, grouped):  # channels innermost in memory: addcmul vectorises
        return torch.addcmul(b, x, s, out=out)
    # NC(S) layout: addcmul with two broadcast operands takes a slow scalar loop; mul + add_ do not
    return torch.mul(x, s, out=out).add_(b)


#: One-pass sums lose about log2(1 + mean^2 / var) bits to cancellation; above this ratio in any
#: channel the statistics are recomputed from the centred input (64: at most ~6 of 24 bits in float32).
_CANCELLATION_LIMIT = 64.0


def _batch_stats(
    x: Tensor, m: int, scratch: Tensor | None, grouped: bool = False
) -> tuple[Tensor, Tensor, bool]:
    """Per-channel batch mean and biased variance of ``x`` (N, C, *S), and whether the backward pass
    must centre ``x`` before its reductions. ``scratch`` (like x) is overwritten; None (the
    torch.func form) takes ``torch.var_mean``. ``grouped``: x is a (K, G, C, R) view of K ghost
    batches and the statistics are per (ghost batch, channel), (K, C) (:func:`_reduce_dims`).

    On CPU in eager mode the fast route is two plain sums, ``sum(x)`` and ``sum(x * x)`` (torch's
    vectorised sum is ~10x faster there than ``torch.var_mean``'s Welford loop; sum(x * x) is a
    row-wise vector norm for contiguous (N, C, *S) input, else x * x goes into ``scratch``, the future
    output, so no buffer is allocated for it): var = E[x^2] - E[x]^2. That
    formula cancels when |mean| >> std, so a batch with mean^2 / var > ``_CANCELLATION_LIMIT`` in
    any channel falls back to centred two-pass sums (the check reads one number, free on CPU).
    Elsewhere (CUDA, ``torch.compile``, torch.func transforms) ``torch.var_mean`` is one fused, stable kernel, and the
    backward centres x inside its fused reductions. Half-precision input is accumulated in float32.
    (Small inputs do not come here: the modules give them to
    :class:`~normzoo.norms._small.SmallBatchNorm`.)
    """
    dims = _reduce_dims(x, grouped)
    if scratch is None or x.device.type != "cpu" or torch.compiler.is_compiling():
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, True
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
        scratch = torch.empty_like(x)
    mean = x.sum(dims).div_(m)
    if x.is_contiguous() and (x.shape[3] > 1 if grouped else x.dim() > 2):
        # rows of the spatial values: a vectorised norm, no x * x pass
        rows = torch.linalg.vector_norm(
            x.view(-1, x.shape[3] if grouped else m // x.shape[0]), dim=1
        )
        sq = torch.mul(rows, rows).view(x.shape[:3] if grouped else x.shape[:2])
        mean_sq_x = sq.sum(1 if grouped else 0).div_(m)  # E[x^2]
    else:
        mean_sq_x = torch.mul(x, x, out=scratch).sum(dims).div_(m)
    var = torch.addcmul(mean_sq_x, mean, mean, value=-1)
    # var - mean^2 / L < 0  <=>  mean^2 / var > L (also catches a var < 0 from rounding)
    if torch.addcmul(var, mean, mean, value=-1.0 / _CANCELLATION_LIMIT).min().item() >= 0:
        return mean, var, False
    centred = torch.sub(x, _channel_view(mean, x, grouped), out=scratch)
    return mean, centred.square_().sum(dims).div_(m), True


def _batch_norm_function_double_backward(
    ctx: Any, dy: Tensor | None, *_: Any
) -> tuple[Tensor | None, ...]:
    """:class:`_BatchNormFunction`'s backward under ``create_graph`` (differentiable again)."""
    if dy is None:
        return (None,) * 8
    x, _, _, r, d, weight = ctx.saved_tensors
    grads = batch_norm_double_backward(ctx, dy, x, weight, r, d, ctx.eps, ctx.grouped)
    return (*grads, None, None, None, None, None)


def _batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    ref_mean: Tensor | None = None,
    ref_var: Tensor | None = None,
    limits: Tensor | None = None,
    grouped: bool = False,
    functional: bool = False,
) -> tuple[tuple[Tensor, ...], Tensor, bool]:
    """:class:`_BatchNormFunction`'s forward: its outputs, invstd and whether x was centred.
    ``functional``: no ``out=`` and no host read (torch.func: vmap has no batching rule for
    them, and under ``grad`` the forward runs with autograd on)."""
    m = _values_per_channel(x, grouped)
    y = None if functional else torch.empty_like(x)
    mean, var, centred = _batch_stats(x, m, y, grouped)
    invstd = torch.rsqrt(var + eps)
    g, offset, _, _, extra = _scale_and_offset(
        invstd, mean, weight, bias, eps, ref_mean, ref_var, limits
    )
    if functional:
        y = (x - _channel_view(mean, x, grouped)) * _channel_view(g, x, grouped)
        y = y if offset is None else y + _channel_view(offset, x, grouped)
    elif centred:  # |mean| >> std: x * g + (offset - mean * g) would cancel; centre first
        torch.sub(x, _channel_view(mean, x, grouped), out=y)
        if offset is None:
            y.mul_(_channel_view(g, x, grouped))
        else:
            _affine_into(y, y, g, offset, grouped)
    else:
        shift = -mean * g if offset is None else torch.addcmul(offset, mean, g, value=-1)
        _affine_into(y, x, g, shift, grouped)
    assert y is not None
    return (y, mean, var, *extra), invstd, centred


def _save_for_batch_norm_backward(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    outputs: tuple[Tensor, ...],
    invstd: Tensor,
    centred: bool,
    grouped: bool,
) -> None:
    """What :meth:`_BatchNormFunction.backward` reads: x, mean, invstd, r, d, gamma (g is
    recomputed); mean, var (, r, d and the clip fractions) get no gradient."""
    _, mean, var, *extra = outputs
    r, d = (extra[2], extra[3]) if extra else (None, None)
    ctx.set_materialize_grads(False)  # mean, var (, r, d) get no gradient: skip their zeros
    ctx.centred, ctx.eps, ctx.grouped = centred, eps, grouped
    ctx.save_for_backward(x, mean, invstd, r, d, weight)
    ctx.mark_non_differentiable(mean, var, *extra)


class _BatchNormFunction(torch.autograd.Function):
    r"""Training-mode batch norm with batch statistics and a hand-derived backward.

    ``apply(x, weight, bias, eps)`` returns ``(y, mean, var)``: the output and the batch mean and
    biased variance per channel (non-differentiable, for the running statistics).
    ``apply(x, weight, bias, eps, ref_mean, ref_var, limits)`` (Batch Renorm, ``limits`` the tensor
    ``[rmax, dmax]``) returns ``(y, mean, var, clip_fraction_r, clip_fraction_d, r, d)``: also the
    fractions of channels whose r resp. d was clipped, and r, d themselves (returning r and d keeps
    torch.compile from recomputing their sqrt/rsqrt/clamp chain inside the backward's per-element
    loop, which made it ~1.5x slower). An eighth argument ``grouped=True`` takes x as a (K, G, C,
    R) view of K ghost batches of G samples (``normzoo.norms._ghost``): the same formulas per
    (ghost batch, channel) pair, whose statistics (and r, d) are (K, C) while gamma, beta and
    the moving statistics stay (C,) (their grads sum over the ghost batches). With
    x_hat = (x - mean) * invstd, invstd = 1 / sqrt(var + eps)::

        y = gamma * x_hat + beta                                   (BatchNorm)
        y = gamma * (x_hat * r + d) + beta                         (Batch Renorm)
        r = clip(sqrt(var + eps) / sigma, 1/rmax, rmax),  d = clip((mean - ref_mean) / sigma, +-dmax)

    with sigma = sqrt(ref_var + eps). r and d are
    constants for the gradient (stop_gradient), so both share one backward with the effective
    per-channel scale g = gamma * r * invstd (r = 1 for BatchNorm); sums run over N and S (m values)::

        dot     = sum(dy * x_hat) = invstd * (sum(dy * x) - mean * sum(dy))
        dbeta   = sum(dy)
        dgamma  = r * dot + d * sum(dy)                             (dot for BatchNorm)
        dx      = g / m * (m * dy - sum(dy) - x_hat * dot)
                = g * dy + a * x + b,  a = -g * invstd * dot / m,  b = -g * sum(dy) / m - a * mean

    The second form (one pass over x after the reductions) serves the one-pass route; where the
    forward centred (the cancellation fallback, CUDA and ``torch.compile``) the backward centres x
    once and computes dx = g * (dy - (sum(dy) + (x - mean) * invstd * dot) / m) in place in that
    buffer.

    Saved for backward: x and per-channel vectors (mean, invstd, gamma; r, d for Batch Renorm; the
    backward recomputes g) -- torch's native kernel saves x and five. Memory traffic: forward two reductions and the output pass;
    backward two reductions and the dx passes; one large buffer allocated per direction (the output
    buffer doubles as scratch for x * x and dy * x). Under ``create_graph`` the backward
    differentiates the same formula with autograd instead, so the grads are differentiable again
    (gamma is saved for that).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        ref_mean: Tensor | None = None,
        ref_var: Tensor | None = None,
        limits: Tensor | None = None,
        grouped: bool = False,
    ) -> tuple[Tensor, ...]:
        outputs, invstd, centred = _batch_norm_forward(
            x, weight, bias, eps, ref_mean, ref_var, limits, grouped
        )
        _save_for_batch_norm_backward(ctx, x, weight, eps, outputs, invstd, centred, grouped)
        return outputs

    @staticmethod
    @hand_written_backward(_batch_norm_function_double_backward)
    def backward(ctx: Any, dy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if dy is None:  # grads are not materialised: y did not take part in the loss
            return (None,) * 8
        x, mean, invstd, r, d, weight = ctx.saved_tensors
        grouped = ctx.grouped
        g = _batch_norm_scale(invstd, weight, r)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims = _reduce_dims(x, grouped)
        k = -1.0 / _values_per_channel(x, grouped)
        sum_dy = dy.sum(dims)
        dx = dweight = None
        if ctx.centred and (need_x or need_w):
            xc = x - _channel_view(mean, x, grouped)  # becomes dx
            dot = torch.mul(dy, xc).sum(dims).mul_(invstd)
            if need_w:
                dweight = dot if r is None else torch.addcmul(r * dot, d, sum_dy)
                dweight = _summed_over_ghosts(dweight, grouped)
            if need_x:  # dx = g * (dy + k * (sum_dy + (x - mean) * invstd * dot)): five ops
                t = xc.mul_(_channel_view(invstd * dot, x, grouped))
                t = t.add_(_channel_view(sum_dy, x, grouped))
                # (no out= under torch.compile: dynamo rejects a non-contiguous out; nor vmap)
                out = None if _graph_mode() else t
                dx = torch.add(dy, t, alpha=k, out=out).mul_(_channel_view(g, x, grouped))
        elif need_x or need_w:
            buf = torch.empty_like(x)  # first holds dy * x, then becomes dx
            dot = torch.mul(dy, x, out=buf).sum(dims)
            dot = torch.addcmul(dot, mean, sum_dy, value=-1).mul_(invstd)
            if need_w:
                dweight = dot if r is None else torch.addcmul(r * dot, d, sum_dy)
                dweight = _summed_over_ghosts(dweight, grouped)
            if need_x:
                a = (g * invstd).mul_(dot).mul_(k)
                b = (g * sum_dy).mul_(k).addcmul_(a, mean, value=-1)
                dx = _affine_into(buf, x, a, b, grouped)
                dx = dx.addcmul_(dy, _channel_view(g, x, grouped))
        dbias = _summed_over_ghosts(sum_dy, grouped) if need_b else None
        return dx, dweight, dbias, None, None, None, None, None


class _BatchNormFunctionForTransforms(_BatchNormFunction):
    """:class:`_BatchNormFunction` in the ``forward`` + ``setup_context`` form that torch.func
    transforms need (a generated vmap rule: there the forward is plain tensor ops), with invstd
    and the centring flag as two more outputs; the backward is the same hand-derived one. Eager
    calls keep the ctx form: torch binds a ``setup_context`` Function's signature with
    ``inspect`` on every call (~35 us more per forward + backward, measured on the 2-core VM)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        ref_mean: Tensor | None = None,
        ref_var: Tensor | None = None,
        limits: Tensor | None = None,
        grouped: bool = False,
    ) -> tuple[Any, ...]:
        outputs, invstd, centred = _batch_norm_forward(
            x, weight, bias, eps, ref_mean, ref_var, limits, grouped, functional=True
        )
        return (*outputs, invstd, centred)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, _, eps = inputs[:4]
        grouped = bool(inputs[7]) if len(inputs) > 7 else False
        *outputs, invstd, centred = output
        _save_for_batch_norm_backward(ctx, x, weight, eps, tuple(outputs), invstd, centred, grouped)
        ctx.mark_non_differentiable(*outputs[1:], invstd)  # (a superset of the call above's)


def _batch_norm_apply(*args: Any) -> tuple[Tensor, ...]:
    """``_BatchNormFunction.apply(*args)``, through its torch.func form inside a transform; its
    forward's tensor ops alone under ``torch.jit.trace`` and the legacy ONNX exporter (a traced
    graph of aten ops saves, loads and exports; autograd differentiates them)."""
    if torch.jit.is_tracing():
        return _batch_norm_forward(*args, functional=True)[0]
    if _under_transform():
        return _BatchNormFunctionForTransforms.apply(*args)[:-2]  # type: ignore[no-any-return]
    return _BatchNormFunction.apply(*args)  # type: ignore[no-any-return]
