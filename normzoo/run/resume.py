"""Whether a kept result was computed by the code of this checkout: ``resume=true`` redoes a
finished run whose record names another git revision (or other uncommitted ``normzoo/`` paths),
``resume=keep_any_revision`` keeps it whatever the revision."""

from __future__ import annotations

from typing import Any

from normzoo.config.validate import KEEP_ANY_REVISION
from normzoo.provenance import git_dirty, git_revision

__all__ = ["KEEP_ANY_REVISION", "revision_change"]


def _code_paths(paths: Any) -> list[str] | None:
    if paths is None:
        return None
    return sorted(p for p in paths if str(p).startswith("normzoo/"))


def revision_change(record: dict[str, Any]) -> str | None:
    """Why ``record`` is of another code revision than this checkout (None: the same, or unknown
    on either side, as outside a git checkout)."""
    theirs, mine = record.get("git_rev"), git_revision()
    if theirs and mine and theirs != mine:
        return f"recorded at git revision {theirs[:10]}, the checkout is at {mine[:10]}"
    old, new = _code_paths(record.get("git_dirty")), _code_paths(git_dirty())
    if old is not None and new is not None and old != new:
        return (
            f"recorded with uncommitted normzoo/ paths {old or 'none'}, the checkout has "
            f"{new or 'none'}"
        )
    return None
