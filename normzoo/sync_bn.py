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

import warnings
from typing import Any, Literal

import torch
from torch import nn

from normzoo.norms.batch import BatchNorm, BatchRenorm
from normzoo.norms.sync_batch import SyncBatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


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
