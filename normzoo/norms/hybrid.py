"""Hybrids of batch and per-sample statistics: Batch-Instance Normalization (Nam & Kim 2018) and
Switchable Normalization (Luo et al. 2018).

Both keep BatchNorm's running statistics (torch's rule and buffers) for their batch part, take the
batch part over ghost batches when ``ghost_batch_size`` is set (``normzoo.norms._ghost``), and need
spatial dims (their instance part is undefined on (N, C) input, as InstanceNorm). Autograd
differentiates the tensor ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normzoo.norms._base import RunningStatsMixin, _NormBase
from normzoo.norms._ghost import batch_moments, check_ghost_batch_size
from normzoo.norms.batch import _check_batch
from normzoo.registry import register_norm

__all__ = ["BatchInstanceNorm", "SwitchableNorm"]


class _HybridNorm(RunningStatsMixin, _NormBase):
    """Shared constructor, input checks and batch part of the hybrid layers."""

    min_rank = 3

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
        self._init_mixing({"device": device, "dtype": dtype})

    def _init_mixing(self, factory: dict) -> None:
        """Create the layer's mixing parameters (after the affine ones and the buffers)."""

    def _check_instances(self, x: Tensor) -> None:
        """torch's errors for one value per channel (batch part), then per instance."""
        if self.training or not self.track_running_stats:
            _check_batch(x)
        if self.training and x.numel() // max(x.shape[0] * x.shape[1], 1) == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {x.size()}"
            )

    def _batch_part(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """BN's (mean, variance) per channel for each sample, (N, C, 1..) or (1, C, 1..): batch
        (ghost batch) statistics in training, the running statistics in eval."""
        if self.training or not self.track_running_stats:
            mean, var, mean_target, var_target = batch_moments(x, self.ghost_batch_size)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean_target, var_target)
            return mean, var
        assert self.running_mean is not None and self.running_var is not None
        view = (1, -1) + (1,) * (x.dim() - 2)
        return self.running_mean.view(view).to(x.dtype), self.running_var.view(view).to(x.dtype)

    def _affine(self, z: Tensor) -> Tensor:
        if self.weight is None:
            return z
        view = (-1,) + (1,) * (z.dim() - 2)
        return z * self.weight.view(view) + self.bias.view(view)

    def extra_repr(self) -> str:
        ghost = (
            "" if self.ghost_batch_size is None else f", ghost_batch_size={self.ghost_batch_size}"
        )
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}{ghost}"
        )


@register_norm(
    "batchinstancenorm",
    display="Batch-Instance Norm",
    aliases=("bin",),
    paper="Nam & Kim 2018, Batch-Instance Normalization for Adaptively Style-Invariant Neural "
    "Networks, arXiv:1805.07925",
    uses_batch_stats=True,
    native=None,
    needs_spatial=True,
    description="Batch-Instance Norm: a learned per-channel gate rho mixing BN and IN outputs",
)
class BatchInstanceNorm(_HybridNorm):
    r"""Batch-Instance Normalization (Nam & Kim 2018, arXiv:1805.07925, Eqs. 3-5), from scratch.

    For an input x of shape (N, C, *S), with x_BN normalised by the per-channel batch statistics
    (over N and S) and x_IN by the per-(sample, channel) statistics (over S), both biased::

        y = (rho * x_BN + (1 - rho) * x_IN) * gamma + beta,   rho in [0, 1] per channel

    * **rho** (``rho``, ones at init as in the authors' code): the paper clips it into [0, 1] after
      each optimizer step; here the *forward* uses clamp(rho, 0, 1) (no optimizer hook needed, any
      loop works). The value used is the paper's; the difference: a step that pushes rho past a
      bound leaves the parameter outside, where its gradient is 0 (the paper's clip would reset it
      to the bound, from where a later step can move it back in).
    * **Training:** x_BN with the batch (ghost batch) statistics, running statistics updated with
      BatchNorm's rule. **Eval:** x_BN with the running statistics; x_IN always per sample.

    State: ``weight``, ``bias``, ``rho`` and BatchNorm's buffers.
    """

    def _init_mixing(self, factory: dict) -> None:
        self.rho = nn.Parameter(torch.ones(self.num_features, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "rho"):
            nn.init.ones_(self.rho)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        self._check_instances(x)
        bn_mean, bn_var = self._batch_part(x)
        in_var, in_mean = torch.var_mean(x, list(range(2, x.dim())), correction=0, keepdim=True)
        x_bn = (x - bn_mean) * torch.rsqrt(bn_var + self.eps)
        x_in = (x - in_mean) * torch.rsqrt(in_var + self.eps)
        rho = self.rho.clamp(0.0, 1.0).view((-1,) + (1,) * (x.dim() - 2))
        return self._affine(x_in + rho * (x_bn - x_in))


@register_norm(
    "switchablenorm",
    display="Switchable Norm",
    aliases=("sn", "switchnorm"),
    paper="Luo, Ren, Peng & Zhang 2018, Differentiable Learning-to-Normalize via Switchable "
    "Normalization, arXiv:1806.10779",
    uses_batch_stats=True,
    native=None,
    needs_spatial=True,
    description="Switchable Norm: softmax-weighted mix of IN, LN and BN means and variances",
)
class SwitchableNorm(_HybridNorm):
    r"""Switchable Normalization (Luo et al. 2018, arXiv:1806.10779, Eqs. 3-5), from scratch.

    For an input x of shape (N, C, *S), with the (biased) statistics of InstanceNorm (per sample
    and channel, over S), LayerNorm (per sample, over C and S) and BatchNorm (per channel, over N
    and S)::

        mu     = sum_k softmax(lambda_mean)_k * mu_k,   k in (IN, LN, BN)
        sigma2 = sum_k softmax(lambda_var)_k * sigma2_k
        y      = (x - mu) / sqrt(sigma2 + eps) * gamma + beta

    ``mean_weight`` (lambda_mean) and ``var_weight`` (lambda_var) are (3,) parameters in the order
    (IN, LN, BN), ones at init (equal shares, as the authors' code).

    * **Training:** mu_BN, sigma2_BN from the batch (ghost batch); running statistics updated with
      BatchNorm's rule. **Eval:** mu_BN, sigma2_BN = the running statistics (unbiased variance, as
      BatchNorm's eval); IN and LN always per sample.

    State: ``weight``, ``bias``, ``mean_weight``, ``var_weight`` and BatchNorm's buffers.
    """

    def _init_mixing(self, factory: dict) -> None:
        self.mean_weight = nn.Parameter(torch.ones(3, **factory))
        self.var_weight = nn.Parameter(torch.ones(3, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_weight"):
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        self._check_instances(x)
        in_var, in_mean = torch.var_mean(x, list(range(2, x.dim())), correction=0, keepdim=True)
        ln_var, ln_mean = torch.var_mean(x, list(range(1, x.dim())), correction=0, keepdim=True)
        bn_mean, bn_var = self._batch_part(x)
        w_mean = torch.softmax(self.mean_weight, 0)
        w_var = torch.softmax(self.var_weight, 0)
        mean = w_mean[0] * in_mean + w_mean[1] * ln_mean + w_mean[2] * bn_mean
        var = w_var[0] * in_var + w_var[1] * ln_var + w_var[2] * bn_var
        return self._affine((x - mean) * torch.rsqrt(var + self.eps))
