"""Normalisation over the trailing dims (transformers) and per position over C (ConvNeXt).

* :class:`LayerNormLast` -- torch's ``nn.LayerNorm(normalized_shape)`` (Ba, Kiros & Hinton 2016):
  each position normalised over its trailing ``normalized_shape`` dims.
* :class:`RMSNorm` -- torch's ``nn.RMSNorm(normalized_shape)`` (Zhang & Sennrich 2019): the same
  without centring or bias.
* :class:`LayerNorm2d` -- ConvNeXt's LayerNorm2d (Liu et al. 2022): (N, C, *S) input, each pixel
  normalised over its C channels (the channels-first form of ``LayerNormLast(C)``).

All three are one computation over a set of dims R (m values per position)::

    LayerNorm:  x_hat = (x - mean_R(x)) / sqrt(var_R(x) + eps)      (biased variance)
    RMSNorm:    x_hat = x / sqrt(mean_R(x^2) + eps)
    y = gamma * x_hat (+ beta)

with a hand-derived backward (:class:`RowNormFunction`). None uses batch statistics: training and
evaluation compute the same function and there is no running state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.norms._backward import hand_written_backward, vjp_by_autograd
from normzoo.norms._base import FxTraceable, _NormBase
from normzoo.registry import register_norm

__all__ = ["LayerNorm2d", "LayerNormLast", "RMSNorm", "RowNormFunction", "row_norm"]


def _row_norm_reference(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: tuple[int, ...], eps: float,
    centre: bool,
) -> Tensor:  # fmt: skip
    """The formula with plain differentiable tensor ops (double backward; float32 for half input)."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    xc = xf - xf.mean(dims, keepdim=True) if centre else xf
    y = xc * torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _sum_to(t: Tensor, like: Tensor) -> Tensor:
    """``t`` summed over the dims where ``like`` (a broadcast parameter) has none or size 1."""
    return t.sum_to_size(like.shape).to(like.dtype)


class RowNormFunction(torch.autograd.Function):
    """LayerNorm (``centre=True``) or RMSNorm over ``dims``: ``apply(x, weight, bias, dims, eps,
    centre) -> (y, mean, rstd)`` (mean zeros for RMSNorm; both not differentiable); ``weight``,
    ``bias`` broadcast against x (or None). Written with ``setup_context`` and a generated vmap
    rule, so ``torch.func`` transforms (vmap, grad, per-sample gradients) apply.

    Forward: mean (LayerNorm only) and rstd = 1 / sqrt(mean(xc^2) + eps) per position, two-pass
    (centred, stable for any mean); y = x_hat * gamma + beta. Saved: x, gamma, mean, rstd (torch's
    kernel saves the same). Backward, with g = dy * gamma and means over the m values of ``dims``::

        LayerNorm: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        RMSNorm:   dx = rstd * (g - x_hat * mean(g * x_hat))
        dgamma = sum dy * x_hat,  dbeta = sum dy          (over every other dim)

    Half-precision input is computed in float32 and rounded once. Under ``create_graph`` the
    grads come from autograd on :func:`_row_norm_reference` (differentiable again).
    """

    generate_vmap_rule = True  # (torch.func: vmap, and grad through setup_context)

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
        centre: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean = xf.mean(dims, keepdim=True) if centre else None
        xc = xf - mean if mean is not None else xf
        rstd = (xc * xc).mean(dims, keepdim=True).add_(eps).rsqrt_()
        y = xc * rstd
        if weight is not None:
            y = y.mul_(weight)
        if bias is not None:
            y = y.add_(bias)
        y = y.to(x.dtype) if y.dtype != x.dtype else y
        return y, torch.zeros_like(rstd) if mean is None else mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, weight, bias, dims, eps, centre = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.dims, ctx.eps, ctx.centre = dims, eps, centre
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    @staticmethod
    def _double_backward(ctx: Any, dy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if dy is None:
            return (None,) * 6
        x, weight, bias, _, _ = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        wanted = [t if n else None for t, n in zip((x, weight, bias), need, strict=True)]

        def forward() -> Tensor:
            return _row_norm_reference(x, weight, bias, ctx.dims, ctx.eps, ctx.centre)

        return (*vjp_by_autograd(forward, wanted, dy), None, None, None)

    @staticmethod
    @hand_written_backward(lambda ctx, *grads: RowNormFunction._double_backward(ctx, *grads))
    def backward(ctx: Any, dy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if dy is None:
            return (None,) * 6
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        acc = rstd.dtype
        xf, dyf = x.to(acc), dy.to(acc)
        x_hat = (xf - mean).mul_(rstd) if ctx.centre else xf * rstd
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_w and weight is not None:
            dw = _sum_to(dyf * x_hat, weight)
        if need_b and bias is not None:
            db = _sum_to(dyf, bias)
        if need_x:
            g = dyf if weight is None else dyf * weight
            t = x_hat * (g * x_hat).mean(dims, keepdim=True)
            if ctx.centre:
                t = t.add_(g.mean(dims, keepdim=True))
            dx = g.sub_(t).mul_(rstd) if g is not dyf else (g - t).mul_(rstd)
            dx = dx.to(x.dtype)
        return dx, dw, db, None, None, None


def row_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    centre: bool = True,
) -> Tensor:
    """Functional LayerNorm (``centre``) / RMSNorm of ``x`` over ``dims`` (see RowNormFunction)."""
    if torch.jit.is_tracing():  # jit.trace, legacy ONNX: aten ops (saved, loaded, exported)
        return _row_norm_reference(x, weight, bias, dims, eps, centre)
    return RowNormFunction.apply(x, weight, bias, dims, eps, centre)[0]  # type: ignore[no-any-return]


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty tuple of them, "
            f"got {normalized_shape!r}"
        )
    return shape


