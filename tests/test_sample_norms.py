"""Facts about the per-sample layers (LayerNorm, GroupNorm, InstanceNorm) beyond the generic parity.

The generic tests (test_parity.py, test_gradcheck.py) compare every registered layer with its
native reference; these check what is specific to this family: LayerNorm is ``nn.LayerNorm(C)`` on
(N, C) input, the three layers are one GroupNorm computation, InstanceNorm's running statistics
follow torch's ``nn.InstanceNorm2d``, channels_last is kept, the output is standardised over the
layer's own axes, a sample's output never depends on the rest of its batch, and the hand-written
backward saves no more than the native kernel.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normzoo
from normzoo.norms import _group_norm_function as gn_function
from normzoo.norms.sample import GroupNorm, GroupNormFunction, InstanceNorm, LayerNorm

C = 6


def _randomise(layer: nn.Module) -> nn.Module:
    """Affine parameters away from ones/zeros, so a swapped gamma/beta would show."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return layer


def _fwd_bwd(layer: nn.Module, x: Tensor, dy: Tensor) -> list[Tensor]:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return [y, x.grad, *(p.grad for _, p in sorted(layer.named_parameters()))]


def _max_rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_layernorm_equals_torch_layernorm_on_2d() -> None:
    x = 2.0 * torch.randn(16, C, dtype=torch.float64) + 1.0
    dy = torch.randn_like(x)
    ours = _randomise(LayerNorm(C).double())
    ref = nn.LayerNorm(C).double()
    ref.load_state_dict(ours.state_dict())
    for a, b in zip(_fwd_bwd(ours, x, dy), _fwd_bwd(ref, x, dy), strict=True):
        assert _max_rel(a, b) <= 1e-12


@pytest.mark.parametrize("shape", [(4, C), (4, C, 7), (3, C, 4, 5), (2, C, 3, 4, 2)])
def test_layernorm_is_groupnorm_with_one_group(shape: tuple[int, ...]) -> None:
    x, dy = torch.randn(shape), torch.randn(shape)
    ln = _randomise(LayerNorm(C))
    gn = GroupNorm(C, num_groups=1)
    gn.load_state_dict(ln.state_dict())
    for a, b in zip(_fwd_bwd(ln, x, dy), _fwd_bwd(gn, x, dy), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(4, C, 7), (3, C, 4, 5), (2, C, 3, 4, 2)])
