"""``model=transformer``: a small pre-norm transformer encoder on images read row by row.

An image (C, H, W) becomes a sequence of T = H tokens of C * W values each (digits: 8 tokens of 8
pixels; ``digits_hard``: 16 of 16), embedded to ``d_model`` with a learned position embedding, then
``depth`` pre-norm blocks (Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture", arXiv:2002.04745)::

    x = x + Attn(norm1(x));  x = x + MLP(norm2(x))      # x: (B, T, D)

a final norm, the mean over tokens and a Linear classifier.

How a registry entry fills a norm slot of a (B, T, D) tensor (:class:`SequenceNorm`, by ``spec.kind``):

* ``last_dim`` (``layernorm_last``, ``rmsnorm``) — applied as is: statistics over D per (sample,
  token), the transformer's LayerNorm / RMSNorm.
* ``activation`` — applied to the channels-first view (B, D, T), so D is the channel: BatchNorm's
  statistics are over (batch, time) per feature (PowerNorm, Shen et al. 2020, arXiv:2003.07845, calls
  this BN in transformers); the GN-sense LayerNorm's over (D, T) per sample; InstanceNorm's over T
  per (sample, feature).
* ``weight`` — no norm in the slots (identity); every Linear is reparametrised (as in the mlp).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SequenceNorm", "Transformer"]


class SequenceNorm(nn.Module):
    """A norm slot of a (B, T, D) sequence: ``norm`` over the last dim (``channels_first=False``)
    or over the (B, D, T) view with D as the channel (``channels_first=True``)."""

    def __init__(self, norm: nn.Module, *, channels_first: bool) -> None:
        super().__init__()
        self.norm = norm
        self.channels_first = channels_first

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_first:
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, D, T) -> (B, T, D)

    def extra_repr(self) -> str:
        return f"channels_first={self.channels_first}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with plain Linear projections (so a weight-kind norm wraps them)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"model.d_model={d_model} must be a multiple of model.heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)  # (B, T, H, d/H)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + Attn(norm1(x))``, then ``x + MLP(norm2(x))``."""

    def __init__(
        self, d_model: int, heads: int, mlp_ratio: int, norm1: nn.Module, norm2: nn.Module
    ):
        super().__init__()
        self.norm1, self.attn, self.norm2 = norm1, SelfAttention(d_model, heads), norm2
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Rows as tokens -> embedding + position -> ``depth`` pre-norm blocks -> norm -> mean -> Linear.

    ``make_norm(where)`` builds the norm slot named ``where`` (a :class:`SequenceNorm`, or
    ``nn.Identity`` for weight-kind norms).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        make_norm: Any,
        *,
        d_model: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        self.embed = nn.Linear(c * w, d_model)
        self.position = nn.Parameter(torch.zeros(1, h, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(
            *(
                Block(
                    d_model,
                    heads,
                    mlp_ratio,
                    make_norm(f"block{i}.norm1"),
                    make_norm(f"block{i}.norm2"),
                )
                for i in range(1, depth + 1)
            )
        )
        self.norm = make_norm("final norm")
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, T=H, C*W): one token per row
        z = self.blocks(self.embed(tokens) + self.position)
        return self.classifier(self.norm(z).mean(dim=1))  # mean over tokens
