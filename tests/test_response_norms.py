"""FRN + TLU, EvoNorm-S0 and EvoNorm-B0 (normzoo.norms.response) against float64 references of the
papers' formulas written here with explicit loops over (sample, channel/group), in float64 and
float32; eval behaviour, running variance, batch (in)dependence, state dicts, refusals.

(Gradcheck, double backward, finiteness and per-sample independence of every registry entry are
in tests/test_gradcheck.py and tests/test_properties.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import normzoo
from normzoo.registry import display_name

#: |layer - float64 reference| allowed, relative to (1 + |reference|)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
SHAPES = [(4, 6), (3, 6, 5), (2, 6, 3, 4)]


def _params(layer: torch.nn.Module, seed: int = 0) -> None:
    """Parameters away from their 1 / 0 start (gamma in [0.5, 1.5], the rest in [-1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(0.5 + u if name == "weight" else 2 * u - 1)


def _input(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5


def _per_channel(p: Tensor | None, c: int, fill: float) -> list[float]:
    return [fill] * c if p is None else p.detach().double().tolist()


def _assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> float:
    err = (actual.detach().double() - expected).abs()
    bound = TOL[dtype] * (1 + expected.abs())
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"
    return float(err.max())


def frn_reference(x: Tensor, gamma, beta, tau, eps: float) -> Tensor:
    """z = max(gamma x / sqrt(mean_S(x^2) + eps) + beta, tau), per (sample, channel)."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[n, c]
            nu2 = (v * v).mean() if v.dim() else v * v
            y = gamma[c] * v / torch.sqrt(nu2 + eps) + beta[c]
            out[n, c] = y if tau is None else torch.clamp(y, min=tau[c])
    return out


def s0_reference(x: Tensor, v, gamma, beta, groups: int, eps: float) -> Tensor:
    """x sigmoid(v x) / sqrt(var_{C/G, S}(x) + eps) * gamma + beta."""
    out = torch.empty_like(x)
    size = x.shape[1] // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            block = x[n, g * size : (g + 1) * size]
            std = torch.sqrt(block.var(unbiased=False) + eps)
            for c in range(g * size, (g + 1) * size):
                xc = x[n, c]
                out[n, c] = xc * torch.sigmoid(v[c] * xc) / std * gamma[c] + beta[c]
    return out


def b0_reference(x: Tensor, v, gamma, beta, eps: float, batch_var=None) -> Tensor:
    """x / max(sqrt(var_{N,S} + eps), v x + sqrt(var_S + eps)) * gamma + beta."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        bvar = x[:, c].var(unbiased=False) if batch_var is None else batch_var[c]
        for n in range(x.shape[0]):
            xc = x[n, c]
            ivar = xc.var(unbiased=False) if xc.dim() else torch.zeros((), dtype=x.dtype)
            den = torch.maximum(torch.sqrt(bvar + eps), v[c] * xc + torch.sqrt(ivar + eps))
            out[n, c] = xc / den * gamma[c] + beta[c]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("tlu", [True, False])
def test_frn_matches_the_papers_formula(shape, dtype, tlu: bool) -> None:
    layer = normzoo.build_norm("frn", shape[1], tlu=tlu)
    _params(layer)
    x = _input(shape)
    c = shape[1]
    tau = layer.tau.detach().double().tolist() if tlu else None
    gamma, beta = _per_channel(layer.weight, c, 1), _per_channel(layer.bias, c, 0)
    expected = frn_reference(x, gamma, beta, tau, 1e-6)
    _assert_close(layer.to(dtype)(x.to(dtype)), expected, dtype)
    if tlu:  # the threshold is active somewhere, so the test sees it
        assert bool(
            (expected == torch.tensor(tau, dtype=x.dtype).view(-1, *[1] * (x.dim() - 2))).any()
        )


def test_frn_defaults_and_its_normalised_response() -> None:
    """eps is the paper's 1e-6; without affine and TLU each (sample, channel) leaves with
    mean square nu2 / (nu2 + eps) (no centring: its mean is not 0)."""
    layer = normzoo.build_norm("frn", 3, affine=False, tlu=False).double()
    assert layer.eps == 1e-6 and layer.tau is None and layer.weight is None
    x = _input((2, 3, 7)) * 1e-3  # small enough that eps shows
    y = layer(x)
    nu2 = x.square().mean(-1)
    torch.testing.assert_close(y.square().mean(-1), nu2 / (nu2 + 1e-6), rtol=1e-12, atol=0)
    assert y.mean(-1).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_evonorm_s0_matches_the_papers_formula(shape, dtype, groups: int) -> None:
    layer = normzoo.build_norm("evonorms0", shape[1], num_groups=groups)
    _params(layer)
    x = _input(shape)
    c = shape[1]
    v = layer.v.detach().double().tolist()
    expected = s0_reference(x, v, _per_channel(layer.weight, c, 1), _per_channel(layer.bias, c, 0),
                            groups, 1e-5)  # fmt: skip
    _assert_close(layer.to(dtype)(x.to(dtype)), expected, dtype)


def test_evonorm_s0_defaults_follow_the_paper() -> None:
    assert normzoo.build_norm("evos0", 64).num_groups == 32
    with pytest.raises(ValueError, match="num_groups=32 must divide num_channels=48"):
        normzoo.build_norm("evos0", 48)
    layer = normzoo.build_norm("evos0", 4, num_groups=2).double()
    with torch.no_grad():
        layer.v.zero_()  # sigmoid(0) = 1/2: S0 is then x / (2 group_std)
    x = _input((3, 4, 5))
    xg = x.reshape(3, 2, -1)
    std = torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), (0.5 * xg / std).reshape(x.shape), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
def test_evonorm_b0_matches_the_papers_formula_in_training(shape, dtype) -> None:
    layer = normzoo.build_norm("evonormb0", shape[1])
    _params(layer)
    with torch.no_grad():  # v large enough that the instance branch wins for large positive x
        layer.v.copy_(torch.linspace(1.5, 3.0, shape[1]))
    x = _input(shape)
    c = shape[1]
    v = layer.v.detach().double().tolist()
    gamma, beta = _per_channel(layer.weight, c, 1), _per_channel(layer.bias, c, 0)
    expected = b0_reference(x, v, gamma, beta, 1e-5)
    _assert_close(layer.to(dtype).train()(x.to(dtype)), expected, dtype)
    # both branches of the max are taken somewhere (else one term would go untested)
    bvar = x.transpose(0, 1).reshape(c, -1).var(-1, unbiased=False)
    view = (1, c) + (1,) * (x.dim() - 2)
    spatial = tuple(range(2, x.dim()))
    ivar = x.var(dim=spatial, unbiased=False, keepdim=True) if spatial else torch.zeros_like(x)
    inst = torch.tensor(v, dtype=x.dtype).view(view) * x + torch.sqrt(ivar + 1e-5)
    batch_wins = torch.sqrt(bvar.view(view) + 1e-5) > inst
    assert bool(batch_wins.any()) and bool((~batch_wins).any())


def test_evonorm_b0_running_variance_and_eval() -> None:
    """Training updates running_var with the unbiased batch variance at rate momentum; eval uses
    it (a sample's output no longer depends on its batch), and the instance term stays its own."""
    layer = normzoo.build_norm("evob0", 3, momentum=0.25).double()
    _params(layer)
    x = _input((4, 3, 5))
    layer.train()(x)
    m = 4 * 5
    unbiased = x.transpose(0, 1).reshape(3, -1).var(-1, unbiased=False) * m / (m - 1)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * unbiased, rtol=1e-13, atol=0)
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    after_training = layer.running_var.clone()
    v, gamma, beta = (p.detach().tolist() for p in (layer.v, layer.weight, layer.bias))
    expected = b0_reference(x, v, gamma, beta, 1e-5, batch_var=layer.running_var)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[1:2])[0], layer(x)[1], rtol=1e-13, atol=1e-13)
    assert torch.equal(layer.running_var, after_training)  # eval leaves it alone


