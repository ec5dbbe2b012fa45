"""K models of one architecture as one stacked model, and back (issue 17).

The K members' activations live side by side in the channel dim, member-major: a conv activation
is ``(N, K*C, H, W)`` (member k owns channels ``k*C .. (k+1)*C``), a dense one ``(N, K*F)``. Then

* each ``Conv2d`` is one grouped conv over ``K*C_in -> K*C_out`` channels with ``groups=K``;
* each ``Linear`` is one ``baddbmm`` over a ``(K, F_in, F_out)`` weight (:class:`StackedLinear`);
* ReLU, pooling and Flatten act per channel (Flatten of member-major channels is member-major);
* each norm is the registry's own layer over ``K*C`` channels where that is the same function:
  a per-channel layer (BatchNorm, Batch Renorm, InstanceNorm) over ``K*C``; GroupNorm(G) as
  GroupNorm(K*C, G*K); LayerNorm (one group per sample) as GroupNorm(K*C, K); ``none``. Members
  with different norms are contiguous segments of the channels, one layer per segment
  (:class:`StackedNorm`).

Every stacked tensor has the member index first (``view(K, -1)`` is one row per member), which is
what per-member clipping and learning rates use. :func:`unstack_into` copies member k's slice
back into a single model of its own (evaluation, diagnostics, the record).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normzoo.registry import build_norm, get_norm

__all__ = [
    "PER_CHANNEL_NORMS",
    "Slot",
    "StackedConv2d",
    "StackedLinear",
    "StackedNorm",
    "build_stack",
    "stack_refusal",
    "unstack_into",
]

#: norms whose statistics and affine parameters are per channel: the K*C layer is K layers of C
PER_CHANNEL_NORMS = frozenset(
    {"batchnorm", "batchrenorm", "instancenorm", "native_batchnorm", "native_instancenorm"}
)
#: norms stacked as a GroupNorm with K times the groups (LayerNorm: one group per member)
GROUP_NORMS = frozenset({"groupnorm", "layernorm"})
STACKABLE_MODELS = frozenset({"mlp", "cnn"})


def stack_refusal(model_name: str, norm: str, optimizer: str = "sgd") -> str | None:
    """Why a run of ``model_name`` with ``norm`` cannot train in a stack (None: it can)."""
    if model_name not in STACKABLE_MODELS:
        return f"model={model_name} is not stackable (only {', '.join(sorted(STACKABLE_MODELS))})"
    if optimizer != "sgd":
        return f"optim.name={optimizer}: the stack implements SGD only"
    name = get_norm(norm).name
    if name not in PER_CHANNEL_NORMS | GROUP_NORMS | {"none"}:
        return f"norm={name}: no stacked form is known to compute the same function"
    return None


class StackedLinear(nn.Module):
    """K ``nn.Linear(F_in, F_out)`` as one ``baddbmm``: ``(N, K*F_in) -> (N, K*F_out)``.

    ``weight``: ``(K, F_in, F_out)`` (member k's ``Linear.weight.T``); ``bias``: ``(K, 1, F_out)``.
    """

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        xk = x.view(n, self.members, self.in_features).transpose(0, 1)  # (K, N, F_in)
        out = torch.baddbmm(self.bias, xk, self.weight)  # (K, N, F_out)
        return out.transpose(0, 1).reshape(n, self.members * self.out_features)


class StackedConv2d(nn.Conv2d):
    """K members' ``Conv2d`` as one grouped conv (``groups=K``). With one input channel per
    group (a stem on grey images) it runs in channels_last: oneDNN's NCHW grouped kernel was
    2.4x slower there (fwd+bwd, K=5..30, 16x16 -> 8x8, 1 thread); other layers stay NCHW."""

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels != self.groups or x.dim() != 4:
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        return y.contiguous()


class StackedNorm(nn.Module):
    """Contiguous channel segments, each normalised by its own registry layer (mixed norms)."""

    def __init__(self, layers: Sequence[nn.Module], channels: Sequence[int]) -> None:
        super().__init__()
        self.segments = nn.ModuleList(layers)
        self.channels = list(channels)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.segments) == 1:
            return self.segments[0](x)
        parts = torch.split(x, self.channels, dim=1)
        return torch.cat([layer(p) for layer, p in zip(self.segments, parts, strict=True)], 1)


@dataclass
class Slot:
    """Where a stacked tensor's rows come from: the stacked module, the members it holds (a
    contiguous range ``first .. first + count``) and the name of each member's module."""

    module: nn.Module
    first: int
    count: int
    member_name: str


