"""Old import path of :mod:`normzoo.analysis.results` (sweep dir -> one tidy DataFrame), kept for
users' code: ``from normzoo.results import load_sweep`` keeps working."""

from normzoo.analysis.results import (
    FINISHED_STATUSES,
    GRID_SWEEPERS,
    METRICS_FILE,
    NEUTRAL_CONFIG_KEYS,
    aggregate_seeds,
    expected_jobs,
    find_run_dirs,
    load_layers,
    load_sweep,
    ok_runs,
    run_config,
    write_csv,
)

__all__ = [
    "FINISHED_STATUSES",
    "GRID_SWEEPERS",
    "METRICS_FILE",
    "NEUTRAL_CONFIG_KEYS",
    "aggregate_seeds",
    "expected_jobs",
    "find_run_dirs",
    "load_layers",
    "load_sweep",
    "ok_runs",
    "run_config",
    "write_csv",
]
