"""Weight Standardization and Batch-Channel Normalization (Qiao et al. 2019, arXiv:1903.10520).

* :func:`weight_standardization` — a ``weight``-kind entry (``ws``): each output filter's weight is
  standardised over its fan-in before the conv/linear uses it.
* :func:`group_norm_with_weight_standardization` — ``gn_ws``, the paper's GN + WS baseline as one
  ``weight``-kind entry: WS on every conv/linear, and a GroupNorm after every conv.
* :class:`BatchChannelNorm` — ``bcn``: BatchNorm-style per-channel normalisation followed by a
  per-(sample, group) channel normalisation.

Why ``gn_ws`` is one weight-kind entry: a model has one norm slot, and ``normzoo.models`` applies a
weight-kind entry to every conv/linear (the classifier included) and places an activation-kind
entry after every hidden conv/linear. A weight-kind entry is the one place that reaches the conv's
weight, so ``gn_ws`` returns ``Sequential(conv with WS, GroupNorm)`` for a conv, and a
``nn.Linear`` with WS only: at that hook a hidden dense layer cannot be told from the classifier,
and the paper normalises conv activations only. So on an ``mlp`` (or a cnn's ``hidden`` dense
layers) ``gn_ws`` is WS without GN. ``normzoo.models`` is unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo.norms._base import RunningStatsMixin, _NormBase
from normzoo.norms.sample import GroupNorm
from normzoo.norms.weight import SUPPORTED
from normzoo.registry import register_norm

__all__ = [
    "BatchChannelNorm",
    "GroupNormWeightStandardization",
    "WeightStandardization",
    "group_norm_with_weight_standardization",
    "is_weight_standardized",
    "weight_standardization",
]

PAPER = (
    "Qiao, Wang, Liu, Shen & Yuille 2019, Micro-Batch Training with Batch-Channel "
    "Normalization and Weight Standardization, arXiv:1903.10520"
)


class WeightStandardization(nn.Module):
    """The parametrization ``W -> (W - mean) / sqrt(var + eps)`` per output filter (Qiao et al. 2019).

    For a weight of shape (out, in, *k) (``nn.Linear``: (out, in)), per output unit i (Eq. 5 of
    arXiv:1903.10520)::

        W_hat_i = (W_i - mu_i) / sqrt(sigma2_i + eps),   mu_i, sigma2_i over the fan-in (in, *k)

    sigma2 is the biased variance, eps inside the root as in the paper's formula (the authors'
    code adds 1e-5 to the unbiased standard deviation instead). The original weight is kept and
    trained; ``module.weight`` is recomputed from it on each access.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, weight: Tensor) -> Tensor:
        fan_in = tuple(range(1, weight.dim()))
        var, mean = torch.var_mean(weight, dim=fan_in, correction=0, keepdim=True)
        return (weight - mean) * torch.rsqrt(var + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GroupNormWeightStandardization(WeightStandardization):
    """:class:`WeightStandardization` as ``gn_ws`` installs it: the same map, its own type, so a
    model's layers name the entry that wrapped them (``normzoo.diagnostics`` maps a
    parametrization's type to its registry entry)."""


def is_weight_standardized(module: nn.Module) -> bool:
    """Whether ``module.weight`` carries a :class:`WeightStandardization` parametrization."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    plist = module.parametrizations["weight"]  # type: ignore[union-attr,index]
    return any(isinstance(p, WeightStandardization) for p in plist)


@register_norm(
    "weightstandardization",
    display="Weight Standardization",
    kind="weight",
    aliases=("ws",),
    paper=PAPER,
)
def weight_standardization(module: nn.Module, *, eps: float = 1e-5) -> nn.Module:
    """Weight Standardization: reparametrise ``module.weight`` as W_hat = (W - mu) / sqrt(var + eps).

    ``module`` is a ``nn.Linear`` or ``nn.Conv1d/2d/3d``; statistics per output unit over its fan-in
    (see :class:`WeightStandardization`). Unlike WeightNorm this changes the layer's function at
    wrapping (no parameter keeps the old scale) and adds no parameter: the state dict holds
    ``parametrizations.weight.original`` (the trained W) in place of ``weight``. In place; returns
    ``module``.

    Raises:
        TypeError: a module that is not one of the supported layer types.
        ValueError: a weight already standardised, or a fan-in of 1 (every W_hat would be 0).
    """
    return _standardize(module, WeightStandardization(eps))


def _standardize(module: nn.Module, parametrization: WeightStandardization) -> nn.Module:
    """Register ``parametrization`` on ``module.weight`` after the checks of
    :func:`weight_standardization`."""
    if not isinstance(module, SUPPORTED):
        raise TypeError(
            f"weight_standardization wraps {', '.join(t.__name__ for t in SUPPORTED)}; "
            f"got {type(module).__name__}"
        )
    if is_weight_standardized(module):
        raise ValueError(f"the weight of {type(module).__name__} is already standardised")
    fan_in = module.weight[0].numel()
    if fan_in < 2:
        raise ValueError(
            f"weight standardization needs a fan-in of at least 2 per output unit, "
            f"{type(module).__name__} has {fan_in}: every standardised weight would be 0"
        )
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
    return module


@register_norm("gn_ws", display="GroupNorm + WS", kind="weight", aliases=("gnws",), paper=PAPER)
def group_norm_with_weight_standardization(
    module: nn.Module,
    *,
    num_groups: int = 32,
    eps: float = 1e-5,
    affine: bool = True,
    ws_eps: float = 1e-5,
) -> nn.Module:
    """GN + WS (Qiao et al. 2019): WS on ``module``; after a conv, a from-scratch GroupNorm.

    A conv becomes ``Sequential(conv=<conv with WS>, norm=GroupNorm(out_channels, num_groups,
    eps, affine))``; a ``nn.Linear`` gets WS only (see the module docstring: the classifier is
    not normalised, and a hidden dense layer cannot be told from it here). ``num_groups``
    defaults to the paper's 32; ``conf/norm/gn_ws.yaml`` sets 8 for the default cnn.

    Raises:
        TypeError / ValueError: as :func:`weight_standardization`, and GroupNorm's ``ValueError``
            for ``num_groups`` not dividing the conv's output channels.
    """
    norm = None
    if not isinstance(module, nn.Linear) and isinstance(module, SUPPORTED):
        norm = GroupNorm(module.out_channels, num_groups=num_groups, eps=eps, affine=affine)
        norm = norm.to(device=module.weight.device, dtype=module.weight.dtype)
    module = _standardize(module, GroupNormWeightStandardization(ws_eps))
    if norm is None:
        return module
    return nn.Sequential(OrderedDict(conv=module, norm=norm))


def _group_standardise(x: Tensor, num_groups: int, eps: float) -> Tensor:
    """(x - mu) / sqrt(s2 + eps) per (sample, group) over C / G channels and all spatial dims."""
    xg = x.reshape(x.shape[0], num_groups, -1)  # (N, G, C/G * prod(S))
    var, mean = torch.var_mean(xg, dim=-1, correction=0, keepdim=True)
    return ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)


@register_norm(
    "batchchannelnorm",
    display="Batch-Channel Norm",
    aliases=("bcn",),
    paper=PAPER,
    uses_batch_stats=True,
)
class BatchChannelNorm(RunningStatsMixin, _NormBase):
    """Batch-Channel Normalization (Qiao et al. 2019, arXiv:1903.10520, Sec. 4 and Algorithm 1).

    For an input (N, C, *S), a batch step and then a channel step::

        x_b = gamma_b,c * (x - mu_c) / sqrt(s2_c + eps) + beta_b,c          (per channel c)
        y   = gamma_c * (x_b - mu_ng) / sqrt(s2_ng + eps) + beta_c           (GroupNorm of x_b)

    mu_ng, s2_ng: mean and biased variance of sample n's group g of C / G channels over them and
    the spatial dims. Which (mu_c, s2_c) the batch step uses:

    * ``estimate=False`` (default; the paper's large-batch BCN): in training the batch's mean and
      biased variance over N and S, with gradients through them, and the running buffers updated
      as torch's BatchNorm (unbiased variance, ``momentum``); in eval ``running_mean`` /
      ``running_var`` (when ``track_running_stats``, else the batch's).
    * ``estimate=True`` (the paper's micro-batch Algorithm 1, the authors' ``EstBN``): training and
      eval both normalise with the estimates, which each training step first moves towards the
      batch without gradient: mu_hat += momentum * (mu_B - mu_hat), s2_hat += momentum *
      (mean((x - mu_hat_old)^2) - s2_hat) (a biased variance about the old estimate, as the
      authors' code). Needs ``track_running_stats``.

    gamma, beta of both steps are per channel (the authors' code has one (gamma, beta) per group in
    the channel step; per channel is the suite's convention and includes it). ``num_groups``
    defaults to 32 (conf: 8). Training with one value per channel raises ``ValueError``. State:
    ``batch_weight`` / ``batch_bias`` (the batch step's affine), ``weight`` / ``bias`` (the channel
    step's), buffers ``running_mean``, ``running_var``, ``num_batches_tracked``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        estimate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if isinstance(num_features, int) and num_features % num_groups != 0:
            raise ValueError(
                f"num_groups={num_groups} must divide num_channels={num_features} "
                f"(the channel step splits the channels into groups of equal size)"
            )
        if estimate and not track_running_stats:
            raise ValueError(
                "estimate=True normalises with the running estimates: it needs "
                "track_running_stats=True"
            )
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.num_groups = num_groups
        self.estimate = bool(estimate)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.batch_weight = nn.Parameter(torch.ones(num_features, **factory))
            self.batch_bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("batch_weight", None)
            self.register_parameter("batch_bias", None)
        self._init_running_stats(momentum, track_running_stats, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Both steps' gamma <- 1, beta <- 0; running statistics reset."""
        super().reset_parameters()
        if getattr(self, "batch_weight", None) is not None:
            nn.init.ones_(self.batch_weight)
            nn.init.zeros_(self.batch_bias)

    def _batch_step_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_c, s2_c) for the batch step, updating the running buffers in training."""
        dims = [0, *range(2, x.dim())]
        m = x.numel() // x.shape[1]
        if not self.training and self.track_running_stats:
            return self.running_mean, self.running_var
        if m == 1 and self.training:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        if self.estimate:
            with torch.no_grad():
                batch_mean = x.mean(dims)
                about_old = (x - self.running_mean.view(_view(x))).square().mean(dims)
                factor = self._averaging_weight(self.running_mean.dtype)
                self.running_mean.lerp_(batch_mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(about_old.to(self.running_var.dtype), factor)
            return self.running_mean, self.running_var
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var * (m / (m - 1)))
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        mean, var = self._batch_step_stats(x)
        view = _view(x)
        x_b = (x - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        if self.batch_weight is not None:
            x_b = torch.addcmul(self.batch_bias.view(view), x_b, self.batch_weight.view(view))
        y = _group_standardise(x_b, self.num_groups, self.eps)
        if self.weight is None:
            return y
        return torch.addcmul(self.bias.view(view), y, self.weight.view(view))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_groups={self.num_groups}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}, estimate={self.estimate}"
        )


def _view(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector against x of shape (N, C, *S)."""
    return (-1,) + (1,) * (x.dim() - 2)
