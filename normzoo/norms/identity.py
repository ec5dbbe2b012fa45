"""The no-normalisation baseline, registered so a sweep treats "no norm" like any other entry."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from normzoo.registry import register_norm

__all__ = ["NoNorm"]


@register_norm(
    "none",
    aliases=("identity", "nonorm"),
    description="no normalisation (baseline)",
    display="no norm",
)
class NoNorm(nn.Module):
    """y = x. Accepts (and ignores) the common norm options so it drops in anywhere."""

    def __init__(self, num_features: int, **_: Any) -> None:
        super().__init__()
        self.num_features = num_features

    def reset_parameters(self) -> None:
        """Nothing to reset (here so that every activation entry answers the same calls)."""

    def forward(self, x: Tensor) -> Tensor:
        return x
