"""Virtual BatchNorm, Mean-only BatchNorm, Batch-Instance Norm and Switchable Norm against float64
references of their papers' formulas written here (forward and input/parameter gradients, float64
and float32), their eval behaviour and their state dicts. (gradcheck: tests/test_gradcheck.py,
registry-driven; ghost batches: tests/test_ghost.py.)"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normzoo
from normzoo.norms.virtual import set_reference

DT = torch.float64
C = 3
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over N and S, (1, C, 1..)."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    return mean, ((x - mean) ** 2).mean(dims, keepdim=True)


def _in_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return mean, ((x - mean) ** 2).mean(dims, keepdim=True)


def _ln_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = list(range(1, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return mean, ((x - mean) ** 2).mean(dims, keepdim=True)


def ref_virtual(x: Tensor, ref: Tensor, layer: nn.Module, eps: float) -> Tensor:
    """Salimans et al. 2016 (reference code): per example, new_coeff = 1 / (R + 1) on its own
    E[x], E[x^2] over S, old_coeff = R / (R + 1) on the reference batch's; var = E[x^2] - E[x]^2."""
    r = ref.shape[0]
    dims = [0, *range(2, x.dim())]
    ref_mean, ref_sq = ref.mean(dims, keepdim=True), (ref**2).mean(dims, keepdim=True)
    own = list(range(2, x.dim()))
    own_mean = x.mean(own, keepdim=True) if own else x
    own_sq = (x**2).mean(own, keepdim=True) if own else x**2
    mean = own_mean / (r + 1) + ref_mean * r / (r + 1)
    sq = own_sq / (r + 1) + ref_sq * r / (r + 1)
    z = (x - mean) / torch.sqrt(sq - mean**2 + eps)
    return z * _view(layer.weight, x) + _view(layer.bias, x)


def ref_mean_only(x: Tensor, layer: nn.Module, eps: float) -> Tensor:
    """Salimans & Kingma 2016, Sec. 2.3: t - mu[t] + b."""
    return x - _bn_stats(x)[0] + _view(layer.bias, x)


def ref_batch_instance(x: Tensor, layer: nn.Module, eps: float) -> Tensor:
    """Nam & Kim 2018, Eqs. 3-5: (rho x_BN + (1 - rho) x_IN) gamma + beta, rho in [0, 1]."""
    (bm, bv), (im, iv) = _bn_stats(x), _in_stats(x)
    rho = _view(layer.rho.clamp(0, 1), x)
    mixed = rho * (x - bm) / torch.sqrt(bv + eps) + (1 - rho) * (x - im) / torch.sqrt(iv + eps)
    return mixed * _view(layer.weight, x) + _view(layer.bias, x)


def ref_switchable(x: Tensor, layer: nn.Module, eps: float) -> Tensor:
    """Luo et al. 2018, Eq. 3: softmax-weighted IN, LN, BN means and variances."""
    stats = [_in_stats(x), _ln_stats(x), _bn_stats(x)]
    wm, wv = torch.softmax(layer.mean_weight, 0), torch.softmax(layer.var_weight, 0)
    mean = sum(w * m for w, (m, _) in zip(wm, stats, strict=True))
    var = sum(w * v for w, (_, v) in zip(wv, stats, strict=True))
    return (x - mean) / torch.sqrt(var + eps) * _view(layer.weight, x) + _view(layer.bias, x)


Reference = Callable[[Tensor, nn.Module, float], Tensor]
REFERENCES: dict[str, tuple[Reference, list[tuple[int, ...]]]] = {
    "meanonlybatchnorm": (ref_mean_only, [(6, C), (4, C, 5), (3, C, 2, 3)]),
    "batchinstancenorm": (ref_batch_instance, [(4, C, 5), (3, C, 2, 3)]),
    "switchablenorm": (ref_switchable, [(4, C, 5), (3, C, 2, 3)]),
}


