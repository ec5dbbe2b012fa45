"""The normalisation layers. Importing this package registers them all.

* ``batch``  — statistics over the batch: BatchNorm, BatchRenorm.
* ``sample`` — statistics per sample: LayerNorm, GroupNorm, InstanceNorm.
* ``weight`` — weight reparametrisation: WeightNorm.
* ``native`` — torch's fused layers, registered as references (the only file that calls them).
* ``identity`` — the no-norm baseline.
"""

from normzoo.norms import batch, identity, native, sample, weight
from normzoo.norms.batch import *  # noqa: F403
from normzoo.norms.identity import *  # noqa: F403
from normzoo.norms.native import *  # noqa: F403
from normzoo.norms.sample import *  # noqa: F403
from normzoo.norms.weight import *  # noqa: F403

__all__ = [*batch.__all__, *identity.__all__, *native.__all__, *sample.__all__, *weight.__all__]
