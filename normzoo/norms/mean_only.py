"""Mean-only BatchNorm (Salimans & Kingma 2016, arXiv:1602.07868, Sec. 2.3): WeightNorm's companion.

It centres each channel with the batch mean and leaves the scale to WeightNorm's g.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normzoo.norms._base import RunningStatsMixin, _NormBase
from normzoo.norms._ghost import batch_moments, check_ghost_batch_size
from normzoo.registry import register_norm

__all__ = ["MeanOnlyBatchNorm"]


@register_norm(
    "meanonlybatchnorm",
    display="Mean-only BatchNorm",
    aliases=("mobn", "meanonlybn"),
    paper="Salimans & Kingma 2016, Weight Normalization: A Simple Reparameterization to "
    "Accelerate Training of Deep Neural Networks, arXiv:1602.07868",
    uses_batch_stats=True,
    native=None,
    description="Mean-only BatchNorm: subtract the batch mean per channel, add a bias; no scaling",
)
class MeanOnlyBatchNorm(RunningStatsMixin, _NormBase):
    r"""Mean-only Batch Normalization (Salimans & Kingma 2016, Sec. 2.3), from scratch.

    For an input x of shape (N, C, *S), per channel::

        y = x - mu + beta

    * **Training:** mu is the batch mean over N and the spatial dims (over each ghost batch of
      ``ghost_batch_size`` samples when set, as :class:`~normzoo.norms.batch.BatchNorm`). The
      running buffers follow BatchNorm's rule; ``running_var`` (the unbiased batch variance) is
      tracked only so that the suite's diagnostics and PreciseBN treat the layer as every BN.
    * **Eval:** mu = ``running_mean`` (when tracked, else the batch mean).

    The gradient is dL/dx = dy - mean(dy) per channel (autograd). No variance division, so no eps
    in the formula (``eps`` is accepted for a uniform constructor and unused); ``affine=True`` gives
    the bias beta only (the scale is WeightNorm's g). State: ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``.
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
        if self.affine:  # the bias only: the scale is WeightNorm's
            self.register_parameter("weight", None)
        self._init_running_stats(momentum, track_running_stats, device, dtype)
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)

    def reset_parameters(self) -> None:
        """beta <- 0 (and the running statistics reset)."""
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if getattr(self, "track_running_stats", False):
            self.reset_running_stats()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        view = (-1,) + (1,) * (x.dim() - 2)
        if self.training or not self.track_running_stats:
            mean, _, mean_target, var_target = batch_moments(x, self.ghost_batch_size)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean_target, var_target)
            y = x - mean.to(x.dtype)
        else:
            assert self.running_mean is not None
            y = x - self.running_mean.view(view).to(x.dtype)
        return y if self.bias is None else y + self.bias.view(view)

    def extra_repr(self) -> str:
        ghost = (
            "" if self.ghost_batch_size is None else f", ghost_batch_size={self.ghost_batch_size}"
        )
        return (
            f"{self.num_features}, affine={self.affine}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}{ghost}"
        )
