"""Shared machinery of the activation norms: affine parameters, running buffers, input checks.

The subclasses differ only in which axes they reduce over (as torch's ``_NormBase``). Parameter and
buffer names follow torch (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so a state dict moves between a normzoo layer and its native reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["FxTraceable", "RunningStatsMixin", "_NormBase"]


def _call_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` run eagerly: the one node torch.fx records for a normzoo layer (see
    :class:`FxTraceable`); at run time x is a Tensor, so the layer's eager forward runs."""
    return layer.forward(x)  # type: ignore[no-any-return]


torch.fx.wrap("_call_layer")  # (symbolic tracing records calls of it as one call_function node)


class FxTraceable:
    """Makes a layer's ``forward`` traceable by ``torch.fx.symbolic_trace`` (and so by torchvision's
    ``create_feature_extractor``, FX fusion and quantisation passes).

    The layers branch on shapes, dtypes and sizes (input checks, small-input paths), which a
    ``Proxy`` cannot answer. So every ``forward`` a subclass defines is wrapped: called with a
    ``torch.fx.Proxy`` it records one call of :func:`_call_layer` (the layer is a ``get_attr``
    node), which runs the layer's own eager forward, checks included, when the traced graph runs.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "_fx_traceable", False):
            cls.forward = _traceable(forward)  # type: ignore[attr-defined]


def _traceable(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(forward)
    def wrapper(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _call_layer(self, x)
        return forward(self, x, *args, **kwargs)

    wrapper._fx_traceable = True  # type: ignore[attr-defined]
    return wrapper


#: float32/64 CPU eager inputs of at most this many elements (64 KiB in float32) take the layers'
#: small-input paths (``normzoo.norms._small``: SmallBatchNorm for BatchNorm/Batch Renorm,
#: SmallGroupNorm for the per-sample norms): at such sizes each tensor op costs its few us of
#: dispatch, not its memory traffic, so those count ops, not passes over memory.
_SMALL_NUMEL = 1 << 14


def _is_small(x: Tensor) -> bool:
    """Small float32/float64 CPU input in eager mode: the forward with the fewest ops."""
    return (
        x.numel() <= _SMALL_NUMEL
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not _graph_mode()  # (torch.compile, torch.func: the general Functions)
    )


def _under_transform() -> bool:
    """Inside a ``torch.func`` transform (vmap, grad, jvp, ...): functorch's interpreter stack is
    not empty. (Inside a Function's forward under ``grad`` alone it is empty: x is plain there.)"""
    return torch._C._functorch.maybe_current_level() is not None


def _graph_mode() -> bool:
    """No ``out=`` and no host reads (``.item()``): ``torch.compile`` and ``torch.jit.trace``
    (and the legacy ONNX exporter) record a graph, and ``vmap`` has no batching rule for ``out=``
    ops or data-dependent branches."""
    return torch.compiler.is_compiling() or _under_transform() or torch.jit.is_tracing()


#: the advice a batch-statistics layer gives when a torch.func transform meets its running update
RUNNING_STATS_UNDER_TRANSFORM = (
    "{layer} in training mode updates its running statistics in place, which torch.func "
    "transforms (vmap, grad, per-sample gradients) cannot do. Use the layer in eval mode "
    "(model.eval(): the running statistics), build it with track_running_stats=False (batch "
    "statistics, no state), or call normzoo.layers.replace_all_batch_norm_modules_(model) first "
    "(as torch.func.replace_all_batch_norm_modules_, for normzoo's and torch's layers)"
)


def refuse_running_update_under_transform(layer: nn.Module) -> None:
    """Raise :data:`RUNNING_STATS_UNDER_TRANSFORM` inside a torch.func transform (called before a
    training-mode running-statistics update, ahead of functorch's less helpful error)."""
    if _under_transform():
        raise RuntimeError(RUNNING_STATS_UNDER_TRANSFORM.format(layer=type(layer).__name__))


@functools.lru_cache(maxsize=512)
def _cpu_scalar(value: float, dtype: torch.dtype) -> Tensor:
    """A 0-dim CPU tensor holding ``value`` (read-only by convention: never written to).

    For the small-input paths of the layers: arithmetic with a Python number wraps it into a
    tensor on every call (~1.6 us each on the 2-core VM, as much as the op itself at (2, 128));
    a cached 0-dim tensor skips that. CPU eager only (the lookup is not meant for traced code).
    """
    return torch.tensor(value, dtype=dtype)


#: the Batch Renorm buffers that :func:`_scale_and_offset`'s ``extra`` fills, in its order
_RENORM_DIAGNOSTICS = ("clip_fraction_r", "clip_fraction_d", "last_r", "last_d")


def _batch_norm_scale(invstd: Tensor, weight: Tensor | None, r: Tensor | None) -> Tensor:
    """g = gamma * invstd (* r), the per-channel scale of :func:`_scale_and_offset`, bitwise
    (the backward recomputes it rather than saving one more per-channel vector)."""
    g = invstd if weight is None else weight * invstd
    return g if r is None else g * r


def _scale_and_offset(
    invstd: Tensor,
    mean: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | Tensor,
    ref_mean: Tensor | None,
    ref_var: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, tuple[Tensor, ...]]:
    """Per-channel g, offset with y = (x - mean) * g + offset, for both BatchNorm Functions.

    BatchNorm (``ref_mean`` None): g = gamma * invstd, offset = beta. Batch Renorm (Ioffe 2017),
    with the moving statistics ``ref_mean``, ``ref_var`` and ``limits`` = [rmax, dmax]::

        r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mean - ref_mean) / sigma, -dmax, dmax)
        g = gamma * r * invstd,  offset = gamma * d + beta

    with sigma_B = 1 / invstd and sigma = sqrt(ref_var + eps). Returns (g, offset, r, d, extra):
    r, d are None and ``extra`` is () for BatchNorm; for Batch Renorm ``extra`` is
    (clip_r, clip_d, r, d), clip_r and clip_d the fractions of channels (0-dim) where r resp. d was
    clipped (the values of the layer's ``_RENORM_DIAGNOSTICS`` buffers). ``eps`` may be a 0-dim
    tensor (the small-input path's cached constant).
    """
    if ref_mean is None:
        return _batch_norm_scale(invstd, weight, None), bias, None, None, ()
    assert ref_var is not None and limits is not None
    rmax, dmax = limits.unbind()
    ref_invstd = torch.add(ref_var, eps).rsqrt_()
    # r, d are constants for the gradient (detached: where autograd differentiates this formula,
    # under torch.jit.trace, it must not reach invstd and mean through them)
    r_raw = torch.div(ref_invstd, invstd.detach())  # sigma_B / sigma
    d_raw = torch.sub(mean.detach(), ref_mean).mul_(ref_invstd)
    r = torch.clamp(r_raw, rmax.reciprocal(), rmax)
    d = torch.clamp(d_raw, dmax.neg(), dmax)
    # clamp returns its input's value exactly where it does not clip
    clip_r = torch.ne(r, r_raw).mean(dtype=mean.dtype)
    clip_d = torch.ne(d, d_raw).mean(dtype=mean.dtype)
    g = _batch_norm_scale(invstd, weight, r)
    if weight is None:
        offset = d if bias is None else d + bias
    else:
        offset = weight * d if bias is None else torch.addcmul(bias, weight, d)
    return g, offset, r, d, (clip_r, clip_d, r, d)


class _NormBase(FxTraceable, nn.Module):
    """Base of every activation norm: ``Layer(num_features, *, eps=1e-5, affine=True)``.

    Owns the per-channel affine parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros) and the
    input checks. Channels are at dim 1 of an input of rank >= 2: (N, C, *S).
    """

    #: the smallest input rank the layer accepts (InstanceNorm needs spatial dims: 3)
    min_rank: int = 2

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = bool(affine)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:  # (torch's LayerNorm/GroupNorm ``bias=False``: gamma without beta)
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0 (and running statistics reset, where the layer has them)."""
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        """Raise a clear error for input the layer cannot normalise."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects a floating-point input, got dtype {x.dtype}"
            )
        if x.dim() < self.min_rank:
            need = "(N, C, *S) with at least one spatial dim" if self.min_rank > 2 else "(N, C, *S)"
            raise ValueError(
                f"{type(self).__name__} expects input of shape {need}, "
                f"got {x.dim()}-D input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels "
                f"at dim 1, got input of shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        no_bias = ", bias=False" if self.affine and self.bias is None else ""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}{no_bias}"


def _normalise_with_running_stats(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Evaluation with the running statistics, per channel:
    y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta, as x * scale + shift.

    scale and shift are taken in at least float32 (half-precision buffers are upcast, so the
    shift ~ -mean * scale keeps what a large mean leaves of y) and y is returned in x's dtype,
    as torch's layers do for half-precision input to a float32 layer.
    """
    acc = torch.promote_types(running_var.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias
    view = (-1,) + (1,) * (x.dim() - 2)
    y = x * scale.view(view) + shift.view(view)  # (two ops: each vectorises on any layout)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class RunningStatsMixin:
    """Running mean/variance buffers with torch's update rule.

    ``running = (1 - momentum) * running + momentum * batch``; ``momentum=None`` gives the cumulative
    moving average (factor ``1 / num_batches_tracked``). ``running_var`` holds the *unbiased* variance.
    """

    #: 2 as torch's ``_NormBase``: version-1 checkpoints (before ``num_batches_tracked``) load
    _version = 2

    num_features: int
    momentum: float | None
    track_running_stats: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def _init_running_stats(
        self,
        momentum: float | None,
        track_running_stats: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.momentum = momentum
        self.track_running_stats = bool(track_running_stats)
        module: nn.Module = self  # type: ignore[assignment]
        if self.track_running_stats:
            module.register_buffer(
                "running_mean", torch.zeros(self.num_features, device=device, dtype=dtype)
            )
            module.register_buffer(
                "running_var", torch.ones(self.num_features, device=device, dtype=dtype)
            )
            module.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            module.register_buffer("running_mean", None)
            module.register_buffer("running_var", None)
            module.register_buffer("num_batches_tracked", None)

    def reset_parameters(self) -> None:
        """gamma <- 1, beta <- 0, and the running statistics reset (as torch's ``_NormBase``)."""
        super().reset_parameters()  # type: ignore[misc]
        # (``_NormBase.__init__`` calls this before ``_init_running_stats`` has run)
        if getattr(self, "track_running_stats", False):
            self.reset_running_stats()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        # torch's state-dict versioning: a checkpoint saved before num_batches_tracked existed
        # (version None or 1) loads with the count at 0, as torch's BatchNorm loads it
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)  # type: ignore[misc]

    def reset_running_stats(self) -> None:
        """running_mean <- 0, running_var <- 1, num_batches_tracked <- 0."""
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def _momentum_factor(self) -> float:
        """Increment ``num_batches_tracked`` and return this step's averaging factor as a float.

        For callers that need a Python number (torch's fused references take ``momentum`` as a
        float); ``momentum=None`` reads the count back (``.item()``: a host sync, and a graph break
        under ``torch.compile``). The from-scratch layers use :meth:`_averaging_weight`.
        """
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked.item())
        return self.momentum

    def _averaging_weight(self, dtype: torch.dtype | None = None) -> float | Tensor:
        """Increment ``num_batches_tracked`` and return this step's averaging factor.

        ``momentum`` as a float, or for ``momentum=None`` the 0-dim tensor
        ``1 / num_batches_tracked`` in ``dtype`` (the running buffers' dtype; default float32),
        computed on the device: no ``.item()``, so no host sync and no graph break under
        ``torch.compile``. The value equals torch's ``1.0 / float(num_batches_tracked)`` rounded
        to ``dtype``.
        """
        refuse_running_update_under_transform(self)  # type: ignore[arg-type]
        count = self._buffers["num_batches_tracked"]  # type: ignore[attr-defined]
        assert count is not None
        count.add_(1)
        if self.momentum is None:
            return count.to(dtype or torch.get_default_dtype()).reciprocal_()
        return self.momentum

    def _update_running_stats(self, mean: Tensor, var_unbiased: Tensor) -> None:
        """Blend this batch's per-channel mean and unbiased variance into the running buffers.

        (Called once per training step: no ``no_grad`` context and no dtype conversion unless
        needed, since at small sizes each costs as much as the update itself.)
        """
        buffers = self._buffers  # type: ignore[attr-defined]  # (Module.__getattr__: ~0.6 us each)
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        assert running_mean is not None and running_var is not None
        if mean.requires_grad or var_unbiased.requires_grad:
            mean, var_unbiased = mean.detach(), var_unbiased.detach()
        if mean.dtype != running_mean.dtype:
            mean, var_unbiased = mean.to(running_mean.dtype), var_unbiased.to(running_var.dtype)
        factor = self._averaging_weight(running_mean.dtype)
        running_mean.lerp_(mean, factor)
        running_var.lerp_(var_unbiased, factor)
