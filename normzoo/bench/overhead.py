"""The cost of normalising: one training step of each model with each layer, against no norm.

One step = ``zero_grad; loss = cross_entropy(model(x), y); loss.backward(); opt.step()`` with
``SGD(lr=0.01, momentum=0.9)``, on a fixed random batch, in training mode. Per (device, model,
batch size) every layer's model and the ``none`` model (the same net with the identity where the
norm goes) are timed interleaved (:func:`~normzoo.bench.timing.time_interleaved`), so a row's
ratio is the median over repeats of (layer step time / no-norm step time) with the IQR of those
per-repeat ratios. Memory: the bytes autograd saves for backward in one forward + loss
(:func:`~normzoo.bench.memory.saved_tensor_bytes`), and on CUDA the peak allocated bytes of a
step (``torch.cuda.max_memory_allocated``; CPU has no such counter). Each layer gets the options of its
shipped ``conf/norm/<name>.yaml``, as in a study.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn

from normzoo.bench.measure import ratio_spread
from normzoo.bench.memory import saved_tensor_bytes
from normzoo.bench.timing import Step, sync, time_interleaved
from normzoo.config.options import norm_layer_options
from normzoo.models import build_model, check_batch_size, count_parameters
from normzoo.registry import get_norm, list_norms

__all__ = ["OVERHEAD_COLUMNS", "OVERHEAD_MODELS", "OverheadConfig", "run_overhead"]

#: the models as the shipped ``conf/model/<name>.yaml`` define them, and the input they get:
#: mlp and cnn on digits-sized images (1x8x8, 10 classes), resnet on CIFAR-sized ones (3x32x32)
OVERHEAD_MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp": ({"name": "mlp", "widths": [128, 128, 128]}, (1, 8, 8)),
    "cnn": (
        {
            "name": "cnn",
            "channels": [16, 32, 32],
            "strides": [1, 2, 2],
            "kernel_size": 3,
            "head": "flatten",
            "hidden": [],
        },
        (1, 8, 8),
    ),
    "resnet": ({"name": "resnet", "arch": "resnet18", "zero_init_residual": False}, (3, 32, 32)),
}
NUM_CLASSES = 10

OVERHEAD_COLUMNS: tuple[str, ...] = (
    "device", "model", "input", "batch_size", "layer", "kind", "params", "params_none", "threads", "repeats",
    "none_ms", "layer_ms", "ratio", "ratio_q1", "ratio_q3", "ratio_min", "ratio_max",
    "saved_bytes_none", "saved_bytes_layer", "bytes_ratio", "peak_bytes_none", "peak_bytes_layer",
    "peak_ratio", "error",
)  # fmt: skip


@dataclass
class OverheadConfig:
    """What ``normzoo-bench --overhead`` measures."""

    devices: list[str] = field(default_factory=lambda: ["cpu"])
    models: list[str] = field(default_factory=lambda: ["mlp", "cnn"])
    batch_sizes: list[int] = field(default_factory=lambda: [8, 128])
    #: registry names; None: every entry but ``none`` (from-scratch and torch's own)
    norms: list[str] | None = None
    repeats: int = 20
    warmup: int = 3
    min_time: float = 0.02
    threads: int | None = 1
    seed: int = 0
    quick: bool = False
    #: model settings and input shape per model name (default :data:`OVERHEAD_MODELS`)
    model_specs: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = field(
        default_factory=lambda: dict(OVERHEAD_MODELS)
    )


def conf_dir() -> Path | None:
    """The shipped Hydra config folder (package data, or a checkout's ``conf/``), if any."""
    root = Path(__file__).resolve().parent.parent
    return next((d for d in (root / "conf", root.parent / "conf") if (d / "norm").is_dir()), None)


def shipped_options(layer: str) -> dict[str, Any]:
    """The layer options of ``conf/norm/<layer>.yaml`` (what a study trains with, e.g. GroupNorm's
    ``num_groups: 8``), or none when no config ships for it."""
    folder = conf_dir()
    path = folder / "norm" / f"{layer}.yaml" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    node = OmegaConf.load(path)
    with open_dict(node):
        node.pop("defaults", None)
    # what a run's layer gets from this node (not the loop's keys, e.g. WeightNorm's data_init)
    return norm_layer_options(OmegaConf.create({"norm": node}))


@dataclass
class _Contender:
    layer: str
    model: nn.Module | None
    step: Step | None
    forward: Callable[[], torch.Tensor] | None
    error: str = ""


def _contender(layer: str, spec: dict[str, Any], shape: tuple[int, ...], x: torch.Tensor,
               y: torch.Tensor, seed: int) -> _Contender:  # fmt: skip
    """The model with ``layer``, its training step and its forward + loss (or why it cannot be)."""
    torch.manual_seed(seed)
    try:
        options = shipped_options(layer)
        model = build_model(OmegaConf.create(spec), layer, options, shape, NUM_CLASSES)
        check_batch_size(model, layer, shape, int(x.shape[0]))
    except Exception as exc:  # an invalid combination is a row, not a crash
        return _Contender(layer, None, None, None, f"{type(exc).__name__}: {exc}"[:300])
    model = model.to(x.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    return _Contender(layer, model, step, forward)


def _peak_bytes(c: _Contender, device: torch.device) -> float:
    if device.type != "cuda" or c.step is None:
        return math.nan
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    c.step()
    sync(device)
    return float(torch.cuda.max_memory_allocated(device))


def _layers(config: OverheadConfig) -> list[str]:
    """The layers to measure; by default each from-scratch entry followed by torch's own twin."""
    if config.norms is not None:
        return [get_norm(n).name for n in config.norms if get_norm(n).name != "none"]
    names: list[str] = []
    for name in list_norms(references=False):
        native = get_norm(name).native
        names += [name, *([get_norm(native).name] if native else [])]
    names += [n for n in list_norms() if n not in names]
    return [n for n in names if n != "none"]


def _measure_group(config: OverheadConfig, device: str, model_name: str, batch: int) -> list[dict[str, Any]]:  # fmt: skip
    """One row per layer for one (device, model, batch size), all timed interleaved with none."""
    spec, shape = config.model_specs[model_name]
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn((batch, *shape), generator=gen).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(dev)
    contenders = [_contender(n, spec, shape, x, y, config.seed) for n in ["none", *_layers(config)]]
    saved = [saved_tensor_bytes(c.forward) if c.forward else math.nan for c in contenders]
    peaks = [_peak_bytes(c, dev) for c in contenders]
    times, _ = time_interleaved([c.step for c in contenders], repeats=config.repeats,
                                warmup=config.warmup, min_time=config.min_time, device=dev)  # fmt: skip
    rows, none = [], contenders[0]
    for c, ts, nbytes, peak in list(zip(contenders, times, saved, peaks, strict=True))[1:]:
        spread = ratio_spread([a / b for a, b in zip(ts, times[0], strict=False)])
        rows.append({
            "device": dev.type, "model": model_name, "input": "x".join(map(str, shape)),
            "batch_size": batch, "layer": c.layer, "kind": get_norm(c.layer).kind,
            "params": count_parameters(c.model) if c.model is not None else math.nan,
            "params_none": count_parameters(none.model) if none.model is not None else math.nan,
            "threads": torch.get_num_threads(), "repeats": config.repeats,
            "none_ms": 1e3 * statistics.median(times[0]),
            "layer_ms": 1e3 * statistics.median(ts) if ts else math.nan,
            "ratio": spread["paired_ratio"], "ratio_q1": spread["ratio_q1"],
            "ratio_q3": spread["ratio_q3"], "ratio_min": spread["ratio_min"],
            "ratio_max": spread["ratio_max"], "saved_bytes_none": saved[0],
            "saved_bytes_layer": nbytes, "bytes_ratio": nbytes / saved[0],
            "peak_bytes_none": peaks[0], "peak_bytes_layer": peak, "peak_ratio": peak / peaks[0],
            "error": c.error,
        })  # fmt: skip
    return rows


def run_overhead(config: OverheadConfig, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:  # fmt: skip
    """Every (device, model, batch size, layer) row of ``config``; one progress line per group."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    unknown = [m for m in config.models if m not in config.model_specs]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(config.model_specs)}")
    rows: list[dict[str, Any]] = []
    groups = [(d, m, b) for d in config.devices for m in config.models for b in config.batch_sizes]
    for i, (dev, model, batch) in enumerate(groups, 1):
        rows += _measure_group(config, dev, model, batch)
        log(f"[{i}/{len(groups)}] {dev} {model} batch {batch}: none step "
            f"{rows[-1]['none_ms']:.3f} ms")  # fmt: skip
    return [{c: r.get(c, math.nan) for c in OVERHEAD_COLUMNS} for r in rows]
