"""THE declared ``metrics.json`` record of one run: its schema version, its statuses and what
each means for the exit status and for resume, its keys, the writer and the reader.

Every run writes ``metrics.json`` in its output dir, atomically (temp file in the same dir, fsync,
``os.replace``), once, at the end, with ``status`` one of ``ok``, ``failed`` (an exception: its
text and traceback tail), ``diverged`` (a NaN/inf loss: the step), ``invalid`` (the combination
cannot run). Besides the keys of :data:`RECORD_KEYS` a record holds what the run adds: the layer
options, ``traceback`` of a failed run, ``brn_clip_*`` (and ``val_*`` with a validation split) in
the curves, the diagnostics' keys, ``inference_panel`` (``diagnostics.panel``). ``lr`` is the peak
of the schedule (``lr_rule``, ``lr_scale``); ``steps``/``epochs_run``/``samples_seen`` what the run
did; ``predictions`` / ``model_file``: the files an ok run kept beside it (else None).
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from normzoo.config.flat import flatten
from normzoo.files import write_json_atomic
from normzoo.provenance import cpu_model, git_dirty, git_revision, now_utc, versions
from normzoo.registry import NormSpec

__all__ = [
    "EXIT_CODES",
    "KEEP_ON_RESUME",
    "METRICS_FILE",
    "RECORD_KEYS",
    "SCHEMA_VERSION",
    "STATUSES",
    "base_record",
    "read_record",
    "write_record",
]

#: version of the metrics.json layout; bump when a key changes meaning. 2: ``train_time_s`` (and
#: ``steps_per_s``) time the training steps only, the evaluations are ``eval_time_s``; the
#: diagnostics' eval-mode error is ``test_error_ema``/``test_loss_ema`` (it replaced ``test_error``
#: /``test_loss``, now always the last epoch's evaluation, at the training batch size for a layer
#: without running statistics).
SCHEMA_VERSION = 2
METRICS_FILE = "metrics.json"
#: the statuses a finished run records
STATUSES = ("ok", "failed", "diverged", "invalid")
#: exit status of a single run by its status (``config_error``: refused before it started).
EXIT_CODES = {"ok": 0, "failed": 1, "config_error": 1, "invalid": 2, "diverged": 3}
#: statuses a rerun with resume=true keeps: deterministic results of the config
KEEP_ON_RESUME = ("ok", "invalid", "diverged")
#: the keys every record has, in the order it writes them
RECORD_KEYS = (
    "schema_version", "status", "error", "error_step", "norm", "norm_kind", "uses_batch_stats",
    "reference", "norm_layer_options", "model", "data", "batch_size", "seed", "base_lr", "lr",
    "lr_rule", "lr_scale", "epochs", "optimizer", "device", "threads", "study", "config", "train_loss", "train_error",
    "test_loss", "test_error", "val_loss", "val_error", "curves", "steps", "epochs_run",
    "samples_seen", "num_params", "wall_time_s", "train_time_s",
    "eval_time_s", "steps_per_s", "predictions", "model_file", "versions", "git_rev", "git_dirty", "hostname", "cpu", "command",
    "task_overrides", "rerun_command", "started_at", "finished_at",
)  # fmt: skip


def _norm_keys(cfg: DictConfig, spec: NormSpec | None) -> dict[str, Any]:
    if spec is None:  # an unknown name is reported by validate(); keep what was asked for
        return {"norm": str(cfg.norm.get("name")), "norm_kind": None, "uses_batch_stats": None,
                "reference": None}  # fmt: skip
    return {"norm": spec.name, "norm_kind": spec.kind, "uses_batch_stats": spec.uses_batch_stats,
            "reference": spec.reference}  # fmt: skip


def base_record(
    cfg: DictConfig,
    spec: NormSpec | None,
    lr: float | None,
    task_overrides: list[str] | None,
) -> dict[str, Any]:
    """The record a run starts with: its config and provenance, every result still empty.
    ``task_overrides``: the job's command-line overrides (``rerun_command`` reruns that one run,
    at the recorded ``git_rev``, with ``git_dirty`` listing the uncommitted source paths)."""
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": None,
        "error": None,
        "error_step": None,
        **_norm_keys(cfg, spec),
        "norm_layer_options": None,
        "model": str(cfg.model.get("name")),
        "data": str(cfg.data.name),
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "base_lr": cfg.optim.base_lr,
        "lr": lr,  # the peak of the schedule
        "lr_rule": str(cfg.optim.get("lr_rule", "linear")),
        "lr_scale": float(cfg.optim.get("lr_scale", 1.0)),
        "epochs": cfg.train.epochs,
        "optimizer": str(cfg.optim.name),
        "device": getattr(cfg.device, "name", str(cfg.device)),
        "threads": cfg.threads,
        "study": cfg.get("study"),
        "config": flatten(cfg),
        "train_loss": None,
        "train_error": None,
        "test_loss": None,
        "test_error": None,
        "val_loss": None,
        "val_error": None,
        "curves": [],
        "steps": 0,
        "epochs_run": 0,
        "samples_seen": 0,
        "num_params": None,
        "wall_time_s": None,
        "train_time_s": None,
        "eval_time_s": None,
        "steps_per_s": None,
        "predictions": None,
        "model_file": None,
        "versions": versions(),
        "git_rev": git_revision(),
        "git_dirty": git_dirty(),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),  # the same code rounds differently on another CPU (README)
        "command": list(sys.argv),
        "task_overrides": task_overrides,
        "rerun_command": (
            shlex.join(["normzoo-train", *task_overrides]) if task_overrides is not None else None
        ),
        "started_at": now_utc(),
        "finished_at": None,
    }
    assert tuple(record) == RECORD_KEYS  # the declaration above is the record
    return record


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<out_dir>/metrics.json``, atomically; its path."""
    path = Path(out_dir) / METRICS_FILE
    write_json_atomic(path, record)
    return path


def read_record(path: Path) -> dict[str, Any] | None:
    """A ``metrics.json`` (a file, or a dir holding one) as a dict; None if absent, unreadable or
    not a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