class _TrailingNorm(FxTraceable, nn.Module):
    """Shared constructor and input check of the trailing-dims norms (torch's argument names)."""

    normalized_shape: tuple[int, ...]
    eps: float | None
    centre: bool

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None,
        elementwise_affine: bool,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = None if eps is None else float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        factory = {"device": device, "dtype": dtype}
        weight = beta = None
        if self.elementwise_affine:
            weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                beta = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        self.register_parameter("weight", weight)
        self.register_parameter("bias", beta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        name, k = type(self).__name__, len(self.normalized_shape)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name} expects a floating-point Tensor, got {what}")
        if x.dim() < k or tuple(x.shape[-k:]) != self.normalized_shape:
            hint = ""
            if x.dim() >= 2 and x.shape[1] == math.prod(self.normalized_shape):
                hint = " (channels at dim 1? use layernorm2d for ConvNeXt's per-pixel LayerNorm)"
            raise ValueError(
                f"{name}(normalized_shape={list(self.normalized_shape)}) normalises the last "
                f"{k} dim(s), got input of shape {tuple(x.shape)}{hint}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        k = len(self.normalized_shape)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        dims = tuple(range(x.dim() - k, x.dim()))
        return row_norm(x, self.weight, self.bias, dims, eps, self.centre)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


@register_norm(
    "layernorm_last",
    kind="last_dim",
    display="LayerNorm (last dims)",
    aliases=("ln_last", "layernorm_lastdim"),
    paper="Ba, Kiros & Hinton 2016, Layer Normalization, arXiv:1607.06450",
    native="native_layernorm_last",
    description="torch's nn.LayerNorm(normalized_shape): each position over its trailing dims",
)
class LayerNormLast(_TrailingNorm):
    """Layer Normalization over the trailing dims (Ba, Kiros & Hinton 2016, arXiv:1607.06450).

    ``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``'s API
    and function: for x of shape (*, *normalized_shape) each position is normalised over its last
    ``len(normalized_shape)`` dims, y = (x - mean) / sqrt(var + eps) * gamma + beta (biased
    variance), gamma and beta of shape ``normalized_shape``. The transformer's LayerNorm on
    (B, T, D) is ``LayerNormLast(D)``. Train/eval: identical; state ``weight``, ``bias`` (torch's
    names and shapes: state dicts load both ways).
    """

    centre = True

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)


@register_norm(
    "rmsnorm",
    kind="last_dim",
    display="RMSNorm",
    aliases=("rms",),
    paper="Zhang & Sennrich 2019, Root Mean Square Layer Normalization, arXiv:1910.07467",
    native="native_rmsnorm",
    description="torch's nn.RMSNorm(normalized_shape): x / RMS over the trailing dims",
)
class RMSNorm(_TrailingNorm):
    """Root Mean Square Layer Normalization (Zhang & Sennrich 2019, arXiv:1910.07467).

    ``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True)``'s API and function:
    y = x / sqrt(mean(x^2) + eps) * gamma over the last ``len(normalized_shape)`` dims (no
    centring, no beta); ``eps=None`` is ``torch.finfo(x.dtype).eps``, as torch. Train/eval:
    identical; state ``weight`` (torch's name and shape).
    """

    centre = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, device, dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


@register_norm(
    "layernorm2d",
    display="LayerNorm2d",
    aliases=("ln2d", "convnext_ln"),
    paper="Liu et al. 2022, A ConvNet for the 2020s (ConvNeXt), arXiv:2201.03545",
    native="native_layernorm2d",
    description="ConvNeXt's LayerNorm2d: each pixel of (N, C, *S) normalised over its C channels",
)
class LayerNorm2d(_NormBase):
    """ConvNeXt's LayerNorm2d (Liu et al. 2022, arXiv:2201.03545; timm's ``LayerNorm2d``).

    For (N, C, *S) input each position (n, s) is normalised over its C channels:
    y = (x - mean_C) / sqrt(var_C + eps) * gamma_c + beta_c, i.e. ``nn.LayerNorm(C)`` applied to
    the channels-last tensor (``x.permute(0, 2, 3, 1)``) without the permutes. On (N, C) input it
    equals LayerNorm. Train/eval: identical; state ``weight``, ``bias`` (C,) (``bias=False``: none).
    """

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        view = (-1,) + (1,) * (x.dim() - 2)
        w = None if self.weight is None else self.weight.view(view)
        b = None if self.bias is None else self.bias.view(view)
        return row_norm(x, w, b, (1,), self.eps, True)
