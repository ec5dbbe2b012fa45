"""Train/inference mismatch diagnostics, computed at the end of every run.

A layer that normalises with batch statistics (BatchNorm, Batch Renorm) computes different functions
in training (statistics of the current batch) and at inference (running EMA statistics). This module
measures that mismatch on the test set, the same way for every layer, so that layers without batch
statistics are *measured* to have none rather than assumed to:

* ``test_error_ema`` / ``test_loss_ema`` — eval mode: every norm layer uses its running (EMA)
  statistics (in batches of ``eval_batch_size``: eval-mode outputs do not depend on the batch; a
  layer without running statistics normalises with those of the test batches, of the training
  batch size). Named apart from a run's own ``test_error``/``test_loss`` (``normzoo.train``'s
  evaluation after the last epoch), which these never replace: the two agree (up to float
  rounding) when every layer has running statistics, and are two measurements where eval mode
  still depends on the batch composition (this one uses shuffled test batches, ``seed``).
* ``test_error_batch_stats`` / ``test_loss_batch_stats`` — the norm layers in training mode, i.e.
  normalising with the statistics of test batches of the training batch size. Nothing is learnt: the
  forward runs under ``no_grad`` and every buffer is restored after each batch.
* ``test_error_precise`` / ``test_loss_precise`` — PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch'
  in BatchNorm", arXiv:2105.07576): the running statistics are replaced by population statistics
  recomputed over >= ``precise_samples`` training samples in batches of the training batch size,
  size-weighted: ``mu_pop = E[mu_B]``, ``var_pop = E[mu_B^2 + var_B] - mu_pop^2``; then eval mode.
  The original buffers are restored afterwards. Up to ``GHOST_SAMPLES`` samples (whole batches)
  go through one forward, each batch normalised on its own (:func:`population_stats`).
* ``kl_batch_vs_ema`` — mean over test samples of ``KL(p_batch || p_ema)`` between the two predictive
  distributions (nats).
* ``batch_dependence`` — how far one sample's output moves when its batch companions are replaced:
  mean over probe samples x of ``||f(x|B1) - f(x|B2)|| / (0.5 (||f(x|B1)|| + ||f(x|B2)||))`` where
  B1, B2 hold x plus ``batch_size - 1`` different random training samples, norm layers in training
  mode. ``batch_dependence_floor`` is the same measurement in eval mode, where no layer depends on its
  companions mathematically: it is the numerical floor of batched float arithmetic (usually exactly 0
  on CPU, since a matmul's row does not depend on the other rows). A layer has no measurable batch
  dependence when ``batch_dependence <= batch_dependence_floor``; both are reported, raw.
* ``ema_mean_gap`` / ``ema_log_std_gap`` — over the layers with running statistics, the mean over
  channels of ``|mu_ema - mu_pop| / sigma_pop`` and ``|log(sigma_ema / sigma_pop)|`` with
  ``sigma = sqrt(var + eps)`` (the layer's own eps, as it divides by it), averaged over layers.
* ``brn_clip_r`` / ``brn_clip_d`` — mean over Batch Renorm layers of the fraction of r and d clipped
  in the last training step (``None`` without Batch Renorm).

Norm layers are found through the registry (instances of the registered classes) and, for foreign
layers such as ``nn.BatchNorm2d``, by their ``running_mean``/``running_var`` buffers. Only norm layers
are switched to training mode for the batch-statistics forwards; dropout and the like stay in eval
mode. The model's parameters, buffers, tensor/scalar attributes of its norm layers and the training
flags of all its modules are bitwise unchanged afterwards.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo.registry import NormSpec, get_norm, list_norms

__all__ = [
    "NormLayer",
    "find_norm_layers",
    "population_stats",
    "preserved_state",
    "run_diagnostics",
]

_SCALAR_TYPES = (bool, int, float)
#: batch dependence probes at most PROBE_BUDGET // batch_size samples (but >= 16)
PROBE_BUDGET = 4096
#: probes of the eval-mode (numerical floor) measurement
FLOOR_PROBES = 16


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


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    )


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


def _volatile_state(layers: list[NormLayer]) -> list[tuple[nn.Module, str, Any]]:
    """Buffers and tensor/scalar attributes of the norm layers (what a forward may change)."""
    saved: list[tuple[nn.Module, str, Any]] = []
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


def _restore_volatile(saved: list[tuple[nn.Module, str, Any]]) -> None:
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
) -> Iterator[list[tuple[nn.Module, str, Any]]]:
    """Context manager: on exit, the model's full state is bitwise what it was on entry.

    Restores every parameter and buffer (``state_dict``, including ``num_batches_tracked``), the
    tensor/scalar attributes of the norm layers (Batch Renorm's clip fractions, step counters) and
    every module's training flag. Yields the saved volatile state of the norm layers, which
    ``_restore_volatile`` puts back between forwards.
    """
    layers = find_norm_layers(model) if layers is None else layers
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    volatile = _volatile_state(layers)
    flags = {m: m.training for m in model.modules()}
    try:
        yield volatile
    finally:
        with torch.no_grad():
            current = model.state_dict()
            for key, value in state.items():
                current[key].copy_(value)
        _restore_volatile(volatile)
        for m, flag in flags.items():
            m.training = flag


def _set_mode(model: nn.Module, layers: list[NormLayer], *, norm_training: bool) -> None:
    """Everything in eval mode except the norm layers, which get ``norm_training``."""
    for m in model.modules():
        m.training = False
    for layer in layers:
        layer.module.training = norm_training


def _forward(
    model: nn.Module, x: Tensor, volatile: list[tuple[nn.Module, str, Any]] | None
) -> Tensor:
    """One forward under no_grad; restores the norm layers' buffers/attributes afterwards."""
    with torch.no_grad():
        out = model(x)
    if volatile is not None:
        _restore_volatile(volatile)
    return out


def _chunks(order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, int]]:
    """Batches of exactly ``batch_size`` indices covering ``order`` once.

    The last, partial batch is filled up with samples from the start of ``order`` so that every
    sample is evaluated in a batch of the training batch size (a last batch of 1 sample would have
    no batch statistics at all). Yields (indices, k): only the first k entries are new samples.
    """
    n = order.numel()
    size = min(batch_size, n)
    for start in range(0, n, size):
        idx = order[start : start + size]
        k = idx.numel()
        if k < size:
            idx = torch.cat([idx, order[: size - k]])
        yield idx, k


