"""Normalisation over the batch: BatchNorm (Ioffe & Szegedy 2015) and Batch Renorm (Ioffe 2017).

Both reduce an input of shape (N, C, *S) over N and the spatial dims S, one (mean, variance) per
channel, and keep running (moving-average) statistics for inference, with PyTorch's conventions: the
biased variance normalises, ``running_var`` stores the unbiased one, ``momentum=None`` is a cumulative
average.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.norms._base import (
    _RENORM_DIAGNOSTICS,
    RunningStatsMixin,
    _batch_norm_double_backward,
    _batch_norm_scale,
    _graph_mode,
    _is_small,
    _normalise_with_running_stats,
    _NormBase,
    _scale_and_offset,
    _under_transform,
    hand_written_backward,
    refuse_running_update_under_transform,
)
from normzoo.norms._ghost import check_ghost_batch_size, ghost_batch_norm
from normzoo.norms._small import SmallBatchNorm
from normzoo.registry import register_norm

__all__ = ["RENORM_SCHEDULES", "BatchNorm", "BatchRenorm", "set_progress"]


def _reduce_dims(x: Tensor) -> list[int]:
    """The axes a batch-statistics layer reduces over: N and every spatial dim."""
    return [0, *range(2, x.dim())]


def _values_per_channel(x: Tensor) -> int:
    """m = N * prod(S), the number of values each channel's statistics are taken over."""
    return x.numel() // x.shape[1] if x.numel() else 0


def _check_batch(x: Tensor) -> int:
    """m for ``x``; torch's error (same type and wording) when a channel holds a single value."""
    m = _values_per_channel(x)
    if m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )
    return m


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped (C, 1, ..., 1) to broadcast against (N, C, *S)."""
    return t.view(-1, *([1] * (x.dim() - 2)))


def _affine_into(out: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """out = x * scale + shift with per-channel (C,) ``scale`` and ``shift``, written into ``out``."""
    if x.dim() == 2 or x.stride(1) == 1:  # channels innermost in memory: addcmul vectorises
        return torch.addcmul(_channel_view(shift, x), x, _channel_view(scale, x), out=out)
    # NC(S) layout: addcmul with two broadcast operands takes a slow scalar loop; mul + add_ do not
    return torch.mul(x, _channel_view(scale, x), out=out).add_(_channel_view(shift, x))


#: One-pass sums lose about log2(1 + mean^2 / var) bits to cancellation; above this ratio in any
#: channel the statistics are recomputed from the centred input (64: at most ~6 of 24 bits in float32).
_CANCELLATION_LIMIT = 64.0


def _batch_stats(x: Tensor, m: int, scratch: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """Per-channel batch mean and biased variance of ``x`` (N, C, *S), and whether the backward pass
    must centre ``x`` before its reductions. ``scratch`` (like x) is overwritten; None (the
    torch.func form) takes ``torch.var_mean``.

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
    dims = _reduce_dims(x)
    if scratch is None or x.device.type != "cpu" or torch.compiler.is_compiling():
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, True
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
        scratch = torch.empty_like(x)
    mean = x.sum(dims).div_(m)
    if x.dim() > 2 and x.is_contiguous():  # (N*C, prod(S)) rows: a vectorised norm, no x * x pass
        rows = torch.linalg.vector_norm(x.view(x.shape[0] * x.shape[1], -1), dim=1)
        mean_sq_x = torch.mul(rows, rows).view(x.shape[0], -1).sum(0).div_(m)  # E[x^2]
    else:
        mean_sq_x = torch.mul(x, x, out=scratch).sum(dims).div_(m)
    var = torch.addcmul(mean_sq_x, mean, mean, value=-1)
    # var - mean^2 / L < 0  <=>  mean^2 / var > L (also catches a var < 0 from rounding)
    if torch.addcmul(var, mean, mean, value=-1.0 / _CANCELLATION_LIMIT).min().item() >= 0:
        return mean, var, False
    centred = torch.sub(x, _channel_view(mean, x), out=scratch)
    return mean, centred.square_().sum(dims).div_(m), True


