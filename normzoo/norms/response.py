"""Batch-free response normalisations and their evolved kin, from scratch (tensor ops, autograd).

* :class:`FilterResponseNorm` — FRN + TLU (Singh & Krishnan 2020, arXiv:1911.09737): divides by
  the root mean square over the spatial dims per (sample, channel), no centring, then a learned
  threshold.
* :class:`EvoNormS0` — EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967): x * sigmoid(v x) divided
  by the group standard deviation; batch-free.
* :class:`EvoNormB0` — EvoNorm-B0 (same paper): x divided by the larger of the batch standard
  deviation and v x + the instance standard deviation; uses batch statistics in training and a
  running batch variance in evaluation.

The gradients are autograd's through the forward's tensor ops (no hand-written backward), so they
are differentiable again (double backward, gradient penalties) without a second code path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normzoo.norms._base import _NormBase, refuse_running_update_under_transform
from normzoo.norms._ghost import batch_moments, check_ghost_batch_size
from normzoo.registry import register_norm

__all__ = ["EvoNormB0", "EvoNormS0", "FilterResponseNorm"]


def _channel_view(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector against x of shape (N, C, *S)."""
    return (-1,) + (1,) * (x.dim() - 2)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """gamma * y + beta per channel (y unchanged without affine parameters)."""
    if weight is None or bias is None:
        return y
    view = _channel_view(y)
    return torch.addcmul(bias.view(view), y, weight.view(view))


def _check_groups(num_features: int, num_groups: int, layer: str) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if isinstance(num_features, int) and num_features % num_groups != 0:
        raise ValueError(
            f"num_groups={num_groups} must divide num_channels={num_features} "
            f"({layer} splits the channels into groups of equal size)"
        )


