"""Per-sample normalisation: LayerNorm, GroupNorm, InstanceNorm (Wu & He 2018, Eqs. 3-7).

The three are one computation. For an input of shape (N, C, *S) split into G groups of C / G
channels, each (sample, group) is normalised over its m = (C / G) * prod(S) values::

    mu_ng = mean(x_ng),  sigma2_ng = mean((x_ng - mu_ng)^2)      (biased variance)
    y_nc  = gamma_c * (x_nc - mu_ng) / sqrt(sigma2_ng + eps) + beta_c

LayerNorm (GN-paper sense) is G = 1, InstanceNorm is G = C, GroupNorm takes G. None of them looks at
the other samples of the batch, so training and evaluation compute the same function (InstanceNorm
with ``track_running_stats=True`` aside).

:class:`GroupNormFunction` (:mod:`normzoo.norms._group_norm_function`) is the shared
``torch.autograd.Function``: a two-pass forward and a hand-derived backward.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from normzoo.norms._base import RunningStatsMixin, _normalise_with_running_stats, _NormBase
from normzoo.norms._group_norm_function import GroupNormFunction, group_norm, normalise
from normzoo.registry import register_norm

__all__ = ["GroupNorm", "GroupNormFunction", "InstanceNorm", "LayerNorm", "group_norm"]


@register_norm(
    "groupnorm",
    display="GroupNorm",
    aliases=("gn",),
    paper="Wu & He 2018, Group Normalization, arXiv:1803.08494",
    native="native_groupnorm",
    defaults={"num_groups": 32},
)
class GroupNorm(_NormBase):
    """Group Normalization (Wu & He 2018, arXiv:1803.08494).

    ``y = gamma_c * (x - mu_ng) / sqrt(sigma2_ng + eps) + beta_c``: the C channels of an (N, C, *S)
    input are split into ``num_groups`` groups of C / G consecutive channels; mu and the biased
    sigma2 are taken per (sample, group) over its C / G channels and all spatial dims. gamma, beta
    are per channel. Equals ``torch.nn.GroupNorm(num_groups, C)``.

    Train/eval: identical (no batch statistics, no running state). State: ``weight`` (gamma, ones)
    and ``bias`` (beta, zeros) when ``affine``. ``num_groups=1`` is :class:`LayerNorm` and
    ``num_groups=C`` is :class:`InstanceNorm`; 32 groups is the paper's default.
    """

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
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if isinstance(num_features, int) and num_features % num_groups != 0:
            raise ValueError(
                f"num_groups={num_groups} must divide num_channels={num_features} "
                f"(GroupNorm splits the channels into groups of equal size)"
            )
        super().__init__(
            num_features, eps=eps, affine=affine, bias=bias, device=device, dtype=dtype
        )
        self.num_groups = num_groups

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return normalise(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups}"


@register_norm(
    "layernorm",
    display="LayerNorm",
    aliases=("ln",),
    paper="Ba, Kiros & Hinton 2016, Layer Normalization, arXiv:1607.06450",
    native="native_layernorm",
)
class LayerNorm(_NormBase):
    """Layer Normalization (Ba, Kiros & Hinton 2016, arXiv:1607.06450), in the GN-paper sense.

    ``y = gamma_c * (x - mu_n) / sqrt(sigma2_n + eps) + beta_c``: mu and the biased sigma2 are taken
    per sample over C and all spatial dims of an (N, C, *S) input; gamma, beta are per channel.
    This is GroupNorm with one group; on 2-D input (N, C) it equals ``torch.nn.LayerNorm(C)``.
    (torch's ``nn.LayerNorm`` on conv input would normalise over the trailing dims instead.)

    Train/eval: identical (no batch statistics, no running state). State: ``weight`` (gamma, ones)
    and ``bias`` (beta, zeros) when ``affine`` (``bias=False``: gamma only, as torch's).

    Not torch's ``nn.LayerNorm(D)`` over the last dim of a (B, T, D) token tensor: that is
    ``layernorm_last`` (:class:`~normzoo.norms.last_dim.LayerNormLast`); ConvNeXt's per-pixel LN
    is ``layernorm2d``. Input whose dim 1 is not C but whose last dim is raises and names them; a
    3-D input with T == C (where both readings fit) warns once.
    """

    def _check_input(self, x: Tensor) -> None:
        c = self.num_features
        if isinstance(x, Tensor) and x.dim() >= 3 and x.shape[-1] == c:
            if x.shape[1] != c:
                raise ValueError(
                    f"LayerNorm({c}) normalises (N, C, *S) input over C and S (the GN paper's "
                    f"LayerNorm, channels at dim 1), got input of shape {tuple(x.shape)} whose "
                    f"last dim is {c}: did you mean build_norm('layernorm_last', {c}) (torch's "
                    f"nn.LayerNorm(normalized_shape={c}) over the last dim)?"
                )
            if x.dim() == 3:
                warnings.warn(
                    f"LayerNorm({c}) got (N, C, L) input {tuple(x.shape)} with L == C: it "
                    f"normalises each sample over C and L jointly (channels-first); for torch's "
                    f"nn.LayerNorm({c}) over the last dim use build_norm('layernorm_last', {c})",
                    UserWarning,
                    stacklevel=3,
                )
        super()._check_input(x)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return normalise(x, 1, self.weight, self.bias, self.eps)


@register_norm(
    "instancenorm",
    display="InstanceNorm",
    aliases=("in",),
    paper="Ulyanov, Vedaldi & Lempitsky 2016, Instance Normalization, arXiv:1607.08022",
    native="native_instancenorm",
    needs_spatial=True,
)
class InstanceNorm(RunningStatsMixin, _NormBase):
    """Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022).

    ``y = gamma_c * (x - mu_nc) / sqrt(sigma2_nc + eps) + beta_c``: mu and the biased sigma2 are
    taken per (sample, channel) over the spatial dims S of an (N, C, *S) input (rank >= 3; on 2-D
    input each (sample, channel) holds a single value and the layer raises ``ValueError``). This
    is GroupNorm with C groups and matches ``torch.nn.InstanceNorm{1,2,3}d``.

    normzoo's default is ``affine=True`` (torch's is ``affine=False``), so that every layer in a
    comparison has the same per-channel gamma, beta.

    Train/eval: with ``track_running_stats=False`` (default) both modes use the instance
    statistics and there is no running state. With ``track_running_stats=True``, training also
    updates ``running_mean`` / ``running_var`` with the batch average of the per-instance means and
    *unbiased* variances (``running = (1 - momentum) * running + momentum * batch``;
    ``momentum=None`` is a cumulative average), as torch's ``F.instance_norm``, and evaluation
    normalises with the running statistics. Unlike ``nn.InstanceNorm2d`` (which never counts
    batches and treats ``momentum=None`` as "no update"), ``num_batches_tracked`` counts the
    training batches and ``momentum=None`` averages them, as in BatchNorm. State: ``weight``,
    ``bias`` when ``affine``; ``running_mean``, ``running_var``, ``num_batches_tracked`` when
    tracking.

    torch compatibility: ``spatial_dims`` (1, 2 or 3, as ``nn.InstanceNorm1d/2d/3d``) makes an
    input of rank ``spatial_dims + 1`` an unbatched (C, *S) sample, as torch accepts it (without
    it, the rank says nothing: (C, H, W) would read as (N, C, L)). A checkpoint without gamma and
    beta (torch's default ``affine=False``) loads into an affine layer as gamma = 1, beta = 0:
    the same function.
    """

    min_rank = 3

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.1,
        track_running_stats: bool = False,
        spatial_dims: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if spatial_dims not in (None, 1, 2, 3):
            raise ValueError(f"spatial_dims must be None, 1, 2 or 3, got {spatial_dims!r}")
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self._init_running_stats(momentum, track_running_stats, device, dtype)
        self.spatial_dims = spatial_dims

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:  # fmt: skip
        w_key, b_key = prefix + "weight", prefix + "bias"
        if self.affine and w_key not in state_dict and b_key not in state_dict:
            # an affine-off checkpoint (torch's InstanceNorm default): identity gamma and beta
            state_dict[w_key] = torch.ones_like(self.weight)
            state_dict[b_key] = torch.zeros_like(self.bias)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_input(self, x: Tensor) -> None:
        if isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point():
            raise ValueError(
                f"InstanceNorm needs spatial dims: on 2-D input of shape {tuple(x.shape)} each "
                f"(sample, channel) holds a single value, so its variance is undefined; use "
                f"LayerNorm or BatchNorm for (N, C) input"
            )
        super()._check_input(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial_dims is not None and x.dim() == self.spatial_dims + 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)  # unbatched (C, *S), as torch's
        self._check_input(x)
        use_running = self.track_running_stats and not self.training
        if use_running:
            assert self.running_mean is not None and self.running_var is not None
            return _normalise_with_running_stats(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        m = math.prod(x.shape[2:])
        if m == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size "
                f"{list(x.shape)} (InstanceNorm normalises each (sample, channel) over its spatial "
                f"values)"
            )
        if not (self.training and self.track_running_stats and x.shape[0] > 0):
            return normalise(x, self.num_features, self.weight, self.bias, self.eps)
        y, mean, var = group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        self._update_running_stats(mean.mean(0), var.mean(0) * (m / (m - 1)))
        return y

    def extra_repr(self) -> str:
        dims = "" if self.spatial_dims is None else f", spatial_dims={self.spatial_dims}"
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}{dims}"
        )
