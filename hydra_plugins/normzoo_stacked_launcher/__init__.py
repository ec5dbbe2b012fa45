"""Hydra launcher ``hydra/launcher=stacked``: a multirun's jobs trained as stacks (issue 17).

The jobs whose overrides differ only in norm, norm options, seed and ``optim.base_lr``
(:mod:`normzoo.run.stack_plan`) are trained as one stacked model each
(:func:`normzoo.run.stack.train_stacked`); the stacks are spread over the cores by forked worker
processes where that is safe, else joblib's loky ones as ``local_joblib`` spreads jobs
(:mod:`normzoo.sweep.workers`). Runs that cannot stack train alone in their stack's
process through ``normzoo.run.run``. Each job keeps what a job of ``local_joblib`` has: its own run
dir (``hydra.sweep.dir``/``subdir``) with ``.hydra/`` (config, hydra config, overrides), its
``train.log``, ``metrics.json`` and files, resume (finished members drop out of a stack), and the
sweep callbacks (``on_job_start``/``on_job_end`` per job: ``SweepGuard``'s progress lines and
summary). A member's progress line comes as soon as its record is written, and its seconds
count from the previous member's end (the first member's: the stack's build and training). A
stack's sweep configs are composed once per set of config-group choices and derived for each job
(:mod:`.compose_once`), equal to what ``load_sweep_config`` composes for it.
"""

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    _save_config,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.normzoo_stacked_launcher.compose_once import SweepComposer

log = logging.getLogger(__name__)


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.normzoo_stacked_launcher.StackedLauncher"
    n_jobs: int = -1  # worker processes (-1: one per core)
    max_members: int = 32  # runs in one stack at most
    stacks_per_worker: int = 2  # split buckets until each worker has this many stacks


ConfigStore.instance().store(
    group="hydra/launcher", name="normzoo_stacked", node=StackedLauncherConf, provider="normzoo"
)


class StackedLauncher(Launcher):
    def __init__(self, n_jobs: int = -1, max_members: int = 32, stacks_per_worker: int = 2):
        self.n_jobs, self.max_members, self.stacks_per_worker = (
            n_jobs,
            max_members,
            stacks_per_worker,
        )
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from joblib import cpu_count

        from normzoo.run.stack_plan import plan_stacks
        from normzoo.sweep.workers import run_tasks

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        workers = cpu_count() if self.n_jobs < 0 else max(self.n_jobs, 1)
        stacks = plan_stacks(job_overrides, workers, self.max_members, self.stacks_per_worker)
        log.info("stacked launcher: %d jobs in %d stacks on %d workers (sizes %s)",
                 len(job_overrides), len(stacks), workers, [len(s) for s in stacks])  # fmt: skip
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        tasks = [[(initial_job_idx + i, list(job_overrides[i])) for i in stack] for stack in stacks]
        shared = (self.hydra_context, self.config, self.task_function, state)
        done = run_tasks(execute_stack, tasks, shared, workers)
        by_index = {idx: ret for task, rets in zip(tasks, done, strict=True)
                    for (idx, _), ret in zip(task, rets, strict=True)}  # fmt: skip
        return [by_index[initial_job_idx + i] for i in range(len(job_overrides))]


@dataclass
class _Job:
    config: DictConfig  # the job's sweep config (with hydra)
    task_cfg: DictConfig  # without hydra: what the run gets
    ret: JobReturn
    out: Path
    hydra_state: DictConfig  # HydraConfig's cfg for this job (set_config's masked copy, ~20 ms)


def _activate(job: _Job) -> None:
    """``HydraConfig.instance().set_config(job.config)`` from the copy made when the job was
    prepared: its config does not change after that, and a fresh masked copy cost ~20 ms (a
    stack called it five times a job: 0.1 s a job, measured)."""
    HydraConfig.instance().cfg = job.hydra_state


