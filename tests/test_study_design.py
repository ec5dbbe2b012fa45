"""The default study's design, as its configs state it: every run at one SGD batch and one step
budget, the normalisation batch varied by ghost batches, a validation split, the chosen lr."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from normzoo.config import CONF_DIR
from normzoo.config.grid import jobs

SWEEPS = ("digits", "digits_reference", "digits_noniid")


@pytest.fixture(scope="module")
def studies():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield {
            s: compose("config", overrides=[f"experiment={s}"], return_hydra_config=True)
            for s in SWEEPS
        }


def test_every_sweep_shares_batch_budget_data_and_lr(studies) -> None:
    for name, cfg in studies.items():
        assert cfg.data.name == "digits_hard" and cfg.data.val_fraction == 0.2, name
        assert cfg.data.batch_size == 32 and cfg.train.steps == 600, name
        assert (cfg.optim.base_lr, cfg.optim.lr_rule, cfg.optim.lr_scale) == (0.05, "linear", 1.0)
        assert cfg.study == "digits" and cfg.diagnostics.panel, name
        # three sibling sweeps of one study dir: one report reads them together
        assert cfg.hydra.sweep.dir == f"multirun/digits/{cfg.hydra.sweep.dir.rsplit('/', 1)[1]}"


def test_the_grid_varies_the_normalisation_batch_only_for_batch_statistics(studies) -> None:
    ghost = jobs(dict(studies["digits"].hydra.sweeper.params), [])
    assert len(ghost) == 5 * 2 * 2 * 5
    sizes = {j for job in ghost for j in job if j.startswith("norm.ghost_batch_size=")}
    assert sizes == {f"norm.ghost_batch_size={g}" for g in (2, 4, 8, 16, 32)}
    reference = jobs(dict(studies["digits_reference"].hydra.sweeper.params), [])
    assert {j for job in reference for j in job if j.startswith("norm=")} == {
        "norm=groupnorm",
        "norm=layernorm",
        "norm=none",
    }
    assert not any("ghost" in j for job in reference for j in job)
    assert studies["digits_noniid"].data.classes_per_batch == 2
