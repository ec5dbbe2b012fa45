"""``SweepGuard``, the Hydra callback of every multirun (wired in ``conf/config.yaml``), and the
sweep's outcome that the entry point turns into the exit status."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normzoo.data import DataNotFoundError
from normzoo.errors import ConfigError, SweepRejected
from normzoo.run.record import METRICS_FILE, read_record
from normzoo.sweep.checks import check_sweep, count_jobs
from normzoo.sweep.context import is_multirun, task_overrides
from normzoo.sweep.job_output import (
    JobConsole,
    job_tag,
    job_values,
    shows_every_line,
    swept_keys,
)
from normzoo.sweep.progress import PROGRESS_FILE, ProgressPrinter, append_line

__all__ = ["OUTCOME", "SweepGuard", "SweepOutcome"]

log = logging.getLogger("normzoo.train")


@dataclass
class SweepOutcome:
    """What the multirun of this process came to: Hydra instantiates the callback itself, so this
    is how the entry point learns it (``main`` resets it before Hydra starts)."""

    seen: bool = False  # SweepGuard ran: the exit status is the sweep's
    failed: int = 0  # failed runs of this sweep
    ok: int = 0  # ok runs in the sweep dir (this sweep's and those kept by resume)

    def reset(self) -> None:
        self.seen, self.failed, self.ok = False, 0, 0

    def exit_status(self) -> int:
        """0: no run failed and at least one is ok; 1: a run failed; 2: no run ended ok."""
        return 1 if self.failed else 0 if self.ok else 2


OUTCOME = SweepOutcome()


def _job_status(job_return: Any) -> str:
    """A finished job's status for its progress line."""
    # JobReturn.return_value re-raises a failed job's exception: read what it holds
    value = getattr(job_return, "_return_value", None)
    if isinstance(value, dict):
        status = str(value.get("status"))
        if value.get("skipped"):
            status += ", kept from before"
        return status
    if isinstance(value, BaseException):
        return f"error ({type(value).__name__})"
    return "config error" if value is None else str(value)


class SweepGuard(Callback):
    """Hydra callback for multiruns (wired in ``conf/config.yaml``).

    ``on_multirun_start``: before the first job, check every swept value (and the shared config)
    with :func:`normzoo.sweep.checks.check_sweep`: an out-of-range or mistyped value or an unknown
    group option stops the sweep before any training, and so does a sweep over a key left out of
    the run-directory names (``threads``, ``device``, ...: its jobs would share one dir).
    ``on_job_start`` (in the process that runs the job: a joblib/submitit worker or this one)
    tags the job's console lines with its swept values and keeps them to warnings and errors
    unless ``train.progress=log`` (:mod:`normzoo.sweep.job_output`); ``on_job_end`` restores the
    console and appends ``<swept values>: <status> (<seconds>)`` to :data:`PROGRESS_FILE` in the
    sweep dir, and a thread of the launching process prints each new line as ``[k/N] ...`` (it
    reads the small file once a second).
    ``on_multirun_end``: count this sweep's ``metrics.json`` by status (and those older than the
    sweep, kept by ``resume``), log failed ones, and make the process exit non-zero if any run of
    this sweep ``failed`` (1) or no run in the sweep dir ended ``ok`` (2).
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.job_started = 0.0
        self.progress: ProgressPrinter | None = None
        self.swept: list[str] = []  # the keys of the sweep: a job's tag and progress line
        self.console = JobConsole()

    def __getstate__(self) -> dict[str, Any]:
        # launchers pickle the callbacks to their workers: the printer thread stays here
        return {**self.__dict__, "progress": None, "console": JobConsole()}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        OUTCOME.seen = True
        self.started = time.time()
        try:
            check_sweep(config)
        except (ConfigError, DataNotFoundError) as exc:
            raise SweepRejected(str(exc)) from None
        with contextlib.suppress(Exception):  # a courtesy: without it, tags name every override
            self.swept = swept_keys(config)
        with contextlib.suppress(OSError, ValueError):  # progress lines are a courtesy
            sweep_dir = Path(str(config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            path = sweep_dir / PROGRESS_FILE
            path.write_text(f"{count_jobs(config)}\n", encoding="utf-8")
            self.progress = ProgressPrinter(path)
            self.progress.start()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_started = time.perf_counter()
        if is_multirun():
            tag = job_tag(task_overrides() or [], self.swept)
            self.console.install(tag, every_line=shows_every_line(config))

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        self.console.restore()
        if not is_multirun():
            return
        try:
            seconds = time.perf_counter() - self.job_started if self.job_started else None
            done = list(getattr(job_return, "overrides", None) or [])
            overrides = " ".join(job_values(done, self.swept)) or "(no overrides)"
            took = f" ({seconds:.1f}s)" if seconds is not None else ""
            append_line(Path(str(config.hydra.sweep.dir)) / PROGRESS_FILE,
                        f"{overrides}: {_job_status(job_return)}{took}".replace("\n", " "))  # fmt: skip
        except Exception as exc:  # never let the progress line break a job
            log.debug("progress line: %s: %s", type(exc).__name__, exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        sweep_dir = Path(str(config.hydra.sweep.dir))
        counts: dict[str, int] = {}
        failed = []
        kept = 0
        kept_ok = 0
        for path in sorted(sweep_dir.glob(f"**/{METRICS_FILE}")):
            record = read_record(path)
            status = record.get("status", "unreadable") if record is not None else "unreadable"
            if path.stat().st_mtime < self.started - 1:
                kept += 1  # written before this sweep started: kept by resume, or another sweep's
                kept_ok += status == "ok"
                continue
            counts[status] = counts.get(status, 0) + 1
            if status in ("failed", "unreadable"):
                failed.append(str(path.parent))
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"
        if kept:
            summary += f" (+{kept} finished before this sweep, not rerun)"
        log.info("sweep %s: %s", sweep_dir, summary)
        for path in failed:
            log.error("failed run: %s", path)
        OUTCOME.failed = len(failed)
        OUTCOME.ok = counts.get("ok", 0) + kept_ok
        if not OUTCOME.ok:
            log.error("sweep %s: no run ended ok (exit status 2)", sweep_dir)
