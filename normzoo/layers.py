"""Finding a model's normalisation layers, and setting them (modes, saved and restored state).

The one place that answers "which modules of this model are norm layers, and which of them
normalise with batch statistics": instances of the registry's classes (a ``weight`` entry
registered as a factory is probed once to learn the class it installs) and foreign layers such as
``nn.BatchNorm2d``, known by their ``running_mean``/``running_var`` buffers. The diagnostics, the
PreciseBN / AdaBN estimates and the training loop's evaluation all ask here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo.registry import NormSpec, get_norm, list_norms

__all__ = [
    "NormLayer",
    "find_norm_layers",
    "preserved_state",
    "replace_all_batch_norm_modules_",
    "set_norm_mode",
    "uses_batch_stats_in_eval",
]

_SCALAR_TYPES = (bool, int, float)
#: saved state of a model's norm layers: (module, "buffer:<name>" | "attr:<name>", value)
VolatileState = list[tuple[nn.Module, str, Any]]


@dataclass
class NormLayer:
    """One normalisation layer found in a model."""

    name: str  # qualified module name ("" for the model itself)
    module: nn.Module
    spec: NormSpec | None  # registry entry, None for a foreign layer found by its buffers
    uses_batch_stats: bool
    has_running_stats: bool
    per_instance: bool  # running stats average per-(sample, channel) stats (InstanceNorm)

    @property
    def is_weight_norm(self) -> bool:
        return self.spec is not None and self.spec.kind == "weight"


def _registered_classes() -> dict[type, NormSpec]:
    """Registered class -> spec. A ``weight`` entry registered as a factory function is probed
    once on a tiny ``nn.Linear`` to learn the parametrization class it installs."""
    names = tuple(list_norms())
    return dict(_classes_for(names))


@functools.lru_cache(maxsize=8)
def _classes_for(names: tuple[str, ...]) -> tuple[tuple[type, NormSpec], ...]:
    classes: dict[type, NormSpec] = {}
    for name in names:
        spec = get_norm(name)
        if isinstance(spec.cls, type):
            classes.setdefault(spec.cls, spec)
        elif spec.kind == "weight":
            try:  # the probe's init must not advance the global RNG (it runs on first use)
                with torch.random.fork_rng(devices=[]):
                    probe = spec.cls(nn.Linear(2, 2), **dict(spec.defaults))
            except Exception:  # a factory that cannot wrap a Linear: nothing to learn from it
                continue
            if parametrize.is_parametrized(probe):  # torch-style: the parametrization modules
                for plist in probe.parametrizations.values():  # type: ignore[union-attr]
                    for module in plist:
                        classes.setdefault(type(module), spec)
            elif type(probe) is not nn.Linear:  # a wrapper module
                classes.setdefault(type(probe), spec)
    return tuple(classes.items())


@functools.lru_cache(maxsize=8)
def _batch_stats_classes_for(names: tuple[str, ...]) -> tuple[type, ...]:
    """torch's BatchNorm base and every registered class of an entry with ``uses_batch_stats``."""
    classes: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
    for name in names:
        spec = get_norm(name)
        if spec.uses_batch_stats and isinstance(spec.cls, type):
            classes += (spec.cls,)
    return classes


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    )


_RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def replace_all_batch_norm_modules_(model: nn.Module) -> nn.Module:
    """``torch.func.replace_all_batch_norm_modules_`` for normzoo's layers as well as torch's: every
    module that tracks running statistics stops (``track_running_stats=False``, its running
    buffers None), so it normalises with the batch's statistics in training and eval and a
    torch.func transform (vmap, grad, per-sample gradients) has no buffer to update in place.
    In place; returns ``model``."""
    for module in model.modules():
        if getattr(module, "track_running_stats", False) is True:
            module.track_running_stats = False
            for name in _RUNNING_BUFFERS:
                if name in module._buffers:
                    module._buffers[name] = None
    return model


