"""Multi-device batch statistics: :func:`convert_sync_batchnorm` for normzoo's and torch's BN.

torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts only torch's ``_BatchNorm``
subclasses: it leaves normzoo's :class:`~normzoo.norms.batch.BatchNorm` per-device, silently.
:func:`convert_sync_batchnorm` converts both: normzoo's BatchNorm into the from-scratch
:class:`~normzoo.norms.sync_batch.SyncBatchNorm`, torch's into ``nn.SyncBatchNorm`` (torch's own
converter; its kernels need a GPU) or, with ``torch_bn="normzoo"``, into the from-scratch one too
(any device, gloo on CPU included), with parameters, buffers and train/eval mode kept. Batch Renorm is not converted
(its r, d would need the moving statistics of the global batch): a warning names each one.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from normzoo.norms.batch import BatchNorm, BatchRenorm
from normzoo.norms.sync_batch import SyncBatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batchnorm_for_run"]

log = logging.getLogger(__name__)


def _from_batchnorm(bn: nn.Module, process_group: Any) -> SyncBatchNorm:
    p = bn.weight if bn.weight is not None else bn.running_mean
    sync = SyncBatchNorm(
        bn.num_features,
        eps=bn.eps,
        affine=bn.affine,
        momentum=bn.momentum,
        track_running_stats=bn.track_running_stats,
        process_group=process_group,
        device=None if p is None else p.device,
        dtype=None if p is None else p.dtype,
    )
    with torch.no_grad():
        sync.load_state_dict(bn.state_dict())
    sync.train(bn.training)
    return sync


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: Any = None,
    *,
    torch_bn: Literal["torch", "normzoo"] = "torch",
) -> nn.Module:
    """``module`` with every BatchNorm (normzoo's and torch's) replaced by its synchronised form.

    ``torch_bn``: what torch's ``nn.BatchNorm*d`` become: ``"torch"`` (``nn.SyncBatchNorm``,
    GPU only) or ``"normzoo"`` (the from-scratch :class:`SyncBatchNorm`, same state dict).
    Returns the converted module (``module`` itself unless it is a BatchNorm), as torch's
    converter does. Call it before wrapping the model in ``DistributedDataParallel``.
    """
    if torch_bn not in ("torch", "normzoo"):
        raise ValueError(f"torch_bn must be 'torch' or 'normzoo', got {torch_bn!r}")
    if isinstance(module, BatchRenorm):
        warnings.warn(
            "convert_sync_batchnorm: Batch Renorm is not synchronised (its r, d correct towards "
            "per-device moving statistics); left per-device",
            RuntimeWarning,
            stacklevel=2,
        )
        return module
    if isinstance(module, BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _from_batchnorm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, nn.SyncBatchNorm
    ):
        if torch_bn == "normzoo":
            return _from_batchnorm(module, process_group)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group, torch_bn=torch_bn)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _world_size() -> int:
    """Processes of the run: the default group's size, or before it exists torchrun's
    ``WORLD_SIZE`` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def sync_batchnorm_for_run(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """The ``train.sync_batchnorm`` option: with several processes (torchrun-style
    ``WORLD_SIZE`` > 1, or an initialised default group of that size) the model's BatchNorms
    become :class:`SyncBatchNorm` (statistics over every process's batch; torch's BN too, through
    the from-scratch layer on CPU, where torch's needs a GPU), the default group initialised from
    torchrun's environment (gloo on CPU, nccl on CUDA) if it is not yet. One process: a no-op
    with one log line. Off (``enabled`` false): the model as it is."""
    if not enabled:
        return model
    world = _world_size()
    if world <= 1:
        log.info("train.sync_batchnorm: one process; the norms keep per-device statistics")
        return model
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # (env://)
    torch_bn: Literal["torch", "normzoo"] = "torch" if device.type == "cuda" else "normzoo"
    model = convert_sync_batchnorm(model, torch_bn=torch_bn)
    synced = sum(isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) for m in model.modules())
    log.info("train.sync_batchnorm: %d BatchNorm layers synchronised over %d processes",
             synced, world)  # fmt: skip
    return model