def _batch_norm_function_double_backward(
    ctx: Any, dy: Tensor | None, *_: Any
) -> tuple[Tensor | None, ...]:
    """:class:`_BatchNormFunction`'s backward under ``create_graph`` (differentiable again)."""
    if dy is None:
        return (None,) * 7
    x, _, _, r, d, weight = ctx.saved_tensors
    grads = _batch_norm_double_backward(ctx, dy, x, weight, r, d, ctx.eps)
    return (*grads, None, None, None, None)


def _batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    ref_mean: Tensor | None = None,
    ref_var: Tensor | None = None,
    limits: Tensor | None = None,
    functional: bool = False,
) -> tuple[tuple[Tensor, ...], Tensor, bool]:
    """:class:`_BatchNormFunction`'s forward: its outputs, invstd and whether x was centred.
    ``functional``: no ``out=`` and no host read (torch.func: vmap has no batching rule for
    them, and under ``grad`` the forward runs with autograd on)."""
    m = _values_per_channel(x)
    y = None if functional else torch.empty_like(x)
    mean, var, centred = _batch_stats(x, m, scratch=y)
    invstd = torch.rsqrt(var + eps)
    g, offset, _, _, extra = _scale_and_offset(
        invstd, mean, weight, bias, eps, ref_mean, ref_var, limits
    )
    if functional:
        y = (x - _channel_view(mean, x)) * _channel_view(g, x)
        y = y if offset is None else y + _channel_view(offset, x)
    elif centred:  # |mean| >> std: x * g + (offset - mean * g) would cancel; centre first
        torch.sub(x, _channel_view(mean, x), out=y)
        if offset is None:
            y.mul_(_channel_view(g, x))
        else:
            _affine_into(y, y, g, offset)
    else:
        shift = -mean * g if offset is None else torch.addcmul(offset, mean, g, value=-1)
        _affine_into(y, x, g, shift)
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
) -> None:
    """What :meth:`_BatchNormFunction.backward` reads: x, mean, invstd, r, d, gamma (g is
    recomputed); mean, var (, r, d and the clip fractions) get no gradient."""
    _, mean, var, *extra = outputs
    r, d = (extra[2], extra[3]) if extra else (None, None)
    ctx.set_materialize_grads(False)  # mean, var (, r, d) get no gradient: skip their zeros
    ctx.centred, ctx.eps = centred, eps
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
    loop, which made it ~1.5x slower). With x_hat = (x - mean) * invstd,
    invstd = 1 / sqrt(var + eps)::

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
    ) -> tuple[Tensor, ...]:
        outputs, invstd, centred = _batch_norm_forward(
            x, weight, bias, eps, ref_mean, ref_var, limits
        )
        _save_for_batch_norm_backward(ctx, x, weight, eps, outputs, invstd, centred)
        return outputs

    @staticmethod
    @hand_written_backward(_batch_norm_function_double_backward)
    def backward(ctx: Any, dy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if dy is None:  # grads are not materialised: y did not take part in the loss
            return (None,) * 7
        x, mean, invstd, r, d, weight = ctx.saved_tensors
        g = _batch_norm_scale(invstd, weight, r)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims = _reduce_dims(x)
        k = -1.0 / _values_per_channel(x)
        sum_dy = dy.sum(dims)
        dx = dweight = None
        if ctx.centred and (need_x or need_w):
            xc = x - _channel_view(mean, x)  # becomes dx
            dot = torch.mul(dy, xc).sum(dims).mul_(invstd)
            if need_w:
                dweight = dot if r is None else torch.addcmul(r * dot, d, sum_dy)
            if need_x:  # dx = g * (dy + k * (sum_dy + (x - mean) * invstd * dot)): five ops
                t = xc.mul_(_channel_view(invstd * dot, x)).add_(_channel_view(sum_dy, x))
                # (no out= under torch.compile: dynamo rejects a non-contiguous out; nor vmap)
                out = None if _graph_mode() else t
                dx = torch.add(dy, t, alpha=k, out=out).mul_(_channel_view(g, x))
        elif need_x or need_w:
            buf = torch.empty_like(x)  # first holds dy * x, then becomes dx
            dot = torch.mul(dy, x, out=buf).sum(dims)
            dot = torch.addcmul(dot, mean, sum_dy, value=-1).mul_(invstd)
            if need_w:
                dweight = dot if r is None else torch.addcmul(r * dot, d, sum_dy)
            if need_x:
                a = (g * invstd).mul_(dot).mul_(k)
                b = (g * sum_dy).mul_(k).addcmul_(a, mean, value=-1)
                dx = _affine_into(buf, x, a, b).addcmul_(dy, _channel_view(g, x))
        return dx, dweight, sum_dy if need_b else None, None, None, None, None


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
    ) -> tuple[Any, ...]:
        outputs, invstd, centred = _batch_norm_forward(
            x, weight, bias, eps, ref_mean, ref_var, limits, functional=True
        )
        return (*outputs, invstd, centred)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, _, eps = inputs[:4]
        *outputs, invstd, centred = output
        _save_for_batch_norm_backward(ctx, x, weight, eps, tuple(outputs), invstd, centred)
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


