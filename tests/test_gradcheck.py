"""``torch.autograd.gradcheck`` in float64 for every registered from-scratch layer (registry-driven).

* ``activation`` layers: w.r.t. the input and every parameter (weight, bias), in training mode on 2-D
  (unless the layer needs spatial dims) and 3-D input, and in eval mode with running statistics for
  layers that can track them (``track_running_stats=True`` where it is an option, the buffers moved
  away from their 0/1 initialisation). Batch Renorm also with its clipping active at limits other
  than BatchNorm's (its default schedule starts as plain BN).
* ``weight`` layers: wrapped around a small ``nn.Linear`` and ``nn.Conv2d``; w.r.t. the input and
  every parameter of the wrapped module.

The layer is called through ``torch.func.functional_call`` with the parameters as gradcheck inputs
and *fresh copies* of the buffers on every call, so a training step's running-statistics update
cannot change the function between gradcheck's evaluations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import normzoo

C = 4
DT = torch.float64


def _activation_options(name: str) -> dict[str, Any]:
    return {"num_groups": 2} if "num_groups" in normzoo.get_norm(name).options() else {}


def _prepared(name: str, layer: nn.Module) -> nn.Module:
    """Virtual BatchNorm takes its first batch as its (detached) reference: give it one first, so
    gradcheck differentiates the layer, not the choice of reference from the perturbed input."""
    if name == "virtualbatchnorm":
        layer.set_reference(torch.randn(7, C, 5, dtype=layer.weight.dtype) * 1.3 - 0.4)
    return layer


def _has_running_stats_option(name: str) -> bool:
    return "track_running_stats" in normzoo.get_norm(name).options()


def _perturb_buffers(module: nn.Module) -> None:
    with torch.no_grad():
        for bname, buf in module.named_buffers():
            if bname.endswith("running_mean"):
                buf.copy_(torch.linspace(-0.5, 0.5, buf.numel(), dtype=buf.dtype))
            elif bname.endswith("running_var"):
                buf.copy_(torch.linspace(0.5, 2.0, buf.numel(), dtype=buf.dtype))


def _as_function(module: nn.Module) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """``f(x, *params)`` calling ``module`` with those parameters and fresh copies of its buffers."""
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        state = {**dict(zip(names, ps, strict=True)), **{n: b.clone() for n, b in buffers.items()}}
        return functional_call(module, state, (x,))

    return f, params


def _gradcheck(module: nn.Module, x: Tensor) -> None:
    f, params = _as_function(module)
    x = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def activation_cases() -> list[tuple[str, str, tuple[int, ...]]]:
    cases = []
    for name in normzoo.list_norms(kind="activation", references=False):
        spec = normzoo.get_norm(name)
        shapes = [(3, C, 5)] if spec.needs_spatial else [(6, C), (3, C, 5)]
        cases += [(name, "train", shape) for shape in shapes]
        if _has_running_stats_option(name):
            cases.append((name, "eval", (3, C, 5)))
    return cases


CASES = activation_cases()


@pytest.mark.parametrize(
    ("name", "mode", "shape"), CASES, ids=[f"{n}-{m}-{len(s)}d" for n, m, s in CASES]
)
def test_activation_gradcheck(
    name: str, mode: str, shape: tuple[int, ...], stats_route: str
) -> None:
    options = _activation_options(name)
    if mode == "eval":
        options["track_running_stats"] = True
    layer = normzoo.build_norm(name, C, **options).to(DT).train(mode == "train")
    _prepared(name, layer)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if pname.endswith("weight") else torch.randn_like(p))
    _perturb_buffers(layer)
    x = torch.randn(shape, dtype=DT) * 1.5 + 0.5
    _gradcheck(layer, x)


@pytest.mark.parametrize(
    ("name", "shape"),
    [(n, s) for n, m, s in CASES if m == "train"],
    ids=[f"{n}-{len(s)}d" for n, m, s in CASES if m == "train"],
)
def test_backward_twice_with_retain_graph(
    name: str, shape: tuple[int, ...], stats_route: str
) -> None:
    """A second backward through the same graph gives the same gradients: the backward passes
    must not modify what the forward saved (they work in place on their own buffers only)."""
    layer = normzoo.build_norm(name, C, **_activation_options(name)).to(DT)
    x = torch.randn(shape, dtype=DT).requires_grad_(True)
    dy = torch.randn(shape, dtype=DT)
    inputs = [x, *layer.parameters()]
    y = layer(x)
    first = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    second = torch.autograd.grad(y, inputs, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# (the identity, "none", has no backward of its own: its grads are differentiable again)
SECOND_ORDER = [(n, s) for n, m, s in CASES if m == "train" and n != "none"]


@pytest.mark.parametrize(
    ("name", "shape"), SECOND_ORDER, ids=[f"{n}-{len(s)}d" for n, s in SECOND_ORDER]
)
def test_double_backward_passes_gradgradcheck(
    name: str, shape: tuple[int, ...], stats_route: str
) -> None:
    """Under ``create_graph`` the grads are differentiable again (the hand-written backward hands
    over to the layer's formula differentiated by autograd): second derivatives w.r.t. the input
    and the parameters against finite differences."""
    layer = _prepared(name, normzoo.build_norm(name, C, **_activation_options(name)).to(DT))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    f, params = _as_function(layer)
    x = torch.randn(shape, dtype=DT).requires_grad_(True)
    assert torch.autograd.gradgradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


#: layers whose backward is autograd's own (no hand-written backward, no torch twin): there is
#: no second-order term a ``once_differentiable`` backward could lose, and gradgradcheck above
#: already checks their second derivatives against finite differences
AUTOGRAD_BACKWARD = {
    "filterresponsenorm",
    "evonorms0",
    "evonormb0",
    "batchchannelnorm",
    # no torch layer computes these either
    "meanonlybatchnorm",
    "switchablenorm",
    "virtualbatchnorm",
}
#: a layer's plain-autograd twin for the penalty test (Batch Renorm at its start is BatchNorm)
TWINS = {n: normzoo.get_norm(n).native or "native_batchnorm" for n, _ in SECOND_ORDER}
PENALTY = [
    (n, s)
    for n, s in SECOND_ORDER
    if normzoo.get_norm(n).kind == "activation" and n not in AUTOGRAD_BACKWARD
]


@pytest.mark.parametrize(("name", "shape"), PENALTY, ids=[f"{n}-{len(s)}d" for n, s in PENALTY])
def test_a_gradient_penalty_matches_torchs_layer(
    name: str, shape: tuple[int, ...], stats_route: str
) -> None:
    """A WGAN-GP-like penalty ||dL/dx||^2, with L linear in the layer's output (a constant
    incoming gradient) and a learnable scale before the layer: its gradient w.r.t. the scale and
    the layer's parameters equals the one through torch's own layer (which autograd
    differentiates twice). With a ``once_differentiable`` backward this penalty silently lost
    the layer's second-order term."""
    kwargs = _activation_options(name)
    twin_name = TWINS[name]
    results = []
    for which in (name, twin_name):
        torch.manual_seed(0)
        layer = normzoo.build_norm(which, C, **kwargs).to(DT)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=DT))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, C, dtype=DT))
        scale = torch.linspace(0.7, 1.3, C, dtype=DT).view((C,) + (1,) * (len(shape) - 2))
        scale.requires_grad_(True)
        x = torch.randn(shape, dtype=DT).requires_grad_(True)
        out = (layer(x * scale) * torch.randn(shape, dtype=DT)).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        penalty = gx.square().sum()
        wrt = [scale, layer.weight, layer.bias]  # (the bias has no say in dL/dx: zeros)
        results.append(torch.autograd.grad(penalty, wrt, materialize_grads=True))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


