"""torch.fx (issue 15, item 2): every registered layer goes through ``torch.fx.symbolic_trace``
and torchvision's ``create_feature_extractor`` of a resnet18, and the traced module computes what
the eager one does (training mode included: BatchNorm's running statistics still update); the
input checks still run when the traced graph runs."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn

import normzoo

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
from torchvision.models import resnet18  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

ACTIVATION = normzoo.list_norms(kind="activation")
LAST_DIM = normzoo.list_norms(kind="last_dim")
WEIGHT = normzoo.list_norms(kind="weight")


def _options(name: str) -> dict[str, Any]:
    return {"num_groups": 8} if "num_groups" in normzoo.get_norm(name).options() else {}


def _resnet(name: str) -> nn.Module:
    torch.manual_seed(0)
    norm_layer = functools.partial(normzoo.build_norm, name=name, **_options(name))
    return resnet18(num_classes=10, norm_layer=norm_layer)


@pytest.mark.parametrize("name", ACTIVATION)
def test_symbolic_trace_of_a_resnet18(name: str) -> None:
    model = _resnet(name)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)  # (64 px: InstanceNorm still has 2x2 values at the last stage)
    reference = _resnet(name)
    torch.testing.assert_close(traced(x), reference(x), rtol=0, atol=0)  # training mode
    for a, b in zip(traced.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the running statistics moved alike
    traced.eval()
    reference.eval()
    torch.testing.assert_close(traced(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ACTIVATION)
def test_create_feature_extractor_of_a_resnet18(name: str) -> None:
    model = _resnet(name).eval()
    extractor = create_feature_extractor(model, {"layer1": "stage1", "layer4": "stage4"})
    features = extractor(torch.randn(2, 3, 64, 64))
    assert features["stage1"].shape == (2, 64, 16, 16)
    assert features["stage4"].shape == (2, 512, 2, 2)


@pytest.mark.parametrize("name", LAST_DIM)
def test_symbolic_trace_of_a_transformer_block_norm(name: str) -> None:
    block = nn.Sequential(nn.Linear(8, 8), normzoo.build_norm(name, 8), nn.GELU())
    traced = torch.fx.symbolic_trace(block)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(traced(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", WEIGHT)
def test_symbolic_trace_of_a_weight_normed_conv(name: str) -> None:
    groups = {"num_groups": 2} if "num_groups" in normzoo.get_norm(name).options() else {}
    model = nn.Sequential(normzoo.build_norm(name, nn.Conv2d(3, 4, 3), **groups), nn.ReLU())
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_the_input_checks_run_in_the_traced_graph() -> None:
    traced = torch.fx.symbolic_trace(nn.Sequential(normzoo.build_norm("bn", 8)))
    assert "_call_layer" in traced.code  # one call of the layer's eager forward
    with pytest.raises(ValueError, match="expects 8 channels at dim 1"):
        traced(torch.randn(2, 6, 4, 4))
