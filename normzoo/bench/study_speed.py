"""``normzoo-study-speed``: a study's wall time, from-scratch layers against their native references.

Runs a study's sweep twice, in fresh processes, one after the other::

    normzoo-train -m experiment=<study> norm=<from-scratch layers>  hydra.sweep.dir=<root>/speed_scratch
    normzoo-train -m experiment=<study> norm=<native references>    hydra.sweep.dir=<root>/speed_native

(the same grid otherwise; each sweep's report goes into its own sweep dir, never over the study's),
times each end to end (Hydra start-up, every run, the report), and compares the runs' own times
(``wall_time_s`` = training + diagnostics + set-up, ``train_time_s`` = the training loop) per layer
and model, per batch size and in total, counting only runs that finished ``ok`` on *both* sides.
The layers are every from-scratch entry of the registry with a ``native`` reference (Batch Renorm
has none; ``none`` is the same module on both sides), or ``--norms``.

Writes ``study_speed.md`` and ``study_speed.csv`` into ``--out`` (default ``reports/bench``).
``--compare-only`` rebuilds them from existing sweep dirs (their end-to-end times are kept in
``<sweep dir>/study_speed.json``). ``--interleaved`` runs one sweep holding both sides instead
(``norm=batchnorm,native_batchnorm,...``; the study's grid runs the norms innermost but for the
seed, so a layer's runs and its reference's run back to back): its run-time ratio is immune to
the machine getting faster or slower between two sweeps, which on a shared VM moves the two-sweep
ratio by 0.1 and more; the end-to-end ratio needs the two sweeps. Arguments after ``--`` go to both sweeps, e.g.
``normzoo-study-speed -- train.epochs=1`` for a quick look. ``--stacked``: the default study's
sweeps stacked against unstacked instead (:mod:`normzoo.bench.study_speed_stacked`). The machine should be otherwise idle:
the two sweeps run at different times, so anything else running skews the ratio.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
from normzoo.bench.study_speed_report import SIDES, write_report
from normzoo.registry import get_norm, list_norms

__all__ = ["TIMES_FILE", "compare_sweeps", "default_pairs", "main", "run_sweep",
           "write_report"]  # fmt: skip

TIMES_FILE = "study_speed.json"


def _native_pair(name: str) -> tuple[str, str]:
    """(from-scratch, native) registry names for ``name`` (an alias works); raises for an unknown
    name (with the choices) or a layer without a native reference."""
    spec = get_norm(name)
    if not spec.native:
        raise ValueError(f"{spec.name} has no native reference to compare with")
    return spec.name, get_norm(spec.native).name


def default_pairs() -> list[tuple[str, str]]:
    """(from-scratch, native) for every registered from-scratch layer with a native reference."""
    return [_native_pair(n) for n in list_norms(references=False) if get_norm(n).native]


def _registry_name(name: Any) -> Any:
    """The registry's name for ``name`` (an alias or a differently written name), else ``name``."""
    try:
        return get_norm(str(name)).name
    except (KeyError, ValueError, TypeError):
        return name


def _pairs(norms: str | None) -> list[tuple[str, str]]:
    """The pairs of ``--norms`` (comma-separated names), or :func:`default_pairs` without it."""
    if not norms:
        return default_pairs()
    return [_native_pair(n.strip()) for n in norms.split(",") if n.strip()]


