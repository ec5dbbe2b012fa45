"""A run's ``checkpoint.pt`` (``train.checkpoint=auto|true|false``; ``auto``: on for every data set
but the small embedded ones (:data:`SMALL_DATASETS`), and for any run longer than :data:`AUTO_CHECKPOINT_STEPS` steps).

At the end of every epoch the run writes ``checkpoint.pt`` atomically into its dir: model,
optimizer, the global step (the lr schedule and Batch Renorm's progress follow from it), the
epoch-order generator and torch's RNG states, the curves so far and the training time. Started
again, it continues after the last saved epoch; the final metrics equal an uninterrupted run's
bitwise on CPU (timings aside). A checkpoint written for another config (its
:func:`normzoo.config.identity.comparable_config`) is ignored. It is deleted when the run ends
``ok``, ``invalid`` or ``diverged``, and kept when it ``failed``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from normzoo.files import atomic_open

if TYPE_CHECKING:
    from normzoo.run.loop import FitState

__all__ = [
    "AUTO_CHECKPOINT_STEPS",
    "CHECKPOINT_FILE",
    "MODEL_FILE",
    "SMALL_DATASETS",
    "load_checkpoint",
    "load_model_file",
    "save_checkpoint",
    "save_model",
    "use_checkpoint",
]

log = logging.getLogger("normzoo.train")

CHECKPOINT_FILE = "checkpoint.pt"
#: train.checkpoint=auto saves checkpoints for runs longer than this many optimizer steps
AUTO_CHECKPOINT_STEPS = 20_000
#: data sets whose runs take seconds: ``auto`` keeps no checkpoint for them (unless long)
SMALL_DATASETS = ("digits", "digits_hard")


def use_checkpoint(cfg: DictConfig, total_steps: int) -> bool:
    """Whether a run of ``total_steps`` steps keeps a checkpoint (``train.checkpoint``)."""
    setting = cfg.train.get("checkpoint", "auto")
    if setting == "auto":
        return str(cfg.data.name) not in SMALL_DATASETS or total_steps > AUTO_CHECKPOINT_STEPS
    return bool(setting)


def save_checkpoint(
    path: Path,
    identity: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    epoch: int,
    state: FitState,
) -> None:
    """Everything the next epoch depends on, written to a temp file and renamed over ``path``."""
    payload = {
        "format": 1,
        "config": json.dumps(identity, sort_keys=True),
        "epoch": epoch,
        "step": state.steps,
        "train_time_s": state.train_time_s,
        "eval_time_s": state.eval_time_s,
        "curves": json.dumps(state.curves, allow_nan=True),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists, loads, and was written for ``identity``."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved["curves"] = json.loads(saved["curves"])
        same = json.loads(saved["config"]) == identity
    except Exception as exc:  # a damaged checkpoint costs the epochs it held, not the run
        log.warning("ignoring unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if not same:
        log.warning("ignoring checkpoint %s: written for another config", path)
        return None
    return saved


#: the kept final model of an ok run (``train.keep_model``)
MODEL_FILE = "model.pt"


def save_model(path: Path, model: nn.Module, config: dict[str, Any], build: dict[str, Any]) -> None:
    """Write the trained ``model``'s state dict with what rebuilds it, atomically: ``config`` (the
    run's resolved config, plain) and ``build`` (norm name, layer options, input shape, classes)."""
    payload = {
        "format": 1,
        "config": json.dumps(config, sort_keys=True, default=str),
        "build": json.dumps(build, sort_keys=True),
        "state_dict": model.state_dict(),
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_model_file(path: Path) -> dict[str, Any]:
    """A ``model.pt``: ``{"config", "build", "state_dict"}`` (config and build as dicts)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["config"] = json.loads(saved["config"])
    saved["build"] = json.loads(saved["build"])
    return saved