@register_norm(
    "batchnorm",
    display="BatchNorm",
    aliases=("bn",),
    paper="Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by "
    "Reducing Internal Covariate Shift, arXiv:1502.03167",
    uses_batch_stats=True,
    native="native_batchnorm",
    description="BatchNorm: statistics over N and the spatial dims, one per channel",
)
class BatchNorm(RunningStatsMixin, _NormBase):
    r"""Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167), from scratch.

    For an input x of shape (N, C, *S) (any rank >= 2, channels at dim 1)::

        y = (x - mu) / sqrt(sigma2 + eps) * gamma + beta

    with one (mu, sigma2) per channel, taken over N and all spatial dims (m = N * prod(S) values).

    * **Training:** mu, sigma2 are the batch mean and the *biased* batch variance (divide by m).
      With ``track_running_stats`` the buffers are updated as
      ``running = (1 - momentum) * running + momentum * batch``, where ``running_var`` receives the
      *unbiased* variance (m / (m - 1) * sigma2); ``momentum=None`` uses the factor
      ``1 / num_batches_tracked`` (cumulative average). m == 1 raises torch's ``ValueError``.
    * **Eval:** ``running_mean``/``running_var`` when tracked, else the batch statistics.
    * **Ghost batches** (Hoffer et al. 2017, arXiv:1705.08741): with ``ghost_batch_size`` G (None:
      the whole batch) the batch statistics are those of consecutive chunks of G samples (the last
      chunk smaller when G does not divide N; one holding a single value per channel raises), as if
      the layer ran on each chunk; the running statistics get one update per forward, towards the
      chunks' mean and mean unbiased variance weighted by their sizes (``normzoo.norms._ghost``).

    State: ``weight`` (gamma, ones), ``bias`` (beta, zeros) when ``affine``; ``running_mean`` (zeros),
    ``running_var`` (ones), ``num_batches_tracked`` (long 0) when ``track_running_stats``. Names match
    ``torch.nn.BatchNorm2d``, so state dicts move between the two. A channels_last input gives a
    channels_last output.

    Multi-device: torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` does not convert this class
    (it looks for torch's own) and leaves it per-device silently; use
    :func:`normzoo.convert_sync_batchnorm` (:class:`~normzoo.norms.sync_batch.SyncBatchNorm`).

    Example::

        >>> bn = BatchNorm(64)
        >>> y = bn(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        ghost_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self._init_running_stats(momentum, track_running_stats, device, dtype)
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)

    def _in_ghost_batches(self, x: Tensor) -> bool:
        """Whether batch statistics are taken over ghost batches (a ghost size >= N is plain BN)."""
        return self.ghost_batch_size is not None and x.shape[0] > self.ghost_batch_size

    def _empty_batch(self, x: Tensor) -> Tensor:
        """torch's answer to an empty batch: an empty output, the statistics left alone (the step
        is still counted)."""
        if self.training and self.track_running_stats:
            self._averaging_weight()
        return x.clone()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return self._empty_batch(x)
        if self.training or not self.track_running_stats:
            m = _check_batch(x)
            if self._in_ghost_batches(x):  # (normzoo.norms._ghost: one running update per step)
                assert self.ghost_batch_size is not None
                y, mean, var_unbiased, _ = ghost_batch_norm(
                    x, self.weight, self.bias, self.eps, self.ghost_batch_size
                )
                if self.training and self.track_running_stats:
                    self._update_running_stats(mean, var_unbiased)
                return y
            if _is_small(x):  # (updates the running statistics itself)
                layer = self if self.training and self.track_running_stats else None
                return SmallBatchNorm.apply(x, self.weight, self.bias, self.eps, layer, None)
            y, mean, var = _batch_norm_apply(x, self.weight, self.bias, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var * (m / (m - 1)))
            return y
        assert self.running_mean is not None and self.running_var is not None
        return _normalise_with_running_stats(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def extra_repr(self) -> str:
        ghost = (
            "" if self.ghost_batch_size is None else f", ghost_batch_size={self.ghost_batch_size}"
        )
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}{ghost}"
        )


#: Batch Renorm's limit schedule: plain BatchNorm (rmax = 1, dmax = 0) until ``relax_start``, then a
#: linear relaxation reaching ``rmax`` at ``rmax_relaxed`` and ``dmax`` at ``dmax_relaxed``. The paper
#: (Ioffe 2017, Sec. 4.1) relaxes from step 5k to rmax = 3 at 40k and dmax = 5 at 25k steps; as
#: fractions of a 100k-step run these are the progress defaults 0.05, 0.4 and 0.25.
RENORM_SCHEDULES = ("auto", "steps", "none")


def _relaxed_fraction(now: float, start: float, end: float) -> float:
    """How far along [start, end] ``now`` is, clipped to [0, 1] (a jump at ``start`` if end == start)."""
    if end <= start:
        return 1.0 if now >= start else 0.0
    return min(max((now - start) / (end - start), 0.0), 1.0)


@register_norm(
    "batchrenorm",
    display="Batch Renorm",
    aliases=("brn", "renorm"),
    paper="Ioffe 2017, Batch Renormalization: Towards Reducing Minibatch Dependence in "
    "Batch-Normalized Models, arXiv:1702.03275",
    uses_batch_stats=True,
    native=None,
    description="Batch Renorm: BatchNorm corrected by clipped (r, d) towards the moving statistics",
)
class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275), from scratch.

    Statistics over N and the spatial dims, one (mu_B, sigma_B) per channel, as :class:`BatchNorm`.
    In training, the batch-normalised value is corrected towards the moving statistics (mu, sigma)::

        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
        r = stop_grad(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_grad(clip((mu_B - mu) / sigma, -dmax, dmax))

    with sigma_B = sqrt(biased batch variance + eps), sigma = sqrt(running_var + eps), and mu, sigma
    the moving statistics from *before* this step's update. r = 1, d = 0 (rmax = 1, dmax = 0) is
    exactly BatchNorm. The gradient treats r and d as constants: it is BatchNorm's with gamma * r
    as the per-channel scale (one shared hand-written backward).

    * **Training:** as above; then ``running_mean``/``running_var`` are updated as in BatchNorm
      (torch's convention: unbiased variance, ``momentum`` default 0.01 as in the paper,
      ``momentum=None`` a cumulative average). Without ``track_running_stats`` there are no moving
      statistics to correct towards and the layer is plain BatchNorm.
    * **Eval:** y = gamma * (x - mu) / sigma + beta with the moving statistics (as BatchNorm).
    * **Ghost batches** (``ghost_batch_size``, as :class:`BatchNorm`): mu_B, sigma_B, r and d per
      ghost batch (r, d against the same moving statistics); one moving-stats update per forward;
      the diagnostics are over all (ghost batch, channel) pairs, ``last_r``/``last_d`` the ghost
      batches' mean.

    **Limits schedule** (``schedule``). The paper trains with plain BN first and relaxes the limits
    later; here the limits move linearly from (1, 0) to (``rmax``, ``dmax``):

    * ``"auto"`` (default): driven by the training loop's *progress* p in [0, 1] (the fraction of
      the run done), set with :meth:`set_progress` (or the module-level :func:`set_progress`):
      plain BN while p < ``relax_start``, rmax fully relaxed at p = ``rmax_relaxed``, dmax at
      p = ``dmax_relaxed`` (defaults 0.05, 0.4, 0.25: the paper's 5k / 40k / 25k steps as
      fractions of a 100k-step run), so short runs relax the limits too. Until set_progress is
      first called, the limits follow the paper's step schedule (below) on ``num_batches_tracked``
      -- a layer nobody drives still leaves plain BN, it never silently stays BatchNorm.
    * ``"steps"``: the paper's schedule on ``num_batches_tracked``: plain BN for
      ``relax_start_step`` (5000) steps, rmax reached at ``rmax_relaxed_step`` (40000), dmax at
      ``dmax_relaxed_step`` (25000).
    * ``"none"``: fixed limits ``rmax``, ``dmax`` from the first step (as Keras' ``renorm_clipping``).

    State: as BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``; a BatchNorm state dict loads). Not saved: the progress and the
    diagnostics ``clip_fraction_r``, ``clip_fraction_d`` -- 0-dim tensors, the fraction of channels
    whose r resp. d was clipped in the last training forward -- and ``last_r``, ``last_d``, that
    step's (C,) r and d (all detached, no device sync).
    :attr:`current_rmax` and :attr:`current_dmax` are the limits the next training step uses.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.01,
        rmax: float = 3.0,
        dmax: float = 5.0,
        schedule: str = "auto",
        relax_start: float = 0.05,
        rmax_relaxed: float = 0.4,
        dmax_relaxed: float = 0.25,
        relax_start_step: int = 5000,
        rmax_relaxed_step: int = 40000,
        dmax_relaxed_step: int = 25000,
        track_running_stats: bool = True,
        ghost_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            affine=affine,
            momentum=momentum,
            track_running_stats=track_running_stats,
            ghost_batch_size=ghost_batch_size,
            device=device,
            dtype=dtype,
        )
        if not rmax >= 1.0 or not dmax >= 0.0 or math.isinf(rmax) or math.isinf(dmax):
            raise ValueError(f"need finite rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if schedule not in RENORM_SCHEDULES:
            raise ValueError(f"schedule must be one of {RENORM_SCHEDULES}, got {schedule!r}")
        if (
            not 0.0
            <= relax_start
            <= min(rmax_relaxed, dmax_relaxed)
            <= max(rmax_relaxed, dmax_relaxed)
            <= 1.0
        ):
            raise ValueError(
                "need 0 <= relax_start <= rmax_relaxed, dmax_relaxed <= 1 (fractions of the run), "
                f"got {relax_start}, {rmax_relaxed}, {dmax_relaxed}"
            )
        steps = (relax_start_step, rmax_relaxed_step, dmax_relaxed_step)
        if any(isinstance(s, bool) or not isinstance(s, int) for s in steps) or not (
            0 <= relax_start_step <= min(rmax_relaxed_step, dmax_relaxed_step)
        ):
            raise ValueError(
                "need integer steps 0 <= relax_start_step <= rmax_relaxed_step, dmax_relaxed_step, "
                f"got {steps}"
            )
        self.rmax, self.dmax, self.schedule = float(rmax), float(dmax), schedule
        self.relax_start, self.rmax_relaxed, self.dmax_relaxed = (
            float(relax_start),
            float(rmax_relaxed),
            float(dmax_relaxed),
        )
        self.relax_start_step, self.rmax_relaxed_step, self.dmax_relaxed_step = steps
        self.progress: float | None = None  # set by set_progress
        self._progress_driven = False  # a bool, so torch.compile guards on it, not on the float
        factory = {"device": device, "dtype": dtype}

        def constant(*values: float) -> Tensor:
            return torch.tensor(values, **factory)  # type: ignore[arg-type]

        # [rmax, dmax] limits: plain BN, fully relaxed, as last set by set_progress; the values are
        # (re)written from Python floats by _fill_constants, also after every .to()/.double(), so a
        # float64 layer clips at exactly rmax/dmax, not at their float32 roundings
        self.register_buffer("_limits_bn", constant(1.0, 0.0), persistent=False)
        self.register_buffer("_limits_full", constant(1.0, 0.0), persistent=False)
        self.register_buffer("_limits_progress", constant(1.0, 0.0), persistent=False)
        # the step schedule's relaxation lengths (at least 1 step: a jump if start == end)
        self._spans = tuple(
            float(max(s - relax_start_step, 1)) for s in (rmax_relaxed_step, dmax_relaxed_step)
        )
        self.register_buffer("_relax_steps", constant(1.0, 1.0), persistent=False)
        self._fill_constants()
        self.register_buffer("clip_fraction_r", constant(0.0).squeeze(0), persistent=False)
        self.register_buffer("clip_fraction_d", constant(0.0).squeeze(0), persistent=False)
        self.register_buffer("last_r", constant(*[1.0] * num_features), persistent=False)
        self.register_buffer("last_d", constant(*[0.0] * num_features), persistent=False)

    def set_progress(self, progress: float) -> None:
        """Drive the limits by the run's progress p in [0, 1] (the fraction of training done).

        Used by the ``"auto"`` schedule from the first call on; recorded but without effect for
        ``"steps"`` and ``"none"``.
        """
        p = _check_progress(progress)
        self.progress = p
        self._progress_driven = True
        limits = self._progress_limits(p)
        if limits != self._limits_written:  # (constant outside the relaxation: no op per step)
            self._limits_progress.copy_(self._exact(*limits))
            self._limits_written = limits

    def _progress_limits(self, p: float) -> tuple[float, float]:
        """(rmax, dmax) at progress p, in Python floats (double precision)."""
        fr = _relaxed_fraction(p, self.relax_start, self.rmax_relaxed)
        fd = _relaxed_fraction(p, self.relax_start, self.dmax_relaxed)
        return 1.0 + (self.rmax - 1.0) * fr, self.dmax * fd

    @staticmethod
    def _exact(*values: float) -> Tensor:
        """Values as a float64 CPU tensor: ``copy_`` into a buffer then rounds once, to its dtype."""
        return torch.tensor(values, dtype=torch.float64)

    def _fill_constants(self) -> None:
        """Write the limit buffers from the Python-float settings, in the buffers' own dtype."""
        with torch.no_grad():
            self._limits_bn.copy_(self._exact(1.0, 0.0))
            self._limits_full.copy_(self._exact(self.rmax, self.dmax))
            self._relax_steps.copy_(self._exact(*self._spans))
            limits = (1.0, 0.0) if self.progress is None else self._progress_limits(self.progress)
            self._limits_progress.copy_(self._exact(*limits))
            self._limits_written = limits  # what _limits_progress holds, as Python floats

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # a dtype change (.double(), .half(), .to(dtype)) converts the buffers' values; refill them
        # from the Python floats so each holds the setting rounded once, to its new dtype
        super()._apply(fn, recurse)
        if "_relax_steps" in self._buffers:  # not during __init__
            self._fill_constants()
        return self

    def _limits_now(self) -> Tensor:
        """The (2,) tensor [rmax, dmax] for the next training step (tensor ops only: no sync)."""
        if self.schedule == "none":
            return self._limits_full
        if self.schedule == "auto" and self._progress_driven:
            return self._limits_progress
        assert self.num_batches_tracked is not None, "the step schedule needs track_running_stats"
        done = (self.num_batches_tracked - self.relax_start_step) / self._relax_steps
        return torch.lerp(self._limits_bn, self._limits_full, done.clamp_(0.0, 1.0))

    @property
    def current_rmax(self) -> float:
        """The r limit the next training step uses (1 = plain BatchNorm)."""
        if not self.track_running_stats:
            return 1.0
        return float(self._limits_now()[0])

    @property
    def current_dmax(self) -> float:
        """The d limit the next training step uses (0 = plain BatchNorm)."""
        if not self.track_running_stats:
            return 0.0
        return float(self._limits_now()[1])

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)  # eval with the moving statistics, or plain BatchNorm
        refuse_running_update_under_transform(self)  # (before the diagnostics are stored)
        self._check_input(x)
        if x.numel() == 0:
            return self._empty_batch(x)
        m = _check_batch(x)
        if self._in_ghost_batches(x):  # r, d per ghost batch; one moving-stats update per step
            assert self.running_mean is not None and self.running_var is not None
            assert self.ghost_batch_size is not None
            moving = (self.running_mean, self.running_var, self._limits_now())
            y, mean, var_unbiased, extra = ghost_batch_norm(
                x, self.weight, self.bias, self.eps, self.ghost_batch_size, moving
            )
            self._buffers.update(zip(_RENORM_DIAGNOSTICS, extra, strict=True))
            self._update_moving_stats(mean, var_unbiased)
            return y
        if _is_small(x):  # (sets the diagnostics and updates the moving statistics itself)
            limits = self._limits_now()
            return SmallBatchNorm.apply(x, self.weight, self.bias, self.eps, self, limits)
        y, mean, var, *extra = _batch_norm_apply(
            x,
            self.weight,
            self.bias,
            self.eps,
            self.running_mean,
            self.running_var,
            self._limits_now(),
        )
        # (stored in the buffer dict: see _update_moving_stats)
        self._buffers.update(zip(_RENORM_DIAGNOSTICS, extra, strict=True))
        self._update_moving_stats(mean, var * (m / (m - 1)))
        return y

    def _update_moving_stats(self, mean: Tensor, var_unbiased: Tensor) -> None:
        """BatchNorm's running-statistics update; out of place under ``torch.compile``.

        The compiled backward (torch 2.14, AOTAutograd) may recompute r and d from the moving
        statistics and the step count *as they are after the step* if they were updated in place,
        which gives wrong gradients; replacing the buffers by new tensors keeps the old values.
        The new tensors (and the diagnostics, in :meth:`forward`) are stored into ``_buffers``
        directly: dynamo replays each store after the graph, and a dict store costs ~2-3 us less
        than ``Module.__setattr__`` (measured: 7 stores, ~13 us per step).
        """
        if not torch.compiler.is_compiling():
            self._update_running_stats(mean, var_unbiased)  # the shared in-place rule
            return
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        count = buffers["num_batches_tracked"]
        assert count is not None and running_mean is not None and running_var is not None
        count = count + 1
        factor = (
            count.to(running_mean.dtype).reciprocal() if self.momentum is None else self.momentum
        )
        buffers["num_batches_tracked"] = count
        buffers["running_mean"] = torch.lerp(running_mean, mean.detach(), factor)
        buffers["running_var"] = torch.lerp(running_var, var_unbiased.detach(), factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, schedule={self.schedule!r}"


def _check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress must be a number in [0, 1], got {type(progress).__name__}")
    if not 0.0 <= progress <= 1.0:  # also rejects nan
        raise ValueError(
            f"progress must be in [0, 1] (the fraction of training done), got {progress}"
        )
    return float(progress)


def set_progress(model: nn.Module, progress: float) -> None:
    """Tell every submodule of ``model`` (itself included) that has a ``set_progress`` method how far
    training is: ``progress`` in [0, 1], the fraction of the run done. The training loop calls this
    (e.g. every step with step / total_steps) so that scheduled layers (Batch Renorm's limits)
    follow the run whatever its length.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_progress expects an nn.Module, got {type(model).__name__}")
    progress = _check_progress(progress)
    for module in model.modules():
        method = getattr(module, "set_progress", None)
        if callable(method):
            method(progress)
