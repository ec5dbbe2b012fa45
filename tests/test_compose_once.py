"""The stacked launcher's compose-once (``hydra_plugins/normzoo_stacked_launcher/compose_once.py``):
every sweep config it derives equals Hydra's fresh ``load_sweep_config`` of the job, unresolved
(``hydra`` included: ``overrides.task``, ``job.override_dirname``, ...) and with the task part
resolved; what it cannot prove falls back to ``load_sweep_config`` itself."""

from __future__ import annotations

import copy

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.normzoo_stacked_launcher.compose_once import SweepComposer
from normzoo.config import CONF_DIR
from normzoo.config.grid import jobs

#: the default study's three sweeps and the variants study's first
STUDIES = ["digits", "digits_reference", "digits_noniid", "variants"]


@pytest.fixture(scope="module")
def loader():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def master(loader, *overrides: str) -> DictConfig:
    """The multirun's config, as ``Hydra.multirun`` composes it (a hydra override included, as
    ``make study``'s command lines have)."""
    return loader.load_configuration(
        "config", ["hydra.sweep.dir=multirun/test", *overrides], run_mode=RunMode.MULTIRUN
    )


def grid(cfg: DictConfig) -> list[list[str]]:
    """The jobs the sweeper hands the launcher (BasicSweeper's expansion, norm names canonical)."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    return jobs(params, list(cfg.hydra.overrides.task))


def task_resolved(cfg: DictConfig) -> dict:
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    return OmegaConf.to_container(task, resolve=True)


def assert_same(derived: DictConfig, fresh: DictConfig, job: list[str]) -> None:
    assert OmegaConf.to_container(derived, resolve=False) == OmegaConf.to_container(
        fresh, resolve=False
    ), job
    assert task_resolved(derived) == task_resolved(fresh), job
    task = [o for o in job if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    assert OmegaConf.to_container(derived.hydra.overrides.task) == task
    assert derived.hydra.job.override_dirname == fresh.hydra.job.override_dirname


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_every_job_of_a_study_derives_its_fresh_sweep_config(loader, study: str) -> None:
    cfg = master(loader, f"experiment={study}")
    # every third job (all 100 of digits took 20 s of the suite): each cell of the grid but its
    # seed is still derived at least once, most of them from a template made for an earlier job
    full = grid(cfg)
    job_list = full[::3]
    cells = {tuple(o for o in job if not o.startswith("seed=")) for job in job_list}
    assert cells == {tuple(o for o in job if not o.startswith("seed=")) for job in full}
    composer = SweepComposer(loader, cfg)
    for job in job_list:
        assert_same(composer.load_sweep_config(job), loader.load_sweep_config(cfg, job), job)
    assert composer.fallbacks == 0 and composer.derived == len(job_list)
    # one composition per set of config-group choices (norm, model, experiment)
    choices = {tuple(o for o in job if o.split("=")[0] in {"norm", "model", "experiment"})
               for job in job_list}  # fmt: skip
    assert composer.composed == len(choices) < len(job_list)


BASE = ["experiment=digits", "model=cnn16", "norm=batchnorm", "seed=0"]


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.base_lr=1e-2"],  # Hydra's float
        ["norm.ghost_batch_size=null"],
        ["norm.eps=0.001", "seed=3", "optim.base_lr=0.1"],
        ["study='quoted, with a comma'"],
        ["model.channels=[8,8]", "model.strides=[1,2]"],  # lists replace the node's list
        ["norm_options.batchrenorm.momentum=0.5"],  # below a dict the study set
        ["data.val_fraction=0.1", "resume=false", "device=auto"],  # an excluded key, in the dir
    ],
)
def test_value_overrides_are_derived(loader, extra: list[str]) -> None:
    cfg = master(loader, "experiment=digits")
    composer = SweepComposer(loader, cfg)
    composer.load_sweep_config(BASE)  # the template for these choices
    job = [*BASE, *extra]
    assert_same(composer.load_sweep_config(job), loader.load_sweep_config(cfg, job), job)
    assert (composer.composed, composer.derived, composer.fallbacks) == (1, 2, 0)


@pytest.mark.parametrize(
    "extra",
    [
        ["+new_key=1"],
        ["++seed=2"],
        ["~norm_options.groupnorm"],
        ["optim.base_lr=${optim.weight_decay}"],  # an interpolation
        ["norm={eps: 0.01}"],  # a dict on a config group's key (Hydra merges it into the node)
        ["hydra.job.chdir=true"],  # a hydra key
        ["hydra/launcher=local_joblib"],  # a hydra config group
        ["norm_options={}"],  # a dict value
    ],
)
def test_what_is_not_proven_falls_back_and_is_equal(loader, extra: list[str]) -> None:
    cfg = master(loader, "experiment=digits")
    composer = SweepComposer(loader, cfg)
    composer.load_sweep_config(BASE)
    job = [*BASE, *extra]
    assert_same(composer.load_sweep_config(job), loader.load_sweep_config(cfg, job), job)
    assert (composer.derived, composer.fallbacks) == (1, 1)


def test_other_config_group_choices_get_their_own_composition(loader) -> None:
    cfg = master(loader, "experiment=digits")
    composer = SweepComposer(loader, cfg)
    composer.load_sweep_config(BASE)
    for job in (
        ["experiment=digits", "model=mlp", "norm=batchnorm", "seed=1"],
        ["experiment=digits", "model=cnn16", "norm=bn", "seed=1"],  # an alias: its own name
        ["experiment=digits", "norm=batchnorm", "model=cnn16", "seed=1"],  # another order
        ["experiment=digits", "model=cnn16", "norm=batchnorm", "data=digits", "seed=1"],
    ):
        before = composer.composed
        assert_same(composer.load_sweep_config(job), loader.load_sweep_config(cfg, job), job)
        assert composer.composed == before + 1 and composer.fallbacks == 0, job


@pytest.mark.parametrize(
    "extra",
    [["norm.no_such_option=1"], ["seed=0,1"], ["seed=not_an_int"], ["norm=no_such_norm"]],
)
def test_errors_are_hydras(loader, extra: list[str]) -> None:
    cfg = master(loader, "experiment=digits")
    composer = SweepComposer(loader, cfg)
    composer.load_sweep_config(BASE)
    job = [*BASE, *extra]
    with pytest.raises(ConfigCompositionException) as fresh:
        loader.load_sweep_config(cfg, job)
    with pytest.raises(ConfigCompositionException) as derived:
        composer.load_sweep_config(job)
    assert str(derived.value) == str(fresh.value)
    assert composer.fallbacks == 1


def test_a_loader_that_is_not_hydras_is_only_called(loader) -> None:
    cfg = master(loader, "experiment=digits")
    calls = []

    class Loader:
        def load_sweep_config(self, master_config, overrides):
            calls.append(overrides)
            return loader.load_sweep_config(master_config, overrides)

    composer = SweepComposer(Loader(), cfg)
    composer.load_sweep_config(BASE)
    assert calls == [BASE] and composer.fallbacks == 1
