"""torch's checkpoints load wherever the layer is the same function (issue 15, item 5): the
output after loading equals torch's layer's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normzoo


def _same_output(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_instancenorm_with_torchs_defaults_loads_into_an_affine_layer() -> None:
    theirs = nn.InstanceNorm2d(6)  # affine=False, no running statistics: an empty state dict
    assert theirs.state_dict() == {}
    ours = normzoo.build_norm("in", 6)
    with torch.no_grad():
        ours.weight.fill_(3.0)  # whatever it held before, the checkpoint has identity gamma, beta
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, torch.ones(6)) and torch.equal(ours.bias, torch.zeros(6))
    _same_output(ours, theirs, torch.randn(2, 6, 5, 5))
    affine_off = normzoo.build_norm("in", 6, affine=False)
    affine_off.load_state_dict(theirs.state_dict())
    _same_output(affine_off, theirs, torch.randn(2, 6, 5, 5))


def test_an_incomplete_affine_checkpoint_is_still_refused() -> None:
    with pytest.raises(RuntimeError, match=r"Missing key.*bias"):
        normzoo.build_norm("in", 6).load_state_dict({"weight": torch.ones(6)})


@pytest.mark.parametrize("name", ["batchnorm", "batchrenorm", "native_batchnorm"])
def test_batchnorm_checkpoint_from_before_num_batches_tracked(name: str) -> None:
    theirs = nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3) * 2 + 1)  # running statistics away from their init
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # type: ignore[attr-defined]  # as torch < 0.4.1 saved it
    ours = normzoo.build_norm(name, 4)
    ours.load_state_dict(state)
    assert ours.num_batches_tracked.item() == 0
    _same_output(ours, theirs, torch.randn(2, 4, 3, 3))
    current = theirs.state_dict()  # version 2: it must hold the count
    del current["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        normzoo.build_norm(name, 4).load_state_dict(current)


@pytest.mark.parametrize("name", ["weightnorm", "native_weightnorm"])
def test_old_weight_norm_keys_weight_g_and_weight_v(name: str) -> None:
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="deprecated"):
        old = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))  # the old API: weight_g, weight_v
    state = old.state_dict()
    assert {"weight_g", "weight_v"} <= set(state)
    ours = normzoo.build_norm(name, nn.Conv2d(3, 4, 3))
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), old(x))


@pytest.mark.parametrize(
    ("cls", "name"), [(nn.LayerNorm, "layernorm_last"), (nn.GroupNorm, "groupnorm")]
)
def test_bias_false_checkpoints(cls: type[nn.Module], name: str) -> None:
    theirs = nn.LayerNorm(6, bias=False) if cls is nn.LayerNorm else nn.GroupNorm(2, 6, bias=False)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    options = {"num_groups": 2} if name == "groupnorm" else {}
    ours = normzoo.build_norm(name, 6, bias=False, **options)
    ours.load_state_dict(theirs.state_dict())
    assert ours.bias is None
    x = torch.randn(2, 6) if name == "layernorm_last" else torch.randn(2, 6, 4)
    _same_output(ours, theirs, x)


@pytest.mark.parametrize(
    ("cls", "shape"), [(nn.InstanceNorm1d, (6, 7)), (nn.InstanceNorm2d, (6, 4, 5))]
)
def test_unbatched_instancenorm_input(cls: type[nn.Module], shape: tuple[int, ...]) -> None:
    theirs = cls(6, affine=True)
    ours = normzoo.build_norm("in", 6, spatial_dims=len(shape) - 1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape)
    assert ours(x).shape == shape
    _same_output(ours, theirs, x)
    with pytest.raises(ValueError, match="needs spatial dims"):
        normzoo.build_norm("in", 6)(torch.randn(6, 7))  # without spatial_dims (C, L) is (N, C)
