"""WeightNorm against ``torch.nn.utils.parametrizations.weight_norm``, and the data-dependent init."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import normzoo
from normzoo.norms.weight import (
    WeightNorm,
    WeightNormFunction,
    data_dependent_init,
    is_weight_normed,
    weight_norm,
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (6, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 3, 4, 3)),
}
G = "parametrizations.weight.original0"
V = "parametrizations.weight.original1"


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _pair(kind: str, dtype: torch.dtype, dim: int | None) -> tuple[nn.Module, nn.Module]:
    make, _ = LAYERS[kind]
    module = make().to(dtype)
    ours = weight_norm(copy.deepcopy(module), dim=dim)
    ref = nn.utils.parametrizations.weight_norm(copy.deepcopy(module), dim=dim)
    with torch.no_grad():  # move g away from ||v||, so w != v
        ours.state_dict()[G].mul_(torch.rand_like(ours.state_dict()[G]) + 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _grads(layer: nn.Module, x: Tensor, dy: Tensor) -> dict[str, Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], dy)
    return {"output": y, "weight": layer.weight, "grad_input": grads[0]} | {
        f"grad_{n}": g for n, g in zip(params, grads[1:], strict=True)
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("dim", [0, 1, None], ids=["dim0", "dim1", "dimNone"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_matches_torch_weight_norm(kind: str, dim: int | None, dtype: torch.dtype) -> None:
    ours, ref = _pair(kind, dtype, dim)
    x = torch.randn(LAYERS[kind][1], dtype=dtype)
    dy = torch.randn_like(ref(x))
    got, want = _grads(ours, x, dy), _grads(ref, x, dy)
    assert set(got) == set(want) >= {"output", "weight", "grad_input", f"grad_{G}", f"grad_{V}"}
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert _rel(got[key], want[key]) <= TOLERANCE[dtype], key


@pytest.mark.parametrize("kind", list(LAYERS))
def test_wrapping_keeps_the_function_and_sets_g_to_the_norm(kind: str) -> None:
    make, shape = LAYERS[kind]
    plain = make().double()
    wrapped = weight_norm(copy.deepcopy(plain))
    x = torch.randn(shape, dtype=torch.float64)
    assert _rel(wrapped(x), plain(x)) <= 1e-12
    g = wrapped.state_dict()[G]
    assert g.shape == (plain.weight.shape[0],) + (1,) * (plain.weight.dim() - 1)
    norms = plain.weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(g.flatten(), norms, rtol=1e-12, atol=0)
    # the weight is recomputed from (g, v): doubling g doubles w
    with torch.no_grad():
        g.mul_(2.0)
    assert torch.allclose(wrapped.weight, 2 * plain.weight, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dim", [0, 1, None], ids=["dim0", "dim1", "dimNone"])
def test_state_dict_keys_and_interchange_with_torch(dim: int | None) -> None:
    ours, ref = _pair("conv2d", torch.float64, dim)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["bias", G, V]
    x = torch.randn(LAYERS["conv2d"][1], dtype=torch.float64)
    # torch's state dict into ours, and ours into a fresh torch layer
    fresh_ours = weight_norm(nn.Conv2d(3, 4, 3, stride=2).double(), dim=dim)
    fresh_ours.load_state_dict(ref.state_dict())
    fresh_ref = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, stride=2), dim=dim)
    fresh_ref.double().load_state_dict(ours.state_dict())
    assert _rel(fresh_ours(x), ref(x)) <= 1e-12
    assert _rel(fresh_ref(x), ours(x)) <= 1e-12


def test_registry_builds_it_with_options() -> None:
    layer = normzoo.build_norm("WN", nn.Linear(5, 3), dim=1)
    assert is_weight_normed(layer) and isinstance(layer, nn.Linear)
    assert layer.state_dict()[G].shape == (1, 5)
    spec = normzoo.get_norm("wn")
    assert spec.kind == "weight" and spec.cls is weight_norm and spec.options() == ("dim",)


def test_does_not_call_torch_fused_weight_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("called a fused weight-norm op")

    monkeypatch.setattr(torch, "_weight_norm", forbidden)
    monkeypatch.setattr(torch, "norm_except_dim", forbidden)
    layer = weight_norm(nn.Conv2d(3, 4, 3))
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize(
    "module",
    [nn.BatchNorm2d(4), nn.ConvTranspose2d(3, 4, 3), nn.ReLU(), nn.Embedding(5, 3)],
    ids=["batchnorm", "convtranspose", "relu-no-weight", "embedding"],
)
def test_unsupported_module_is_a_type_error(module: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"weight_norm wraps Linear, Conv1d, Conv2d, Conv3d; got"):
        weight_norm(module)
    if isinstance(module, nn.ReLU):
        with pytest.raises(TypeError, match="has no weight"):
            weight_norm(module)


def test_wrapping_twice_is_an_error() -> None:
    layer = weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="already weight-normalised"):
        weight_norm(layer)
    with pytest.raises(ValueError, match="already weight-normalised"):
        weight_norm(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)))


def test_bad_dim() -> None:
    with pytest.raises(ValueError, match="dim must be None, -1"):
        WeightNorm(dim=-3)
    with pytest.raises(ValueError, match="out of range for a 2-D weight"):
        weight_norm(nn.Linear(3, 2), dim=2)


def test_is_weight_normed() -> None:
    assert is_weight_normed(weight_norm(nn.Conv1d(2, 3, 1)))
    assert is_weight_normed(nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 3, 1)))
    assert not is_weight_normed(nn.Conv1d(2, 3, 1))
    assert not is_weight_normed(nn.ReLU())


def _model(wrap: object = weight_norm) -> nn.Sequential:
    return nn.Sequential(
        wrap(nn.Conv2d(3, 8, 3)),  # type: ignore[operator]
        nn.ReLU(),
        nn.BatchNorm2d(8),
        wrap(nn.Conv2d(8, 6, 3, bias=True)),  # type: ignore[operator]
        nn.ReLU(),
        nn.Flatten(),
        wrap(nn.Linear(6 * 5 * 5, 7)),  # type: ignore[operator]
    )


@pytest.mark.parametrize(
    "wrap",
    [weight_norm, nn.utils.parametrizations.weight_norm],
    ids=["normzoo", "torch-native"],
)
def test_data_dependent_init_standardises_each_unit_on_the_batch(wrap: object) -> None:
    model = _model(wrap).double()
    x = 3.0 * torch.randn(32, 3, 9, 9, dtype=torch.float64) + 1.0
    before = {n: b.clone() for n, b in model.named_buffers()}
    g_before = model[0].parametrizations.weight.original0.clone()
    data_dependent_init(model, x)
    assert not torch.allclose(model[0].parametrizations.weight.original0, g_before)
    # no training side effects on the BatchNorm in between: buffers as before the init
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert model.training
    h = x
    checked = 0
    for layer in model:  # the training-mode forward the init prepared the layers for
        h = layer(h)
        if is_weight_normed(layer):
            dims = [0, 2, 3] if h.dim() == 4 else [0]
            assert h.mean(dims).abs().max() < 1e-10
            assert (h.var(dims, unbiased=False) - 1).abs().max() < 1e-6
            checked += 1
    assert checked == 3


def test_data_dependent_init_without_bias_sets_unit_variance() -> None:
    layer = weight_norm(nn.Linear(6, 4, bias=False)).double()
    x = torch.randn(50, 6, dtype=torch.float64) + 2.0
    data_dependent_init(layer, x)
    assert (layer(x).var(0, unbiased=False) - 1).abs().max() < 1e-6


def test_data_dependent_init_errors() -> None:
    with pytest.raises(ValueError, match="no weight-normalised layer"):
        data_dependent_init(nn.Sequential(nn.Linear(2, 2)), torch.randn(3, 2))
    with pytest.raises(ValueError, match="dim=0"):
        data_dependent_init(weight_norm(nn.Linear(2, 2), dim=1), torch.randn(3, 2))
    unused = nn.ModuleDict({"a": weight_norm(nn.Linear(2, 2)), "b": weight_norm(nn.Linear(2, 2))})

    class OnlyA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = unused

        def forward(self, x: Tensor) -> Tensor:
            return self.layers["a"](x)

    with pytest.warns(RuntimeWarning, match="1 weight-normalised layer"):
        data_dependent_init(OnlyA(), torch.randn(5, 2))


@pytest.mark.parametrize(
    ("shape", "dims"),
    [((4, 3), (1,)), ((4, 3, 2, 2), (1, 2, 3)), ((4, 3, 2), (0, 2)), ((3, 2, 2), (0, 1, 2))],
    ids=["linear-dim0", "conv2d-dim0", "conv1d-dim1", "whole"],
)
def test_hand_written_backward_passes_gradcheck(
    shape: tuple[int, ...], dims: tuple[int, ...]
) -> None:
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    keep = [1 if d in dims else s for d, s in enumerate(shape)] if len(dims) < len(shape) else []
    g = (torch.rand(keep, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g, v: WeightNormFunction.apply(g, v, dims), (g, v))


def test_saves_no_more_for_backward_than_torch() -> None:
    def saved(layer: nn.Module) -> int:
        storages: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(torch.randn(2, 16, 8, 8))
        return sum(storages.values())

    ours = weight_norm(nn.Conv2d(16, 32, 3))
    ref = nn.utils.parametrizations.weight_norm(nn.Conv2d(16, 32, 3))
    assert 0 < saved(ours) <= saved(ref)


def test_create_graph_grads_match_and_are_differentiable_again() -> None:
    """With ``create_graph=True`` the grads equal a plain backward's, and they are differentiable
    again: gradgradcheck of the parametrization w.r.t. g and v."""
    layer = weight_norm(nn.Linear(5, 3)).double()
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    x = torch.randn(4, 5, dtype=torch.float64)
    dy = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(layer(x), (g, v), dy)
    graph = torch.autograd.grad(layer(x), (g, v), dy, create_graph=True)
    for a, b in zip(graph, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert graph[1].requires_grad
    g0 = (torch.rand(3, 1, dtype=torch.float64) + 0.5).requires_grad_(True)
    v0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: WeightNormFunction.apply(a, b, (1,)), (g0, v0))
