"""Weight Standardization, GN + WS and Batch-Channel Normalization (normzoo.norms.standardize)
against float64 references of Qiao et al. (2019) written here with explicit loops, in float64 and
float32; eval behaviour and running estimates, how the models take them, state dicts, refusals.

(Gradcheck of every registry entry is in tests/test_gradcheck.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

import normzoo
from normzoo.config import CNNConf, MLPConf, ResNetConf
from normzoo.models import InvalidCombination, build_model, count_parameters
from normzoo.norms.sample import GroupNorm

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _input(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5


def _assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    err = (actual.detach().double() - expected).abs()
    assert bool((err <= TOL[dtype] * (1 + expected.abs())).all()), f"max error {err.max():.3g}"


def ws_reference(w: Tensor, eps: float) -> Tensor:
    """Each output unit's weights minus their mean, over sqrt(biased variance + eps)."""
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        row = w[i]
        out[i] = (row - row.mean()) / torch.sqrt(row.var(unbiased=False) + eps)
    return out


def bcn_reference(x: Tensor, layer: nn.Module, mean=None, var=None) -> Tensor:
    """Per channel (x - mu_c) / sqrt(s2_c + eps) * gamma_b + beta_b (batch stats unless given),
    then per (sample, group) GroupNorm with the channel step's gamma, beta."""
    eps, groups = layer.eps, layer.num_groups
    gb, bb = layer.batch_weight.detach().double(), layer.batch_bias.detach().double()
    g, b = layer.weight.detach().double(), layer.bias.detach().double()
    xb = torch.empty_like(x)
    for c in range(x.shape[1]):
        mu = x[:, c].mean() if mean is None else mean[c]
        s2 = x[:, c].var(unbiased=False) if var is None else var[c]
        xb[:, c] = (x[:, c] - mu) / torch.sqrt(s2 + eps) * gb[c] + bb[c]
    out = torch.empty_like(x)
    size = x.shape[1] // groups
    for n in range(x.shape[0]):
        for k in range(groups):
            block = xb[n, k * size : (k + 1) * size]
            z = (block - block.mean()) / torch.sqrt(block.var(unbiased=False) + eps)
            for j, c in enumerate(range(k * size, (k + 1) * size)):
                out[n, c] = z[j] * g[c] + b[c]
    return out


def _random_params(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(0.5 + u if name.endswith("weight") else 2 * u - 1)


# ---------------------------------------------------------------------------------------------
# Weight Standardization


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_ws_weight_and_output_match_the_papers_formula(kind: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module, x = {
        "linear": (nn.Linear(5, 4), _input((3, 5))),
        "conv1d": (nn.Conv1d(3, 4, 3), _input((2, 3, 6))),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1), _input((2, 3, 5, 5))),
    }[kind]
    with torch.no_grad():
        module.weight.mul_(3.0).add_(0.2)  # a weight with a mean and a scale to remove
    raw = module.weight.detach().double().clone()
    bias = module.bias.detach().double().clone()
    wrapped = normzoo.build_norm("ws", module).to(dtype)
    w_hat = ws_reference(raw, 1e-5)
    _assert_close(wrapped.weight, w_hat, dtype)
    if kind == "linear":
        expected = F.linear(x, w_hat, bias)
    else:
        conv = F.conv1d if kind == "conv1d" else F.conv2d
        expected = conv(x, w_hat, bias, padding=wrapped.padding)
    _assert_close(wrapped(x.to(dtype)), expected, dtype)


