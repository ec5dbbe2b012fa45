"""Hydra at the edge of a run: the one reader of ``HydraConfig`` (:mod:`.context`), the multirun
callback (:mod:`.callbacks`), the up-front checks of every job (:mod:`.checks`), the command-line
guard (:mod:`.argv`), the progress lines (:mod:`.progress`), what the jobs print
(:mod:`.job_output`), zsh completion (:mod:`.completion`) and a single run's summary
(:mod:`.summary`)."""

from __future__ import annotations

from normzoo.sweep.argv import check_argv
from normzoo.sweep.callbacks import OUTCOME, SweepGuard, SweepOutcome
from normzoo.sweep.checks import check_sweep, count_jobs, multirun_overrides
from normzoo.sweep.context import is_multirun, output_dir, task_overrides
from normzoo.sweep.progress import PROGRESS_FILE, ProgressPrinter
from normzoo.sweep.summary import run_summary

__all__ = [
    "OUTCOME",
    "PROGRESS_FILE",
    "ProgressPrinter",
    "SweepGuard",
    "SweepOutcome",
    "check_argv",
    "check_sweep",
    "count_jobs",
    "is_multirun",
    "multirun_overrides",
    "output_dir",
    "run_summary",
    "task_overrides",
]
