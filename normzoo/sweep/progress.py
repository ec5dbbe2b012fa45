"""Progress lines of a sweep: each finished job appends ``<overrides>: <status> (<seconds>)`` to
:data:`PROGRESS_FILE` in the sweep dir (from whichever process ran it), and a thread of the
launching process prints each new line as ``[k/N] ... ETA <time>`` and, on a terminal, keeps one
tqdm bar of the whole sweep (runs done, rate, ETA) below the lines."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from normzoo.sweep.job_output import PROGRESS_LOGGER

__all__ = ["PROGRESS_FILE", "ProgressPrinter", "append_line", "eta_text"]

log = logging.getLogger(PROGRESS_LOGGER)

#: in the sweep dir: the number of jobs, then one line per finished job (SweepGuard's [k/N] lines)
PROGRESS_FILE = ".normzoo_progress"


def append_line(path: Path, line: str) -> None:
    """Append one line to the progress file (if the sweep started one), under a lock."""
    if not path.is_file():
        return
    with open(path, "a", encoding="utf-8") as f:
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")


class ProgressPrinter(threading.Thread):
    """In the launching process: print each job line the workers append to the progress file as
    ``[k/N] <line>``, polling once a second (a daemon thread; :meth:`stop` prints the rest)."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        super().__init__(name="normzoo-progress", daemon=True)
        self.path, self.interval = path, interval
        self.printed = 0
        self.halt = threading.Event()
        self.started = time.monotonic()
        self.bar: Any = None

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.drain()

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=5)
        self.drain()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _bar(self, total: int | None) -> Any:
        """The sweep's tqdm bar, on a terminal only (a log file gets the ETA in each line)."""
        if self.bar is None and total and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="sweep", unit="run", file=sys.stderr,
                                dynamic_ncols=True)  # fmt: skip
        return self.bar

    def drain(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except OSError:
            return
        total = lines[0].strip() or "?"
        count = int(total) if total.isdigit() else None
        bar = self._bar(count)
        done = lines[1:-1]  # the last item: after the final newline (or a line being written)
        for line in done[self.printed :]:
            self.printed += 1
            eta = eta_text(time.monotonic() - self.started, self.printed, count)
            if bar is not None:
                bar.write(f"[{self.printed}/{total}] {line}{eta}", file=sys.stderr)
                bar.update(1)
            else:
                log.info("[%d/%s] %s%s", self.printed, total, line, eta)


def eta_text(elapsed: float, done: int, total: int | None) -> str:
    """`` ETA 2m05s`` from the mean time per finished run so far ("" when all are done)."""
    if not total or done <= 0 or done >= total:
        return ""
    left = round(elapsed / done * (total - done))
    minutes, seconds = divmod(left, 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
    return f" ETA {text}"