def test_ws_output_is_invariant_to_an_affine_map_of_each_filter() -> None:
    """W_i -> a_i W_i + b_i (a_i > 0) leaves W_hat unchanged but for eps's known effect:
    W_hat_i' = W_hat_i * a_i sqrt(s2_i + eps) / sqrt(a_i^2 s2_i + eps)."""
    conv = normzoo.build_norm("ws", nn.Conv2d(2, 3, 3)).double()
    w_hat = conv.weight.detach().clone()
    s2 = conv.parametrizations.weight.original.detach().reshape(3, -1).var(-1, unbiased=False)
    a = torch.tensor([2.0, 5.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(a.view(3, 1, 1, 1)).add_(7.0)
    effect = a * torch.sqrt((s2 + 1e-5) / (a**2 * s2 + 1e-5))
    assert (effect - 1).abs().max() > 1e-4  # eps matters at this weight scale: the test sees it
    torch.testing.assert_close(conv.weight, w_hat * effect.view(3, 1, 1, 1), rtol=1e-10, atol=1e-12)


def test_ws_state_dict_adds_no_parameter_and_reloads() -> None:
    conv = nn.Conv2d(3, 4, 3)
    n_params = count_parameters(conv)
    wrapped = normzoo.build_norm("weightstandardization", conv, eps=1e-4)
    assert count_parameters(wrapped) == n_params
    assert set(wrapped.state_dict()) == {"bias", "parametrizations.weight.original"}
    fresh = normzoo.build_norm("ws", nn.Conv2d(3, 4, 3), eps=1e-4)
    fresh.load_state_dict(wrapped.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(fresh(x), wrapped(x))


def test_ws_refusals() -> None:
    with pytest.raises(TypeError, match="weight_standardization wraps"):
        normzoo.build_norm("ws", nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        normzoo.build_norm("ws", nn.Linear(1, 3))
    conv = normzoo.build_norm("ws", nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="already standardised"):
        normzoo.build_norm("ws", conv)
    with pytest.raises(ValueError, match="eps must be > 0"):
        normzoo.build_norm("ws", nn.Conv2d(2, 3, 3), eps=0.0)


# ---------------------------------------------------------------------------------------------
# GN + WS


def test_gn_ws_is_a_standardised_conv_then_groupnorm() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    raw, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    block = normzoo.build_norm("gn_ws", conv, num_groups=4)
    assert isinstance(block, nn.Sequential) and isinstance(block.norm, GroupNorm)
    assert block.norm.num_groups == 4 and block.norm.weight.dtype == torch.float64
    _random_params(block.norm)
    x = _input((2, 3, 5, 5))
    z = F.conv2d(x, ws_reference(raw, 1e-5), bias, padding=1)
    expected = F.group_norm(z, 4, block.norm.weight.detach(), block.norm.bias.detach(), 1e-5)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    linear = normzoo.build_norm("gn_ws", nn.Linear(5, 3))  # a dense layer: WS only
    assert isinstance(linear, nn.Linear) and normzoo.norms.is_weight_standardized(linear)
    with pytest.raises(ValueError, match="num_groups=32 must divide num_channels=8"):
        normzoo.build_norm("gn_ws", nn.Conv2d(3, 8, 3))


def _cfg(schema, **kw):
    return OmegaConf.merge(OmegaConf.structured(schema), kw)


def test_gn_ws_in_the_models() -> None:
    """cnn: every conv standardised and followed by GroupNorm (2 x its channels of parameters),
    the classifier standardised only; resnet: every conv; mlp: WS only; bad groups: invalid."""
    kw = {"channels": [8, 16], "strides": [1, 2]}
    plain = build_model(_cfg(CNNConf, **kw), "none", {}, (1, 8, 8), 10)
    model = build_model(_cfg(CNNConf, **kw), "gn_ws", {"num_groups": 4}, (1, 8, 8), 10)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    assert [m.num_features for m in norms] == [8, 16]
    assert count_parameters(model) == count_parameters(plain) + 2 * (8 + 16)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert len(layers) == 3 and all(normzoo.norms.is_weight_standardized(m) for m in layers)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    resnet = build_model(_cfg(ResNetConf), "gn_ws", {"num_groups": 8}, (3, 16, 16), 10)
    assert sum(isinstance(m, GroupNorm) for m in resnet.modules()) == 20  # as gn's count
    mlp = build_model(_cfg(MLPConf, widths=[16]), "gn_ws", {"num_groups": 4}, (1, 8, 8), 10)
    assert not any(isinstance(m, GroupNorm) for m in mlp.modules())
    with pytest.raises(InvalidCombination, match="num_groups"):
        build_model(_cfg(CNNConf, channels=[8, 12], strides=[1, 2]), "gn_ws", {"num_groups": 8},
                    (1, 8, 8), 10)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Batch-Channel Normalization


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3)], ids=["2d", "3d", "4d"])
def test_bcn_matches_the_papers_formula_in_training(shape, dtype: torch.dtype) -> None:
    layer = normzoo.build_norm("bcn", shape[1], num_groups=2)
    _random_params(layer)
    x = _input(shape)
    expected = bcn_reference(x, layer)
    _assert_close(layer.to(dtype).train()(x.to(dtype)), expected, dtype)


def test_bcn_running_statistics_and_eval() -> None:
    """Training updates running_mean / running_var (unbiased) as torch's BatchNorm; eval uses them,
    so a sample's output no longer depends on its batch."""
    layer = normzoo.build_norm("bcn", 4, num_groups=2, momentum=0.5).double()
    _random_params(layer)
    x = _input((3, 4, 5))
    layer.train()(x)
    rows = x.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(layer.running_mean, 0.5 * rows.mean(-1), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * rows.var(-1), rtol=1e-13, atol=0)
    layer.eval()
    expected = bcn_reference(x, layer, layer.running_mean, layer.running_var)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[2:3])[0], layer(x)[2], rtol=1e-12, atol=1e-12)


