"""What the jobs of a sweep print on the console: each line tagged with the job's swept values
(``[norm=batchnorm,seed=1] epoch 3/6 ...``), and by default only warnings and errors (``[k/N]``
progress lines of the launching process say when a job ends). ``train.progress=log`` shows every
line, tagged. The job's own log file (``<run dir>/train.log``) keeps every line, untagged.

Parallel workers (joblib/loky) share the launching process's terminal, so their lines interleave:
the tag says whose line it is, the quiet default keeps a study's output to a line per run.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normzoo.sweep.checks import multirun_overrides

__all__ = [
    "PROGRESS_LOGGER",
    "JobConsole",
    "job_tag",
    "job_values",
    "shows_every_line",
    "swept_keys",
]

#: the logger of the launching process's ``[k/N]`` lines: never tagged, never quiet (with Hydra's
#: basic launcher they are printed while the next job runs in the same process)
PROGRESS_LOGGER = "normzoo.sweep"


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps over (``norm=bn,gn``, ``seed=range(3)``, a study's
    ``hydra.sweeper.params``), in command-line order."""
    keys = []
    for override in multirun_overrides(config):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and key not in keys:
            keys.append(key)
    return keys


def job_values(overrides: list[str], keys: list[str]) -> list[str]:
    """``["norm=batchnorm", "seed=1"]``: the job's overrides of the swept ``keys`` (all of them
    when it has none of those)."""
    chosen = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in keys]
    return chosen or list(overrides)


def job_tag(overrides: list[str], keys: list[str]) -> str:
    """``norm=batchnorm,seed=1``: a job's name in its console lines ("" without overrides)."""
    return ",".join(job_values(overrides, keys))


def shows_every_line(config: DictConfig) -> bool:
    """Whether a job prints its info lines (epochs, diagnostics) too: ``train.progress=log``
    or ``bar``; ``auto`` and ``none`` print warnings and errors only."""
    mode = OmegaConf.select(config, "train.progress", default="auto")
    return getattr(mode, "name", str(mode)) in ("log", "bar")


class _TaggedFormatter(logging.Formatter):
    """The console's own format, with ``[<tag>] `` in front of the message."""

    def __init__(self, inner: logging.Formatter | None, tag: str) -> None:
        super().__init__()
        self.inner, self.tag = inner or logging.Formatter(), tag

    def format(self, record: logging.LogRecord) -> str:
        if record.name == PROGRESS_LOGGER:
            return self.inner.format(record)
        tagged = copy.copy(record)  # the file handler formats the same record: leave it as it is
        tagged.msg, tagged.args = f"[{self.tag}] {record.getMessage()}", None
        return self.inner.format(tagged)


def _quiet(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name == PROGRESS_LOGGER


def _console_handlers() -> list[logging.Handler]:
    """The root logger's console handlers (Hydra's ``job_logging``: stdout), not its log file."""
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


@dataclass
class JobConsole:
    """Tags (and quietens) the console of the process running one job, until :meth:`restore`."""

    saved: list[tuple[logging.Handler, Any]] = field(default_factory=list)
    quiet: bool = False

    def install(self, tag: str, every_line: bool) -> None:
        self.restore()
        self.quiet = not every_line
        for handler in _console_handlers():
            self.saved.append((handler, handler.formatter))
            if tag:
                handler.setFormatter(_TaggedFormatter(handler.formatter, tag))
            if self.quiet:
                handler.addFilter(_quiet)
        logging.captureWarnings(True)  # a worker's Python warnings: tagged lines, not bare stderr

    def restore(self) -> None:
        for handler, formatter in self.saved:
            handler.setFormatter(formatter)
            handler.removeFilter(_quiet)
        if self.saved:
            logging.captureWarnings(False)
        self.saved = []
