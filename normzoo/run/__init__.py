"""One training run: :func:`run` (no Hydra), its loop (:mod:`.loop`), checkpoints
(:mod:`.checkpoint`), the ``metrics.json`` record (:mod:`.record`) and the device (:mod:`.device`)."""

from __future__ import annotations

from normzoo.run.checkpoint import AUTO_CHECKPOINT_STEPS, CHECKPOINT_FILE
from normzoo.run.device import resolve_device
from normzoo.run.loop import batch_stats_in_eval, evaluate, fit, lr_schedule
from normzoo.run.record import EXIT_CODES, KEEP_ON_RESUME, METRICS_FILE, SCHEMA_VERSION
from normzoo.run.runner import kept_result, run

__all__ = [
    "AUTO_CHECKPOINT_STEPS",
    "CHECKPOINT_FILE",
    "EXIT_CODES",
    "KEEP_ON_RESUME",
    "METRICS_FILE",
    "SCHEMA_VERSION",
    "batch_stats_in_eval",
    "evaluate",
    "fit",
    "kept_result",
    "lr_schedule",
    "resolve_device",
    "run",
]