def test_instancenorm_is_groupnorm_with_one_channel_per_group(shape: tuple[int, ...]) -> None:
    x, dy = torch.randn(shape), torch.randn(shape)
    inorm = _randomise(InstanceNorm(C))
    gn = GroupNorm(C, num_groups=C)
    gn.load_state_dict(inorm.state_dict())
    for a, b in zip(_fwd_bwd(inorm, x, dy), _fwd_bwd(gn, x, dy), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_instancenorm_running_stats_follow_torch(momentum: float) -> None:
    ours = _randomise(InstanceNorm(C, momentum=momentum, track_running_stats=True).double())
    ref = nn.InstanceNorm2d(C, affine=True, momentum=momentum, track_running_stats=True).double()
    ref.load_state_dict(ours.state_dict())
    for step in range(4):
        x = (1.0 + step) * torch.randn(3, C, 5, 4, dtype=torch.float64) + step
        dy = torch.randn_like(x)
        for a, b in zip(_fwd_bwd(ours, x, dy), _fwd_bwd(ref, x, dy), strict=True):
            assert _max_rel(a, b) <= 1e-10
    assert _max_rel(ours.running_mean, ref.running_mean) <= 1e-12
    assert _max_rel(ours.running_var, ref.running_var) <= 1e-12
    assert not torch.allclose(ours.running_var, torch.ones(C, dtype=torch.float64))
    # normzoo counts batches as BatchNorm does; nn.InstanceNorm2d leaves the counter at 0
    assert ours.num_batches_tracked.item() == 4
    ours.eval()
    ref.eval()
    x = torch.randn(2, C, 6, 3, dtype=torch.float64)
    dy = torch.randn_like(x)
    for a, b in zip(_fwd_bwd(ours, x, dy), _fwd_bwd(ref, x, dy), strict=True):
        assert _max_rel(a, b) <= 1e-10
    # eval uses the running statistics: the output is no longer standardised per instance
    assert ours(x).mean(dim=(2, 3)).sub(ours.bias).abs().max() > 1e-3


def test_instancenorm_momentum_none_is_a_cumulative_average_of_batch_means() -> None:
    """As BatchNorm: the running stats are the plain average over the batches seen so far.

    (nn.InstanceNorm2d treats momentum=None as 0, i.e. it never updates; normzoo follows the
    BatchNorm convention, as its native reference does.)
    """
    layer = InstanceNorm(C, momentum=None, track_running_stats=True).double()
    means, variances = [], []
    for step in range(3):
        x = (1.0 + step) * torch.randn(4, C, 3, 5, dtype=torch.float64) - step
        layer(x)
        means.append(x.mean(dim=(2, 3)).mean(0))
        variances.append(x.var(dim=(2, 3), unbiased=True).mean(0))
    assert _max_rel(layer.running_mean, torch.stack(means).mean(0)) <= 1e-12
    assert _max_rel(layer.running_var, torch.stack(variances).mean(0)) <= 1e-12
    assert layer.num_batches_tracked.item() == 3


def test_instancenorm_without_running_stats_is_the_same_in_eval() -> None:
    layer = _randomise(InstanceNorm(C))
    assert layer.running_mean is None and dict(layer.named_buffers()) == {}
    x = torch.randn(3, C, 5, 5)
    y_train = layer(x)
    assert torch.equal(layer.eval()(x), y_train)


@pytest.mark.parametrize(
    ("layer", "group"),
    [(LayerNorm(C, affine=False), C), (GroupNorm(C, num_groups=3, affine=False), 2)],
    ids=["layernorm", "groupnorm"],
)
@pytest.mark.parametrize("shape", [(5, C), (4, C, 9), (3, C, 4, 5)])
def test_output_is_standardised_over_the_layer_axes(
    layer: nn.Module, group: int, shape: tuple[int, ...]
) -> None:
    x = 3.0 * torch.randn(shape, dtype=torch.float64) + 2.0
    y = layer.double()(x)
    yg = y.reshape(shape[0], C // group, -1)  # (N, G, values of the group)
    var = x.reshape(shape[0], C // group, -1).var(-1, unbiased=False)
    assert yg.mean(-1).abs().max() < 1e-12
    # biased variance of the output is sigma2 / (sigma2 + eps), 1 up to eps
    expected = var / (var + layer.eps)
    assert (yg.var(-1, unbiased=False) - expected).abs().max() < 1e-12


def test_instancenorm_standardises_each_sample_and_channel() -> None:
    x = 3.0 * torch.randn(4, C, 5, 6, dtype=torch.float64) - 1.0
    y = InstanceNorm(C, affine=False).double()(x)
    assert y.mean(dim=(2, 3)).abs().max() < 1e-12
    assert (y.var(dim=(2, 3), unbiased=False) - 1).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "instancenorm"])
def test_a_sample_does_not_depend_on_its_batch(name: str) -> None:
    layer = _randomise(
        normzoo.build_norm(name, C, **({"num_groups": 2} if "group" in name else {}))
    )
    x = torch.randn(5, C, 4, 4, dtype=torch.float64)
    layer.double()
    alone = layer(x[:1])
    x2 = x.clone()
    x2[1:] = 100 * torch.randn_like(x2[1:]) + 7  # change every other sample
    assert torch.allclose(layer(x)[:1], alone, rtol=0, atol=1e-13)
    assert torch.allclose(layer(x2)[:1], alone, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((3, C, 5, 4), torch.channels_last), ((2, C, 3, 4, 5), torch.channels_last_3d)],
    ids=["4d", "5d"],
)
@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "instancenorm"])
def test_channels_last_input(
    name: str, shape: tuple[int, ...], memory_format: torch.memory_format
) -> None:
    layer = _randomise(
        normzoo.build_norm(name, C, **({"num_groups": 3} if "group" in name else {}))
    )
    x = torch.randn(shape, dtype=torch.float64)
    dy = torch.randn_like(x)
    layer.double()
    xcl = x.contiguous(memory_format=memory_format)
    dense = _fwd_bwd(layer, x, dy)
    last = _fwd_bwd(layer, xcl, dy.contiguous(memory_format=memory_format))
    assert last[0].is_contiguous(memory_format=memory_format)
    for a, b in zip(last, dense, strict=True):
        assert _max_rel(a, b) <= 1e-12


