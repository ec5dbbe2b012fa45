"""normzoo: from-scratch normalisation layers, a registry, Hydra sweeps and reports.

>>> import normzoo
>>> normzoo.list_norms()  # doctest: +SKIP
>>> gn = normzoo.build_norm("gn", 64, num_groups=8)
>>> ln = normzoo.build_norm("layernorm_last", 512)  # torch's nn.LayerNorm(512), for (B, T, D)
>>> resnet_norm = normzoo.norm_layer("gn", num_groups=8)  # a norm_layer= for torchvision/timm

Multi-device training: torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` does not see
normzoo's BatchNorm (it converts torch's classes only) and leaves it per-device without a
warning; use :func:`normzoo.convert_sync_batchnorm`, which converts normzoo's and torch's.
"""

from normzoo.hosts import norm_layer
from normzoo.registry import (
    NormSpec,
    UnknownNormError,
    build_norm,
    get_norm,
    list_norms,
    register_norm,
)
from normzoo.sync_bn import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "NormSpec",
    "SyncBatchNorm",
    "UnknownNormError",
    "__version__",
    "build_norm",
    "convert_sync_batchnorm",
    "get_norm",
    "list_norms",
    "norm_layer",
    "register_norm",
]