def run_sweep(
    study: str, norms: Sequence[str], sweep_dir: Path, extra: Sequence[str]
) -> dict[str, Any]:
    """Run ``normzoo-train -m experiment=<study> norm=<norms>`` into ``sweep_dir`` (which must not
    exist) and return its end-to-end time and exit status, also written to ``study_speed.json``."""
    command = [
        sys.executable,
        "-m",
        "normzoo.train",
        "-m",
        f"experiment={study}",
        "norm=" + ",".join(norms),
        f"hydra.sweep.dir={sweep_dir}",
        f"report.out={sweep_dir / 'report'}",
        *extra,
    ]
    print(f"normzoo-study-speed: {shlex.join(command[2:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(command, check=False).returncode
    record = {
        "wall_s": time.perf_counter() - t0,
        "returncode": rc,
        "command": shlex.join(["normzoo-train", *command[3:]]),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / TIMES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _ok_runs(sweep_dir: Path) -> pd.DataFrame:
    from normzoo.results import load_sweep

    df = load_sweep(sweep_dir)
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=["norm", "model", "batch_size", "seed"])
    df = df[(df["status"] == "ok") & ~df.get("superseded", False)].copy()
    df["norm"] = df["norm"].map(_registry_name)
    return df


def compare_sweeps(
    scratch_dir: str | Path, native_dir: str | Path, pairs: Sequence[tuple[str, str]]
) -> dict[str, pd.DataFrame]:
    """Per-run times of the two sweeps side by side, matched on (layer, model, batch size, seed).

    Returns ``{"runs": one row per matched run, "layers": sums per (layer, model) and in total,
    "batch": sums per batch size}``; ratios are from-scratch / native. Runs that are not ``ok`` on
    both sides are left out (InstanceNorm on an mlp is ``invalid`` on both).
    """
    to_scratch = {native: scratch for scratch, native in pairs}
    a = _ok_runs(Path(scratch_dir))
    b = _ok_runs(Path(native_dir))
    a = a[a["norm"].isin(list(to_scratch.values()))]
    b = b[b["norm"].isin(list(to_scratch))].copy()
    b["norm"] = b["norm"].map(to_scratch)
    key = ["norm", "model", "batch_size", "seed"]
    cols = ["wall_time_s", "train_time_s"]
    for df in (a, b):
        for c in cols:
            if c not in df:
                df[c] = float("nan")
    runs = a[key + cols].merge(b[key + cols], on=key, suffixes=("_scratch", "_native"))
    runs = runs.rename(columns={"norm": "layer"}).sort_values(
        ["layer", "model", "batch_size", "seed"]
    )

    def sums(group: pd.DataFrame) -> pd.Series:
        out = {"runs": len(group)}
        for c in cols:
            s, n = group[f"{c}_scratch"].sum(), group[f"{c}_native"].sum()
            out[f"{c}_scratch"], out[f"{c}_native"] = s, n
            out[f"{c}_ratio"] = s / n if n > 0 else float("nan")
        return pd.Series(out)

    layers = [
        sums(g).rename((layer, model)) for (layer, model), g in runs.groupby(["layer", "model"])
    ]
    total = sums(runs).rename(("all", ""))
    table = pd.DataFrame([*layers, total])
    table.index = pd.MultiIndex.from_tuples(table.index, names=["layer", "model"])
    batch = pd.DataFrame([sums(g).rename(bs) for bs, g in runs.groupby("batch_size")]).rename_axis(
        "batch_size"
    )
    return {
        "runs": runs.reset_index(drop=True),
        "layers": table.reset_index(),
        "batch": batch.reset_index(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normzoo-study-speed",
        description="Time a study with the from-scratch layers and with their native references; "
        "writes study_speed.md and study_speed.csv. Arguments after -- go to both sweeps.",
    )
    # the fixed-epoch grid over every layer and its native twin (the v2 study sweeps ghost sizes)
    p.add_argument("--study", default="digits_v1", help="experiment config (default digits_v1)")
    p.add_argument(
        "--norms",
        default=None,
        help="comma-separated from-scratch layers (default: every one with a native reference)",
    )
    p.add_argument("--sweep-root", default="multirun", help="parent of the two sweep dirs")
    p.add_argument("--out", default="reports/bench", help="output folder (default reports/bench)")
    p.add_argument(
        "--order",
        choices=("scratch-first", "native-first"),
        default="scratch-first",
        help="which sweep runs first (default scratch-first)",
    )
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="one sweep holding both sides (norm=a,native_a,b,native_b,...): each layer's runs "
        "and its reference's run back to back, so machine drift hits both alike; compares run "
        "times only (there is one end-to-end time)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete existing speed_* sweep dirs first"
    )
    p.add_argument(
        "--compare-only", action="store_true", help="no sweeps: compare the existing sweep dirs"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``normzoo-study-speed``."""
    full = list(sys.argv[1:] if argv is None else argv)
    if "--stacked" in full[: full.index("--") if "--" in full else len(full)]:
        from normzoo.bench import study_speed_stacked  # the default study, stacked vs unstacked

        full.remove("--stacked")
        return study_speed_stacked.main(full)
    argv, extra = (
        (full[: full.index("--")], full[full.index("--") + 1 :]) if "--" in full else (full, [])
    )
    args = _parser().parse_args(argv)
    try:
        pairs = _pairs(args.norms)
    except (KeyError, ValueError) as exc:
        print(f"normzoo-study-speed: {exc}", file=sys.stderr)
        return 2
    root = Path(args.sweep_root)
    dirs = {side: root / f"speed_{side}" for side in SIDES}
    norms = {"scratch": [s for s, _ in pairs], "native": [n for _, n in pairs]}
    if args.interleaved:  # one sweep, both sides; the study's grid runs norm inside batch, model
        dirs = {side: root / "speed_interleaved" for side in SIDES}
        norms = {"interleaved": [name for pair in pairs for name in pair]}
    info = provenance(shlex.join(["normzoo-study-speed", *full]))
    info.pop("torch threads", None)  # (this process's; each run records its own)
    info["study"] = args.study
    info["pairs (from-scratch / native)"] = ", ".join(f"{s} / {n}" for s, n in pairs)
    times: dict[str, dict[str, Any]] = {}
    if args.compare_only:
        for side, d in dirs.items():
            if not d.is_dir():
                print(f"normzoo-study-speed: no sweep dir {d}", file=sys.stderr)
                return 2
            f = d / TIMES_FILE
            times["interleaved" if args.interleaved else side] = (
                json.loads(f.read_text()) if f.exists() else {}
            )
    else:
        existing = sorted({str(d) for d in dirs.values() if d.exists()})
        if existing and not args.overwrite:
            print(
                f"normzoo-study-speed: {', '.join(existing)} already exist(s): a timing needs "
                f"fresh sweep dirs (finished runs would be kept, not rerun); use --overwrite or "
                f"another --sweep-root",
                file=sys.stderr,
            )
            return 2
        for d in existing:
            shutil.rmtree(d)
        if args.interleaved:
            times["interleaved"] = run_sweep(
                args.study, norms["interleaved"], dirs["scratch"], extra
            )
            info["order"] = "interleaved in one sweep"
        else:
            order = SIDES if args.order == "scratch-first" else SIDES[::-1]
            for side in order:
                times[side] = run_sweep(args.study, norms[side], dirs[side], extra)
            info["order"] = " then ".join(order)
        load = load_average()
        if load is not None:
            info["load average at end (1/5/15 min)"] = load
    tables = compare_sweeps(dirs["scratch"], dirs["native"], pairs)
    paths = write_report(args.out, tables, times, info)
    total = tables["layers"].iloc[-1]
    print(
        f"normzoo-study-speed: wrote {paths['md']}: run time ratio {total['wall_time_s_ratio']:.2f} "
        f"over {int(total['runs'])} runs",
        file=sys.stderr,
    )
    return 0
