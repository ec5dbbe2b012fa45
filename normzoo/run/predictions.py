"""Per-sample predictions of a run, kept beside its ``metrics.json`` for paired tests.

``predictions.npz`` (compressed, a few kB) holds int16 arrays, each one class per sample in the
split's fixed order:

* ``test_y`` -- the test labels; ``test_pred`` -- the final model in eval mode (running stats);
* ``test_pred_batch`` / ``test_pred_precise`` -- with batch statistics / PreciseBN statistics
  (only for layers with batch statistics; absent otherwise);
* ``val_y`` / ``val_pred`` -- the validation split, eval mode (absent without one).

Writer and reader are these two functions; the run writes, the analysis reads.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from normzoo.files import atomic_open

__all__ = ["PREDICTIONS_FILE", "PREDICTION_KEYS", "load_predictions", "save_predictions"]

PREDICTIONS_FILE = "predictions.npz"
PREDICTION_KEYS = (
    "test_y",
    "test_pred",
    "test_pred_batch",
    "test_pred_precise",
    "val_y",
    "val_pred",
)


def save_predictions(out_dir: str | os.PathLike[str], arrays: dict[str, object]) -> Path:
    """Write ``arrays`` (keys from :data:`PREDICTION_KEYS`; tensors or arrays of class indices)
    atomically to ``<out_dir>/predictions.npz``; None values are left out."""
    unknown = sorted(set(arrays) - set(PREDICTION_KEYS))
    if unknown:
        raise ValueError(f"unknown prediction keys {unknown}; expected some of {PREDICTION_KEYS}")
    plain = {}
    for key, value in arrays.items():
        if value is None:
            continue
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()  # type: ignore[union-attr]
        plain[key] = np.asarray(value).astype(np.int16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **plain)
    path = Path(out_dir) / PREDICTIONS_FILE
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def load_predictions(run_dir: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """The arrays of ``<run_dir>/predictions.npz``, or None when the run kept none."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