def find_norm_layers(model: nn.Module) -> list[NormLayer]:
    """The model's normalisation layers, in module order.

    A module is a norm layer if it is an instance of a registered class (exact type first, then
    subclass) or if it holds ``running_mean`` and ``running_var`` tensors (a foreign BatchNorm).
    """
    classes = _registered_classes()
    layers = []
    for name, module in model.named_modules():
        spec = classes.get(type(module))
        if spec is None:
            spec = next((s for c, s in classes.items() if isinstance(module, c)), None)
        running = _has_running_stats(module)
        if spec is None and not running:
            continue
        uses_batch = spec.uses_batch_stats if spec is not None else True
        per_instance = spec is not None and spec.needs_spatial and not spec.uses_batch_stats
        layers.append(NormLayer(name, module, spec, uses_batch, running, per_instance))
    return layers


def uses_batch_stats_in_eval(model: nn.Module) -> bool:
    """Whether some norm layer of ``model`` normalises with batch statistics even in eval mode: a
    batch-statistics layer (registered with ``uses_batch_stats``, or a torch BatchNorm) without
    running statistics (``track_running_stats=False``)."""
    classes = _batch_stats_classes_for(tuple(list_norms()))
    return any(
        isinstance(m, classes)
        and (not getattr(m, "track_running_stats", True) or not _has_running_stats(m))
        for m in model.modules()
    )


def set_norm_mode(model: nn.Module, layers: list[NormLayer], *, norm_training: bool) -> None:
    """Everything in eval mode (dropout off) except the norm layers, which get ``norm_training``."""
    for m in model.modules():
        m.training = False
    for layer in layers:
        layer.module.training = norm_training


def volatile_state(layers: list[NormLayer]) -> VolatileState:
    """Buffers and tensor/scalar attributes of the norm layers (what a forward may change)."""
    saved: VolatileState = []
    for layer in layers:
        m = layer.module
        for key, buf in m._buffers.items():
            if buf is not None:
                saved.append((m, "buffer:" + key, buf.detach().clone()))
        for key, value in vars(m).items():
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                saved.append((m, "attr:" + key, value.detach().clone()))
            elif isinstance(value, _SCALAR_TYPES) and key != "training":
                saved.append((m, "attr:" + key, value))
    return saved


def restore_volatile(saved: VolatileState) -> None:
    """Put back what :func:`volatile_state` saved (in place where the shape still matches)."""
    with torch.no_grad():
        for m, key, value in saved:
            kind, name = key.split(":", 1)
            if kind == "buffer":
                m._buffers[name].copy_(value)  # type: ignore[union-attr]
            elif isinstance(value, Tensor):
                current = getattr(m, name, None)
                if isinstance(current, Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    setattr(m, name, value.clone())
            else:
                setattr(m, name, value)


@contextmanager
def preserved_state(
    model: nn.Module, layers: list[NormLayer] | None = None
) -> Iterator[VolatileState]:
    """Context manager: on exit, the model's full state is bitwise what it was on entry.

    Restores every parameter and buffer (``state_dict``, including ``num_batches_tracked``), the
    tensor/scalar attributes of the norm layers (Batch Renorm's clip fractions, step counters) and
    every module's training flag. Yields the saved volatile state of the norm layers, which
    :func:`restore_volatile` puts back between forwards.
    """
    layers = find_norm_layers(model) if layers is None else layers
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    volatile = volatile_state(layers)
    flags = {m: m.training for m in model.modules()}
    try:
        yield volatile
    finally:
        with torch.no_grad():
            current = model.state_dict()
            for key, value in state.items():
                current[key].copy_(value)
        restore_volatile(volatile)
        for m, flag in flags.items():
            m.training = flag


def frozen_forward(model: nn.Module, x: Tensor, volatile: VolatileState | None) -> Tensor:
    """One forward under no_grad; restores the norm layers' buffers/attributes afterwards."""
    with torch.no_grad():
        out = model(x)
    if volatile is not None:
        restore_volatile(volatile)
    return out
