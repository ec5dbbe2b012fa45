"""The last-dimension norms against torch (issue 15, item 1): ``layernorm_last`` against
``torch.nn.LayerNorm(normalized_shape)`` (``bias`` on and off), ``rmsnorm`` against
``torch.nn.RMSNorm``, on (B, T, D) and (B, T, H, W) inputs in float64 and float32; ConvNeXt's
per-pixel LayerNorm2d; and the channels-first LayerNorm refusing a (B, T, D) input."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import normzoo

#: max |ours - torch| seen on these shapes: ~1e-15 (float64), ~1e-6 (float32)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
SHAPES = {"BTD": ((4, 7, 16), 16), "BTHW": ((2, 5, 6, 8), (6, 8))}


def _torch_twin(name: str, normalized_shape: object, bias: bool, dtype: torch.dtype) -> nn.Module:
    if name == "rmsnorm":
        return nn.RMSNorm(normalized_shape, dtype=dtype)
    return nn.LayerNorm(normalized_shape, bias=bias, dtype=dtype)


def _compare(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, tol: float) -> None:
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2, atol=tol, rtol=tol)
    torch.testing.assert_close(x1.grad, x2.grad, atol=tol, rtol=tol)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, atol=tol * 10, rtol=tol, msg=n1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize(
    ("name", "bias"), [("layernorm_last", True), ("layernorm_last", False), ("rmsnorm", False)]
)
def test_parity_with_torch(name: str, bias: bool, layout: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    shape, normalized_shape = SHAPES[layout]
    theirs = _torch_twin(name, normalized_shape, bias, dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        if getattr(theirs, "bias", None) is not None:
            theirs.bias.normal_()
    options = {"bias": bias} if name == "layernorm_last" else {}
    ours = normzoo.build_norm(name, normalized_shape, dtype=dtype, **options)
    ours.load_state_dict(theirs.state_dict())  # torch's state dict loads: same names and shapes
    assert theirs.load_state_dict(ours.state_dict()) is not None  # and back
    x = torch.randn(shape, dtype=dtype) * 3 + 2  # a mean far from 0
    _compare(ours, theirs, x, TOL[dtype])


def test_rmsnorm_eps_none_is_the_dtypes_machine_eps() -> None:
    x = torch.full((2, 4), 1e-4, dtype=torch.float32)
    ours, theirs = normzoo.build_norm("rmsnorm", 4), nn.RMSNorm(4)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.eps is None and "eps" in normzoo.get_norm("rmsnorm").options()


def test_rmsnorm_has_no_bias_and_elementwise_affine_off_has_no_state() -> None:
    assert set(normzoo.build_norm("rmsnorm", 4).state_dict()) == {"weight"}
    assert normzoo.build_norm("layernorm_last", 4, elementwise_affine=False).state_dict() == {}
    assert set(normzoo.build_norm("layernorm_last", 4, bias=False).state_dict()) == {"weight"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_layernorm2d_is_convnexts_per_pixel_layernorm(
    dtype: torch.dtype, memory_format: torch.memory_format
) -> None:
    torch.manual_seed(0)
    c = 8
    ours = normzoo.build_norm("layernorm2d", c, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    ln = nn.LayerNorm(c, dtype=dtype)
    ln.load_state_dict(ours.state_dict())

    class Permuted(nn.Module):  # ConvNeXt's LayerNorm2d, as timm writes it
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = ln.weight, ln.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    x = (torch.randn(2, c, 5, 6, dtype=dtype) + 1).contiguous(memory_format=memory_format)
    _compare(ours, Permuted(), x, TOL[dtype])


def test_channels_first_layernorm_refuses_a_token_tensor() -> None:
    ln = normzoo.build_norm("ln", 16)
    message = "did you mean build_norm('layernorm_last', 16)"
    with pytest.raises(ValueError, match=re.escape(message)):
        ln(torch.randn(2, 7, 16))


def test_channels_first_layernorm_warns_when_both_readings_fit() -> None:
    """(B, T, D) with T == D: the (N, C, L) reading runs (the GN-paper LN), with a warning that
    says which axes it normalises and names layernorm_last."""
    x = torch.randn(2, 16, 16)
    with pytest.warns(UserWarning, match="normalises each sample over C and L jointly"):
        y = normzoo.build_norm("ln", 16)(x)
    joint = (x - x.mean((1, 2), keepdim=True)) / torch.sqrt(
        x.var((1, 2), keepdim=True, correction=0) + 1e-5
    )
    torch.testing.assert_close(y, joint, atol=1e-5, rtol=1e-5)


def test_layernorm_last_refuses_the_wrong_trailing_dims() -> None:
    layer = normzoo.build_norm("layernorm_last", 16)
    with pytest.raises(
        ValueError,
        match=re.escape("normalises the last 1 dim(s), got input of shape (2, 16, 4, 4)"),
    ):
        layer(torch.randn(2, 16, 4, 4))


def test_which_layernorm_each_name_gives() -> None:
    assert type(normzoo.build_norm("ln", 8)).__name__ == "LayerNorm"
    assert normzoo.get_norm("ln").kind == "activation"
    assert normzoo.get_norm("ln_last").name == "layernorm_last"
    assert normzoo.get_norm("layernorm_last").kind == "last_dim"
    assert normzoo.get_norm("ln2d").name == "layernorm2d"
    with pytest.raises(ValueError, match="normalized_shape must be"):
        normzoo.build_norm("rmsnorm", (4, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 32) * 4 + 10
    ours = normzoo.build_norm("layernorm_last", 32)(x.to(dtype))
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), nn.LayerNorm(32)(x), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["layernorm_last", "rmsnorm"])
def test_torch_func_per_sample_gradients_match_torchs_layer(name: str) -> None:
    """torch.func (issue 15, item 6): vmap(grad(...)) through the layer, per-sample gradients of
    its parameters and of the input, equal to those through torch's own layer."""
    from torch.func import functional_call, grad, vmap

    dt = torch.float64
    ours = normzoo.build_norm(name, 4).to(dt)
    theirs = (nn.LayerNorm(4) if name == "layernorm_last" else nn.RMSNorm(4)).to(dt)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 4, dtype=dt)

    def per_sample(module: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(module, p, (xi,)).pow(3).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x), vmap(grad(loss, 1), (None, 0))(
            params, x
        )

    (p1, x1), (p2, x2) = per_sample(ours), per_sample(theirs)
    assert p1.keys() == p2.keys() and p1["weight"].shape == (3, 4)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x1, x2, atol=1e-12, rtol=1e-12)
