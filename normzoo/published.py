"""Published reference numbers, as data, each with its source paper.

The report draws :data:`GN_PAPER_RESNET50` beside the measured curves "for shape": a different model,
data set and scale, so only the trend with batch size is comparable, never the level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "BRN_INCEPTION_V3",
    "GN_PAPER_AT_32",
    "GN_PAPER_BRN_AT_4",
    "GN_PAPER_RESNET50",
    "WN_CIFAR10",
    "PublishedCurve",
]


@dataclass(frozen=True)
class PublishedCurve:
    """Error (%) against batch size for a few layers, from one table of one paper."""

    title: str
    source: str
    metric: str
    batch_sizes: tuple[int, ...]
    error: dict[str, tuple[float, ...]] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        for name, values in self.error.items():
            if len(values) != len(self.batch_sizes):
                raise ValueError(
                    f"{self.title}: {name} has {len(values)} values for "
                    f"{len(self.batch_sizes)} batch sizes"
                )


#: Wu & He 2018, Group Normalization, Figure 1 (the batch-size curve; the paper also tabulates it):
#: ResNet-50, ImageNet val. error (%)
GN_PAPER_RESNET50 = PublishedCurve(
    title="ResNet-50 on ImageNet (Wu & He 2018)",
    source="Wu & He 2018, Group Normalization, arXiv:1803.08494, Figure 1",
    metric="ImageNet val. error (%)",
    batch_sizes=(32, 16, 8, 4, 2),
    error={
        "batchnorm": (23.6, 23.7, 24.8, 27.3, 34.7),
        "groupnorm": (24.1, 24.2, 24.0, 24.2, 24.1),
    },
    notes="images per GPU; BN statistics per device; lr 0.1 * N / 32; median of last 5 epochs",
)

#: the same paper at batch 32, other layers (val. error %)
GN_PAPER_AT_32 = {
    "batchnorm": 23.6,
    "groupnorm": 24.1,
    "layernorm": 25.3,
    "instancenorm": 28.4,
    "weightnorm": 28.2,
}

#: the same paper, ResNet-50 at batch 4: Batch Renorm (rmax 1.5, dmax 0.5) vs BN (val. error %)
GN_PAPER_BRN_AT_4 = {"batchrenorm": 26.3, "batchnorm": 27.3}

#: Ioffe 2017, Batch Renormalization (secondary source): Inception-v3 ImageNet top-1 accuracy (%)
BRN_INCEPTION_V3 = {
    "source": "Ioffe 2017, Batch Renormalization, arXiv:1702.03275 (secondary source)",
    "batchnorm_batch32": 78.3,
    "batchnorm_micro4": 74.2,
    "batchrenorm_micro4": 76.5,
}

#: Salimans & Kingma 2016 (secondary source): CIFAR-10 test error (%)
WN_CIFAR10 = {
    "source": "Salimans & Kingma 2016, Weight Normalization, arXiv:1602.07868 (secondary source)",
    "plain": 8.43,
    "weightnorm": 8.46,
    "batchnorm": 8.05,
    "weightnorm_meanonly_bn": 7.31,
}
