"""``normzoo-study-speed --stacked``: the default study's sweeps, stacked against unstacked.

Runs each sweep of the study (``experiment=digits``, ``digits_reference``, ``digits_noniid``, as
``make study`` does) twice, in fresh processes, interleaved (sweep 1 unstacked then stacked,
sweep 2 stacked then unstacked, ...: drift of a shared machine hits both sides alike)::

    normzoo-train -m experiment=<sweep> hydra.sweep.dir=<root>/unstacked/<sweep> hydra/launcher=local_joblib
    normzoo-train -m experiment=<sweep> hydra.sweep.dir=<root>/stacked/<sweep> hydra/launcher=stacked

and compares: the end-to-end wall time of each sweep and in total, the runs' summed times per
(sweep, model, normalisation batch) (``wall_time_s``: a stacked member's share of its stack plus
its own evaluations and diagnostics; ``train_time_s``: the training steps), and every per-run
number of the report that moved (test and validation error, the diagnostics' test errors),
matched by run dir. Writes ``study_speed_stacked.md`` / ``.csv`` / ``.png`` into ``--out``
(default ``reports/bench``). Arguments after ``--`` go to every sweep (e.g. ``seed=0,1`` for a
fixed subset of the grid). ``--compare-only`` rebuilds the report from existing sweep dirs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from normzoo.bench.report import load_average, provenance
from normzoo.run.record import METRICS_FILE, read_record

__all__ = ["SWEEPS", "compare", "main", "run_sweep"]

SWEEPS = ("digits", "digits_reference", "digits_noniid")
SIDES = ("unstacked", "stacked")
TIMES_FILE = "study_speed.json"
INFO_FILE = "study_speed_stacked_info.json"  # at the sweep root: the measurement's provenance
#: per-run numbers of the study's report compared between the sides
RESULT_KEYS = ("test_error", "val_error", "test_error_ema", "test_error_batch_stats",
               "test_error_precise")  # fmt: skip


def run_sweep(sweep: str, side: str, sweep_dir: Path, extra: Sequence[str]) -> dict[str, Any]:
    """One sweep of the study into ``sweep_dir``; its end-to-end seconds and exit status."""
    command = [sys.executable, "-m", "normzoo.train", "-m", f"experiment={sweep}",
               f"hydra.sweep.dir={sweep_dir}", *extra]  # fmt: skip
    command.append("hydra/launcher=" + ("stacked" if side == "stacked" else "local_joblib"))
    print(f"study-speed --stacked: {shlex.join(command[3:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(command, check=False, capture_output=True, text=True)
    record = {"wall_s": time.perf_counter() - t0, "returncode": rc.returncode,
              "command": shlex.join(["normzoo-train", *command[3:]]), "load": load_average()}  # fmt: skip
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / TIMES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (sweep_dir / "sweep.log").write_text(rc.stdout + rc.stderr)
    return record


def _runs(sweep_dir: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{METRICS_FILE}")):
        r = read_record(path) or {}
        options = r.get("norm_layer_options") or {}
        rows.append({
            "run": path.parent.name, "status": r.get("status"), "model": r.get("config", {}).get(
                "model.name", r.get("model")), "norm": r.get("norm"), "seed": r.get("seed"),
            "norm_batch": options.get("ghost_batch_size") or r.get("batch_size"),
            "wall_time_s": r.get("wall_time_s"), "train_time_s": r.get("train_time_s"),
            "trained": r.get("trained", "single"),
            **{k: r.get(k) for k in RESULT_KEYS},
        })  # fmt: skip
    return pd.DataFrame(rows)


def compare(root: Path, sweeps: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The two sides' runs matched by (sweep, run dir): ``runs`` (one row per run, both sides),
    ``groups`` (sums per sweep, model, normalisation batch), ``moved`` (numbers that differ)."""
    frames = []
    for sweep in sweeps:
        a, b = (_runs(root / side / sweep) for side in SIDES)
        if a.empty or b.empty:
            continue
        m = a.merge(b, on=["run"], suffixes=("_unstacked", "_stacked"))
        m.insert(0, "sweep", sweep)
        frames.append(m)
    runs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if runs.empty:
        return {"runs": runs, "groups": runs, "moved": runs}
    ok = runs[(runs["status_unstacked"] == "ok") & (runs["status_stacked"] == "ok")]
    cols = [f"{c}_{s}" for c in ("wall_time_s", "train_time_s") for s in SIDES]
    groups = ok.groupby(["sweep", "model_unstacked", "norm_batch_unstacked"])[cols].sum()
    groups["runs"] = ok.groupby(["sweep", "model_unstacked", "norm_batch_unstacked"]).size()
    for c in ("wall_time_s", "train_time_s"):
        groups[f"{c}_ratio"] = groups[f"{c}_unstacked"] / groups[f"{c}_stacked"]
    groups.index.names = ["sweep", "model", "norm_batch"]
    moved = []
    for _, row in runs.iterrows():
        for key in RESULT_KEYS:
            a, b = row.get(f"{key}_unstacked"), row.get(f"{key}_stacked")
            if a is None or b is None or pd.isna(a) or pd.isna(b) or a == b:
                continue
            moved.append({"sweep": row["sweep"], "run": row["run"], "number": key,
                          "unstacked": a, "stacked": b, "change": b - a})  # fmt: skip
    status = runs[runs["status_unstacked"] != runs["status_stacked"]]
    for _, row in status.iterrows():
        moved.append({"sweep": row["sweep"], "run": row["run"], "number": "status",
                      "unstacked": row["status_unstacked"], "stacked": row["status_stacked"],
                      "change": None})  # fmt: skip
    return {"runs": runs, "groups": groups.reset_index(), "moved": pd.DataFrame(moved)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normzoo-study-speed --stacked", description=__doc__)
    p.add_argument("--sweeps", default=",".join(SWEEPS), help="experiments (default: the study)")
    p.add_argument("--sweep-root", default="multirun/speed_stacked", help="parent of the sweeps")
    p.add_argument("--out", default="reports/bench", help="output folder (default reports/bench)")
    p.add_argument("--overwrite", action="store_true", help="delete existing sweep dirs first")
    p.add_argument("--compare-only", action="store_true", help="no sweeps: compare existing dirs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from normzoo.bench.study_speed_stacked_report import write_report

    full = list(sys.argv[1:] if argv is None else argv)
    argv, extra = (full[: full.index("--")], full[full.index("--") + 1 :]) if "--" in full else (
        full, [])  # fmt: skip
    args = _parser().parse_args(argv)
    sweeps = [s for s in args.sweeps.split(",") if s]
    root = Path(args.sweep_root)
    info = provenance(shlex.join(["normzoo-study-speed", "--stacked", *full]))
    info.pop("torch threads", None)
    times: dict[str, dict[str, Any]] = {}
    if not args.compare_only:
        existing = [root / s / w for s in SIDES for w in sweeps if (root / s / w).exists()]
        if existing and not args.overwrite:
            print(f"study-speed --stacked: {existing[0]} exists (--overwrite)", file=sys.stderr)
            return 2
        for d in existing:
            shutil.rmtree(d)
        info["load average at start (1/5/15 min)"] = load_average() or "?"
        for i, sweep in enumerate(sweeps):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                times[f"{side}/{sweep}"] = run_sweep(sweep, side, root / side / sweep, extra)
        info["load average at end (1/5/15 min)"] = load_average() or "?"
        info["order"] = "sweep by sweep, the side that goes first alternating (ABBA)"
        info["arguments to every sweep"] = shlex.join(extra) or "(none: the whole grid)"
        (root / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    else:
        for side in SIDES:
            for sweep in sweeps:
                f = root / side / sweep / TIMES_FILE
                times[f"{side}/{sweep}"] = json.loads(f.read_text()) if f.exists() else {}
        if (root / INFO_FILE).is_file():  # the measurement's own facts, then who rebuilt it
            rebuilt = info["command"]
            info = {**json.loads((root / INFO_FILE).read_text()), "report rebuilt by": rebuilt}
    tables = compare(root, sweeps)
    paths = write_report(Path(args.out), tables, times, sweeps, info)
    print(f"study-speed --stacked: wrote {paths['md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
