"""Torch's native (fused) normalisation layers, registered as references for side-by-side comparison.

This is the only file under ``normzoo/norms/`` allowed to call torch's fused normalisation ops. Each
reference has the same constructor, parameter and buffer names as its from-scratch twin, so a state
dict moves between them and a study can swap one for the other by name (``native_batchnorm`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normzoo.norms._base import RunningStatsMixin, _NormBase
from normzoo.norms.last_dim import LayerNormLast, RMSNorm
from normzoo.registry import register_norm

__all__ = [
    "NativeBatchNorm",
    "NativeGroupNorm",
    "NativeInstanceNorm",
    "NativeLayerNorm",
    "NativeLayerNorm2d",
    "NativeLayerNormLast",
    "NativeRMSNorm",
    "native_weight_norm",
]


@register_norm(
    "native_batchnorm",
    aliases=("native_bn",),
    paper="Ioffe & Szegedy 2015, arXiv:1502.03167",
    uses_batch_stats=True,
    reference=True,
    description="torch F.batch_norm (reference for batchnorm)",
)
class NativeBatchNorm(RunningStatsMixin, _NormBase):
    """``F.batch_norm`` for any rank >= 2 (as ``nn.BatchNorm1d/2d/3d``)."""

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

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            factor = self._momentum_factor()
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )


@register_norm(
    "native_layernorm",
    aliases=("native_ln",),
    paper="Ba, Kiros & Hinton 2016, arXiv:1607.06450",
    reference=True,
    description="torch F.group_norm with one group (reference for layernorm, GN-paper sense)",
)
class NativeLayerNorm(_NormBase):
    """LayerNorm over C and the spatial dims with per-channel affine: ``F.group_norm(x, 1)``."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


@register_norm(
    "native_groupnorm",
    aliases=("native_gn",),
    paper="Wu & He 2018, arXiv:1803.08494",
    reference=True,
    defaults={"num_groups": 32},
    description="torch F.group_norm (reference for groupnorm)",
)
class NativeGroupNorm(_NormBase):
    """``F.group_norm`` over ``num_groups`` groups of C / num_groups channels."""

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps=eps, affine=affine, bias=bias, device=device, dtype=dtype
        )
        if num_groups < 1 or num_features % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_features}")
        self.num_groups = num_groups

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups}"


@register_norm(
    "native_instancenorm",
    aliases=("native_in",),
    paper="Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022",
    reference=True,
    needs_spatial=True,
    description="torch F.instance_norm (reference for instancenorm)",
)
class NativeInstanceNorm(RunningStatsMixin, _NormBase):
    """``F.instance_norm`` with normzoo's defaults (``affine=True``, no running stats)."""

    min_rank = 3

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.1,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self._init_running_stats(momentum, track_running_stats, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        factor = 0.1 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            factor = self._momentum_factor()
        return F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            factor,
            self.eps,
        )


@register_norm(
    "native_weightnorm",
    kind="weight",
    aliases=("native_wn",),
    paper="Salimans & Kingma 2016, arXiv:1602.07868",
    reference=True,
    description="torch.nn.utils.parametrizations.weight_norm (reference for weightnorm)",
)
def native_weight_norm(module: nn.Module, *, dim: int = 0) -> nn.Module:
    """``torch.nn.utils.parametrizations.weight_norm(module, dim=dim)``; g = original0, v = original1."""
    return nn.utils.parametrizations.weight_norm(module, name="weight", dim=dim)


@register_norm(
    "native_layernorm_last",
    kind="last_dim",
    aliases=("native_ln_last",),
    paper="Ba, Kiros & Hinton 2016, arXiv:1607.06450",
    reference=True,
    description="torch F.layer_norm over the trailing dims (reference for layernorm_last)",
)
class NativeLayerNormLast(LayerNormLast):
    """``F.layer_norm(x, normalized_shape, ...)``: ``torch.nn.LayerNorm`` (same API and state)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@register_norm(
    "native_rmsnorm",
    kind="last_dim",
    aliases=("native_rms",),
    paper="Zhang & Sennrich 2019, arXiv:1910.07467",
    reference=True,
    description="torch F.rms_norm over the trailing dims (reference for rmsnorm)",
)
class NativeRMSNorm(RMSNorm):
    """``F.rms_norm(x, normalized_shape, ...)``: ``torch.nn.RMSNorm`` (same API and state)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


@register_norm(
    "native_layernorm2d",
    aliases=("native_ln2d",),
    paper="Liu et al. 2022, arXiv:2201.03545",
    reference=True,
    description="F.layer_norm over C of the channels-last input (reference for layernorm2d)",
)
class NativeLayerNorm2d(_NormBase):
    """timm's ``LayerNorm2d``: ``F.layer_norm`` of the input permuted to channels-last, back."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        last = x.movedim(1, -1)
        y = F.layer_norm(last, (self.num_features,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)