def _stacked_norm_layer(norm: str, options: dict[str, Any], width: int, k: int) -> nn.Module:
    """The registry's layer computing ``k`` members' ``norm(width)`` over ``k * width`` channels."""
    name = get_norm(norm).name
    if name == "none":
        return nn.Identity()
    if name in PER_CHANNEL_NORMS:
        return build_norm(name, k * width, **options)
    if name == "groupnorm":
        groups = int(options.get("num_groups", get_norm(name).defaults.get("num_groups", 32)))
        return build_norm(name, k * width, **{**options, "num_groups": groups * k})
    if name == "layernorm":  # LayerNorm is GroupNorm with one group (the same _normalise)
        return build_norm("groupnorm", k * width, **{**options, "num_groups": k})
    raise ValueError(f"norm={name} has no stacked form")


def build_stack(
    members: Sequence[nn.Module], segments: Sequence[tuple[str, dict[str, Any], int]]
) -> tuple[nn.Sequential, list[Slot]]:
    """The stacked model of ``members`` (each an ``nn.Sequential`` of one architecture, norms
    aside), with their weights copied in. ``segments``: ``(norm, layer options, count)`` in
    member order. Returns the model and the slots that map its tensors back to members."""
    k = len(members)
    first = members[0]
    layers: list[tuple[str, nn.Module]] = []
    slots: list[Slot] = []
    for name, module in first.named_children():
        if isinstance(module, nn.Conv2d):
            stacked: nn.Module = StackedConv2d(
                k * module.in_channels, k * module.out_channels, module.kernel_size,
                stride=module.stride, padding=module.padding, groups=k * module.groups,
                bias=module.bias is not None,
            )  # fmt: skip
            slots.append(Slot(stacked, 0, k, name))
        elif isinstance(module, nn.Linear):
            stacked = StackedLinear(k, module.in_features, module.out_features)
            slots.append(Slot(stacked, 0, k, name))
        elif name.endswith("_norm"):
            width = _width_before(layers, k)
            seg_layers, start = [], 0
            for norm, options, count in segments:
                layer = _stacked_norm_layer(norm, options, width, count)
                seg_layers.append(layer)
                slots.append(Slot(layer, start, count, name))
                start += count
            stacked = StackedNorm(seg_layers, [width * c for _, _, c in segments])
        elif isinstance(module, nn.ReLU | nn.Flatten | nn.AdaptiveAvgPool2d | nn.Identity):
            stacked = module.__class__(**_plain_args(module))
        else:
            raise ValueError(f"layer {name} ({type(module).__name__}) has no stacked form")
        layers.append((name, stacked))
    model = nn.Sequential(OrderedDict(layers))
    _copy(members, slots, into_stack=True)
    return model, slots


def _width_before(layers: list[tuple[str, nn.Module]], k: int) -> int:
    """Per-member output width of the last conv/linear in ``layers``."""
    for _, m in reversed(layers):
        if isinstance(m, nn.Conv2d):
            return m.out_channels // k
        if isinstance(m, StackedLinear):
            return m.out_features
    raise ValueError("a norm before any conv/linear")


def _plain_args(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Flatten):
        return {"start_dim": module.start_dim, "end_dim": module.end_dim}
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return {"output_size": module.output_size}
    return {}


@torch.no_grad()
def _copy(members: Sequence[nn.Module], slots: Sequence[Slot], *, into_stack: bool) -> None:
    for slot in slots:
        state = slot.module.state_dict(keep_vars=True)
        for key, stacked in state.items():
            group = members[slot.first : slot.first + slot.count]
            own = [m.get_submodule(slot.member_name) for m in group]
            if stacked.dim() == 0:  # a scalar buffer (num_batches_tracked): the same in each
                if into_stack:
                    stacked.copy_(own[0].state_dict()[key])
                else:
                    for m in own:
                        m.state_dict(keep_vars=True)[key].copy_(stacked)
                continue
            rows = stacked.view(slot.count, -1)  # one row per member
            for i, m in enumerate(own):
                target = m.state_dict(keep_vars=True)[key]
                if isinstance(slot.module, StackedLinear):
                    mine = target.t() if key == "weight" else target.unsqueeze(0)
                else:
                    mine = target
                if into_stack:
                    rows[i].copy_(mine.reshape(-1))
                else:
                    mine.copy_(rows[i].view(mine.shape))


def unstack_into(members: Sequence[nn.Module], slots: Sequence[Slot]) -> None:
    """Copy every member's slice of the stack's parameters and buffers into its own model."""
    _copy(members, slots, into_stack=False)