@pytest.mark.parametrize(
    ("groups", "shape"),
    [(1, (3, C)), (2, (3, C, 4)), (C, (2, C, 3, 2)), (3, (2, C, 2, 2, 2))],
)
@pytest.mark.parametrize("affine", [True, False])
def test_hand_written_backward_passes_gradcheck(
    groups: int, shape: tuple[int, ...], affine: bool
) -> None:
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(C, dtype=torch.float64, requires_grad=affine)
    if len(shape) == 4:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return GroupNormFunction.apply(
            x, w if affine else None, b if affine else None, groups, 1e-5
        )[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "instancenorm"])
def test_large_mean_does_not_cancel_in_float32(name: str, stats_route: str) -> None:
    """mu^2 / sigma^2 = 1e6: the one-pass E[x^2] - mu^2 would lose every bit of sigma^2 in float32."""
    kw = {"num_groups": 2} if name == "groupnorm" else {}
    ours = _randomise(normzoo.build_norm(name, C, **kw))
    ref = normzoo.build_norm(f"native_{name}", C, **kw).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, C, 5, 6, dtype=torch.float64) + 1000.0
    dy = torch.randn_like(x)
    got = _fwd_bwd(ours, x.float(), dy.float())
    want = _fwd_bwd(ref, x, dy)
    for a, b in zip(got, want, strict=True):
        assert _max_rel(a.double(), b) <= 1e-3


def test_large_mean_path_passes_gradcheck(stats_route: str) -> None:
    x = (torch.randn(2, C, 3, 2, dtype=torch.float64) + 100.0).requires_grad_(True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: GroupNormFunction.apply(*t, 3, 1e-5)[0], (x, w, b))


def _saved_bytes(layer: nn.Module, x: Tensor) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "instancenorm"])
@pytest.mark.parametrize("shape", [(8, 32, 6, 6), (4, 32, 3, 5, 2)])
def test_saves_no_more_for_backward_than_native(name: str, shape: tuple[int, ...]) -> None:
    kw = {"num_groups": 8} if name == "groupnorm" else {}
    x = torch.randn(shape, requires_grad=True)
    ours = _saved_bytes(normzoo.build_norm(name, 32, **kw), x)
    native = _saved_bytes(normzoo.build_norm(f"native_{name}", 32, **kw), x)
    assert x.numel() * 4 < ours <= native


def test_bfloat16_input_close_to_float32() -> None:
    layer = _randomise(GroupNorm(C, num_groups=2))
    x = torch.randn(4, C, 5, 5)
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05