def test_evonorm_b0_uses_the_batch_in_training() -> None:
    layer = normzoo.build_norm("evob0", 2).double().train()
    x = _input((4, 2, 3))
    other = x.clone()
    other[1:] *= 10.0  # the rest of the batch: wider, so the batch term wins for sample 0
    assert (layer(x)[0] - layer(other)[0]).abs().max() > 1e-2


def test_evonorm_b0_refuses_one_value_per_channel_and_cumulates_without_momentum() -> None:
    layer = normzoo.build_norm("evob0", 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 3))
    layer.eval()(torch.randn(1, 3))  # eval has the running variance: fine
    cma = normzoo.build_norm("evob0", 2, momentum=None).double()
    batches = [_input((3, 2, 4), seed=s) for s in range(3)]
    for b in batches:
        cma(b)
    mean_unbiased = torch.stack([b.transpose(0, 1).reshape(2, -1).var(-1) for b in batches]).mean(0)
    torch.testing.assert_close(cma.running_var, mean_unbiased, rtol=1e-12, atol=0)
    untracked = normzoo.build_norm("evob0", 2, track_running_stats=False).double().eval()
    assert untracked.running_var is None
    x = _input((3, 2, 4))
    torch.testing.assert_close(untracked(x), untracked.train()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["frn", "evonorms0", "evonormb0"])
def test_state_dict_round_trip(name: str) -> None:
    """The state dict names the paper's parameters and reloads into a fresh layer exactly."""
    kw = {"num_groups": 2} if name == "evonorms0" else {}
    layer = normzoo.build_norm(name, 4, **kw).double()
    _params(layer)
    x = _input((3, 4, 5))
    layer.train()(x)
    state = layer.state_dict()
    expected_keys = {
        "frn": {"weight", "bias", "tau"},
        "evonorms0": {"weight", "bias", "v"},
        "evonormb0": {"weight", "bias", "v", "running_var", "num_batches_tracked"},
    }[name]
    assert set(state) == expected_keys
    fresh = normzoo.build_norm(name, 4, **kw).double()
    fresh.load_state_dict(state)
    for mode in (True, False):
        torch.testing.assert_close(fresh.train(mode)(x), layer.train(mode)(x), rtol=0, atol=0)


#: issue 16's entries: (alias, kind, uses batch statistics, display name)
ENTRIES = {
    "filterresponsenorm": ("frn", "activation", False, "FRN + TLU"),
    "evonorms0": ("evos0", "activation", False, "EvoNorm-S0"),
    "evonormb0": ("evob0", "activation", True, "EvoNorm-B0"),
    "batchchannelnorm": ("bcn", "activation", True, "Batch-Channel Norm"),
    "weightstandardization": ("ws", "weight", False, "Weight Standardization"),
    "gn_ws": ("gnws", "weight", False, "GroupNorm + WS"),
}


@pytest.mark.parametrize("name", list(ENTRIES))
def test_the_registry_lists_the_entry_with_its_paper_and_flags(name: str) -> None:
    alias, kind, batch, display = ENTRIES[name]
    assert name in normzoo.list_norms(kind=kind, references=False, batch_stats=batch)
    spec = normzoo.get_norm(alias)
    assert spec.name == name and spec.native is None and not spec.reference
    assert "arXiv:" in spec.paper and display_name(name) == display
    assert "=" in (spec.cls.__doc__ or "")  # the docstring states the formula
