"""The stacked launcher's per-job preparation with and without compose-once (issue 17).

Prepares every job of ``experiment=<study>`` (default ``digits``: 100 jobs) as the stacked
launcher's workers do (``_prepare_job``: the sweep config, the run dir, ``.hydra/``), the jobs split
into the launcher's stacks (2 workers) with one ``SweepComposer`` per stack, once composing every
job from scratch (``load_sweep_config``, the launcher before) and once composing once per set of
config-group choices (after); the sides interleaved ABBA ``--repeats`` times in this one process,
CPU seconds (``time.process_time``). Writes markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf

from hydra_plugins.normzoo_stacked_launcher import _prepare_job
from hydra_plugins.normzoo_stacked_launcher.compose_once import SweepComposer
from normzoo.config import CONF_DIR
from normzoo.config.grid import jobs
from normzoo.provenance import cpu_model, git_revision, now_utc
from normzoo.run.stack_plan import plan_stacks


class _Timed:
    """``load_sweep_config(overrides)`` of a composer (or of the loader), its CPU time summed."""

    def __init__(self, load) -> None:
        self.load, self.seconds = load, 0.0

    def load_sweep_config(self, overrides: list[str]):
        since = time.process_time()
        try:
            return self.load(overrides)
        finally:
            self.seconds += time.process_time() - since


def prepare_all(
    loader, study: str, root: Path, compose_once: bool
) -> tuple[float, float, int, int]:
    """CPU seconds to prepare every job of the study, of them in the sweep configs; the number
    of compositions; of jobs."""
    master = loader.load_configuration(
        "config", [f"experiment={study}", f"hydra.sweep.dir={root}"], run_mode=RunMode.MULTIRUN
    )
    job_list = jobs(OmegaConf.to_container(master.hydra.sweeper.params), [f"experiment={study}"])
    context = HydraContext(config_loader=loader, callbacks=None)  # type: ignore[arg-type]
    stacks = plan_stacks(job_list, workers=2)
    compositions, in_configs = 0, 0.0
    since = time.process_time()
    for stack in stacks:
        composer = SweepComposer(loader, master)
        timed = _Timed(composer.load_sweep_config if compose_once else
                       lambda overrides: loader.load_sweep_config(master, overrides))  # fmt: skip
        for i in stack:
            _prepare_job(i, job_list[i], context, master, timed)  # type: ignore[arg-type]
        compositions += composer.composed + composer.fallbacks if compose_once else len(stack)
        in_configs += timed.seconds
    return time.process_time() - since, in_configs, compositions, len(job_list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="digits")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA rounds")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/compose_once.md"))
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    in_configs: dict[bool, list[float]] = {False: [], True: []}
    counts: dict[bool, int] = {}
    load = os.getloadavg()
    conf = initialize_config_dir(str(CONF_DIR), version_base="1.3")
    with conf, tempfile.TemporaryDirectory() as tmp:
        loader = GlobalHydra.instance().config_loader()
        prepare_all(loader, args.study, Path(tmp) / "warm", True)  # imports, caches
        n = n_jobs = 0
        for r in range(args.repeats):
            for side in (False, True) if r % 2 == 0 else (True, False):
                n += 1
                seconds, configs, counts[side], n_jobs = prepare_all(
                    loader, args.study, Path(tmp) / str(n), side
                )
                times[side].append(seconds)
                in_configs[side].append(configs)
                print(f"{'after' if side else 'before'}: {seconds:.2f} CPU s "
                      f"({configs:.2f} in the sweep configs)", flush=True)  # fmt: skip
    before, after = (statistics.median(times[s]) for s in (False, True))
    configs_before, configs_after = (statistics.median(in_configs[s]) for s in (False, True))
    lines = [
        "# Compose once per set of config-group choices: the stacked launcher's job preparation",
        "",
        f"`_prepare_job` (sweep config, run dir, `.hydra/`) for all {n_jobs} jobs of "
        f"`experiment={args.study}`, split into the launcher's stacks for 2 workers, one "
        "`SweepComposer` per stack (`hydra_plugins/normzoo_stacked_launcher/compose_once.py`); "
        f"before: every job composed by `load_sweep_config`. One process, the sides interleaved "
        f"ABBA ({args.repeats} rounds each), CPU seconds (`time.process_time`).",
        "",
        "|  |  |",
        "|---|---|",
        f"| date | {now_utc()} |",
        f"| command | python scripts/compose_once_speed.py --study {args.study} --repeats {args.repeats} |",
        f"| git revision | {git_revision(short=True)} |",
        f"| cpu | {cpu_model()}, {os.cpu_count()} logical cores |",
        f"| load average at start (1/5/15 min) | {' / '.join(f'{x:.2f}' for x in load)} |",
        "",
        "| | compositions | `_prepare_job`, CPU s, all jobs (each round) | CPU s a job "
        "(median) | of it the sweep config, CPU s a job |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {counts[side]} | {', '.join(f'{t:.2f}' for t in times[side])} | "
            f"{statistics.median(times[side]) / n_jobs:.3f} | "
            f"{statistics.median(in_configs[side]) / n_jobs:.3f} |"
            for name, side in (
                ("before (`load_sweep_config` every job)", False),
                ("after (compose once per stack and config-group choices)", True),
            )
        ),
        "",
        f"**{before / after:.1f}x** less CPU in `_prepare_job` ({before - after:.1f} CPU s saved "
        f"over the sweep, spread over the workers); the sweep configs alone "
        f"**{configs_before / configs_after:.1f}x**. The rest of `_prepare_job` (its deep copies, "
        "`HydraConfig.set_config`, the three `.hydra/` YAML files) is unchanged.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
