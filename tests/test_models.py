"""normzoo.models: every registered norm goes into every model through the registry; combinations
that cannot apply raise InvalidCombination with the reason."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import normzoo
from normzoo.config import CNNConf, MLPConf, ResNetConf
from normzoo.models import InvalidCombination, build_model, check_batch_size, count_parameters

ACTIVATION = normzoo.list_norms(kind="activation")
WEIGHT = normzoo.list_norms(kind="weight")
SPATIAL_ONLY = [n for n in ACTIVATION if normzoo.get_norm(n).needs_spatial]
GN = {"num_groups": 4}


def overrides(name: str) -> dict:
    return GN if "num_groups" in normzoo.get_norm(name).options() else {}


def cfg(schema, **kw):
    return OmegaConf.merge(OmegaConf.structured(schema), kw)


def norm_classes() -> set[type]:
    return {
        normzoo.get_norm(n).cls for n in ACTIVATION if isinstance(normzoo.get_norm(n).cls, type)
    }


def count_norms(model: nn.Module, name: str) -> int:
    cls = normzoo.get_norm(name).cls
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name", [n for n in ACTIVATION if n not in SPATIAL_ONLY])
def test_mlp_has_one_norm_per_hidden_layer(name: str) -> None:
    model = build_model(cfg(MLPConf, widths=[16, 12]), name, overrides(name), (1, 8, 8), 10)
    assert count_norms(model, name) == 2
    model.train()
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("name", ACTIVATION)
def test_cnn_has_one_norm_per_conv_and_dense_hidden_layer(name: str) -> None:
    hidden = [] if name in SPATIAL_ONLY else [8]
    model_cfg = cfg(CNNConf, channels=[8, 12, 16], strides=[1, 2, 2], hidden=hidden)
    model = build_model(model_cfg, name, overrides(name), (1, 8, 8), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert count_norms(model, name) == 3 + len(hidden)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("head", ["avg", "flatten"])
def test_cnn_spatial_sizes_follow_the_strides(head: str) -> None:
    model = build_model(
        cfg(CNNConf, channels=[4, 4, 6], strides=[1, 2, 2], head=head), "none", {}, (1, 8, 8), 3
    )
    seen = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape[2:])))
    model(torch.randn(2, 1, 8, 8))
    assert seen == [(8, 8), (4, 4), (2, 2)]
    assert model.classifier.in_features == (6 if head == "avg" else 6 * 2 * 2)


@pytest.mark.parametrize("name", WEIGHT)
@pytest.mark.parametrize("schema", [MLPConf, CNNConf])
def test_weight_norm_reparametrises_every_layer_and_adds_no_activation_norm(name, schema) -> None:
    kw = {"widths": [16]} if schema is MLPConf else {"channels": [4, 8], "strides": [1, 2]}
    plain = build_model(cfg(schema, **kw), "none", {}, (1, 8, 8), 10)
    wrapped = build_model(cfg(schema, **kw), name, {}, (1, 8, 8), 10)
    layers = [m for m in plain.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    # one g per output unit of every conv/linear, the classifier included
    units = sum(m.weight.shape[0] for m in layers)
    assert count_parameters(wrapped) == count_parameters(plain) + units
    assert not any(isinstance(m, tuple(norm_classes())) for m in wrapped.modules())
    assert wrapped(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", SPATIAL_ONLY)
def test_spatial_norm_on_dense_features_is_invalid(name: str) -> None:
    with pytest.raises(InvalidCombination, match="spatial") as err:
        build_model(cfg(MLPConf), name, {}, (1, 8, 8), 10)
    assert "fc1" in str(err.value)
    with pytest.raises(InvalidCombination, match="spatial"):
        build_model(cfg(CNNConf, hidden=[32]), name, {}, (1, 8, 8), 10)


@pytest.mark.parametrize(
    "name", [n for n in ACTIVATION if "num_groups" in normzoo.get_norm(n).options()]
)
def test_groups_not_dividing_a_width_are_invalid(name: str) -> None:
    with pytest.raises(InvalidCombination, match="num_groups") as err:
        build_model(
            cfg(CNNConf, channels=[8, 12], strides=[1, 2]), name, {"num_groups": 8}, (1, 8, 8), 10
        )
    assert "conv2" in str(err.value)  # 8 divides conv1's 8 channels, not conv2's 12


def test_resnet_takes_the_norm_through_norm_layer() -> None:
    model = build_model(cfg(ResNetConf), "gn", {"num_groups": 8}, (3, 32, 32), 10)
    # resnet18: stem + 2 per basic block x 8 + 3 downsample branches
    assert count_norms(model, "gn") == 20
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_resnet_zero_init_residual_zeroes_the_last_norm_of_each_block() -> None:
    model = build_model(cfg(ResNetConf, zero_init_residual=True), "bn", {}, (1, 28, 28), 10)
    assert float(model.layer1[0].bn2.weight.detach().abs().sum()) == 0.0
    assert float(model.layer1[0].bn1.weight.detach().abs().sum()) > 0.0
    build_model(cfg(ResNetConf, zero_init_residual=True), "none", {}, (1, 28, 28), 10)  # no .weight


def test_unknown_norm_is_the_registry_error() -> None:
    with pytest.raises(normzoo.UnknownNormError, match="Known norms"):
        build_model(cfg(MLPConf), "nope", {}, (1, 8, 8), 10)


BATCH_STATS = [n for n in ACTIVATION if normzoo.get_norm(n).uses_batch_stats]


@pytest.mark.parametrize("name", BATCH_STATS)
def test_batch_statistics_at_batch_size_one_on_dense_features_are_invalid(name: str) -> None:
    """They failed in training with "Expected more than 1 value per channel" (recorded failed)."""
    mlp = build_model(cfg(MLPConf, widths=[8]), name, {}, (1, 8, 8), 10)
    with pytest.raises(InvalidCombination, match=r"at data\.batch_size=1 its layer fc1_norm sees"):
        check_batch_size(mlp, name, (1, 8, 8), 1)
    check_batch_size(mlp, name, (1, 8, 8), 2)
    # conv layers pool H x W values per channel: fine at batch size 1, but not a dense hidden layer
    conv = cfg(CNNConf, channels=[4, 4], strides=[1, 2])
    check_batch_size(build_model(conv, name, {}, (1, 8, 8), 10), name, (1, 8, 8), 1)
    hidden = build_model(
        cfg(CNNConf, channels=[4], strides=[1], hidden=[8]), name, {}, (1, 8, 8), 10
    )
    with pytest.raises(InvalidCombination, match="fc1_norm sees a single value per channel"):
        check_batch_size(hidden, name, (1, 8, 8), 1)
    one = build_model(cfg(CNNConf, channels=[4, 4], strides=[8, 1]), name, {}, (1, 8, 8), 10)
    with pytest.raises(InvalidCombination, match="conv1_norm sees a single value per channel"):
        check_batch_size(one, name, (1, 8, 8), 1)  # a 1x1 feature map


@pytest.mark.parametrize("name", SPATIAL_ONLY)
def test_instance_statistics_of_a_one_by_one_map_are_invalid(name: str) -> None:
    model = build_model(cfg(CNNConf, channels=[4, 4], strides=[1, 8]), name, {}, (1, 8, 8), 10)
    with pytest.raises(InvalidCombination, match="conv2_norm sees a 1x1 feature map"):
        check_batch_size(model, name, (1, 8, 8), 32)
    check_batch_size(build_model(cfg(CNNConf), name, {}, (1, 8, 8), 10), name, (1, 8, 8), 1)


def test_the_batch_size_check_leaves_the_model_as_it_was() -> None:
    model = build_model(cfg(MLPConf, widths=[8]), "bn", {}, (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_batch_size(model, "bn", (1, 8, 8), 2)
    with pytest.raises(InvalidCombination):
        check_batch_size(model, "bn", (1, 8, 8), 1)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
