"""Bad input gets a clear error (issue 2, item 5): one test per mistake, asserting the message.

Each test is parametrised from the registry over every entry the mistake applies to, native
references included, so a newly registered layer is checked the day it lands.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normzoo

C = 8


def _activation(predicate: Callable[[normzoo.NormSpec], bool] = lambda spec: True) -> list[str]:
    names = []
    for name in normzoo.list_norms(kind="activation"):
        spec = normzoo.get_norm(name)
        if name != "none" and predicate(spec):  # the no-norm baseline accepts anything
            names.append(name)
    return names


def _build(name: str, num_features: int = C, **kw: object) -> nn.Module:
    if "num_groups" in normzoo.get_norm(name).options():
        kw.setdefault("num_groups", 2)
    return normzoo.build_norm(name, num_features, **kw)


ALL = _activation()
BATCH = _activation(lambda spec: spec.uses_batch_stats)
SPATIAL = _activation(lambda spec: spec.needs_spatial)
GROUPED = _activation(lambda spec: "num_groups" in spec.options())


def test_the_parametrisations_are_not_empty() -> None:
    assert {"batchnorm", "layernorm", "groupnorm", "instancenorm", "native_batchnorm"} <= set(ALL)
    assert {"batchnorm", "native_batchnorm"} <= set(BATCH)
    assert {"instancenorm", "native_instancenorm"} <= set(SPATIAL)
    assert {"groupnorm", "native_groupnorm"} <= set(GROUPED)


@pytest.mark.parametrize("name", ALL)
def test_wrong_channel_count(name: str) -> None:
    layer = _build(name)
    with pytest.raises(
        ValueError, match=re.escape("expects 8 channels at dim 1, got input of shape (2, 6, 4, 4)")
    ):
        layer(torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize("name", BATCH)
def test_one_value_per_channel_in_training(name: str) -> None:
    # (Batch-Instance and Switchable Norm need spatial dims, as InstanceNorm: no (N, C) input)
    dense = not normzoo.get_norm(name).needs_spatial
    layer = _build(name)
    if dense:
        with pytest.raises(
            ValueError, match="Expected more than 1 value per channel when training"
        ):
            layer(torch.randn(1, C))
    with pytest.raises(ValueError, match=r"got input size torch.Size\(\[1, 8, 1, 1\]\)"):
        layer(torch.randn(1, C, 1, 1))
    layer.eval()  # inference uses the running statistics: a single value is fine there
    one = torch.randn(1, C) if dense else torch.randn(1, C, 1, 1)
    assert layer(one).shape == one.shape


@pytest.mark.parametrize("name", SPATIAL)
def test_one_spatial_value_per_instance_in_training(name: str) -> None:
    layer = _build(name)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        layer(torch.randn(4, C, 1))


@pytest.mark.parametrize("name", GROUPED)
def test_num_groups_not_dividing_channels(name: str) -> None:
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=8"):
        normzoo.build_norm(name, C, num_groups=3)
    with pytest.raises(ValueError, match="num_groups=32 must divide num_channels=8"):
        normzoo.build_norm(name, C)  # the paper's default of 32 groups needs C % 32 == 0


@pytest.mark.parametrize("name", SPATIAL)
def test_instancenorm_on_2d_input(name: str) -> None:
    layer = _build(name)
    with pytest.raises(ValueError, match=re.escape("2-D input of shape (4, 8)")):
        layer(torch.randn(4, C))


def test_instancenorm_2d_message_says_why() -> None:
    with pytest.raises(ValueError, match=r"each \(sample, channel\) holds a single value"):
        normzoo.build_norm("in", C)(torch.randn(4, C))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_integer_dtype(name: str, dtype: torch.dtype) -> None:
    layer = _build(name)
    x = torch.ones(2, C, 3, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"expects a floating-point input, got dtype {dtype}"):
        layer(x)


def test_unknown_name() -> None:
    with pytest.raises(normzoo.UnknownNormError, match="unknown norm 'batchnrom'") as info:
        normzoo.build_norm("batchnrom", C)
    message = str(info.value)
    assert "Did you mean 'batchnorm'?" in message
    assert "Known norms: " in message and "groupnorm" in message and "weightnorm" in message
    with pytest.raises(
        normzoo.UnknownNormError, match=r"unknown norm 'xyzzy'\. Known norms"
    ) as info:
        normzoo.get_norm("xyzzy")  # nothing close: no guess, still the list
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize("name", [n for n in normzoo.list_norms() if n != "none"])
def test_unknown_keyword_for_a_layer(name: str) -> None:
    spec = normzoo.get_norm(name)
    target = nn.Linear(3, 2) if spec.kind == "weight" else C
    accepted = ", ".join(spec.options())
    with pytest.raises(
        TypeError, match=re.escape(f"got unknown option(s) bogus; it accepts: {accepted}")
    ):
        normzoo.build_norm(name, target, bogus=1)


@pytest.mark.parametrize("name", normzoo.list_norms(kind="weight"))
def test_weight_entry_given_a_channel_count(name: str) -> None:
    with pytest.raises(TypeError, match=re.escape("pass the nn.Linear/nn.ConvNd to wrap, got int")):
        normzoo.build_norm(name, C)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_channel_count(bad: object) -> None:
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normzoo.build_norm("ln", bad)  # type: ignore[arg-type]
