"""The one answer to "which config keys make a result".

Three users ask it: the run-directory names of a sweep (Hydra's
``hydra.job.config.override_dirname.exclude_keys`` in ``conf/config.yaml`` must list
:data:`RUN_DIR_UNNAMED_KEYS`, a test checks it), resume and checkpoints (:func:`comparable_config`:
a finished run or a checkpoint recorded with other values of :data:`RESULT_NEUTRAL_KEYS` counts),
and the results table (:data:`SERIES_NEUTRAL_KEYS`: runs that differ only there are one series).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from normzoo.config.flat import flatten
from normzoo.config.options import layer_options_from_flat
from normzoo.config.schema import NORM_RESERVED_KEYS

__all__ = [
    "RESULT_NEUTRAL_KEYS",
    "RUN_DIR_UNNAMED_KEYS",
    "SERIES_NEUTRAL_KEYS",
    "comparable_config",
]

#: config keys that do not change a run's result (a finished run recorded with other values counts,
#: a checkpoint written with other values is continued): how it runs and prints, where it reads
#: data, which files it keeps beside metrics.json (``train.keep_*``: flipping one keeps a finished
#: run, without the file it did not write). ``device`` is compared as resolved (``auto`` on a
#: CPU-only machine is ``cpu``); ``diagnostics.enabled`` changes what a run records.
RESULT_NEUTRAL_KEYS = frozenset(
    {
        "resume",
        "threads",
        "train.progress",
        "train.checkpoint",
        "train.keep_model",
        "train.keep_predictions",
        "report.out",
        "data.root",
        "data.download",
    }
)
#: keys the results table ignores when it groups runs into series: the neutral keys, the device
#: (any device measures the same thing) and the study's name
SERIES_NEUTRAL_KEYS = RESULT_NEUTRAL_KEYS | {"device", "study"}
#: keys left out of a sweep's run-dir names: the neutral keys (a rerun with other values finds the
#: same dir), the device and diagnostics.enabled (a rerun decides by the record), the study's name
#: and Hydra's own settings (they are not the run's config)
RUN_DIR_UNNAMED_KEYS = RESULT_NEUTRAL_KEYS | {
    "device",
    "diagnostics.enabled",
    "experiment",
    "hydra.sweep.dir",
    "hydra/launcher",
    "hydra.launcher.n_jobs",
}


def comparable_config(
    cfg: DictConfig | Mapping[str, Any],
    device: str | torch.device | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The flattened config as JSON stores it, without :data:`RESULT_NEUTRAL_KEYS`, with
    ``device`` replaced by the resolved device type when given, and the ``norm.<option>`` and
    ``norm_options.*`` keys replaced by the layer options the run uses (``norm.layer_options``;
    ``overrides``: the job's task overrides): two runs with equal values here give the same
    result."""
    flat = flatten(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    flat = json.loads(json.dumps(flat, default=str))
    if device is not None:
        with contextlib.suppress(RuntimeError, TypeError):
            flat["device"] = torch.device(device).type
    layer = layer_options_from_flat(flat, overrides)
    if layer is not None:
        flat = {
            k: v
            for k, v in flat.items()
            if not (k == "norm_options" or k.startswith("norm_options."))
            and not (k.startswith("norm.") and k.split(".")[1] not in NORM_RESERVED_KEYS)
        }
        flat["norm.layer_options"] = layer
    return {k: v for k, v in flat.items() if k not in RESULT_NEUTRAL_KEYS}