def _prepare_job(
    idx: int,
    overrides: list[str],
    hydra_context: HydraContext,
    config: DictConfig,
    composer: SweepComposer | None = None,
) -> _Job:
    """What ``hydra.core.utils.run_job`` does before calling the task: compose, name and make
    the run dir, save ``.hydra/``. With ``composer`` the sweep config is the one it derives from
    its template (:mod:`.compose_once`: equal to a fresh ``load_sweep_config``), else composed."""
    if composer is not None:
        sweep_config = composer.load_sweep_config(overrides)
    else:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    out = Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) / str(
        OmegaConf.select(sweep_config, "hydra.sweep.subdir")
    )
    with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
        sweep_config.hydra.runtime.output_dir = os.path.abspath(out)
    HydraConfig.instance().set_config(sweep_config)
    task_cfg = copy.deepcopy(sweep_config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    ret = JobReturn()
    ret.cfg, ret.hydra_cfg = task_cfg, copy.deepcopy(HydraConfig.instance().cfg)
    ret.overrides = list(OmegaConf.to_container(sweep_config.hydra.overrides.task))  # type: ignore[arg-type]
    ret.working_dir = os.getcwd()
    out.mkdir(parents=True, exist_ok=True)
    if sweep_config.hydra.output_subdir is not None:
        hydra_output = out / str(sweep_config.hydra.output_subdir)
        _save_config(task_cfg, "config.yaml", hydra_output)
        _save_config(ret.hydra_cfg, "hydra.yaml", hydra_output)
        _save_config(sweep_config.hydra.overrides.task, "overrides.yaml", hydra_output)
    return _Job(sweep_config, task_cfg, ret, out, HydraConfig.instance().cfg)


def _log_files(jobs: list[_Job]) -> list[logging.Handler]:
    """Each job's own log file (``hydra.job_logging``'s file handler) gets the stack's lines."""
    _activate(jobs[0])
    configure_log(jobs[0].config.hydra.job_logging, jobs[0].config.hydra.verbose)
    root = logging.getLogger()
    first = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    added: list[logging.Handler] = []
    if first is None:
        return added
    for job in jobs[1:]:
        _activate(job)
        name = OmegaConf.select(job.config, "hydra.job_logging.handlers.file.filename")
        handler = logging.FileHandler(str(name) if name else job.out / "train.log")
        handler.setFormatter(first.formatter)
        handler.setLevel(first.level)
        root.addHandler(handler)
        added.append(handler)
    return added


def execute_stack(
    task: list[tuple[int, list[str]]],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> list[JobReturn]:
    """In a worker: prepare every job of the stack, train them (:func:`train_stacked`, one stack
    per group key), then finish each job as ``run_job`` does (callbacks, return value)."""
    from normzoo.run.runner import run
    from normzoo.run.stack import group_key, train_stacked

    setup_globals()
    Singleton.set_state(singleton_state)
    orig = HydraConfig.instance().cfg
    composer = SweepComposer(hydra_context.config_loader, config)  # composes once per norm=
    jobs = [_prepare_job(idx, overrides, hydra_context, config, composer)
            for idx, overrides in task]  # fmt: skip
    handlers = _log_files(jobs)
    callbacks = hydra_context.callbacks
    pending = list(jobs)  # jobs whose on_job_end has not run

    def end(job: _Job) -> None:
        """``run_job``'s end of one job, as soon as its record is written: its progress line
        (the console tag moves on to the next pending member of the stack)."""
        _activate(job)
        job.ret.task_name = job.config.hydra.job.name
        callbacks.on_job_end(config=job.config, job_return=job.ret)
        pending.remove(job)
        if pending:
            _activate(pending[0])
            callbacks.on_job_start(config=pending[0].config, task_function=task_function)

    try:
        for job in jobs:
            _activate(job)
            callbacks.on_job_start(config=job.config, task_function=task_function)
        log.info("stack of %d runs: %d compositions, %d configs derived, %d composed in full",
                 len(jobs), composer.composed, composer.derived, composer.fallbacks)  # fmt: skip
        groups: dict[str, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(group_key(job.task_cfg, job.ret.overrides), []).append(job)
        with env_override(jobs[0].ret.hydra_cfg.hydra.job.env_set):
            for members in groups.values():
                _train_group(members, train_stacked, run, end)
        for job in list(pending):
            end(job)
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
        HydraConfig.instance().cfg = orig
    return [job.ret for job in jobs]


def _train_group(members: list[_Job], train_stacked, run, end) -> None:
    """One stack; if it raises, its members train alone (each records its own outcome). ``end``
    finishes a job as soon as its result is in."""
    since = time.perf_counter()

    def done(i: int, result: dict[str, Any]) -> None:
        members[i].ret.return_value, members[i].ret.status = result, JobStatus.COMPLETED
        # the last member: logged before its end restores the console, so the line stays quiet
        if all(j.ret.status == JobStatus.COMPLETED for j in members):
            log.info("stack of %d runs done in %.1fs", len(members), time.perf_counter() - since)
        end(members[i])

    try:
        train_stacked([j.task_cfg for j in members], [j.out for j in members],
                      task_overrides=[j.ret.overrides for j in members], multirun=True,
                      on_result=done)  # fmt: skip
    except Exception as exc:
        log.exception("stack of %d runs failed (%s); training them alone", len(members), exc)
        for i, job in enumerate(members):
            if job.ret.status == JobStatus.COMPLETED:
                continue  # (its record was written before the failure)
            _activate(job)
            done(i, run(job.task_cfg, job.out, task_overrides=job.ret.overrides, multirun=True))
