"""BatchNorm specifics beyond the registry-wide parity (tests/test_parity.py): torch's error for one
value per channel, eval without running statistics, the cumulative average (momentum=None),
num_batches_tracked, memory formats, the cancellation guard of the one-pass statistics, reduced
precision and the saved-for-backward memory."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import normzoo
from normzoo.norms import _base
from normzoo.norms.batch import BatchNorm, _batch_stats

C = 4


def _pair(**options: object) -> tuple[BatchNorm, torch.nn.Module]:
    ours = normzoo.build_norm("batchnorm", C, **options).double()
    ref = normzoo.build_norm("native_batchnorm", C, **options).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    return ours, ref  # type: ignore[return-value]


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_one_value_per_channel_in_training_raises_torchs_error(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    with pytest.raises(ValueError) as ours:
        BatchNorm(C)(x)
    with pytest.raises(ValueError) as ref:
        normzoo.build_norm("native_batchnorm", C)(x)
    assert str(ours.value) == str(ref.value)
    assert str(ours.value) == (
        f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}"
    )


def test_one_value_per_channel_is_fine_in_eval_with_running_stats() -> None:
    bn = BatchNorm(C).eval()
    x = torch.randn(1, C)
    torch.testing.assert_close(bn(x), x / torch.sqrt(torch.tensor(1.0 + bn.eps)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm(C, track_running_stats=False).eval()(x)  # batch statistics: torch raises too


def test_eval_without_tracked_stats_uses_batch_statistics() -> None:
    bn = BatchNorm(C, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert "running_mean" not in bn.state_dict()
    x = 3.0 * torch.randn(5, C, 6) + 2.0
    y_train = bn.train()(x)
    y_eval = bn.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=0)
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
    torch.testing.assert_close(y_eval, (x - mean) / torch.sqrt(var + bn.eps))


def test_eval_uses_running_stats_and_leaves_them_alone() -> None:
    ours, ref = _pair()
    with torch.no_grad():
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    ours.eval()
    ref.eval()
    x = torch.randn(6, C, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_momentum_none_is_the_cumulative_average() -> None:
    bn = BatchNorm(C, momentum=None).double()
    means, variances = [], []
    for step in range(5):
        x = torch.randn(4 + step, C, 3, dtype=torch.float64) * (step + 1) + step
        bn(x)
        means.append(x.mean(dim=(0, 2)))
        variances.append(x.var(dim=(0, 2), unbiased=True))  # running_var holds the unbiased one
    assert int(bn.num_batches_tracked) == 5
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        bn.running_var, torch.stack(variances).mean(0), rtol=1e-12, atol=1e-12
    )


def test_momentum_blends_with_the_unbiased_batch_variance() -> None:
    bn = BatchNorm(C, momentum=0.3).double()
    x = torch.randn(3, C, 5, dtype=torch.float64) + 1.0
    bn(x)
    expected_mean = 0.3 * x.mean(dim=(0, 2))
    expected_var = 0.7 + 0.3 * x.var(dim=(0, 2), unbiased=True)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-12, atol=1e-12)


def test_num_batches_tracked_counts_training_steps_only() -> None:
    bn = BatchNorm(C)
    assert bn.num_batches_tracked.dtype == torch.long and int(bn.num_batches_tracked) == 0
    for _ in range(3):
        bn(torch.randn(4, C))
    bn.eval()(torch.randn(4, C))
    assert int(bn.num_batches_tracked) == 3
    bn.reset_parameters()
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(C))
    assert torch.equal(bn.running_var, torch.ones(C))


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((3, C, 5, 6), torch.channels_last), ((2, C, 3, 4, 5), torch.channels_last_3d)],
    ids=["4d", "5d"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_in_channels_last_out(
    shape: tuple[int, ...], memory_format: torch.memory_format, training: bool
) -> None:
    bn = BatchNorm(C).double().train(training)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=memory_format).requires_grad_(True)
    x_c = x.clone().requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float64)
    y_cl, y_c = bn(x_cl), bn(x_c)
    assert y_cl.is_contiguous(memory_format=memory_format)
    assert y_c.is_contiguous()
    torch.testing.assert_close(y_cl, y_c, rtol=1e-12, atol=1e-12)
    y_cl.backward(dy)
    y_c.backward(dy)
    assert x_cl.grad is not None and x_c.grad is not None
    torch.testing.assert_close(x_cl.grad, x_c.grad, rtol=1e-12, atol=1e-12)


def _naive_var(x: Tensor, dims: list[int]) -> Tensor:
    """E[x^2] - E[x]^2 without any guard: what the fast path computes."""
    return (x * x).mean(dims) - x.mean(dims) ** 2


def test_large_mean_falls_back_to_centred_statistics(stats_route: str) -> None:
    """|mean| >> std cancels in E[x^2] - E[x]^2; the guard recomputes from the centred input (on
    the one-pass route; small inputs are centred from the start)."""
    x64 = torch.randn(16, C, 8, 8, dtype=torch.float64) * 0.5 + 3000.0
    x = x64.float()
    dims = [0, 2, 3]
    true_var = x.double().var(dim=dims, unbiased=False)
    naive_err = ((_naive_var(x, dims).double() - true_var).abs() / true_var).max().item()
    assert naive_err > 1e-2  # the one-pass formula is useless here ...
    _, var, centred = _batch_stats(x, x.numel() // C, torch.empty_like(x))
    assert centred  # ... so the guard took the centred route
    assert ((var.double() - true_var).abs() / true_var).max().item() < 1e-5
    ours, ref = _pair()
    truth = normzoo.build_norm("native_batchnorm", C).double()
    truth.load_state_dict(ours.state_dict())
    ours.float()
    ref.float()
    dy = torch.randn_like(x64)
    errors = {}
    for name, layer, inp in (("ours", ours, x), ("native", ref, x), ("truth", truth, x.double())):
        inp = inp.clone().requires_grad_(True)
        y = layer(inp)
        y.backward(dy.to(inp.dtype))
        errors[name] = (y.double(), inp.grad.double(), layer.running_var.double())
    rel = {
        name: [
            ((a - b).abs().max() / b.abs().max()).item()
            for a, b in zip(v, errors["truth"], strict=True)
        ]
        for name, v in errors.items()
    }
    # float32 cannot hold x - mean better than ulp(3000) / std ~ 5e-4: the output and input gradient
    # are within a small factor of torch's own kernel (which accumulates in float64);
    # running_var is accurate to float32
    for i in range(2):
        assert rel["ours"][i] <= 5 * rel["native"][i] + 1e-6, (i, rel)
    assert rel["ours"][2] < 1e-6


def test_well_conditioned_input_takes_the_one_pass_route() -> None:
    x = torch.randn(8, C, 5) * 2.0 + 1.0
    _, var, centred = _batch_stats(x, x.numel() // C, torch.empty_like(x))
    assert not centred
    torch.testing.assert_close(var, x.var(dim=(0, 2), unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, C), (8, C, 5), (2, C, 3, 3)])
def test_small_input_takes_the_small_route(shape: tuple[int, ...]) -> None:
    """Small CPU inputs take the Function with the fewest ops (SmallBatchNorm), larger ones (or
    _SMALL_NUMEL = 0) the one-pass route; both save x itself for the backward."""
    x = (torch.randn(shape, dtype=torch.float64) * 2.0 + 1.0).requires_grad_(True)
    big = (torch.randn(64, C, 70, dtype=torch.float64) + 1.0).requires_grad_(True)
    assert x.numel() <= _base._SMALL_NUMEL < big.numel()
    for inp, route in ((x, "SmallBatchNorm"), (big, "_BatchNormFunction")):
        saved: list[Tensor] = []
        pack = saved.append
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, pack=pack: pack(t) or t, lambda t: t
        ):
            y = BatchNorm(C).double()(inp)
        assert type(y.grad_fn).__name__.startswith(route), type(y.grad_fn).__name__
        assert any(t is inp for t in saved)


def test_bfloat16_matches_native() -> None:
    ours, ref = _pair()
    ours.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    x = (torch.randn(8, C, 6, 6) * 2.0 + 1.0).to(torch.bfloat16)
    y, yr = ours(x), ref(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_var.float(), ref.running_var.float(), rtol=1e-2, atol=0)


@pytest.mark.parametrize(
    "layer_dtype", [torch.float32, torch.bfloat16], ids=["f32-layer", "bf16-layer"]
)
@pytest.mark.parametrize("name", ["batchnorm", "batchrenorm", "instancenorm"])
def test_eval_with_running_stats_keeps_a_half_input_dtype_and_accuracy(
    name: str, layer_dtype: torch.dtype
) -> None:
    """Evaluation with the running statistics returns the input's dtype (it returned float32
    for bfloat16 input to a float32 layer, where torch returns bfloat16), with the error of one
    rounding of y also when the running mean is large (a bfloat16 shift ~ -mean * scale would
    lose it)."""
    kwargs = {"track_running_stats": True} if name == "instancenorm" else {}
    layer = normzoo.build_norm(name, C, **kwargs)
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(9.0, 11.0, C))
        layer.running_var.copy_(torch.linspace(0.5, 2.0, C))
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, C))
    layer = layer.to(layer_dtype).eval()
    x = (torch.randn(4, C, 3, 3) + 10.0).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    p = {k: v.double() for k, v in layer.state_dict().items() if v.is_floating_point()}
    view = (-1, 1, 1)
    exact = (x.double() - p["running_mean"].view(view)) / (
        p["running_var"].view(view) + 1e-5
    ).sqrt() * p["weight"].view(view) + p["bias"].view(view)
    # within 1.5 units in the last place of bfloat16 (2^-8 relative) of the exact value
    tol = 1.5 * 2.0**-8 * exact.abs().clamp_min(1.0)
    assert ((y.double() - exact).abs() <= tol).all()


def _saved_bytes(module: torch.nn.Module, x: Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("shape", [(8, 16, 6, 6), (32, 16)], ids=["conv", "dense"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_saves_no_more_for_backward_than_native(shape: tuple[int, ...], training: bool) -> None:
    ours = normzoo.build_norm("batchnorm", shape[1]).train(training)
    ref = normzoo.build_norm("native_batchnorm", shape[1]).train(training)
    x = torch.randn(shape, requires_grad=True)
    ours_bytes, ref_bytes = _saved_bytes(ours, x), _saved_bytes(ref, x)
    assert ours_bytes >= x.numel() * x.element_size()  # x itself is kept: the check is live
    assert ours_bytes <= ref_bytes


def test_bad_input_gets_a_clear_error() -> None:
    bn = BatchNorm(C)
    with pytest.raises(ValueError, match=r"expects 4 channels at dim 1"):
        bn(torch.randn(2, C + 1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        bn(torch.ones(2, C, dtype=torch.long))
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(C, momentum=1.5)


@pytest.mark.parametrize("shape", [(4, C), (64, C, 70)], ids=["small-route", "one-pass-route"])
def test_double_backward_matches_native(shape: tuple[int, ...]) -> None:
    """d/dx of ||dL/dx||^2 through BatchNorm equals torch's (its grads are differentiable again)."""
    grads = []
    for layer in _pair():
        layer.double()
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_(True)
        (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), [x, layer.weight]))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["batchnorm", "batchrenorm"])