def _logits(
    model: nn.Module, x: Tensor, order: Tensor, batch_size: int, volatile: list | None
) -> Tensor:
    """Logits of every sample of ``x`` (in the original order), evaluated in shuffled batches."""
    out: Tensor | None = None
    for idx, k in _chunks(order, batch_size):
        logits = _forward(model, x[idx], volatile)[:k]
        if out is None:
            out = logits.new_empty((x.shape[0], *logits.shape[1:]))
        out[idx[:k]] = logits
    assert out is not None
    return out


def _error_and_loss(logits: Tensor, y: Tensor) -> tuple[float, float]:
    logits = logits.float()
    err = (logits.argmax(dim=1) != y).float().mean().item()
    loss = F.cross_entropy(logits, y).item()
    return err, loss


def _reduce_dims(x: Tensor, per_instance: bool) -> tuple[int, ...]:
    return tuple(range(2, x.dim())) if per_instance else (0, *range(2, x.dim()))


def _draw(n: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` indices into range(n): successive seeded permutations, concatenated."""
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))]
    return torch.cat(perms)[:count]


#: PreciseBN puts up to this many samples (whole batches of the batch size) through one forward
GHOST_SAMPLES = 512
#: the per-channel tensors of a batch-statistics layer that its widened copy repeats G times
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _widenable(module: nn.Module) -> bool:
    """Whether ``module`` normalises per channel over (N, *S) with per-channel state only:
    normzoo's BatchNorm (and Batch Renorm), its native reference, torch's BatchNorm1d/2d/3d --
    and has no hooks of its own (a widened copy would call them with (B, G * C, *S) input, or
    skip them: either way not what their owner registered them for)."""
    from normzoo.norms.batch import BatchNorm
    from normzoo.norms.native import NativeBatchNorm

    if not isinstance(module, BatchNorm | NativeBatchNorm | nn.modules.batchnorm._BatchNorm):
        return False
    if (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    ):
        return False
    if isinstance(module, nn.SyncBatchNorm | nn.modules.lazy.LazyModuleMixin):
        return False
    c = getattr(module, "num_features", None)
    return isinstance(c, int) and all(
        getattr(module, key, None) is None or tuple(getattr(module, key).shape) == (c,)
        for key in _PER_CHANNEL
    )


class _GhostBatches(nn.Module):
    """Normalises G batches of ``size`` samples, stacked along dim 0, each with its own statistics:
    (G * size, C, *S) is rearranged to (size, G * C, *S) for a fresh copy of the layer whose
    per-channel tensors are repeated G times, and back. (Fresh for every forward: a training
    forward updates the copy's running statistics, which Batch Renorm's output depends on.)"""

    def __init__(self, layer: nn.Module, size: int) -> None:
        super().__init__()
        self.size = size
        self._layer = (layer,)  # (a tuple: not registered as a submodule)

    def forward(self, x: Tensor) -> Tensor:
        layer = self._layer[0]
        g, c = x.shape[0] // self.size, x.shape[1]
        wide = copy.deepcopy(layer)
        with torch.no_grad():
            for key in _PER_CHANNEL:
                t = getattr(wide, key, None)
                if t is not None:
                    t.data = t.data.repeat(g)
        wide.num_features = g * c
        spatial = x.shape[2:]
        xw = x.reshape(g, self.size, c, *spatial).transpose(0, 1)
        y = wide(xw.reshape(self.size, g * c, *spatial))
        return y.reshape(self.size, g, c, *spatial).transpose(0, 1).reshape(x.shape)


@contextmanager
def _ghost_batches(
    model: nn.Module, layers: list[NormLayer], size: int
) -> Iterator[dict[str, nn.Module] | None]:
    """Swap every batch-statistics layer of ``model`` for a :class:`_GhostBatches` wrapper for the
    duration; yields ``{layer name: the module now in its place}``, or None (nothing swapped) when
    a batch-statistics layer cannot be widened, is the model itself or appears twice."""
    batch = [layer for layer in layers if layer.uses_batch_stats]
    everywhere = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    if (
        size < 1
        or not batch
        or any(not layer.name or not _widenable(layer.module) for layer in batch)
        or any(everywhere.count(id(layer.module)) != 1 for layer in batch)
    ):
        yield None
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for layer in batch:
            parent_name, _, attr = layer.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attr, layer.module))
            setattr(parent, attr, _GhostBatches(layer.module, size))
        yield {
            layer.name: model.get_submodule(layer.name) if layer.uses_batch_stats else layer.module
            for layer in layers
        }
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)


def population_stats(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int,
    num_samples: int | None = None,
    seed: int = 0,
    layers: list[NormLayer] | None = None,
    ghost: bool = True,
) -> dict[str, tuple[Tensor, Tensor, int]]:
    """PreciseBN population statistics of every layer with running statistics.

    Runs the model frozen (``no_grad``, buffers restored after every batch) with its norm layers in
    training mode — so each layer sees the activations it sees in training — over
    ``ceil(num_samples / batch_size)`` batches of exactly ``batch_size`` training samples drawn from
    seeded permutations of ``x`` (the whole set once when ``num_samples == len(x)`` is a multiple of
    the batch size), and combines the per-batch statistics size-weighted (REFERENCES.md)::

        mu_pop = sum_B n_B mu_B / sum_B n_B
        var_pop = sum_B n_B (mu_B^2 + var_B) / sum_B n_B - mu_pop^2     (var_B biased)

    which is exactly the mean and (biased) variance over all M values seen per channel. Returned as
    ``{layer name: (mean, unbiased variance = var_pop * M / (M - 1), M)}``, matching the convention of
    ``running_var``. Layers whose running statistics average per-instance statistics (InstanceNorm
    with ``track_running_stats``) get the mean of the per-instance means and unbiased variances.
    The model's state is unchanged afterwards.

    With ``ghost=True`` (default) up to ``GHOST_SAMPLES // batch_size`` batches go through the
    model in one forward, each batch-statistics layer replaced for the pass by a widened copy that
    normalises them separately (:func:`_ghost_batches`): the same statistics, to float rounding,
    in far fewer forwards (2048 batches of 2 samples become 8 forwards). Models with a
    batch-statistics layer that cannot be widened take one forward per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = find_norm_layers(model) if layers is None else layers
    running = [layer for layer in layers if layer.has_running_stats]
    n = x.shape[0]
    size = min(batch_size, n)
    count = n if num_samples is None else max(int(num_samples), 1)
    count = math.ceil(count / size) * size
    gen = torch.Generator().manual_seed(seed)
    order = _draw(n, count, gen).to(x.device)

    sums: dict[str, list[Any]] = {}

    def hook(name: str, per_instance: bool):
        def fn(_: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach()
            # per-batch statistics in the input's precision, accumulated in float64
            if per_instance:  # one (mu, unbiased var) per (sample, channel), averaged
                dims = _reduce_dims(a, per_instance)
                m = math.prod(a.shape[d] for d in dims)
                var, mu = torch.var_mean(a, dim=dims, correction=1 if m > 1 else 0)
                s = sums.setdefault(name, [0, 0.0, 0.0])
                s[0] += mu.shape[0]
                s[1] = s[1] + mu.double().sum(0)
                s[2] = s[2] + var.double().sum(0)
                return
            # (G * size, C, *S) holds G batches of `size` (G = 1 without ghost batches)
            a = a.reshape(a.shape[0] // size, size, *a.shape[1:])
            dims = (1, *range(3, a.dim()))
            m = math.prod(a.shape[d] for d in dims)
            var_b, mu_b = (t.double() for t in torch.var_mean(a, dim=dims, correction=0))
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += m * a.shape[0]
            s[1] = s[1] + m * mu_b.sum(0)
            s[2] = s[2] + m * (mu_b**2 + var_b).sum(0)

        return fn

    widened = _ghost_batches(model, layers, size) if ghost else nullcontext(None)
    with preserved_state(model, layers) as volatile, widened as wide:
        per_forward = size if wide is None else size * max(1, GHOST_SAMPLES // size)
        hooked = wide or {layer.name: layer.module for layer in layers}
        handles = [
            hooked[layer.name].register_forward_pre_hook(hook(layer.name, layer.per_instance))
            for layer in running
        ]
        try:
            _set_mode(model, layers, norm_training=True)
            for start in range(0, count, per_forward):
                _forward(model, x[order[start : start + per_forward]], volatile)
        finally:
            for h in handles:
                h.remove()

    out: dict[str, tuple[Tensor, Tensor, int]] = {}
    for layer in running:
        total, s1, s2 = sums[layer.name]
        buf = layer.module.running_mean
        if layer.per_instance:
            mean, var = s1 / total, s2 / total
        else:
            mean = s1 / total
            var = (s2 / total - mean**2).clamp_min(0.0)
            var = var * (total / (total - 1)) if total > 1 else var
        out[layer.name] = (mean.to(buf.dtype), var.to(buf.dtype), int(total))
    return out


def _relative_change(a: Tensor, b: Tensor) -> Tensor:
    """||a - b|| / (0.5 (||a|| + ||b||)) per row, 0 where both are 0."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    num = (a - b).norm(dim=1)
    den = 0.5 * (a.norm(dim=1) + b.norm(dim=1))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _batch_dependence(
    model: nn.Module,
    layers: list[NormLayer],
    data: Any,
    batch_size: int,
    probes: Tensor,
    gen: torch.Generator,
    volatile: list,
    *,
    norm_training: bool,
) -> tuple[float | None, dict[str, float]]:
    """Mean relative change of each probe's output (and of each norm layer's output for it)."""
    if batch_size < 2:
        return None, {}
    n_train = data.train_x.shape[0]
    companions = min(batch_size - 1, n_train)
    captured: dict[str, list[Tensor]] = {}
    activation_layers = [layer for layer in layers if not layer.is_weight_norm]

    def hook(name: str):
        def fn(_: nn.Module, __: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() >= 1:
                captured.setdefault(name, []).append(out[:1].detach())

        return fn

    _set_mode(model, layers, norm_training=norm_training)
    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in activation_layers]
    outs: list[list[Tensor]] = [[], []]
    try:
        # drawn per probe, so a prefix of the probes gets the same companions from the same seed
        pairs = [
            [torch.randperm(n_train, generator=gen)[:companions] for _ in range(2)] for _ in probes
        ]
        for rep in range(2):
            for p, pair in zip(probes.tolist(), pairs, strict=True):
                comp = pair[rep]
                idx = torch.cat([torch.tensor([p]), comp]).to(data.test_x.device)
                xb = torch.cat([data.test_x[idx[:1]], data.train_x[idx[1:]]])
                outs[rep].append(_forward(model, xb, volatile)[:1])
    finally:
        for h in handles:
            h.remove()
    total = _relative_change(torch.cat(outs[0]), torch.cat(outs[1])).mean().item()
    per_layer = {}
    k = probes.numel()
    for name, tensors in captured.items():
        if len(tensors) == 2 * k:
            per_layer[name] = (
                _relative_change(torch.cat(tensors[:k]), torch.cat(tensors[k:])).mean().item()
            )
    return total, per_layer


def _gaps(layer: NormLayer, mean_pop: Tensor, var_pop: Tensor) -> tuple[float, float]:
    eps = float(getattr(layer.module, "eps", 1e-5))
    mu_ema = layer.module.running_mean.double()
    var_ema = layer.module.running_var.double()
    sigma_pop = (var_pop.double() + eps).sqrt()
    mean_gap = ((mu_ema - mean_pop.double()).abs() / sigma_pop).mean().item()
    log_std_gap = (0.5 * ((var_ema + eps) / (var_pop.double() + eps)).log()).abs().mean().item()
    return mean_gap, log_std_gap


def _scalar(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value.detach().float().mean().item()) if value.numel() else None
    if isinstance(value, _SCALAR_TYPES):
        return float(value)
    return None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def run_diagnostics(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int,
    precise_samples: int = 4096,
    seed: int = 0,
    probe_samples: int = 64,
    eval_batch_size: int | None = None,
) -> dict[str, Any]:
    """Measure the train/inference mismatch of a trained classifier (see the module docstring).

    Args:
        model: maps ``data.test_x`` batches to logits of shape (N, num_classes).
        data: anything with ``train_x``, ``train_y``, ``test_x``, ``test_y`` tensors (on the model's
            device), e.g. :class:`normzoo.data.DataBundle`.
        batch_size: the training batch size (the normalisation batch size used throughout).
        precise_samples: PreciseBN uses at least this many training samples (rounded up to whole
            batches; the training set is cycled through in fresh permutations if it is smaller).
        seed: seeds the test-batch composition, the PreciseBN batches and the probe companions.
        probe_samples: at most this many test samples are probed for batch dependence (and at
            most ``max(16, PROBE_BUDGET // batch_size)``, since each costs two forwards of a
            full batch); the eval-mode floor uses the first ``FLOOR_PROBES`` of them.
        eval_batch_size: the batch size of the eval-mode passes (EMA and PreciseBN statistics),
            whose outputs do not depend on the batch (default: ``batch_size``). Ignored, i.e.
            ``batch_size`` is used, when a layer normalises with batch statistics even in eval
            mode (one without running statistics).

    Returns:
        A JSON-serialisable dict (floats, ints, None, a list of per-layer dicts).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if precise_samples < 1:
        raise ValueError(f"precise_samples must be >= 1, got {precise_samples!r}")
    if eval_batch_size is not None and (
        isinstance(eval_batch_size, bool)
        or not isinstance(eval_batch_size, int)
        or eval_batch_size < 1
    ):
        raise ValueError(f"eval_batch_size must be a positive int, got {eval_batch_size!r}")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        if not isinstance(getattr(data, key, None), Tensor):
            raise TypeError(f"data must have a tensor attribute {key!r} (e.g. a DataBundle)")
    n_test = data.test_x.shape[0]
    if n_test < 1 or data.train_x.shape[0] < 1:
        raise ValueError("run_diagnostics needs a non-empty training and test set")

    started = time.perf_counter()
    layers = find_norm_layers(model)
    running = [layer for layer in layers if layer.has_running_stats]
    eval_batch = eval_batch_size or batch_size
    if any(layer.uses_batch_stats and not layer.has_running_stats for layer in layers):
        eval_batch = batch_size  # eval mode still normalises with batch statistics
    gen = torch.Generator().manual_seed(seed)
    test_order = torch.randperm(n_test, generator=gen).to(data.test_x.device)
    x, y = data.test_x, data.test_y
    result: dict[str, Any] = {}

    with preserved_state(model, layers) as volatile:
        # (a) eval mode, EMA statistics (per-sample outputs, compared with (b) sample by sample)
        _set_mode(model, layers, norm_training=False)
        ema_logits = _logits(model, x, test_order, eval_batch, volatile)
        result["test_error_ema"], result["test_loss_ema"] = _error_and_loss(ema_logits, y)

        # (b) batch statistics at the training batch size
        _set_mode(model, layers, norm_training=True)
        batch_logits = _logits(model, x, test_order, batch_size, volatile)
        err, loss = _error_and_loss(batch_logits, y)
        result["test_error_batch_stats"], result["test_loss_batch_stats"] = err, loss
        lp_b = F.log_softmax(batch_logits.double(), dim=1)
        lp_e = F.log_softmax(ema_logits.double(), dim=1)
        result["kl_batch_vs_ema"] = (lp_b.exp() * (lp_b - lp_e)).sum(dim=1).mean().item()

        # (c) PreciseBN population statistics
        per_layer_gap: dict[str, tuple[float, float]] = {}
        if running:
            pop = population_stats(
                model,
                data.train_x,
                batch_size=batch_size,
                num_samples=precise_samples,
                seed=seed + 1,
                layers=layers,
            )
            for layer in running:
                per_layer_gap[layer.name] = _gaps(layer, pop[layer.name][0], pop[layer.name][1])
            with torch.no_grad():
                for layer in running:
                    layer.module.running_mean.copy_(pop[layer.name][0])
                    layer.module.running_var.copy_(pop[layer.name][1])
            _set_mode(model, layers, norm_training=False)
            precise_logits = _logits(model, x, test_order, eval_batch, None)
            _restore_volatile(volatile)  # the EMA buffers back
            used = math.ceil(precise_samples / min(batch_size, data.train_x.shape[0]))
            result["precise_samples"] = used * min(batch_size, data.train_x.shape[0])
        else:  # nothing to recompute: eval mode is already "precise"
            precise_logits = ema_logits
            result["precise_samples"] = 0
        err, loss = _error_and_loss(precise_logits, y)
        result["test_error_precise"], result["test_loss_precise"] = err, loss

        # batch dependence (train mode) and its numerical floor (eval mode), same probe batches
        # cost: 2 forwards of batch_size per probe, so large batches get fewer probes
        n_probes = min(probe_samples, max(16, PROBE_BUDGET // batch_size), n_test)
        probes = torch.randperm(n_test, generator=gen)[:n_probes]
        state = gen.get_state()
        dep, dep_layers = _batch_dependence(
            model, layers, data, batch_size, probes, gen, volatile, norm_training=True
        )
        gen.set_state(state)  # the floor re-uses the first probes' batches exactly
        floor, _ = _batch_dependence(
            model,
            layers,
            data,
            batch_size,
            probes[:FLOOR_PROBES],
            gen,
            volatile,
            norm_training=False,
        )
        result["batch_dependence"] = dep
        result["batch_dependence_floor"] = floor
        result["probe_samples"] = int(probes.numel())

    brn = [layer for layer in layers if hasattr(layer.module, "clip_fraction_r")]
    result["brn_clip_r"] = _mean([_scalar(layer.module.clip_fraction_r) for layer in brn])
    result["brn_clip_d"] = _mean(
        [_scalar(getattr(layer.module, "clip_fraction_d", None)) for layer in brn]
    )
    result["ema_mean_gap"] = _mean([g[0] for g in per_layer_gap.values()])
    result["ema_log_std_gap"] = _mean([g[1] for g in per_layer_gap.values()])
    result["layers"] = [
        {
            "name": layer.name,
            "class": type(layer.module).__name__,
            "norm": layer.spec.name if layer.spec is not None else None,
            "uses_batch_stats": layer.uses_batch_stats,
            "has_running_stats": layer.has_running_stats,
            "mean_gap": per_layer_gap.get(layer.name, (None, None))[0],
            "log_std_gap": per_layer_gap.get(layer.name, (None, None))[1],
            "batch_dependence": dep_layers.get(layer.name),
            "clip_fraction_r": _scalar(getattr(layer.module, "clip_fraction_r", None)),
            "clip_fraction_d": _scalar(getattr(layer.module, "clip_fraction_d", None)),
            "rmax": _scalar(getattr(layer.module, "current_rmax", None)),
            "dmax": _scalar(getattr(layer.module, "current_dmax", None)),
        }
        for layer in layers
    ]
    result["num_norm_layers"] = len(layers)
    result["diagnostics_batch_size"] = batch_size
    result["diagnostics_eval_batch_size"] = eval_batch
    result["diagnostics_seconds"] = time.perf_counter() - started
    return result
