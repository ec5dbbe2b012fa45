"""Normalisation over the batch: BatchNorm (Ioffe & Szegedy 2015) and Batch Renorm (Ioffe 2017).

Both reduce an input of shape (N, C, *S) over N and the spatial dims S, one (mean, variance) per
channel, and keep running (moving-average) statistics for inference, with PyTorch's conventions: the
biased variance normalises, ``running_var`` stores the unbiased one, ``momentum=None`` is a cumulative
average.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normzoo.norms._base import RunningStatsMixin, _NormBase
from normzoo.registry import register_norm

__all__ = ["BatchNorm"]


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


def _batch_stats(x: Tensor, m: int, scratch: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Per-channel batch mean and biased variance of ``x`` (N, C, *S), and whether the backward pass
    must centre ``x`` before its reductions. ``scratch`` (like x) is overwritten.

    On CPU in eager mode the fast route is two plain sums, ``sum(x)`` and ``sum(x * x)`` (torch's
    vectorised sum is ~10x faster there than ``torch.var_mean``'s Welford loop, and x * x goes into
    ``scratch``, the future output, so no extra buffer is allocated): var = E[x^2] - E[x]^2. That
    formula cancels when |mean| >> std, so a batch with mean^2 / var > ``_CANCELLATION_LIMIT`` in
    any channel falls back to centred two-pass sums (the check reads one number, free on CPU).
    Elsewhere (CUDA, ``torch.compile``) ``torch.var_mean`` is one fused, stable kernel, and the
    backward centres x inside its fused reductions. Half-precision input is accumulated in float32.
    """
    dims = _reduce_dims(x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
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


class _BatchNormFunction(torch.autograd.Function):
    r"""Training-mode batch norm with batch statistics and a hand-derived backward.

    ``apply(x, weight, bias, eps, ref_mean, ref_var, rmax, dmax)`` returns ``(y, mean, var)``: the
    output and the batch mean and biased variance per channel (non-differentiable, for the running
    statistics). With x_hat = (x - mean) * invstd, invstd = 1 / sqrt(var + eps)::

        y = gamma * x_hat + beta                                   (BatchNorm)
        y = gamma * (x_hat * r + d) + beta                         (Batch Renorm, ref_mean given)
        r = clip(sqrt(var + eps) / sigma, 1/rmax, rmax),  d = clip((mean - ref_mean) / sigma, +-dmax)

    with sigma = sqrt(ref_var + eps); Batch Renorm also returns the unclipped r and d. r and d are
    constants for the gradient (stop_gradient), so both share one backward with the effective
    per-channel scale g = gamma * r * invstd (r = 1 for BatchNorm); sums run over N and S (m values)::

        dot     = sum(dy * x_hat) = invstd * (sum(dy * x) - mean * sum(dy))
        dbeta   = sum(dy)
        dgamma  = r * dot + d * sum(dy)                             (dot for BatchNorm)
        dx      = g / m * (m * dy - sum(dy) - x_hat * dot)
                = g * dy + a * x + b,  a = -g * invstd * dot / m,  b = -g * sum(dy) / m - a * mean

    Saved for backward: x and per-channel vectors (mean, invstd, g; r, d for Batch Renorm) -- torch's
    native kernel saves x and five. Memory traffic: forward two reductions and the output pass;
    backward two reductions and the dx passes; one large buffer allocated per direction (the output
    buffer doubles as scratch for x * x and dy * x). Not twice differentiable.
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
        rmax: float = 1.0,
        dmax: float = 0.0,
    ) -> tuple[Tensor, ...]:
        m = _values_per_channel(x)
        y = torch.empty_like(x)
        mean, var, centred = _batch_stats(x, m, scratch=y)
        invstd = torch.rsqrt(var + eps)
        g = invstd if weight is None else weight * invstd
        r = d = None
        extra: tuple[Tensor, ...] = ()
        if ref_mean is None:
            shift = -mean * g if bias is None else torch.addcmul(bias, mean, g, value=-1)
        else:
            assert ref_var is not None
            ref_invstd = torch.rsqrt(ref_var + eps)
            r_raw = torch.sqrt(var + eps).mul_(ref_invstd)  # sigma_B / sigma
            d_raw = (mean - ref_mean).mul_(ref_invstd)  # (mu_B - mu) / sigma
            r = r_raw.clamp(1.0 / rmax, rmax)
            d = d_raw.clamp(-dmax, dmax)
            g = g * r
            offset = d if weight is None else weight * d  # gamma * d
            if bias is not None:
                offset = offset + bias
            shift = torch.addcmul(offset, mean, g, value=-1)
            extra = (r_raw, d_raw)
        _affine_into(y, x, g, shift)
        ctx.centred = centred
        ctx.set_materialize_grads(False)  # mean, var (, r, d) get no gradient: skip their zeros
        ctx.save_for_backward(x, mean, invstd, g, r, d)
        ctx.mark_non_differentiable(mean, var, *extra)
        return (y, mean, var, *extra)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if dy is None:  # grads are not materialised: y did not take part in the loss
            return (None,) * 8
        x, mean, invstd, g, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims = _reduce_dims(x)
        k = -1.0 / _values_per_channel(x)
        sum_dy = dy.sum(dims)
        dx = dweight = None
        if need_x or need_w:
            buf = torch.empty_like(x)  # first holds dy * x, then becomes dx
            if ctx.centred:
                xc = x - _channel_view(mean, x)
                dot = torch.mul(dy, xc, out=buf).sum(dims).mul_(invstd)
            else:
                dot = torch.mul(dy, x, out=buf).sum(dims)
                dot = torch.addcmul(dot, mean, sum_dy, value=-1).mul_(invstd)
            if need_w:
                dweight = dot if r is None else torch.addcmul(r * dot, d, sum_dy)
            if need_x:
                a = (g * invstd).mul_(dot).mul_(k)
                b = (g * sum_dy).mul_(k)
                if ctx.centred:
                    dx = _affine_into(buf, xc, a, b)
                else:
                    dx = _affine_into(buf, x, a, b.addcmul_(a, mean, value=-1))
                dx = dx.addcmul_(dy, _channel_view(g, x))
        return dx, dweight, sum_dy if need_b else None, None, None, None, None, None


@register_norm(
    "batchnorm",
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

    State: ``weight`` (gamma, ones), ``bias`` (beta, zeros) when ``affine``; ``running_mean`` (zeros),
    ``running_var`` (ones), ``num_batches_tracked`` (long 0) when ``track_running_stats``. Names match
    ``torch.nn.BatchNorm2d``, so state dicts move between the two. A channels_last input gives a
    channels_last output.

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self._init_running_stats(momentum, track_running_stats, device, dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "track_running_stats"):
            self.reset_running_stats()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training or not self.track_running_stats:
            m = _check_batch(x)
            y, mean, var = _BatchNormFunction.apply(x, self.weight, self.bias, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var * (m / (m - 1)))
            return y
        assert self.running_mean is not None and self.running_var is not None
        scale = torch.rsqrt(self.running_var + self.eps)  # (C,)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return x * _channel_view(scale, x) + _channel_view(shift, x)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )
