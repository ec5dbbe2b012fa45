"""Where a run trains and how torch is set up for it: the device, threads, determinism."""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig

from normzoo.errors import ConfigError

__all__ = ["configure_torch", "resolve_device", "resolved_device_type"]


def resolve_device(name: Any) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a :class:`ConfigError`."""
    name = getattr(name, "name", name)  # the Device enum or a plain string
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda but no CUDA GPU is visible to torch (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}); use device=cpu or "
            "device=auto"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: allowed auto, cpu, cuda")
    return torch.device(name)


def resolved_device_type(cfg: DictConfig) -> str | None:
    """The device type a run of ``cfg`` uses, or None if it cannot run here."""
    try:
        return resolve_device(cfg.device).type
    except ConfigError:
        return None


def configure_torch(cfg: DictConfig, device: torch.device) -> None:
    """Threads (``threads``; 0 = torch's default) and, on a GPU, deterministic kernels."""
    if int(cfg.threads) > 0:
        torch.set_num_threads(int(cfg.threads))
    if device.type == "cuda":  # CPU kernels are deterministic at a fixed thread count already
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(bool(cfg.train.deterministic), warn_only=True)
        torch.backends.cudnn.benchmark = not bool(cfg.train.deterministic)
