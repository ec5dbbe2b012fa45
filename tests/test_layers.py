"""Finding a model's norm layers: the one answer that train.py's evaluation and the diagnostics use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normzoo
from normzoo.layers import (
    find_norm_layers,
    preserved_state,
    set_norm_mode,
    uses_batch_stats_in_eval,
)
from normzoo.run.loop import batch_stats_in_eval


def _models() -> dict[str, nn.Module]:
    def dense(norm: nn.Module) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), norm, nn.Dropout(0.5), nn.Linear(6, 2))

    return {
        "bn": dense(normzoo.build_norm("bn", 6)),
        "bn_no_running": dense(normzoo.build_norm("bn", 6, track_running_stats=False)),
        "brn_no_running": dense(normzoo.build_norm("brn", 6, track_running_stats=False)),
        "torch_bn": dense(nn.BatchNorm1d(6)),
        "torch_bn_no_running": dense(nn.BatchNorm1d(6, track_running_stats=False)),
        "native_bn_no_running": dense(
            normzoo.build_norm("native_bn", 6, track_running_stats=False)
        ),
        "gn": dense(normzoo.build_norm("gn", 6, num_groups=2)),
        "ln": dense(normzoo.build_norm("ln", 6)),
        "wn": nn.Sequential(normzoo.build_norm("wn", nn.Linear(4, 2))),
        "plain": dense(nn.Identity()),
    }


@pytest.mark.parametrize("name", sorted(_models()))
def test_uses_batch_stats_in_eval_agrees_with_train(name: str) -> None:
    model = _models()[name]
    expected = name.endswith("no_running")
    assert uses_batch_stats_in_eval(model) is expected
    assert batch_stats_in_eval(model) is expected  # the copy in run/loop.py


def test_find_norm_layers_names_the_registry_entries() -> None:
    found = find_norm_layers(_models()["bn"])
    assert [(layer.name, layer.spec.name, layer.uses_batch_stats) for layer in found] == [
        ("1", "batchnorm", True)
    ]
    foreign = find_norm_layers(_models()["torch_bn"])
    assert [(layer.name, layer.spec, layer.has_running_stats) for layer in foreign] == [
        ("1", None, True)
    ]
    assert find_norm_layers(_models()["plain"]) == []


def test_set_norm_mode_trains_only_the_norm_layers_and_preserved_state_restores() -> None:
    model = _models()["bn"].train()
    layers = find_norm_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with preserved_state(model, layers):
        set_norm_mode(model, layers, norm_training=True)
        assert [m.training for m in model] == [False, True, False, False]
        model(torch.randn(8, 4))  # moves the running statistics
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
