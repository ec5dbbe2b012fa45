"""The normalisation layers. Importing this package registers them all.

* ``batch``  — statistics over the batch: BatchNorm, BatchRenorm.
* ``sample`` — statistics per sample: LayerNorm, GroupNorm, InstanceNorm.
* ``last_dim`` — the trailing dims / per position: LayerNormLast, RMSNorm, LayerNorm2d.
* ``weight`` — weight reparametrisation: WeightNorm.
* ``native`` — torch's fused layers, registered as references (the only file that calls them).
* ``identity`` — the no-norm baseline.
"""

from normzoo.norms import batch, identity, last_dim, native, sample, weight
from normzoo.norms.batch import *  # noqa: F403
from normzoo.norms.identity import *  # noqa: F403
from normzoo.norms.last_dim import *  # noqa: F403
from normzoo.norms.native import *  # noqa: F403
from normzoo.norms.sample import *  # noqa: F403
from normzoo.norms.weight import *  # noqa: F403

__all__ = [
    *batch.__all__,
    *identity.__all__,
    *last_dim.__all__,
    *native.__all__,
    *sample.__all__,
    *weight.__all__,
]
