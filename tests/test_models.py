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
#: weight entries that are not WeightNorm's (g, v): no g per unit, no data-dependent init
#: (their own model tests are in tests/test_standardize.py)
NOT_G_AND_V = {
    "weightstandardization": "standardises W, adds no parameter",
    "gn_ws": "WS on every layer and a GroupNorm after every conv",
}
G_AND_V = [n for n in WEIGHT if n not in NOT_G_AND_V]
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


@pytest.mark.parametrize("name", G_AND_V)
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


@pytest.mark.parametrize("name", normzoo.list_norms(kind="last_dim"))
def test_last_dim_norm_on_conv_feature_maps_is_invalid(name: str) -> None:
    """A last-dim layer (layernorm_last, rmsnorm) would normalise a feature map's width: refused
    before training, naming the layer and what to use; on dense features it applies."""
    with pytest.raises(InvalidCombination, match="layernorm2d") as err:
        build_model(cfg(CNNConf), name, {}, (1, 8, 8), 10)
    assert "conv1" in str(err.value) and name in str(err.value)
    model = build_model(cfg(MLPConf), name, {}, (1, 8, 8), 10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


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


# (without the layers that need spatial dims, which no dense layer can hold: SPATIAL_ONLY's tests)
BATCH_STATS = [
    n
    for n in ACTIVATION
    if normzoo.get_norm(n).uses_batch_stats and not normzoo.get_norm(n).needs_spatial
]


@pytest.mark.parametrize("name", BATCH_STATS)
def test_batch_statistics_at_batch_size_one_on_dense_features_are_invalid(name: str) -> None:
    """They failed in training with "Expected more than 1 value per channel" (recorded failed)."""
    mlp = build_model(cfg(MLPConf, widths=[8]), name, overrides(name), (1, 8, 8), 10)
    with pytest.raises(InvalidCombination, match=r"at data\.batch_size=1 its layer fc1_norm sees"):
        check_batch_size(mlp, name, (1, 8, 8), 1)
    check_batch_size(mlp, name, (1, 8, 8), 2)
    # conv layers pool H x W values per channel: fine at batch size 1, but not a dense hidden layer
    conv = cfg(CNNConf, channels=[4, 4], strides=[1, 2])
    check_batch_size(build_model(conv, name, overrides(name), (1, 8, 8), 10), name, (1, 8, 8), 1)
    hidden = build_model(
        cfg(CNNConf, channels=[4], strides=[1], hidden=[8]), name, overrides(name), (1, 8, 8), 10
    )
    with pytest.raises(InvalidCombination, match="fc1_norm sees a single value per channel"):
        check_batch_size(hidden, name, (1, 8, 8), 1)
    one = build_model(
        cfg(CNNConf, channels=[4, 4], strides=[8, 1]), name, overrides(name), (1, 8, 8), 10
    )
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


# norms with no beta of their own after a layer (gn_ws has one, its GroupNorm's, but being a
# weight-kind entry its resnet convs get a bias too: tests/test_standardize.py)
NO_SHIFT = [*(n for n in WEIGHT if n != "gn_ws"), "none"]


def biased(model: nn.Module) -> tuple[int, int]:
    """(convs/linears with a bias, all convs/linears)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return sum(getattr(m, "bias", None) is not None for m in layers), len(layers)


@pytest.mark.parametrize("name", ["bn", "gn", *NO_SHIFT])
def test_resnet_convs_carry_a_bias_when_the_norm_has_no_beta(name: str) -> None:
    """torchvision builds its convs with bias=False (the norm supplies beta); with weightnorm or none
    the ResNet had no bias but the classifier's (1 bias parameter against bn's 21)."""
    model = build_model(cfg(ResNetConf), name, overrides(name), (3, 16, 16), 10)
    with_bias, layers = biased(model)
    assert layers == 21  # 20 convs + the classifier
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert len(biases) == 21  # either the norms' beta or the convs' bias, never both
    if name in NO_SHIFT:
        assert with_bias == 21
        assert float(model.layer1[0].conv1.bias.detach().abs().sum()) == 0.0  # zero-initialised
        assert "layer1.0.conv1.bias" in model.state_dict()
    else:
        assert with_bias == 1  # the classifier only: the norm after each conv has a beta
    model.eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", [*ACTIVATION, *WEIGHT])
@pytest.mark.parametrize("schema", [MLPConf, CNNConf])
def test_mlp_and_cnn_layers_always_carry_a_bias(name: str, schema) -> None:
    if schema is MLPConf and name in SPATIAL_ONLY:
        return
    kw = {"widths": [16]} if schema is MLPConf else {"channels": [4, 8], "strides": [1, 2]}
    model = build_model(cfg(schema, **kw), name, overrides(name), (1, 8, 8), 10)
    with_bias, layers = biased(model)
    assert with_bias == layers


@pytest.mark.parametrize("name", G_AND_V)
def test_weight_norm_data_dependent_init_standardises_every_resnet_conv(name: str) -> None:
    """Without conv biases the init set g only: each conv's pre-activation kept its batch mean."""
    from normzoo.norms.weight import data_dependent_init

    torch.manual_seed(0)
    model = build_model(cfg(ResNetConf), name, {}, (3, 16, 16), 10).double()
    x = 2.0 * torch.randn(16, 3, 16, 16, dtype=torch.float64) + 1.0
    data_dependent_init(model, x)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_: nn.Module, __: tuple, out: torch.Tensor) -> None:
            outputs[name] = out.clone()  # before the in-place ReLU after it

        return hook

    handles = [
        m.register_forward_hook(keep(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert len(outputs) == 21
    for n, out in outputs.items():
        dims = [0, 2, 3] if out.dim() == 4 else [0]
        assert out.mean(dims).abs().max() < 1e-8, n
        assert (out.var(dims, unbiased=False) - 1).abs().max() < 1e-5, n
