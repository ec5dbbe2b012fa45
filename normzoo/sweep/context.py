"""What Hydra knows about the job running in this process: the one reader of ``HydraConfig``.
Each answer has a plain default outside Hydra (a test or a script calling ``run()`` directly)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

__all__ = ["is_multirun", "output_dir", "task_overrides"]


def task_overrides() -> list[str] | None:
    """The job's command-line overrides (``hydra.overrides.task``), or None outside Hydra."""
    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        return None


def is_multirun() -> bool:
    """Whether this job is one of a multirun (``-m``)."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra (a test calling run() directly)
        return False


def output_dir() -> Path | None:
    """The job's output dir (``hydra.runtime.output_dir``), or None outside Hydra."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None