def test_batchrenorm_gradcheck_with_clipping_active(stats_route: str) -> None:
    """r = clip(sigma_B / sigma) and d = clip((mu_B - mu) / sigma) are stop-gradient: the backward is
    the derivative of the forward only where they are locally constant, i.e. clipped. Here every
    channel clips both, at limits other than BatchNorm's (1, 0), so the renorm terms of the
    backward (gamma * r as scale, dgamma = r * sum(dy * x_hat) + d * sum(dy)) are checked; with r, d
    inside the limits the gradient is the paper's stop-gradient one, checked against the paper's
    formulas in tests/test_batchrenorm.py."""
    layer = normzoo.build_norm("batchrenorm", C, rmax=1.2, dmax=0.3, schedule="none").to(DT)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([2.0, -2.0, 3.0, -3.0], dtype=DT))
        layer.running_var.copy_(torch.tensor([0.1, 10.0, 0.1, 10.0], dtype=DT))
    x = torch.randn(6, C, 5, dtype=DT) * 1.5 + 0.2
    probe = copy.deepcopy(layer)
    probe(x)
    assert probe.clip_fraction_r.item() == 1.0 and probe.clip_fraction_d.item() == 1.0
    _gradcheck(layer, x)


WEIGHT_NORMS = normzoo.list_norms(kind="weight", references=False)
WRAPPED: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 4, 4)),
}

if WEIGHT_NORMS:  # collected once a weight reparametrisation is registered

    @pytest.mark.parametrize("wrapped", list(WRAPPED))
    @pytest.mark.parametrize("name", WEIGHT_NORMS)
    def test_weight_gradcheck(name: str, wrapped: str) -> None:
        make, in_shape = WRAPPED[wrapped]
        module = normzoo.build_norm(name, make().to(DT), **_activation_options(name))
        assert sum(p.numel() for p in module.parameters()) > 0
        _gradcheck(module, torch.randn(in_shape, dtype=DT))


LAST_DIM_NORMS = normzoo.list_norms(kind="last_dim", references=False)


@pytest.mark.parametrize("name", LAST_DIM_NORMS)
@pytest.mark.parametrize("normalized_shape", [C, (2, C)], ids=["last", "last-two"])
def test_last_dim_gradcheck_and_gradgradcheck(name: str, normalized_shape: Any) -> None:
    """The trailing-dims norms (torch's LayerNorm / RMSNorm API) on (B, T, D) and (B, T, H, W)."""
    layer = normzoo.build_norm(name, normalized_shape).to(DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    shape = (2, 3, C) if isinstance(normalized_shape, int) else (2, 3, 2, C)
    x = torch.randn(shape, dtype=DT) * 1.5 + 0.5
    _gradcheck(layer, x)
    f, params = _as_function(layer)
    x = x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_every_from_scratch_layer_is_covered() -> None:
    """The parametrisation above really is the registry: a layer added later is checked too."""
    covered = {name for name, _, _ in CASES} | set(WEIGHT_NORMS) | set(LAST_DIM_NORMS)
    assert covered == set(normzoo.list_norms(references=False))
    assert {"batchnorm", "batchrenorm"} <= covered
    assert ("batchnorm", "eval", (3, C, 5)) in CASES


@pytest.mark.parametrize("name", sorted({n for n, _, _ in CASES}))
def test_training_after_a_first_call_under_inference_mode(name: str) -> None:
    """The small-input paths cache 0-dim constants on first use; created under inference_mode,
    they must still serve a later training step (an inference tensor cannot be saved for
    backward)."""
    from normzoo.norms import _base

    _base._cpu_scalar.cache_clear()
    layer = normzoo.build_norm(name, C, **_activation_options(name)).to(DT)
    x = torch.randn(3, C, 5, dtype=DT)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
