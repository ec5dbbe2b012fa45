"""The normalisation layers. Importing this package registers them all.

* ``batch``  — statistics over the batch: BatchNorm, BatchRenorm (both with ghost batches).
* ``ghost``  — Ghost BatchNorm: BatchNorm over ghost batches of 16 by default.
* ``mean_only`` — Mean-only BatchNorm, WeightNorm's companion.
* ``virtual`` — Virtual BatchNorm: a fixed reference batch plus the example.
* ``hybrid`` — batch and per-sample statistics mixed: Batch-Instance Norm, Switchable Norm.
* ``sample`` — statistics per sample: LayerNorm, GroupNorm, InstanceNorm.
* ``last_dim`` — the trailing dims / per position: LayerNormLast, RMSNorm, LayerNorm2d.
* ``weight`` — weight reparametrisation: WeightNorm.
* ``response`` — batch-free response norms: FRN + TLU, EvoNorm-S0 / B0.
* ``standardize`` — Weight Standardization, GN + WS, Batch-Channel Normalization.
* ``native`` — torch's fused layers, registered as references (the only file that calls them).
* ``identity`` — the no-norm baseline.
"""

from normzoo.norms import (
    batch,
    ghost,
    hybrid,
    identity,
    last_dim,
    mean_only,
    native,
    response,
    sample,
    standardize,
    virtual,
    weight,
)
from normzoo.norms.batch import *  # noqa: F403
from normzoo.norms.ghost import *  # noqa: F403
from normzoo.norms.hybrid import *  # noqa: F403
from normzoo.norms.identity import *  # noqa: F403
from normzoo.norms.last_dim import *  # noqa: F403
from normzoo.norms.mean_only import *  # noqa: F403
from normzoo.norms.native import *  # noqa: F403
from normzoo.norms.response import *  # noqa: F403
from normzoo.norms.sample import *  # noqa: F403
from normzoo.norms.standardize import *  # noqa: F403
from normzoo.norms.virtual import *  # noqa: F403
from normzoo.norms.weight import *  # noqa: F403

__all__ = [
    *batch.__all__,
    *ghost.__all__,
    *hybrid.__all__,
    *identity.__all__,
    *last_dim.__all__,
    *mean_only.__all__,
    *native.__all__,
    *response.__all__,
    *sample.__all__,
    *standardize.__all__,
    *virtual.__all__,
    *weight.__all__,
]