def test_bcn_uses_the_batch_in_training() -> None:
    layer = normzoo.build_norm("bcn", 4, num_groups=2).double().train()
    x = _input((4, 4, 3))
    other = x.clone()
    other[1:, :2] += 5.0  # the companions move half the channels: sample 0's channel mix changes
    assert (layer(x)[0] - layer(other)[0]).abs().max() > 0.1


def test_bcn_micro_batch_estimates() -> None:
    """estimate=True (Algorithm 1): each training step first moves the estimates towards the batch
    (the variance about the old mean estimate), then normalises with them, without gradient
    through them; eval normalises with the same estimates."""
    layer = normzoo.build_norm("bcn", 4, num_groups=2, momentum=0.25, estimate=True).double()
    _random_params(layer)
    x = _input((2, 4, 3)).requires_grad_(True)
    rows = x.detach().transpose(0, 1).reshape(4, -1)
    y = layer.train()(x)
    mu = 0.25 * rows.mean(-1)
    s2 = 0.75 + 0.25 * rows.square().mean(-1)  # about the old estimate, 0
    torch.testing.assert_close(layer.running_mean, mu, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(layer.running_var, s2, rtol=1e-13, atol=0)
    torch.testing.assert_close(y, bcn_reference(x.detach(), layer, mu, s2), rtol=1e-12, atol=1e-12)
    frozen = layer.running_mean.clone(), layer.running_var.clone()
    y_eval = layer.eval()(x.detach())
    torch.testing.assert_close(y_eval, bcn_reference(x.detach(), layer, *frozen), rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    # the batch step is affine in x with constant statistics: the grad is the GN step's alone
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()
    with pytest.raises(ValueError, match="track_running_stats=True"):
        normzoo.build_norm("bcn", 4, num_groups=2, estimate=True, track_running_stats=False)


def test_bcn_refusals_and_state_dict() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        normzoo.build_norm("bcn", 4, num_groups=2)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="num_groups=32 must divide num_channels=16"):
        normzoo.build_norm("bcn", 16)
    layer = normzoo.build_norm("bcn", 4, num_groups=2).double()
    _random_params(layer)
    x = _input((3, 4, 5))
    layer(x)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "batch_weight", "batch_bias", "running_mean",
                          "running_var", "num_batches_tracked"}  # fmt: skip
    fresh = normzoo.build_norm("bcn", 4, num_groups=2).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))
