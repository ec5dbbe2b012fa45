"""The entry point ``normzoo-train`` / ``python -m normzoo.train``: Hydra's command line.

::

    normzoo-train norm=gn data.batch_size=8                       # one run -> outputs/<date>/<time>/
    normzoo-train -m norm=bn,gn data.batch_size=2,8,32 seed=0,1   # a sweep -> multirun/<date>/<time>/
    normzoo-train -m experiment=digits                            # a named study (its own ranges)

A run is :func:`normzoo.run.run` (its record: :mod:`normzoo.run.record`); a multirun's checks,
callback and progress lines are :mod:`normzoo.sweep`. Hydra re-raises a job's exception only after
the whole batch of jobs has run, and then ends the multirun, so every failure is recorded in the
run's ``metrics.json`` and the sweep goes on. The exit status says what happened: a single run
exits 1 if ``failed`` or refused by a config error, 2 if ``invalid``, 3 if ``diverged``; a multirun
exits 1 if it was refused or any of its runs ``failed``, 2 if no run ended ``ok`` (every one
``diverged`` or ``invalid``), else 0 (some ``diverged``/``invalid`` runs are results of a study).
A job killed from outside (SIGKILL, out of memory) leaves no ``metrics.json``; a rerun into the same
sweep dir redoes it (run dirs are named by the job's overrides).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from normzoo import sweep
from normzoo.config import CONF_DIR, ConfigError
from normzoo.config.identity import RESULT_NEUTRAL_KEYS
from normzoo.data import DataNotFoundError
from normzoo.errors import Diverged, SweepRejected
from normzoo.files import write_json_atomic
from normzoo.run import run as run_plain
from normzoo.run.checkpoint import AUTO_CHECKPOINT_STEPS
from normzoo.run.device import resolve_device
from normzoo.run.loop import batch_stats_in_eval, evaluate, lr_schedule
from normzoo.run.record import EXIT_CODES, KEEP_ON_RESUME, METRICS_FILE, SCHEMA_VERSION
from normzoo.sweep import PROGRESS_FILE, SweepGuard, check_sweep, count_jobs
from normzoo.sweep.completion import zsh_completion

log = logging.getLogger("normzoo.train")

__all__ = [
    "AUTO_CHECKPOINT_STEPS",
    "EXIT_CODES",
    "KEEP_ON_RESUME",
    "PROGRESS_FILE",
    "RESULT_NEUTRAL_KEYS",
    "SCHEMA_VERSION",
    "Diverged",
    "SweepGuard",
    "SweepRejected",
    "batch_stats_in_eval",
    "check_sweep",
    "count_jobs",
    "evaluate",
    "lr_schedule",
    "main",
    "resolve_device",
    "run",
    "write_json_atomic",
]


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`normzoo.run.run` with what Hydra knows about this job filled in (its output dir,
    task overrides and whether it is a multirun); outside Hydra the plain defaults."""
    if out_dir is None:
        out_dir = sweep.output_dir()
    return run_plain(
        cfg, out_dir, task_overrides=sweep.task_overrides(), multirun=sweep.is_multirun()
    )


class _SingleRun:
    """The status of the single run of this process (its exit status); None: not run."""

    status: str | None = None


# ``conf/`` as an absolute path: Hydra resolves a relative config_path against the *module*
# (``pkg://conf``, not a package) when the task function is not in __main__, which is the case
# for the ``normzoo-train`` console script.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        result = run(cfg)
    except (ConfigError, DataNotFoundError) as exc:  # single run: refuse before anything ran
        print(f"normzoo-train: error: {exc}", file=sys.stderr)
        _SingleRun.status = "config_error"
        return None
    _SingleRun.status = result["status"]
    if not sweep.is_multirun():
        for line in sweep.run_summary(result["dir"]):
            log.info(line)
    if result["status"] == "invalid" and not sweep.is_multirun():  # say it where errors are said
        print(
            f"normzoo-train: error: invalid combination, nothing trained: {result['error']} "
            f"(recorded in {Path(result['dir']) / METRICS_FILE})",
            file=sys.stderr,
        )
    return result


def main() -> None:
    """Console entry point ``normzoo-train`` (Hydra's command line)."""
    _SingleRun.status = None
    sweep.OUTCOME.reset()
    script = zsh_completion(sys.argv[1:])
    if script is not None:  # Hydra's zsh plugin would print the bash script
        print(script)
        return
    try:
        sweep.check_argv(sys.argv[1:])
    except ConfigError as exc:
        print(f"normzoo-train: error: {exc}", file=sys.stderr)
        sys.exit(1)
    _hydra_main()
    if sweep.OUTCOME.seen:
        sys.exit(sweep.OUTCOME.exit_status())
    if _SingleRun.status is not None:
        sys.exit(EXIT_CODES.get(_SingleRun.status, 1))


if __name__ == "__main__":
    # Run the copy imported as ``normzoo.train``: launchers pickle the task function by reference
    # to its module, and ``__main__`` would be pickled by value (with all its globals).
    from normzoo.train import main as _main

    _main()
