"""Where a result came from: package versions, the git revision of the sources, the host.

The one place these facts are read; the run record, the bench and the reports all call it.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = ["cpu_model", "git_dirty", "git_revision", "host", "now_utc", "source_root", "versions"]


def source_root() -> Path:
    """The directory that holds the ``normzoo`` package (a checkout's root in a dev install)."""
    return Path(__file__).resolve().parent.parent


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """Versions of Python and the packages a result depends on."""
    import torch

    import normzoo

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normzoo": normzoo.__version__,
        "hydra": _dist_version("hydra-core"),
        "numpy": _dist_version("numpy"),
        "sklearn": _dist_version("scikit-learn"),
        "torchvision": _dist_version("torchvision"),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(source_root()), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.lru_cache(maxsize=4)
def git_revision(short: bool = False) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding the sources, or None outside a checkout."""
    out = _git("rev-parse", *(["--short"] if short else []), "HEAD")
    return (out or "").strip() or None


@functools.lru_cache(maxsize=8)
def git_dirty(
    paths: tuple[str, ...] = ("normzoo", "conf"), untracked: bool = True
) -> list[str] | None:
    """Uncommitted paths under ``paths`` of the source checkout (sorted), or None outside one."""
    args = ["status", "--porcelain"]
    if not untracked:
        args.append("--untracked-files=no")
    out = _git(*args, "--", *paths)
    if out is None:
        return None
    return sorted(line[3:] for line in out.splitlines() if line.strip())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict[str, str | int | None]:
    """The machine a result was computed on."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def now_utc() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
