"""Weight Normalization (Salimans & Kingma 2016, arXiv:1602.07868), from scratch.

WeightNorm reparametrises the weight of a ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Conv3d`` instead of normalising activations::

    w = g * v / ||v||        (the norm over every dim of v but ``dim``; one g per output unit)

so the length ``g`` and the direction ``v / ||v||`` of each output unit's weight vector are trained
separately. No statistics are taken over the batch: training and evaluation compute the same
function, and there is no running state.

The reparametrisation is a ``torch.nn.utils.parametrize`` parametrization with two originals, laid
out exactly as ``torch.nn.utils.parametrizations.weight_norm``, so the two state dicts interchange:

* ``parametrizations.weight.original0`` -- g, shape (out, 1, ..., 1) for ``dim=0``
  (the size of ``dim`` kept, every other dim 1; a 0-dim tensor for ``dim=None``),
* ``parametrizations.weight.original1`` -- v, the weight's shape,

and ``module.weight`` is recomputed from them on access. The norm is computed with tensor ops
(``torch.linalg.vector_norm``), not with torch's fused ``_weight_norm`` / ``norm_except_dim``, and
:class:`WeightNormFunction` has a hand-derived backward that saves what the fused op saves.

:func:`data_dependent_init` is the paper's initialisation: on one minibatch, layer by layer in
forward order, t = v . x / ||v||, then g <- 1 / sigma[t] and b <- -mu[t] / sigma[t] per output
unit, so that every weight-normalised layer starts with zero-mean, unit-variance pre-activations.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo.norms._backward import hand_written_backward, vjp_by_autograd
from normzoo.norms._base import _under_transform
from normzoo.registry import register_norm

__all__ = [
    "WeightNorm",
    "WeightNormFunction",
    "data_dependent_init",
    "is_weight_normed",
    "weight_norm",
]

#: the layer types WeightNorm wraps; the output units are dim 0 of their weight
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _norm_dims(ndim: int, dim: int | None) -> tuple[int, ...]:
    """The dims the norm runs over: all of them for ``dim`` None/-1 (torch's convention)."""
    if dim is None or dim == -1:
        return tuple(range(ndim))
    return tuple(d for d in range(ndim) if d != dim)


def _weight_norm_double_backward(ctx: Any, dw: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    """:class:`WeightNormFunction`'s backward under ``create_graph``: w = g * v / ||v|| (norm over
    ``ctx.dims``) differentiated with autograd, so the grads are differentiable again."""
    v, _, g = ctx.saved_tensors
    need_g, need_v = ctx.needs_input_grad[:2]

    def forward() -> Tensor:
        return g * v / torch.linalg.vector_norm(v, dim=ctx.dims, keepdim=g.dim() > 0)

    dg, dv = vjp_by_autograd(forward, [g if need_g else None, v if need_v else None], dw)
    return dg, dv, None


def _weight_norm_forward(g: Tensor, v: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """w = g * v / ||v|| and ||v|| (g's shape), :class:`WeightNormFunction`'s forward."""
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=g.dim() > 0)
    return v * (g / norm), norm  # (the scale per output unit first: one pass over v)


class WeightNormFunction(torch.autograd.Function):
    """w = g * v / ||v|| with a hand-derived backward: ``apply(g, v, dims)``.

    ``dims`` are the dims of v the norm runs over; ``||v||`` keeps them as size-1 dims, so it has
    g's shape (a 0-dim tensor when the norm runs over the whole weight). With s = sum(dw * v)
    over ``dims``::

        dg = s / ||v||,    dv = (g / ||v||) * (dw - (s / ||v||^2) * v)

    Saved for backward: v, ||v|| and g, as torch's fused ``_weight_norm`` (the backward recomputes
    the per-unit scale g / ||v||, a division as small as g). Backward makes one reduction pass and
    two elementwise passes over the weight, allocating one weight-sized buffer (dw * v, reused for
    dv). Under ``create_graph`` the backward differentiates w = g * v / ||v|| with autograd
    instead, so the grads are differentiable again.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, v: Tensor, dims: tuple[int, ...]) -> Tensor:
        w, norm = _weight_norm_forward(g, v, dims)
        ctx.dims = dims
        ctx.save_for_backward(v, norm, g)
        return w

    @staticmethod
    @hand_written_backward(_weight_norm_double_backward)
    def backward(ctx: Any, dw: Tensor, *_: Any) -> tuple[Tensor | None, Tensor | None, None]:
        v, norm, g = ctx.saved_tensors
        scale = g / norm
        buf = dw * v
        s = buf.sum(ctx.dims, keepdim=norm.dim() > 0)  # (out, 1, ...): dw . v per output unit
        dg = s.div_(norm)  # s / ||v||
        dv = None
        if ctx.needs_input_grad[1]:  # dv = scale * dw - (scale * dg / ||v||) * v, into buf
            if _under_transform():  # (vmap has no batching rule for out= nor for addcmul_)
                dv = dw * scale - v * (dg * scale / norm)
            else:
                dv = torch.mul(dw, scale, out=buf).addcmul_(v, (dg * scale).div_(norm), value=-1.0)
        return dg if ctx.needs_input_grad[0] else None, dv, None


class WeightNormFunctionForTransforms(WeightNormFunction):
    """:class:`WeightNormFunction` in the ``forward`` + ``setup_context`` form that torch.func
    transforms need (a generated vmap rule: the forward is plain tensor ops), ``||v||`` as a second
    output; the backward is the same hand-derived one. Eager calls keep the ctx form (torch binds
    a ``setup_context`` Function's signature with ``inspect`` on every call: ~35 us more per
    forward + backward, measured on the 2-core VM)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, v: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return _weight_norm_forward(g, v, dims)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        g, v, dims = inputs
        ctx.dims = dims
        ctx.save_for_backward(v, output[1], g)
        ctx.mark_non_differentiable(output[1])


class WeightNorm(nn.Module):
    """The parametrization ``(g, v) -> g * v / ||v||`` (Salimans & Kingma 2016, arXiv:1602.07868).

    ``||v||`` is the Euclidean norm over every dim of v except ``dim`` (over all of them for
    ``dim=None``, or ``-1`` as in torch), kept as size-1 dims so it broadcasts against v. Register
    it with :func:`weight_norm`; ``right_inverse`` splits an existing weight into
    ``g = ||w||, v = w`` so the wrapped layer computes the same function as before.
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < -1):
            raise ValueError(
                f"dim must be None, -1 (norm over the whole weight) or a dim >= 0, got {dim!r}"
            )
        self.dim = -1 if dim is None else dim  # torch's _WeightNorm stores None as -1

    def _norm(self, v: Tensor) -> Tensor:
        if self.dim >= v.dim():
            raise ValueError(f"dim={self.dim} is out of range for a {v.dim()}-D weight")
        dims = _norm_dims(v.dim(), self.dim)
        keepdim = self.dim != -1  # g is a 0-dim tensor for the whole-tensor norm
        return torch.linalg.vector_norm(v, dim=dims, keepdim=keepdim)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        if self.dim >= v.dim():
            raise ValueError(f"dim={self.dim} is out of range for a {v.dim()}-D weight")
        dims = _norm_dims(v.dim(), self.dim)
        if torch.jit.is_tracing():  # jit.trace, legacy ONNX: aten ops (saved, loaded, exported)
            return _weight_norm_forward(g, v, dims)[0]
        if _under_transform():  # torch.func: the setup_context form
            return WeightNormFunctionForTransforms.apply(g, v, dims)[0]  # type: ignore[no-any-return]
        return WeightNormFunction.apply(g, v, dims)  # type: ignore[no-any-return]

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight

    def extra_repr(self) -> str:
        return f"dim={None if self.dim == -1 else self.dim}"


@register_norm(
    "weightnorm",
    display="WeightNorm",
    kind="weight",
    aliases=("wn",),
    paper="Salimans & Kingma 2016, Weight Normalization, arXiv:1602.07868",
    native="native_weightnorm",
)
def weight_norm(module: nn.Module, *, dim: int | None = 0) -> nn.Module:
    """Weight Normalization: reparametrise ``module.weight`` as w = g * v / ||v||, in place.

    ``module`` is a ``nn.Linear`` or ``nn.Conv1d/2d/3d``; ``dim`` is the dim of the weight that
    indexes the output units (0, the default, gives one g per output unit; ``None`` one g for the
    whole weight). The layer computes the same function right after wrapping (g = ||w||, v = w).
    Returns ``module``, whose state dict now holds ``parametrizations.weight.original0`` (g) and
    ``parametrizations.weight.original1`` (v) as torch's ``parametrizations.weight_norm`` does; a
    checkpoint of torch's old ``nn.utils.weight_norm`` (``weight_g``, ``weight_v``) loads too.

    Raises:
        TypeError: for a module that is not one of the supported layer types.
        ValueError: for a module whose weight is already weight-normalised, or a bad ``dim``.
    """
    if not isinstance(module, SUPPORTED):
        has = "has no weight" if not isinstance(getattr(module, "weight", None), Tensor) else ""
        raise TypeError(
            f"weight_norm wraps {', '.join(t.__name__ for t in SUPPORTED)}; got "
            f"{type(module).__name__}{' (it ' + has + ')' if has else ''}"
        )
    if is_weight_normed(module):
        raise ValueError(f"the weight of {type(module).__name__} is already weight-normalised")
    parametrize.register_parametrization(module, "weight", WeightNorm(dim), unsafe=True)
    module._register_load_state_dict_pre_hook(_legacy_weight_norm_keys)
    return module


def _legacy_weight_norm_keys(
    state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:  # fmt: skip
    """Load a checkpoint of torch's old ``nn.utils.weight_norm`` (keys ``weight_g``, ``weight_v``):
    the same g and v under this layout's names, as torch's own parametrization does."""
    g_key, v_key = f"{prefix}weight_g", f"{prefix}weight_v"
    if g_key in state_dict and v_key in state_dict:
        state_dict[f"{prefix}parametrizations.weight.original0"] = state_dict.pop(g_key)
        state_dict[f"{prefix}parametrizations.weight.original1"] = state_dict.pop(v_key)


def _weight_norm_of(module: nn.Module) -> nn.Module | None:
    """The WeightNorm parametrization on ``module.weight`` (ours or torch's), if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:  # type: ignore[union-attr,index]
        if isinstance(p, WeightNorm) or type(p).__name__ == "_WeightNorm":
            return p
    return None


def is_weight_normed(module: nn.Module) -> bool:
    """Whether ``module.weight`` is weight-normalised (by :func:`weight_norm` or by torch's
    ``torch.nn.utils.parametrizations.weight_norm``, which shares the layout)."""
    return _weight_norm_of(module) is not None


def _unit_direction_output(module: nn.Module, x: Tensor) -> Tensor:
    """t = (v / ||v||) . x, the layer's output with g = 1 and no bias."""
    wn = _weight_norm_of(module)
    assert wn is not None
    v = module.parametrizations["weight"].original1  # type: ignore[union-attr,index]
    dims = _norm_dims(v.dim(), 0)
    direction = v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    if isinstance(module, nn.Linear):
        return F.linear(x, direction)
    return module._conv_forward(x, direction, None)  # type: ignore[operator,union-attr]


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: Tensor, *, eps: float = 1e-8) -> None:
    """The data-dependent initialisation of Salimans & Kingma (2016, Sec. 3), in place.

    Runs ``model(x)`` once. Each weight-normalised layer (``dim=0``), in forward order, computes
    on its actual input t = v . x / ||v|| per output unit, then sets::

        g <- 1 / sigma[t],    b <- -mu[t] / sigma[t]      (mu, sigma over batch and spatial dims)

    so its output (g * t + b) has zero mean and unit (biased) variance per unit on this batch, and
    the layers after it see the initialised output. A layer without a bias gets g only. ``eps``
    guards sigma = sqrt(var + eps) against a dead unit. The model's buffers (running statistics
    of any BatchNorm in it, counters) and its train/eval mode are left as they were.

    Raises:
        ValueError: if the model has no weight-normalised layer, or one with ``dim != 0``.
    """
    layers = [m for m in model.modules() if is_weight_normed(m)]
    if not layers:
        raise ValueError("data_dependent_init: the model has no weight-normalised layer")
    for m in layers:
        wn = _weight_norm_of(m)
        if getattr(wn, "dim", 0) != 0:
            raise ValueError(
                f"data_dependent_init needs one g per output unit (dim=0); "
                f"{type(m).__name__} is weight-normalised with dim={wn.dim}"  # type: ignore[union-attr]
            )
    done: set[int] = set()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if id(module) in done:  # a layer used twice is initialised on its first call
            return None
        done.add(id(module))
        t = _unit_direction_output(module, args[0])
        channel = t.dim() - 1 if isinstance(module, nn.Linear) else 1
        dims = [d for d in range(t.dim()) if d != channel]
        var, mu = torch.var_mean(t, dim=dims, correction=0)
        inv_sigma = (var + eps).rsqrt()
        g = module.parametrizations["weight"].original0  # type: ignore[union-attr,index]
        g.copy_(inv_sigma.view(g.shape).to(g.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_((-mu * inv_sigma).to(module.bias.dtype))  # type: ignore[union-attr]
        return module.forward(*args)  # the initialised layer's output, without re-running hooks

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])  # no running-statistics side effects
    missed = [type(m).__name__ for m in layers if id(m) not in done]
    if missed:
        warnings.warn(
            f"data_dependent_init: {len(missed)} weight-normalised layer(s) were not called by "
            f"model(x) and keep their initialisation: {', '.join(missed)}",
            RuntimeWarning,
            stacklevel=2,
        )