@register_norm(
    "filterresponsenorm",
    display="FRN + TLU",
    aliases=("frn",),
    paper=(
        "Singh & Krishnan 2020, Filter Response Normalization Layer: Eliminating Batch "
        "Dependence in the Training of Deep Neural Networks, arXiv:1911.09737"
    ),
)
class FilterResponseNorm(_NormBase):
    """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020).

    For an input (N, C, *S), per sample n and channel c (Eqs. 1-3 of arXiv:1911.09737)::

        nu2 = mean_S(x^2)                         (no centring: the mean is not subtracted)
        y   = gamma_c * x / sqrt(nu2 + eps) + beta_c
        z   = max(y, tau_c)                       (TLU, when ``tlu``)

    eps defaults to the paper's 1e-6 (not torch's 1e-5). Dense input (N, C) is accepted, as in the
    paper's fully connected case: with no spatial dims nu2 = x^2, so x / sqrt(x^2 + eps) is close
    to sign(x) unless |x| is near sqrt(eps) (the paper's reason for a larger or learned eps there).

    Train/eval: identical (batch-free, no running state). State: ``weight`` (gamma, ones) and
    ``bias`` (beta, zeros) when ``affine``; ``tau`` (zeros) when ``tlu``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        affine: bool = True,
        tlu: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.tlu = bool(tlu)
        if self.tlu:
            self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("tau", None)

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0, tau <- 0."""
        super().reset_parameters()
        if getattr(self, "tau", None) is not None:
            nn.init.zeros_(self.tau)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        spatial = tuple(range(2, x.dim()))
        nu2 = x.square().mean(spatial, keepdim=True) if spatial else x.square()  # (N, C, 1...)
        y = _affine(x * torch.rsqrt(nu2 + self.eps), self.weight, self.bias)
        if self.tau is None:
            return y
        return torch.maximum(y, self.tau.view(_channel_view(x)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tlu={self.tlu}"


@register_norm(
    "evonorms0",
    display="EvoNorm-S0",
    aliases=("evos0",),
    paper="Liu, Brock, Simonyan & Le 2020, Evolving Normalization-Activation Layers, arXiv:2004.02967",
)
class EvoNormS0(_NormBase):
    """EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967, Table 1), a batch-free normalisation-activation.

    For an input (N, C, *S) split into G groups of C / G consecutive channels::

        y = x * sigmoid(v_c * x) / sqrt(s2_{n,g} + eps) * gamma_c + beta_c

    s2_{n,g}: the biased variance of sample n's group g over its C / G channels and all spatial dims
    (the paper's group_std; GroupNorm's axes). v, gamma, beta are per channel. ``num_groups``
    defaults to the paper's 32, as GroupNorm's; the shipped ``conf/norm/evonorms0.yaml`` sets 8,
    which divides every width of the default cnn. eps: 1e-5. Dense (N, C) input is accepted (groups
    of C / G features, as GroupNorm).

    Train/eval: identical (no batch statistics, no running state). State: ``v`` (ones, always: it
    is the layer's nonlinearity), ``weight`` (gamma, ones) and ``bias`` (beta, zeros) when
    ``affine``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_groups(num_features, num_groups, "EvoNorm-S0")
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.num_groups = num_groups
        self.v = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0, v <- 1."""
        super().reset_parameters()
        if getattr(self, "v", None) is not None:
            nn.init.ones_(self.v)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        n = x.shape[0]
        xg = x.reshape(n, self.num_groups, -1)  # (N, G, C/G * prod(S))
        var = torch.var(xg, dim=-1, correction=0, keepdim=True)
        inv_std = torch.rsqrt(var + self.eps).expand_as(xg).reshape(x.shape)
        gated = x * torch.sigmoid(self.v.view(_channel_view(x)) * x)
        return _affine(gated * inv_std, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups}"


@register_norm(
    "evonormb0",
    display="EvoNorm-B0",
    aliases=("evob0",),
    paper="Liu, Brock, Simonyan & Le 2020, Evolving Normalization-Activation Layers, arXiv:2004.02967",
    uses_batch_stats=True,
)
class EvoNormB0(_NormBase):
    """EvoNorm-B0 (Liu et al. 2020, arXiv:2004.02967, Table 1): batch variance and an instance term.

    For an input (N, C, *S)::

        y = x / max(sqrt(s2_B,c + eps), v_c * x + sqrt(s2_I,nc + eps)) * gamma_c + beta_c

    s2_B,c: the biased variance of channel c over N and the spatial dims (BatchNorm's axes); s2_I:
    the biased variance of sample n, channel c over the spatial dims (InstanceNorm's axes; 0 for
    dense (N, C) input, which is accepted: the instance term is then sqrt(eps)). Nothing is
    centred. v, gamma, beta are per channel. eps: 1e-5.

    Train: s2_B from the batch; ``running_var`` is updated with the unbiased batch variance,
    ``running = (1 - momentum) * running + momentum * batch`` (``momentum=None``: cumulative
    average), as torch's BatchNorm. Training with one value per channel raises ``ValueError``.
    Eval: s2_B = ``running_var`` when ``track_running_stats`` (else the batch's); the instance
    term is always the sample's own. State: ``v`` (ones), ``weight`` / ``bias`` (gamma, beta) when
    ``affine``; buffers ``running_var`` (ones) and ``num_batches_tracked``.

    Ghost batches (``ghost_batch_size`` G, Hoffer et al. 2017): s2_B per chunk of G samples, as
    if the layer ran on each chunk, with one running update towards the chunks' size-weighted
    unbiased variances (``normzoo.norms._ghost``, the rule of every ghost-batch layer).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        ghost_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        self.track_running_stats = bool(track_running_stats)  # (read by reset_parameters)
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.momentum = momentum
        self.v = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        if self.track_running_stats:
            self.register_buffer(
                "running_var", torch.ones(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0, v <- 1, running_var <- 1, num_batches_tracked <- 0."""
        super().reset_parameters()
        if getattr(self, "v", None) is not None:
            nn.init.ones_(self.v)
        if getattr(self, "running_var", None) is not None:
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def _batch_variance(self, x: Tensor) -> Tensor:
        """s2_B (biased): per channel (C,), or per sample's ghost batch (N, C, 1..) shaped like x;
        and the running variance's update in training."""
        ghost = self.ghost_batch_size
        if ghost is not None and x.shape[0] > ghost:
            _, var, _, target = batch_moments(x, ghost)  # (raises torch's error at 1 value)
        else:
            dims = [0, *range(2, x.dim())]
            m = x.numel() // x.shape[1]
            if self.training and m == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{x.size()}"
                )
            var = torch.var(x, dim=dims, correction=0)
            target = var.detach() * (m / (m - 1)) if m > 1 else var.detach()
        if self.training and self.running_var is not None:
            refuse_running_update_under_transform(self)
            self.num_batches_tracked.add_(1)
            factor = self.momentum
            if factor is None:
                factor = 1.0 / float(self.num_batches_tracked.item())
            self.running_var.lerp_(target.to(self.running_var.dtype), factor)
        return var

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        use_running = not self.training and self.running_var is not None
        batch_var = self.running_var if use_running else self._batch_variance(x)
        view = _channel_view(x)
        spatial = tuple(range(2, x.dim()))
        if spatial:
            instance_var = torch.var(x, dim=spatial, correction=0, keepdim=True)
        else:
            instance_var = torch.zeros_like(x)
        instance = self.v.view(view) * x + torch.sqrt(instance_var + self.eps)
        if batch_var.dim() == 1:  # per channel; ghost batches give it per sample, shaped like x
            batch_var = batch_var.view(view)
        denominator = torch.maximum(torch.sqrt(batch_var + self.eps), instance)
        return _affine(x / denominator, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
            + (
                ""
                if self.ghost_batch_size is None
                else f", ghost_batch_size={self.ghost_batch_size}"
            )
        )
