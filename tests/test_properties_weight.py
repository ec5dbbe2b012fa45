"""Property tests (hypothesis) for the ``weight`` layers w = g * v / ||v|| (WeightNorm, its native
reference): the effective weight has norm |g| and direction sign(g) v / ||v|| per output unit,
wrapping keeps the layer's function, and the output is invariant to scaling each unit's v by a
positive constant, with finite gradients. Settings and tolerances: tests/property_support.py
(reproducible: ``derandomize=True``); the activation layers' properties: test_properties.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from property_support import DTYPES, PROPERTY, RTOL, _check, _finite
from torch import Tensor, nn

import normzoo

#: weight entries that are not w = g v / ||v|| (tests/test_standardize.py has their properties)
NOT_G_AND_V = {
    "weightstandardization": "W_hat = (W - mean) / std per unit: no g, no v",
    "gn_ws": "WS and a GroupNorm after a conv",
}
WEIGHT = [n for n in normzoo.list_norms("weight") if n not in NOT_G_AND_V]  # scratch and reference


def _draw_weight_case(
    data: st.DataObject, name: str
) -> tuple[nn.Module, Tensor, tuple[int, ...], torch.Generator]:
    """A drawn nn.Linear / nn.ConvNd wrapped through the registry (and its input), g and v set to
    random values: g of either sign, v at a random scale. Returns (module, x, norm dims, gen)."""
    kind = data.draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]), label="module")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bias = data.draw(st.booleans(), label="bias")
    n_in = data.draw(st.integers(1, 5), label="in features")
    n_out = data.draw(st.integers(1, 5), label="out features")
    batch = data.draw(st.integers(1, 3), label="N")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    if kind == "linear":
        module: nn.Module = nn.Linear(n_in, n_out, bias=bias)
        x = torch.randn(batch, n_in, generator=gen, dtype=torch.float64)
    else:
        nd = int(kind[-2])
        kernel = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd), label="kernel")
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        module = conv(n_in, n_out, kernel_size=tuple(kernel), bias=bias)
        size = [k + data.draw(st.integers(0, 2), label="input size - kernel") for k in kernel]
        x = torch.randn(batch, n_in, *size, generator=gen, dtype=torch.float64)
    module = module.to(dtype)
    x = x.to(dtype)
    options = normzoo.get_norm(name).options()
    kw = {"dim": data.draw(st.sampled_from([0, None]), label="dim")} if "dim" in options else {}
    with torch.no_grad():
        before = module(x)
    module = normzoo.build_norm(name, module, **kw)
    with torch.no_grad():
        _check(
            "output right after wrapping", module(x), before, RTOL[dtype] * 1e2 * _bound(module, x)
        )
    g = module.parametrizations.weight.original0
    v = module.parametrizations.weight.original1
    dims = (
        tuple(range(v.dim()))
        if g.dim() == 0
        else tuple(d for d in range(v.dim()) if g.shape[d] == 1)
    )
    with torch.no_grad():
        sign = torch.where(torch.rand(g.shape, generator=gen) < 0.5, -1.0, 1.0)
        g.copy_(
            sign * 10.0 ** torch.empty(g.shape, dtype=torch.float64).uniform_(-2, 2, generator=gen)
        )
        v_scale = 10.0 ** data.draw(st.floats(-3.0, 3.0), label="log10 |v|")
        v.copy_(v_scale * torch.randn(v.shape, generator=gen, dtype=torch.float64))
    return module, x, dims, gen


def _bound(module: nn.Module, x: Tensor) -> Tensor:
    """|W| |x| (+ |bias|): the scale of the rounding error in the module's output."""
    w = module.weight.detach().abs()
    if isinstance(module, nn.Linear):
        out = F.linear(x.abs(), w)
    else:
        out = module._conv_forward(x.abs(), w, None)  # type: ignore[operator]
    if module.bias is not None:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        out = out + module.bias.detach().abs().view(shape)
    return out.double() + 1e-30


@pytest.mark.parametrize("name", WEIGHT)
@PROPERTY
@given(data=st.data())
def test_weight_norm_has_length_g_and_direction_v(name: str, data: st.DataObject) -> None:
    """w = g * v / ||v||: ||w|| = |g| and w / ||w|| = sign(g) * v / ||v|| per output unit (over the
    whole weight for dim=None); wrapping kept the layer's function (checked in the draw)."""
    module, _, dims, _ = _draw_weight_case(data, name)
    g = module.parametrizations.weight.original0.detach().double()
    v = module.parametrizations.weight.original1.detach().double()
    w = module.weight.detach().double()
    keep = g.dim() > 0
    norm_w = torch.linalg.vector_norm(w, dim=dims, keepdim=keep)
    tol = RTOL[module.weight.dtype] * 10
    _check("||w|| per unit", norm_w, g.abs(), tol * g.abs())
    direction = torch.sign(g) * v / torch.linalg.vector_norm(v, dim=dims, keepdim=keep)
    _check("direction of w", w / norm_w, direction, tol)


@pytest.mark.parametrize("name", WEIGHT)
@PROPERTY
@given(data=st.data())
def test_weight_norm_output_is_invariant_to_scaling_v(name: str, data: st.DataObject) -> None:
    """Scaling each unit's v by its own positive constant changes neither w nor the output; the
    gradients of x, g, v and the bias are finite."""
    module, x, dims, gen = _draw_weight_case(data, name)
    v = module.parametrizations.weight.original1
    g = module.parametrizations.weight.original0
    with torch.no_grad():
        y = module(x)
        w = module.weight.clone()
        c_shape = g.shape if g.dim() > 0 else ()
        log_c = torch.empty(c_shape, dtype=torch.float64).uniform_(-3, 3, generator=gen)
        v.mul_((10.0**log_c).to(v.dtype))
        tol = RTOL[w.dtype] * 10
        _check(
            "w after scaling v", module.weight, w, tol * w.abs().amax(dim=dims, keepdim=g.dim() > 0)
        )
        _check("output after scaling v", module(x), y, tol * _bound(module, x))
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
    _finite("grad x", xg.grad)
    for pname, p in module.named_parameters():
        _finite(f"grad {pname}", p.grad)