def _build(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The layer with parameters away from their init (rho in (0, 1) and one outside [0, 1])."""
    layer = normzoo.build_norm(name, C).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=DT) * 1.5 - 0.25)
        if name == "batchinstancenorm":
            layer.rho.copy_(torch.tensor([0.3, 1.4, 0.8]))  # 1.4: clamped to 1
    return layer


def _input(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=DT) * 2.0 + 1.5


def _max_error(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> float:
    """Largest |difference| over the output and the grads of x and every parameter, layer in
    ``dtype`` against the float64 reference (relative to 1 + |reference|)."""
    layer = _build(name, dtype)
    x64 = _input(shape)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    x = x64.to(dtype).requires_grad_(True)
    y = layer(x)
    got = [y, *torch.autograd.grad(y, [x, *layer.parameters()], dy.to(dtype))]
    ref_layer = copy.deepcopy(layer).double()
    x_ref = x64.clone().requires_grad_(True)
    if name == "virtualbatchnorm":
        y_ref = ref_virtual(x_ref, x64, ref_layer, layer.eps)  # the first batch is the reference
    else:
        y_ref = REFERENCES[name][0](x_ref, ref_layer, layer.eps)
    want = [y_ref, *torch.autograd.grad(y_ref, [x_ref, *ref_layer.parameters()], dy)]
    return max(
        ((g.double() - w).abs() / (1 + w.abs())).max().item()
        for g, w in zip(got, want, strict=True)
    )


PARITY = [(n, s) for n, (_, shapes) in REFERENCES.items() for s in shapes]
PARITY += [("virtualbatchnorm", s) for s in [(6, C), (4, C, 5), (3, C, 2, 3)]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("name", "shape"), PARITY, ids=[f"{n}-{len(s)}d" for n, s in PARITY])
def test_matches_the_papers_formula(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    assert _max_error(name, dtype, shape) < TOL[dtype]


# --- Virtual BatchNorm


def test_virtual_bn_output_of_a_sample_never_depends_on_its_companions_exactly() -> None:
    layer = _build("virtualbatchnorm", torch.float32)
    layer(_input((8, C, 5), seed=3).float())  # the first training batch: the reference
    x = _input((6, C, 5), seed=4).float()
    others = _input((6, C, 5), seed=5).float() * 10 - 3
    for i in range(6):
        alone = layer(x[i : i + 1])[0]
        assert torch.equal(layer(x)[i], alone)
        assert torch.equal(layer(torch.cat([others[:i], x[i : i + 1], others[i + 1 :]]))[i], alone)
    assert normzoo.get_norm("vbn").uses_batch_stats is False


def test_virtual_bn_reference_is_the_first_batch_or_what_set_reference_gives() -> None:
    layer = _build("virtualbatchnorm", DT)
    assert not layer.has_reference
    first, later = _input((8, C, 5), seed=6), _input((8, C, 5), seed=7)
    layer(first)
    assert int(layer.reference_size) == 8
    var, mean = torch.var_mean(first, (0, 2), correction=0)
    torch.testing.assert_close(layer.reference_mean, mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer.reference_var, var, rtol=1e-14, atol=1e-14)
    layer(later)  # does not move the reference
    torch.testing.assert_close(layer.reference_mean, mean, rtol=1e-14, atol=1e-14)
    layer.set_reference(later[:5])
    assert int(layer.reference_size) == 5
    torch.testing.assert_close(layer(first), ref_virtual(first, later[:5], layer, layer.eps))


def test_virtual_bn_set_reference_feeds_each_layer_its_own_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, C, 3), normzoo.build_norm("vbn", C), nn.ReLU(), nn.Conv1d(C, C, 1),
        normzoo.build_norm("vbn", C),
    ).double()  # fmt: skip
    ref = _input((5, 2, 6), seed=8)
    set_reference(model, ref)
    hidden = model[:4](ref)  # (now with the references set: the second layer's input)
    var, mean = torch.var_mean(hidden, (0, 2), correction=0)
    torch.testing.assert_close(model[4].reference_mean, mean)
    torch.testing.assert_close(model[4].reference_var, var)
    assert int(model[1].reference_size) == int(model[4].reference_size) == 5


def test_virtual_bn_is_the_same_function_in_train_and_eval() -> None:
    layer = _build("virtualbatchnorm", DT)
    x = _input((4, C, 5), seed=9)
    y = layer.train()(x)
    assert torch.equal(layer.eval()(x), y)


# --- Mean-only BatchNorm


def test_mean_only_bn_eval_subtracts_the_running_mean_and_has_only_a_bias() -> None:
    layer = _build("meanonlybatchnorm", DT)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    x = _input((6, C, 4), seed=10)
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean((0, 2)))
    layer.eval()
    expected = x - _view(layer.running_mean, x) + _view(layer.bias, x)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_mean_only_bn_gradient_is_dy_minus_its_channel_mean() -> None:
    layer = _build("meanonlybatchnorm", DT)
    x = _input((6, C, 4), seed=11).requires_grad_(True)
    dy = torch.randn(6, C, 4, dtype=DT)
    (dx,) = torch.autograd.grad(layer(x), x, dy)
    torch.testing.assert_close(dx, dy - dy.mean((0, 2), keepdim=True))


# --- Batch-Instance Norm


def test_batch_instance_norm_at_rho_1_is_batchnorm_and_at_rho_0_instancenorm() -> None:
    x = _input((4, C, 5), seed=12)
    for rho, twin in ((1.0, "batchnorm"), (0.0, "instancenorm"), (3.0, "batchnorm"), (-1.0, "in")):
        layer = _build("batchinstancenorm", DT)
        other = normzoo.build_norm(twin, C).double()
        with torch.no_grad():
            layer.rho.fill_(rho)
            other.weight.copy_(layer.weight)
            other.bias.copy_(layer.bias)
        torch.testing.assert_close(layer(x), other(x), rtol=1e-13, atol=1e-13)


def test_batch_instance_norm_rho_gets_no_gradient_where_it_is_clamped() -> None:
    layer = _build("batchinstancenorm", DT)  # rho = (0.3, 1.4, 0.8)
    layer(_input((4, C, 5), seed=13)).square().sum().backward()
    assert layer.rho.grad[1] == 0 and layer.rho.grad[0] != 0 and layer.rho.grad[2] != 0


# --- Switchable Norm


@pytest.mark.parametrize(("k", "twin"), [(0, "instancenorm"), (1, "layernorm"), (2, "batchnorm")])
def test_switchable_norm_with_one_hot_weights_is_that_norm(k: int, twin: str) -> None:
    """softmax of (-1e4 except 0 at k) is exactly one-hot in float64: SN is IN, LN or BN."""
    x = _input((4, C, 5), seed=14)
    layer, other = _build("switchablenorm", DT), normzoo.build_norm(twin, C).double()
    with torch.no_grad():
        for w in (layer.mean_weight, layer.var_weight):
            w.fill_(-1e4)
            w[k] = 0.0
        other.weight.copy_(layer.weight)
        other.bias.copy_(layer.bias)
    if twin == "layernorm":  # (normzoo's LayerNorm has one gamma per channel as well)
        assert other.weight.shape == (C,)
    torch.testing.assert_close(layer(x), other(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["batchinstancenorm", "switchablenorm"])
def test_hybrids_use_the_running_statistics_for_their_batch_part_in_eval(name: str) -> None:
    layer = _build(name, DT)
    x = _input((4, C, 5), seed=15)
    layer(x)
    layer.eval()
    y = layer(x)
    # the reference with BN's statistics replaced by the running ones
    patched = {"mean": _view(layer.running_mean, x), "var": _view(layer.running_var, x)}
    global _bn_stats
    saved = _bn_stats
    _bn_stats = lambda _x: (patched["mean"], patched["var"])  # noqa: E731
    try:
        expected = REFERENCES[name][0](x, layer, layer.eps)
    finally:
        _bn_stats = saved
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer(x[:1]), y[:1])  # no batch dependence in eval


# --- state dicts


@pytest.mark.parametrize("name", ["virtualbatchnorm", *REFERENCES, "ghostbatchnorm"])
def test_state_dict_round_trip(name: str) -> None:
    """A trained layer's state dict loads into a fresh one, which then computes the same function
    in eval and in training (bitwise)."""
    shape = (8, C) if name in ("virtualbatchnorm", "meanonlybatchnorm") else (8, C, 5)
    layer = _build(name, DT)
    layer(_input(shape, seed=16))
    fresh = normzoo.build_norm(name, C).double()
    fresh.load_state_dict(layer.state_dict())
    x = _input(shape, seed=17)
    for mode in (False, True):
        assert torch.equal(copy.deepcopy(fresh).train(mode)(x), copy.deepcopy(layer).train(mode)(x))


def max_errors() -> dict[str, dict[str, float]]:
    """The largest error per layer and dtype over :data:`PARITY` (for a report)."""
    out: dict[str, dict[str, float]] = {}
    for name, shape in PARITY:
        for dtype in (torch.float64, torch.float32):
            key = str(dtype).removeprefix("torch.")
            row = out.setdefault(name, {})
            row[key] = max(row.get(key, 0.0), _max_error(name, dtype, shape))
    return out
