"""Markdown tables: the one writer the reports and the bench share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["frame_table", "md_table"]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` and newlines inside cells are escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def frame_table(df: Any, index: bool = True) -> str:
    """A pandas DataFrame as a markdown table (its index as the first columns when ``index``);
    missing values are empty cells and an empty frame is ``_(none)_``."""
    import pandas as pd

    if df.empty:
        return "_(none)_"
    frame = df.reset_index() if index else df
    rows = [["" if pd.isna(v) else v for v in row] for row in frame.itertuples(index=False)]
    return md_table([str(c) for c in frame.columns], rows)
