"""Synchronised BatchNorm, from scratch: batch statistics over every process of a group.

With data parallelism each device holds N / P samples; per-device BatchNorm then normalises with
the statistics of that small batch (the regime the GN paper measures). Summing the per-channel
statistics across the process group gives every device the statistics of the whole batch::

    S = allreduce(sum x),  Q = allreduce(sum x^2),  M = allreduce(m)     (per channel)
    mean = S / M,  var = Q / M - mean^2,  y = (x - mean) / sqrt(var + eps) * gamma + beta

The backward is hand-derived with the same reduction for the gradient sums (Ioffe & Szegedy
2015's BatchNorm gradient over the global batch)::

    G = allreduce(sum dy),  H = allreduce(sum dy * (x - mean))
    dx = gamma * invstd * (dy - G / M - (x - mean) * invstd^2 * H / M)
    dgamma = invstd * sum dy * (x - mean),  dbeta = sum dy     (local sums: DDP reduces them)

One ``all_reduce`` per direction (the three resp. two sums packed in one tensor). The sums are
accumulated in float64 so that Q / M - mean^2 keeps its digits in float32 training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normzoo.norms.batch import BatchNorm

__all__ = ["SyncBatchNorm"]


def _all_reduce(t: Tensor, group: Any) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


#: why vmap cannot batch the synchronised statistics, and what to use instead
_NO_VMAP = (
    "SyncBatchNorm takes its statistics over the batches of every process (an all-reduce), which "
    "has no per-sample form: torch.func.vmap (per-sample gradients) cannot batch it. Use the "
    "model in eval mode (the running statistics), or per-sample norms (GroupNorm, LayerNorm), or "
    "a per-device normzoo.BatchNorm with track_running_stats=False"
)

#: why a training-mode synchronised layer is not traced, and the routes that are
_NO_TRACE = (
    "SyncBatchNorm all-reduces its training statistics across processes, which torch.jit.trace "
    "and the legacy ONNX exporter cannot record. Trace or export the model in eval mode (the "
    "running statistics), or use torch.export / torch.onnx.export(..., dynamo=True)"
)


class _SyncBatchNormFunction(torch.autograd.Function):
    """``apply(x, weight, bias, eps, group) -> (y, mean, var_unbiased)`` with global statistics.

    In the ``forward`` + ``setup_context`` form (torch.func's ``grad`` applies; a collective's
    cost dwarfs the form's per-call overhead); ``vmap`` raises :data:`_NO_VMAP`.
    """

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        dims = [0, *range(2, x.dim())]
        view = (-1,) + (1,) * (x.dim() - 2)
        xa = x.to(torch.float64)
        local_m = xa.new_full((x.shape[1],), x.numel() // x.shape[1])
        packed = _all_reduce(torch.stack([xa.sum(dims), (xa * xa).sum(dims), local_m]), group)
        total, total_sq, count = packed.unbind()
        if bool((count <= 1).any()):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(count[0])} "
                f"across the process group (input size {tuple(x.shape)} here)"
            )
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_(min=0.0)
        invstd = (var + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.to(torch.float64)
        shift = -mean * scale if bias is None else bias.to(torch.float64) - mean * scale
        y = (x * scale.to(x.dtype).view(view)).add_(shift.to(x.dtype).view(view))
        var_unbiased = var * count / (count - 1)
        return y, mean, var_unbiased, invstd.to(x.dtype), count

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, weight, _, _, group = inputs
        _, mean, var_unbiased, invstd, count = output
        ctx.group = group
        ctx.save_for_backward(x, weight, mean.to(x.dtype), invstd, count)
        ctx.mark_non_differentiable(mean, var_unbiased, invstd, count)

    @staticmethod
    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:
        raise RuntimeError(_NO_VMAP)

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        view = (-1,) + (1,) * (x.dim() - 2)
        xc = x - mean.view(view)
        sum_dy, sum_dy_xc = dy.sum(dims), (dy * xc).sum(dims)
        packed = _all_reduce(torch.stack([sum_dy, sum_dy_xc]).to(torch.float64), ctx.group)
        g_dy, g_dy_xc = (t.to(x.dtype) for t in (packed / count).unbind())
        scale = invstd if weight is None else invstd * weight
        dx = None
        if ctx.needs_input_grad[0]:
            k = (invstd * invstd * g_dy_xc).view(view)
            dx = (dy - g_dy.view(view)).sub_(xc.mul_(k)).mul_(scale.view(view))
        dweight = sum_dy_xc * invstd if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics span a ``torch.distributed`` process group.

    ``SyncBatchNorm(num_features, *, process_group=None, **BatchNorm options)``: in training,
    when ``torch.distributed`` is initialised with more than one process, mean and variance are
    taken over the whole batch of every process of ``process_group`` (default: the world) and
    the gradient sums are all-reduced in backward (formulas in this module's docstring); the
    running statistics get the global mean and unbiased variance, equal on every process.
    Otherwise (one process, eval with running statistics) it is :class:`BatchNorm`. State: as
    BatchNorm (a BatchNorm state dict loads). Build one from a model with
    :func:`normzoo.convert_sync_batchnorm`.
    """

    def __init__(self, num_features: int, *, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, x: Tensor) -> Tensor:
        use_batch = self.training or not self.track_running_stats
        if not (use_batch and self._synchronised()):
            return super().forward(x)
        if torch.jit.is_tracing():  # (the all-reduce is no graph op)
            raise RuntimeError(_NO_TRACE)
        self._check_input(x)
        y, mean, var_unbiased, _, _ = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, self.process_group
        )
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var_unbiased)
        return y
