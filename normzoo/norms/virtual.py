"""Virtual BatchNorm (Salimans et al. 2016, arXiv:1606.03498, Sec. 3.4): statistics of a fixed
reference batch combined with the example itself, so an output never depends on its companions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normzoo.norms._base import _NormBase
from normzoo.registry import register_norm
from normzoo.testing.conformance import CHECKS, Conformance

__all__ = ["VirtualBatchNorm", "set_reference"]


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@register_norm(
    "virtualbatchnorm",
    display="Virtual BatchNorm",
    aliases=("vbn",),
    paper="Salimans, Goodfellow, Zaremba, Cheung, Radford & Chen 2016, Improved Techniques for "
    "Training GANs, arXiv:1606.03498",
    uses_batch_stats=False,
    native=None,
    description="Virtual BatchNorm: statistics of a fixed reference batch plus the example itself",
)
class VirtualBatchNorm(_NormBase):
    r"""Virtual Batch Normalization (Salimans et al. 2016, Sec. 3.4), from scratch.

    A reference batch of R samples gives per channel mu_ref = E[x] and nu_ref = E[x^2] over its
    samples and spatial dims. Each example x_i (C, *S) is normalised with the statistics of the
    reference batch *plus itself*, weights 1/(R+1) and R/(R+1) (the paper's reference code)::

        mu_i  = 1/(R+1) * mean_S(x_i)   + R/(R+1) * mu_ref
        nu_i  = 1/(R+1) * mean_S(x_i^2) + R/(R+1) * nu_ref
        y_i   = (x_i - mu_i) / sqrt(nu_i - mu_i^2 + eps) * gamma + beta

    computed in the centred (pooled-variance) form, which is the same quantity without the
    cancellation of nu - mu^2: with s2_i = var_S(x_i) and s2_ref the reference's biased variance,
    nu_i - mu_i^2 = 1/(R+1) * (s2_i + (mean_S(x_i) - mu_i)^2) + R/(R+1) * (s2_ref + (mu_ref - mu_i)^2).

    (for 2-D input (N, C), mean_S(x_i) = x_i). So y_i depends on x_i and the reference only, never
    on the other samples of its batch, in training and in eval alike (same function in both).

    **The reference batch** is the first batch the layer sees in training (or in eval, when none is
    set yet), or whatever :meth:`set_reference` (or the module-level :func:`set_reference`, which
    forwards a reference batch through a whole model) was given last. Its statistics are stored
    (detached) and held fixed: the paper forwards the reference batch through the *current*
    network at every step (twice the forward cost); a single layer cannot, so a training loop that
    wants that calls :func:`set_reference` with the reference batch before each step.

    State: ``weight``, ``bias``; buffers ``reference_mean``, ``reference_var`` (C, biased) and
    ``reference_size`` (long R; 0 = not set yet).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("reference_mean", torch.zeros(num_features, **factory))
        self.register_buffer("reference_var", torch.ones(num_features, **factory))
        self.register_buffer("reference_size", torch.tensor(0, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0, and the reference forgotten (the next batch sets it again)."""
        super().reset_parameters()
        if "reference_size" in self._buffers:  # (not during _NormBase.__init__)
            self.reference_mean.zero_()
            self.reference_var.fill_(1.0)
            self.reference_size.zero_()

    @property
    def has_reference(self) -> bool:
        return bool(self.reference_size.item() > 0)

    @torch.no_grad()
    def set_reference(self, x: Tensor) -> None:
        """Take the statistics of reference batch ``x`` (N, C, *S), N = R >= 1, and keep them."""
        self._check_input(x)
        if x.shape[0] < 1:
            raise ValueError("a reference batch needs at least one sample")
        var, mean = torch.var_mean(_at_least_float32(x), [0, *range(2, x.dim())], correction=0)
        self.reference_mean.copy_(mean)
        self.reference_var.copy_(var)
        self.reference_size.fill_(x.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        if not self.has_reference:
            self.set_reference(x)
        xf = _at_least_float32(x)
        dims = list(range(2, x.dim()))
        if dims:
            own_var, own_mean = torch.var_mean(xf, dims, correction=0)  # (N, C)
        else:
            own_var, own_mean = torch.zeros_like(xf), xf
        ref_mean, ref_var = self.reference_mean.to(xf.dtype), self.reference_var.to(xf.dtype)
        ref_weight = self.reference_size.to(xf.dtype) / (self.reference_size + 1)  # R / (R + 1)
        mean = torch.lerp(own_mean, ref_mean, ref_weight)
        var = torch.lerp(
            own_var + (own_mean - mean).square(), ref_var + (ref_mean - mean).square(), ref_weight
        )
        view = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(view)) * torch.rsqrt(var + self.eps).view(view)
        channel = (-1,) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.view(channel) + self.bias.view(channel)
        return y.to(x.dtype)


def set_reference(model: nn.Module, x: Tensor) -> None:
    """Give every :class:`VirtualBatchNorm` of ``model`` the reference batch ``x``: one forward of
    ``x`` through ``model`` (no grad, train/eval mode kept) in which each such layer takes its
    reference statistics from its own input before normalising it."""
    layers = [m for m in model.modules() if isinstance(m, VirtualBatchNorm)]
    hooks = [m.register_forward_pre_hook(lambda m, args: m.set_reference(args[0])) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def _set_a_reference(layer: nn.Module) -> None:
    """The conformance suite's setup: a fixed reference batch before any check (as a GAN sets one)."""
    gen = torch.Generator().manual_seed(4)
    channels = layer.num_features
    layer.set_reference(torch.randn(6, channels, generator=gen, dtype=layer.weight.dtype))


VirtualBatchNorm.conformance = Conformance(
    prepare=_set_a_reference, checks=tuple(c for c in CHECKS if c != "parity")
)  # no torch layer to compare with: its formula is tested against a float64 reference
