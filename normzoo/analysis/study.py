"""A study dir (sibling multiruns) -> one frame, and the per-sample correctness arrays of its cells.

A *study* is one dir holding several sweeps side by side (``multirun/digits/{ghost,reference,
noniid}/``), each with its own ``multirun.yaml``. :func:`load_study` reads every sub-sweep with
:func:`~normzoo.analysis.results.load_sweep` (so each one's expected and missing jobs come from its
own ``multirun.yaml``) and returns one frame with a ``sweep`` column; a plain sweep dir is a study
of one sweep (``sweep == ""``).

The *normalisation batch* of a run (``norm_batch``) is ``norm.ghost_batch_size`` when set, else
``data.batch_size``, for layers with batch statistics; NaN for the others (they have none).
A *cell* is the runs of one (sweep, model, layer, normalisation batch); its seeds are paired with
another cell's by seed value, on the same test samples (:func:`paired_cells`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normzoo.analysis.names import canonical, uses_batch_stats
from normzoo.analysis.results import load_sweep, ok_runs
from normzoo.run.predictions import load_predictions

__all__ = [
    "CELL_KEYS",
    "add_study_columns",
    "cell_correct",
    "has_predictions",
    "load_study",
    "paired_cells",
    "stack",
    "sub_sweeps",
]

CELL_KEYS = ("sweep", "model", "norm", "norm_batch")
_GHOST_COLUMNS = (
    "norm.ghost_batch_size",
    "ghost_batch_size",
    "norm_layer_options.ghost_batch_size",
)
_CLASSES_COLUMNS = ("data.classes_per_batch", "classes_per_batch")


def sub_sweeps(path: str | os.PathLike[str]) -> list[Path]:
    """The child dirs of ``path`` that hold a ``multirun.yaml`` (sorted); [] for a plain sweep."""
    root = Path(path)
    if (root / "multirun.yaml").is_file():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / "multirun.yaml").is_file())


def load_study(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Every run of every sub-sweep of ``path`` in one frame with a ``sweep`` column (see module)."""
    parts = sub_sweeps(path)
    if not parts:
        return add_study_columns(load_sweep(path).assign(sweep=""))
    frames = [load_sweep(d).assign(sweep=d.name) for d in parts]
    frames = [f for f in frames if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else load_sweep(parts[0]).assign(sweep="")
    return add_study_columns(df)


def _first_number(row: pd.Series, columns: tuple[str, ...]) -> float:
    for col in columns:
        value = row.get(col)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
    return math.nan


def _batch_stats(row: pd.Series) -> bool:
    value = row.get("uses_batch_stats")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    known = uses_batch_stats(str(row.get("norm")))
    return bool(known)


def add_study_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``norm`` canonical; ``batch_stats``, ``norm_batch``, ``classes_per_batch`` (0 = i.i.d.)."""
    out = df.copy()
    if "sweep" not in out:
        out["sweep"] = ""
    if "model" not in out:
        out["model"] = "model"
    out["norm"] = out["norm"].map(lambda n: canonical(str(n)) if isinstance(n, str) else n)
    out["batch_stats"] = [_batch_stats(r) for _, r in out.iterrows()]
    ghost = [_first_number(r, _GHOST_COLUMNS) for _, r in out.iterrows()]
    sgd = pd.to_numeric(out.get("batch_size"), errors="coerce")
    out["norm_batch"] = [
        (g if not math.isnan(g) else b) if s else math.nan
        for g, b, s in zip(ghost, sgd, out["batch_stats"], strict=True)
    ]
    classes = [_first_number(r, _CLASSES_COLUMNS) for _, r in out.iterrows()]
    out["classes_per_batch"] = [0.0 if math.isnan(c) else c for c in classes]
    return out


def has_predictions(df: pd.DataFrame) -> bool:
    """True when some ok run kept its per-sample predictions (the v2 report needs them)."""
    for run_dir in ok_runs(df).get("run_dir", pd.Series(dtype=object)):
        if isinstance(run_dir, str) and (Path(run_dir) / "predictions.npz").is_file():
            return True
    return False


def _cell_mask(df: pd.DataFrame, cell: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for key, value in cell.items():
        if isinstance(value, float) and math.isnan(value):
            mask &= df[key].isna()
        else:
            mask &= df[key] == value
    return mask


def cell_correct(
    df: pd.DataFrame, cell: dict[str, Any], key: str = "test_pred"
) -> dict[int, np.ndarray]:
    """{seed: correct[samples]} of the ok runs of ``cell`` that kept ``key`` predictions."""
    runs = ok_runs(df)
    out: dict[int, np.ndarray] = {}
    for _, run in runs[_cell_mask(runs, cell)].iterrows():
        pred = load_predictions(run["run_dir"]) if isinstance(run.get("run_dir"), str) else None
        if pred is None or key not in pred or "test_y" not in pred:
            continue
        out[int(run["seed"])] = pred[key] == pred["test_y"]
    return out


def stack(per_seed: dict[int, np.ndarray], seeds: list[int] | None = None) -> np.ndarray:
    """correct[seeds, samples] in seed order (only ``seeds`` when given)."""
    chosen = sorted(per_seed) if seeds is None else seeds
    return np.stack([per_seed[s] for s in chosen])


def paired_cells(
    a: dict[int, np.ndarray], b: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The correct arrays of the seeds both cells have (same test set), or None if there are none."""
    common = sorted(set(a) & set(b))
    common = [s for s in common if a[s].shape == b[s].shape]
    if not common:
        return None
    return stack(a, common), stack(b, common)
