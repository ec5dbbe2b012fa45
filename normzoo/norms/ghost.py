"""Ghost BatchNorm (Hoffer, Hubara & Soudry 2017, arXiv:1705.08741) as its own registry entry.

The ghost-batch math is shared by every batch-statistics layer (``normzoo.norms._ghost``); this
entry is :class:`~normzoo.norms.batch.BatchNorm` with a ghost batch size set by default.
"""

from __future__ import annotations

import torch

from normzoo.norms.batch import BatchNorm
from normzoo.registry import register_norm

__all__ = ["GHOST_BATCH_SIZE", "GhostBatchNorm"]

#: 16 samples per ghost batch: BN's statistics are still reliable there (the GN paper's ResNet-50
#: BN error is 23.7% at 16 images per GPU against 23.6% at 32), and it is below the SGD batches
#: where Hoffer et al. use ghost batches (large batches), so a sweep over SGD batch sizes >= 32
#: holds the normalisation batch fixed while the SGD batch grows.
GHOST_BATCH_SIZE = 16


@register_norm(
    "ghostbatchnorm",
    display="Ghost BatchNorm",
    aliases=("gbn", "ghostbn"),
    paper="Hoffer, Hubara & Soudry 2017, Train longer, generalize better: closing the "
    "generalization gap in large batch training of neural networks, arXiv:1705.08741",
    uses_batch_stats=True,
    native=None,
    description="Ghost BatchNorm: BatchNorm statistics over ghost batches of 16 samples",
)
class GhostBatchNorm(BatchNorm):
    r"""Ghost Batch Normalization (Hoffer et al. 2017, arXiv:1705.08741, Algorithm 1), from scratch.

    The SGD batch (N, C, *S) is split along N into consecutive ghost batches of
    ``ghost_batch_size`` = G samples (default 16; the last one smaller when G does not divide N)
    and each is batch-normalised with its own statistics, one (mu_k, sigma2_k) per channel over
    its G samples and the spatial dims::

        y = (x - mu_k) / sqrt(sigma2_k + eps) * gamma + beta       (x in ghost batch k)

    * **Training:** as above (sigma2_k biased). The running statistics get one update per forward
      with torch's rule, towards the ghost batches' size-weighted mean of means and of unbiased
      variances (why one update: ``normzoo.norms._ghost``). N <= G is plain BatchNorm.
    * **Eval:** the running statistics, as BatchNorm.

    State: as :class:`~normzoo.norms.batch.BatchNorm` (a BatchNorm state dict loads both ways).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        ghost_batch_size: int | None = GHOST_BATCH_SIZE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            affine=affine,
            momentum=momentum,
            track_running_stats=track_running_stats,
            ghost_batch_size=ghost_batch_size,
            device=device,
            dtype=dtype,
        )
