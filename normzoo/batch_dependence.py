"""How far one sample's output depends on the rest of its batch (``batch_dependence``).

For a probe test sample x and two batches B1, B2 that hold x plus ``batch_size - 1`` different
random training samples each, with the norm layers in training mode::

    batch_dependence = mean_x ||f(x|B1) - f(x|B2)|| / (0.5 (||f(x|B1)|| + ||f(x|B2)||))

``batch_dependence_floor`` is the same on the first :data:`FLOOR_PROBES` probes' batches in eval
mode, where no layer depends on its companions mathematically: the numerical floor of batched float
arithmetic. Each norm layer's own output gets the same measurement (the per-layer rows of
:func:`normzoo.diagnostics.run_diagnostics`). Probe batches go through a few grouped forwards where
the layers allow (:func:`normzoo.batched.grouped_forward`), else one by one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normzoo import batched
from normzoo.batched import grouped_forward
from normzoo.layers import NormLayer, VolatileState, frozen_forward, set_norm_mode

__all__ = ["FLOOR_PROBES", "PROBE_BUDGET", "dependence_and_floor"]

#: batch dependence probes at most PROBE_BUDGET // batch_size samples (but >= 16)
PROBE_BUDGET = 4096
#: probes of the eval-mode (numerical floor) measurement
FLOOR_PROBES = 16


def dependence_and_floor(
    model: nn.Module,
    layers: list[NormLayer],
    data: Any,
    batch_size: int,
    probe_samples: int,
    gen: torch.Generator,
    volatile: VolatileState,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Batch dependence (train mode) and its numerical floor (eval mode) on the same probe
    batches. Cost: 2 forwards of ``batch_size`` per probe, so large batches get fewer probes."""
    n_test = data.test_x.shape[0]
    n_probes = min(probe_samples, max(16, PROBE_BUDGET // batch_size), n_test)
    probes = torch.randperm(n_test, generator=gen)[:n_probes]
    state = gen.get_state()
    dep, dep_layers = _batch_dependence(
        model, layers, data, batch_size, probes, gen, volatile, norm_training=True
    )
    gen.set_state(state)  # the floor re-uses the first probes' batches exactly
    floor, _ = _batch_dependence(
        model, layers, data, batch_size, probes[:FLOOR_PROBES], gen, volatile, norm_training=False
    )
    result = {
        "batch_dependence": dep,
        "batch_dependence_floor": floor,
        "probe_samples": int(probes.numel()),
    }
    return result, dep_layers


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
    activation_layers = [layer for layer in layers if not layer.is_weight_norm]
    set_norm_mode(model, layers, norm_training=norm_training)
    # drawn per probe, so a prefix of the probes gets the same companions from the same seed
    pairs = [
        [torch.randperm(n_train, generator=gen)[:companions] for _ in range(2)] for _ in probes
    ]
    size = companions + 1
    outs: list[Tensor] = []
    captured: list[dict[str, Tensor]] = []
    for rep in range(2):
        batches = [
            torch.cat([data.test_x[p : p + 1], data.train_x[pair[rep].to(data.train_x.device)]])
            for p, pair in zip(probes.tolist(), pairs, strict=True)
        ]
        got, layer_out = _probe_outputs(model, layers, activation_layers, batches, size, volatile)
        outs.append(got)
        captured.append(layer_out)
    total = _relative_change(outs[0], outs[1]).mean().item()
    per_layer = {
        name: _relative_change(first, captured[1][name]).mean().item()
        for name, first in captured[0].items()
        if name in captured[1] and first.shape == captured[1][name].shape
    }
    return total, per_layer


def _probe_outputs(
    model: nn.Module,
    layers: list[NormLayer],
    hooked: list[NormLayer],
    batches: list[Tensor],
    size: int,
    volatile: list,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Each batch's first row of the output and of every hooked layer's output: the batches in a
    few grouped forwards where the layers allow (:func:`grouped_forward`), else one by one."""
    stride = size if len(batches) > 1 and batched.ghost_sizes(layers, size) is not None else None
    captured: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def fn(_: nn.Module, __: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() >= 1:
                rows = out[::stride] if stride else out[:1]
                captured.setdefault(name, []).append(rows.detach())

        return fn

    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in hooked]
    try:
        if stride:
            out = grouped_forward(model, layers, torch.cat(batches), size, volatile)
            assert out is not None
            firsts = out[::size]
        else:
            firsts = torch.cat([frozen_forward(model, xb, volatile)[:1] for xb in batches])
    finally:
        for h in handles:
            h.remove()
    return firsts, {name: torch.cat(rows) for name, rows in captured.items()}
