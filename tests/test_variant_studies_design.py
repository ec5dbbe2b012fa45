"""The variants, sequence and dropout studies' design, as their configs state it: the default
study's equal steps, fixed SGD batch and validation split; the normalisation batch varied only by
ghost batches, only for layers that take one; one lr per study, chosen on validation."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

import normzoo
from normzoo.config import CONF_DIR
from normzoo.config.grid import jobs

SWEEPS = (
    "variants",
    "variants_reference",
    "sequence",
    "sequence_reference",
    "sequence_tune",
    "dropout",
)


@pytest.fixture(scope="module")
def studies():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield {
            s: compose("config", overrides=[f"experiment={s}"], return_hydra_config=True)
            for s in SWEEPS
        }


def _grid(cfg) -> list[list[str]]:
    return jobs(dict(cfg.hydra.sweeper.params), [])


def _values(grid: list[list[str]], key: str) -> set[str]:
    return {j.split("=", 1)[1] for job in grid for j in job if j.startswith(key + "=")}


def test_every_sweep_has_equal_steps_one_sgd_batch_and_a_validation_split(studies) -> None:
    for name, cfg in studies.items():
        assert cfg.data.name == "digits_hard" and cfg.data.val_fraction == 0.2, name
        assert cfg.data.batch_size == 32 and cfg.train.steps == 600, name
        assert cfg.optim.lr_rule == "linear" and cfg.optim.base_lr == 0.05, name
        assert "data.batch_size" not in dict(cfg.hydra.sweeper.params), name


def test_only_layers_with_a_ghost_option_sweep_the_normalisation_batch(studies) -> None:
    for study in ("variants", "sequence"):
        ghost, reference = _grid(studies[study]), _grid(studies[study + "_reference"])
        assert len(_values(ghost, "norm.ghost_batch_size")) >= 2
        for norm in _values(ghost, "norm"):
            assert "ghost_batch_size" in normzoo.get_norm(norm).options(), norm
        assert not _values(reference, "norm.ghost_batch_size")
        assert not _values(ghost, "norm") & _values(reference, "norm")
        assert studies[study].hydra.sweep.dir.rsplit("/", 1)[0] == f"multirun/{study}"
        assert studies[study + "_reference"].hydra.sweep.dir == f"multirun/{study}/reference"


def test_the_batch_free_layers_of_the_variants_study_are_in_its_reference_sweep(studies) -> None:
    reference = _values(_grid(studies["variants_reference"]), "norm")
    for norm in reference - {"ghostbatchnorm", "batchchannelnorm"}:
        assert not normzoo.get_norm(norm).uses_batch_stats, norm


def test_one_lr_per_study_and_the_sequence_tune_grid_brackets_it(studies) -> None:
    seq = studies["sequence"].optim.lr_scale
    assert studies["sequence_reference"].optim.lr_scale == seq
    assert str(seq) in _values(_grid(studies["sequence_tune"]), "optim.lr_scale")
    assert not studies["sequence_tune"].diagnostics.enabled
    assert studies["variants"].optim.lr_scale == studies["dropout"].optim.lr_scale == 1.0


def test_the_dropout_grid_crosses_rate_position_and_layer(studies) -> None:
    grid = _grid(studies["dropout"])
    assert len(grid) == 3 * 2 * 2 * 3
    assert studies["dropout"].diagnostics.variance_shift and studies["dropout"].model.name == "mlp"
