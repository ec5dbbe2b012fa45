"""Whether a kept result was computed by the code of this checkout: ``resume=true`` redoes a
finished run whose record names another version of ``normzoo/`` (a git revision whose
``normzoo/`` tree differs from the checkout's, or other uncommitted ``normzoo/`` paths),
``resume=keep_any_revision`` keeps it whatever the revision. A commit that leaves ``normzoo/``
as it was (a report, the README) keeps the results."""

from __future__ import annotations

import functools
import subprocess
from typing import Any

from normzoo.config.validate import KEEP_ANY_REVISION
from normzoo.provenance import git_dirty, git_revision, source_root

__all__ = ["KEEP_ANY_REVISION", "code_tree", "revision_change"]


def _code_paths(paths: Any) -> list[str] | None:
    if paths is None:
        return None
    return sorted(p for p in paths if str(p).startswith("normzoo/"))


@functools.lru_cache(maxsize=64)
def code_tree(revision: str) -> str | None:
    """The git tree hash of ``normzoo/`` at ``revision`` (None: not in this checkout's history)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(source_root()), "rev-parse", "--verify", "-q", f"{revision}:normzoo"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def revision_change(record: dict[str, Any]) -> str | None:
    """Why ``record`` is of another code revision than this checkout (None: the same, or unknown
    on either side, as outside a git checkout)."""
    theirs, mine = record.get("git_rev"), git_revision()
    if theirs and mine and theirs != mine:
        old_tree, new_tree = code_tree(str(theirs)), code_tree(mine)
        if old_tree is None or old_tree != new_tree:
            return f"recorded at git revision {theirs[:10]}, the checkout is at {mine[:10]}" + (
                "" if old_tree is None else " (normzoo/ differs)"
            )
    old, new = _code_paths(record.get("git_dirty")), _code_paths(git_dirty())
    if old is not None and new is not None and old != new:
        return (
            f"recorded with uncommitted normzoo/ paths {old or 'none'}, the checkout has "
            f"{new or 'none'}"
        )
    return None
