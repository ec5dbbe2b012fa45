"""The report's provenance section: the sweep's command, the runs' commands, versions, git
revision, device and host as the runs recorded them, and how and when the report was built."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from normzoo.analysis.results import ok_runs

__all__ = ["provenance_lines"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _sweep_command(sweep_dir: Path | None) -> str | None:
    if sweep_dir is None or not (sweep_dir / "multirun.yaml").is_file():
        return None
    try:
        conf = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml"), resolve=False)
        ov = conf["hydra"]["overrides"]
        hydra_ov = [o for o in ov.get("hydra") or [] if o != "hydra.mode=MULTIRUN"]
        task = list(ov.get("task") or [])
        name = conf["hydra"].get("job", {}).get("name") or "train"
        app = "normzoo-train" if name in ("train", "normzoo-train") else name
        return shlex.join([app, "-m", *task, *hydra_ov])
    except Exception:
        return None


def provenance_lines(df: pd.DataFrame, sweep_dir: Path | None, command: str | None) -> list[str]:
    ok = ok_runs(df)
    lines = []
    if sweep_dir is not None:
        lines.append(f"- sweep dir: `{sweep_dir}`")
    sweep_cmd = _sweep_command(sweep_dir)
    if sweep_cmd:
        lines.append(f"- sweep command (from `multirun.yaml`): `{sweep_cmd}`")
    commands = set()
    for run_dir in ok["run_dir"].dropna().head(200) if "run_dir" in ok else []:
        cmd = _read_json(Path(run_dir) / "metrics.json").get("command")
        if isinstance(cmd, list) and cmd:
            commands.add(shlex.join(str(c) for c in cmd))
    for cmd in sorted(commands)[:5]:
        lines.append(f"- command recorded by the runs: `{cmd}`")
    if command:
        lines.append(f"- report built by: `{command}`")
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    lines.append(
        f"- runs: {len(df)} rows ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none'})"
        + (
            f"; {int(df['superseded'].sum())} superseded"
            if df.get("superseded", pd.Series()).any()
            else ""
        )
    )
    for col, label in (("git_rev", "git revision"), ("device", "device"), ("hostname", "host"),
                       ("cpu", "cpu")):  # fmt: skip
        if col in ok and ok[col].notna().any():
            vals = sorted(map(str, ok[col].dropna().unique()))
            lines.append(f"- {label}: {', '.join(f'`{v}`' for v in vals[:6])}")
    versions = [c for c in ok.columns if c.startswith("versions.")]
    if versions:
        parts = []
        for c in versions:
            vals = sorted(map(str, ok[c].dropna().unique()))
            if vals:
                parts.append(f"{c.split('.', 1)[1]} {'/'.join(vals)}")
        lines.append(f"- versions (runs): {', '.join(parts)}")
    lines.append(
        f"- report built with: python {platform.python_version()}, pandas {pd.__version__}, "
        f"normzoo {_version()}, at {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}"
    )
    if "wall_time_s" in ok and ok["wall_time_s"].notna().any():
        total = float(ok["wall_time_s"].sum())
        lines.append(f"- compute time: {total:.0f} s summed over ok runs")
    span = _elapsed(ok)
    if span is not None:
        lines.append(f"- sweep wall time (first start to last finish of ok runs): {span:.0f} s")
    return lines


def _version() -> str:
    try:
        from normzoo import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "?"


def _elapsed(ok: pd.DataFrame) -> float | None:
    if "started_at" not in ok or "finished_at" not in ok:
        return None
    start = pd.to_datetime(ok["started_at"], errors="coerce", utc=True).min()
    end = pd.to_datetime(ok["finished_at"], errors="coerce", utc=True).max()
    if pd.isna(start) or pd.isna(end):
        return None
    return float((end - start).total_seconds())
