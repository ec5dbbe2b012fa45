"""Two third-party-style plugins for the conformance suite's own tests (tests/test_conformance.py):
a correct RMSNorm, written as a plugin author would (plain tensor ops, autograd's backward), and a
broken one (torch's fused ``F.rms_norm``, and its gamma under another name than torch's)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normzoo.testing import Conformance

DECLARATION = Conformance(
    size=6,
    shapes=((2, 3, 6), (4, 6)),
    reference=functools.partial(nn.RMSNorm, eps=1e-6),
    modes=("train",),  # (no running state: eval is the same function)
)


class PluginRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * gamma over the last dim (Zhang & Sennrich 2019)."""

    conformance = DECLARATION

    def __init__(self, normalized_shape: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BrokenRMSNorm(nn.Module):
    """The same function through torch's fused op, with gamma stored as ``scale``."""

    conformance = DECLARATION

    def __init__(self, normalized_shape: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)