def test_an_empty_batch_behaves_as_in_torch(name: str) -> None:
    ours = normzoo.build_norm(name, C)
    ref = normzoo.build_norm("native_batchnorm", C)
    x = torch.randn(0, C, 5, requires_grad=True)
    y, yr = ours(x), ref(x)
    assert y.shape == yr.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_momentum_none_running_stats_follow_torch_over_many_steps(dtype: torch.dtype) -> None:
    """The cumulative factor is the tensor 1 / num_batches_tracked (no ``.item()``); its value is
    torch's ``1.0 / float(count)`` rounded to the buffers' dtype, so the buffers track torch's."""
    ours = BatchNorm(C, momentum=None).to(dtype)
    ref = torch.nn.BatchNorm1d(C, momentum=None).to(dtype)
    for step in range(7):
        x = torch.randn(5, C, 3, dtype=dtype) * (step + 1) + step
        ours(x)
        ref(x)
    assert int(ours.num_batches_tracked) == 7
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=tol, atol=tol)


def test_momentum_none_has_no_graph_break_under_torch_compile() -> None:
    """The cumulative average used to read the step count back with ``.item()``: a graph break."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(BatchNorm(C, momentum=None).double())(
        torch.randn(6, C, 3, dtype=torch.float64)
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = BatchNorm(C, momentum=None).double()
    module = BatchNorm(C, momentum=None).double()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x = torch.randn(6, C, 3, dtype=torch.float64) + step
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    assert int(module.num_batches_tracked) == 3
    torch.testing.assert_close(module.running_mean, eager.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.running_var, eager.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["batchnorm", "batchrenorm"])
@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last"])
def test_compiled_backward_matches_eager(name: str, layout: str) -> None:
    """Under torch.compile the statistics are centred (var_mean) and the backward takes its
    centred form, which writes dx in place without ``out=`` there (dynamo refuses a
    non-contiguous out)."""
    shape = (6, C) if layout == "2d" else (3, C, 4, 5)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, dtype=torch.float64)
    eager = normzoo.build_norm(name, C).double()
    module = normzoo.build_norm(name, C).double()
    with torch.no_grad():
        for m in (eager, module):
            m.weight.copy_(torch.linspace(0.5, 1.5, C))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for layer in (eager, compiled):
        inp = x.clone().requires_grad_(True)
        layer(inp).backward(dy)
        results.append(
            (inp.grad, *(p.grad for p in (eager if layer is eager else module).parameters()))
        )
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
