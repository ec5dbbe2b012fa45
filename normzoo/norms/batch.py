"""Normalisation over the batch: BatchNorm (Ioffe & Szegedy 2015) and Batch Renorm (Ioffe 2017).

Both reduce an input of shape (N, C, *S) over N and the spatial dims S, one (mean, variance) per
channel, and keep running (moving-average) statistics for inference, with PyTorch's conventions: the
biased variance normalises, ``running_var`` stores the unbiased one, ``momentum=None`` is a cumulative
average.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            m = _check_batch(x)
            var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.detach(), var.detach() * (m / (m - 1)))
        else:
            assert self.running_mean is not None and self.running_var is not None
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)  # (C,)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return x * _channel_view(scale, x) + _channel_view(shift, x)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )
