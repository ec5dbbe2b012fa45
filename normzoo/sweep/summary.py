"""The few lines a single run prints when it ends: its status, its test error (the last epoch's,
and under running / batch / PreciseBN statistics when the diagnostics ran), its time and where
its record is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normzoo.run.record import METRICS_FILE, read_record

__all__ = ["run_summary"]

_ERRORS = (
    ("test_error", "last epoch"),
    ("test_error_ema", "EMA statistics"),
    ("test_error_batch_stats", "batch statistics"),
    ("test_error_precise", "PreciseBN statistics"),
)


def _percent(value: Any) -> str | None:
    return f"{100 * float(value):.2f}%" if isinstance(value, int | float) else None


def run_summary(run_dir: str | Path) -> list[str]:
    """The summary lines of the run recorded in ``run_dir`` (none without a record)."""
    record = read_record(Path(run_dir) / METRICS_FILE)
    if record is None:
        return []
    head = f"result: {record.get('status')} ({record.get('norm')})"
    wall = record.get("wall_time_s")
    if isinstance(wall, int | float):
        head += f" in {wall:.1f}s"
    lines = [head]
    errors = [f"{label} {p}" for key, label in _ERRORS if (p := _percent(record.get(key)))]
    if errors:
        lines.append("test error: " + ", ".join(errors))
    if record.get("error"):
        lines.append(f"error: {record['error']}")
    lines.append(f"record: {Path(run_dir) / METRICS_FILE}")
    return lines
