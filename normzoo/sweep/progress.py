"""Progress lines of a sweep: each finished job appends ``<overrides>: <status> (<seconds>)`` to
:data:`PROGRESS_FILE` in the sweep dir (from whichever process ran it), and a thread of the
launching process prints each new line as ``[k/N] ...``."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

__all__ = ["PROGRESS_FILE", "ProgressPrinter", "append_line"]

log = logging.getLogger("normzoo.train")

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

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.drain()

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=5)
        self.drain()

    def drain(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except OSError:
            return
        total = lines[0].strip() or "?"
        done = lines[1:-1]  # the last item: after the final newline (or a line being written)
        for line in done[self.printed :]:
            self.printed += 1
            log.info("[%d/%s] %s", self.printed, total, line)