HALF_CASES = [  # (layer name, groups, input shape): a large mean, as after a ReLU
    ("layernorm", 1, (8, 16, 8, 8)),
    ("groupnorm", 3, (64, 6)),
    ("groupnorm", 2, (4, 6, 5, 5)),
    ("instancenorm", 6, (4, 6, 5, 5)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("name", "groups", "shape"), HALF_CASES, ids=[c[0] for c in HALF_CASES])
def test_half_precision_input_as_accurate_as_torch(
    name: str, groups: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """y and the grads of a half-precision input with mean 10 and std 1, measured against float64
    on the same (rounded) input, within 1.5x the error of torch's own layer in that precision.
    (The shift ~ -mu * scale was rounded to half precision before y = x * scale + shift, and the
    backward centred with a rounded mean: y was off by up to 6 where torch's is off by 1e-3.)"""
    x = (torch.randn(shape) + 10.0).to(dtype)
    dy = torch.randn(shape).to(dtype)
    w = (torch.rand(shape[1]) + 0.5).to(dtype)
    b = torch.randn(shape[1]).to(dtype)
    layer = normzoo.build_norm(
        name, shape[1], **({"num_groups": groups} if name == "groupnorm" else {})
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    layer = layer.to(dtype)

    def run(f, dt: torch.dtype) -> list[Tensor]:
        xi = x.detach().to(dt).requires_grad_(True)
        wi, bi = (t.detach().to(dt).requires_grad_(True) for t in (w, b))
        y = f(xi, wi, bi)
        y.backward(dy.to(dt))
        return [t.double() for t in (y, xi.grad, wi.grad, bi.grad)]

    def native(xi: Tensor, wi: Tensor, bi: Tensor) -> Tensor:
        return torch.nn.functional.group_norm(xi, groups, wi, bi, 1e-5)

    exact, theirs = run(native, torch.float64), run(native, dtype)
    xi = x.detach().clone().requires_grad_(True)
    y = layer(xi)
    y.backward(dy)
    mine = [t.double() for t in (y, xi.grad, layer.weight.grad, layer.bias.grad)]
    assert y.dtype == dtype
    for what, m, t, e in zip(("y", "dx", "dweight", "dbias"), mine, theirs, exact, strict=True):
        err, ref = (m - e).abs().max().item(), (t - e).abs().max().item()
        assert err <= 1.5 * ref + 1e-3 * e.abs().max().item(), (what, err, ref)


def test_works_under_torch_compile() -> None:
    layer = _randomise(GroupNorm(C, num_groups=3).double())
    x = torch.randn(3, C, 4, 5, dtype=torch.float64)
    dy = torch.randn_like(x)
    eager = _fwd_bwd(layer, x, dy)
    compiled = _fwd_bwd(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, dy)
    for a, b in zip(compiled, eager, strict=True):
        assert _max_rel(a, b) <= 1e-12


def test_repr_and_spec() -> None:
    assert "num_groups=3" in repr(GroupNorm(C, num_groups=3))
    assert "track_running_stats=False" in repr(InstanceNorm(C))
    assert InstanceNorm(C).affine  # normzoo's default, unlike torch's InstanceNorm
    spec = normzoo.get_norm("in")
    assert spec.needs_spatial and spec.native == "native_instancenorm"
    assert normzoo.get_norm("gn").defaults["num_groups"] == 32


@pytest.mark.filterwarnings("error::UserWarning")  # (var_mean warned on an empty compiled batch)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "instancenorm"])
def test_empty_batch_and_empty_spatial_dims(name: str, compiled: bool) -> None:
    kw = {"num_groups": 2} if name == "groupnorm" else {}
    layer = normzoo.build_norm(name, C, **kw)
    if name == "instancenorm":
        layer = InstanceNorm(C, track_running_stats=True)
    x = torch.randn(0, C, 3, 3, requires_grad=True)
    y = (torch.compile(layer, backend="aot_eager") if compiled else layer)(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(C))
    if name == "instancenorm":  # nothing seen, nothing averaged in
        assert torch.equal(layer.running_var, torch.ones(C))
    with pytest.raises(ValueError, match=r"non-empty spatial dims.*\(2, 6, 0, 3\)"):
        layer(torch.randn(2, C, 0, 3))


@pytest.mark.parametrize("groups", [1, 2])
def test_large_mean_path_passes_gradcheck_on_2d_input(groups: int, stats_route: str) -> None:
    """The centred fallback on (N, C) input, where dy * (x - mu) is the per-(n, c) dot itself."""
    x = (torch.randn(5, C, dtype=torch.float64) * 0.01 + 100.0).requires_grad_(True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    assert GroupNormFunction.apply(x, w, b, groups, 1e-5)[0].isfinite().all()
    assert torch.autograd.gradcheck(
        lambda *t: GroupNormFunction.apply(*t, groups, 1e-5)[0], (x, w, b)
    )


@pytest.mark.parametrize(
    ("groups", "shape", "shift"),
    [(1, (3, C), 0.0), (2, (3, C, 4), 0.0), (3, (2, C, 2, 2), 100.0), (2, (3, C), 100.0)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_preallocated_output_path_passes_gradcheck(
    monkeypatch: pytest.MonkeyPatch,
    groups: int,
    shape: tuple[int, ...],
    shift: float,
    channels_last: bool,
) -> None:
    """Large inputs write y and dx into buffers allocated up front; force that path on small ones."""
    monkeypatch.setattr(gn_function, "_PREALLOCATE_BYTES", 0)
    x = torch.randn(shape, dtype=torch.float64) + shift
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    y = GroupNormFunction.apply(x, w, b, groups, 1e-5)[0]
    ref = torch.nn.functional.group_norm(x, groups, w, b, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    if channels_last and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(
        lambda *t: GroupNormFunction.apply(*t, groups, 1e-5)[0], (x, w, b)
    )


def test_preallocated_output_path_with_unmergeable_spatial_dims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(N, C, H, W) with H, W transposed in memory: no (N, G, C/G, H*W) view; a contiguous buffer."""
    monkeypatch.setattr(gn_function, "_PREALLOCATE_BYTES", 0)
    x = torch.randn(2, C, 3, 5, dtype=torch.float64).transpose(2, 3).requires_grad_(True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    y = GroupNormFunction.apply(x, w, b, 2, 1e-5)[0]
    torch.testing.assert_close(
        y, torch.nn.functional.group_norm(x, 2, w, b, 1e-5), rtol=1e-10, atol=1e-10
    )
    assert torch.autograd.gradcheck(lambda *t: GroupNormFunction.apply(*t, 2, 1e-5)[0], (x, w, b))


def test_create_graph_grads_match_and_are_differentiable_again() -> None:
    """With ``create_graph=True`` the grads equal a plain backward's, and the general Function's
    double backward passes gradgradcheck (whatever the input size)."""
    x = torch.randn(3, C, 5, dtype=torch.float64, requires_grad=True)
    layer = _randomise(GroupNorm(C, num_groups=2).double())
    dy = torch.randn_like(x, requires_grad=True)  # so that the graph of the grads needs dy
    plain = torch.autograd.grad(layer(x), x, dy)[0]
    (graph,) = torch.autograd.grad(layer(x), x, dy, create_graph=True)
    torch.testing.assert_close(graph, plain, rtol=1e-12, atol=1e-12)
    assert graph.requires_grad
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda *t: GroupNormFunction.apply(*t, 2, 1e-5)[0], (x, w, b), atol=1e-5
    )


# LayerNorm, C/G = 3, InstanceNorm (C/G = 1; not on 2-D input, where each group holds one value
# and y is beta plus rounding noise times 1 / sqrt(eps))
@pytest.mark.parametrize(
    ("groups", "layout"),
    [
        (g, layout)
        for g in (1, 2, C)
        for layout in ("2d", "4d", "channels_last")
        if not (g == C and layout == "2d")
    ],
)
def test_inductor_compiled_path_matches_eager(groups: int, layout: str) -> None:
    """The compiled path with inductor: y through a (N, G, C/G) view on 2-D input, the backward's
    uncentred sums on (N * C, S) rows (contiguous) or the (N, G, C/G, S) view (channels_last,
    2-D), per-group b, c for C/G > 1 and the inlined per-row form for C/G = 1 -- float32 output
    and gradients as eager, with mean^2 / var ~ 4 in every group (as in a network)."""
    torch._dynamo.reset()
    shape = (8, C) if layout == "2d" else (4, C, 9, 7)
    x = 2.0 * torch.randn(shape) + torch.linspace(-4.0, 4.0, C).view(C, *[1] * (len(shape) - 2))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    layer = _randomise(GroupNorm(C, num_groups=groups))
    eager = _fwd_bwd(layer, x, dy)
    compiled = _fwd_bwd(torch.compile(layer, fullgraph=True, dynamic=False), x, dy)
    if layout == "channels_last":
        assert compiled[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(compiled, eager, strict=True):
        assert _max_rel(a, b) <= 2e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_input_compiles_without_graph_break(channels_last: bool) -> None:
    """Inputs above ``_PREALLOCATE_BYTES`` take the preallocating path in eager mode only."""
    torch._dynamo.reset()
    layer = _randomise(GroupNorm(8, num_groups=2))
    x = torch.randn(2, 8, 128, 128)  # 1 MiB in float32
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() * x.element_size() >= gn_function._PREALLOCATE_BYTES
    dy = torch.randn_like(x)
    eager = _fwd_bwd(layer, x, dy)
    compiled = _fwd_bwd(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, dy)
    for a, b in zip(compiled, eager, strict=True):
        assert _max_rel(a, b) <= 1e-5


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "instancenorm"])
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (4, 8, 64, 64)])  # below and above 1 MiB
@pytest.mark.parametrize("compiled", [False, True])
def test_output_takes_an_inplace_op(name: str, shape: tuple[int, ...], compiled: bool) -> None:
    """ResNet's ReLU(inplace=True) follows the norm: the output must not be a Function's view."""
    kw = {"num_groups": 4} if name == "groupnorm" else {}
    layer = normzoo.build_norm(name, shape[1], **kw)
    block = nn.Sequential(layer, nn.ReLU(inplace=True))
    ref = nn.Sequential(normzoo.build_norm(f"native_{name}", shape[1], **kw), nn.ReLU())
    ref.load_state_dict(block.state_dict())
    run = torch.compile(block, fullgraph=True) if compiled else block
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = run(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
