"""Ghost BatchNorm / Batch Renorm through the BatchNorm Function (``normzoo.norms._ghost.
ghost_batch_norm``: on the (K, G, C, R) view itself for contiguous input, over (ghost batch,
channel) pairs for channels-last input and a remainder) equals the composed formula it replaced:
var_mean and autograd on the (K, G, C, *S) views (``normzoo.testing.ghost_reference``). Outputs,
the grads of the input and the parameters, the running statistics over a few steps and Batch
Renorm's diagnostics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import Tensor

import normzoo
import normzoo.norms._ghost as ghost
import normzoo.norms.batch as batch
from normzoo.testing.ghost_reference import composed_ghost_batch_norm

C = 3
STEPS = 3


#: Batch Renorm with limits that clip some (ghost batch, channel) pairs, not all
OPTIONS = {"batchnorm": {}, "batchrenorm": {"rmax": 1.5, "dmax": 0.5, "schedule": "none"}}
SHAPES = {"2d": ((12, C), None), "4d": ((12, C, 3, 2), None), "4d-cl": ((12, C, 3, 2), "cl")}


def _layer(name: str, size: int, dtype: torch.dtype) -> torch.nn.Module:
    layer = normzoo.build_norm(name, C, ghost_batch_size=size, **OPTIONS[name]).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.running_mean.copy_(torch.tensor([0.5, -0.5, 1.0]))
        layer.running_var.copy_(torch.tensor([0.3, 2.0, 1.0]))
    return layer


def _steps(layer: torch.nn.Module, shape: tuple[int, ...], layout: str | None, dtype) -> list:
    """Outputs, grads, running statistics and diagnostics of ``STEPS`` training steps."""
    gen = torch.Generator().manual_seed(0)
    record = []
    for _ in range(STEPS):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = layer(x)
        if layout == "cl":
            assert y.is_contiguous(memory_format=torch.channels_last)
        dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        state = [layer.running_mean.clone(), layer.running_var.clone()]
        if isinstance(layer, batch.BatchRenorm):
            state += [layer.clip_fraction_r, layer.clip_fraction_d, layer.last_r, layer.last_d]
        record.append((y.detach(), dx, dw, db, *state))
    return record


def _both(monkeypatch, name: str, size: int, shape, layout, dtype) -> tuple[list, list, list]:
    calls: list[tuple[str, int]] = []  # (route, (ghost batch, channel) pairs) per Function call
    real = ghost._batch_norm_apply

    def counted(*args):
        view = len(args) > 7 and args[7]
        x = args[0]
        calls.append(("view", x.shape[0] * x.shape[2]) if view else ("pairs", x.shape[1]))
        return real(*args)

    monkeypatch.setattr(ghost, "_batch_norm_apply", counted)
    fast = _steps(_layer(name, size, dtype), shape, layout, dtype)
    monkeypatch.setattr(batch, "ghost_batch_norm", composed_ghost_batch_norm)
    old = _steps(_layer(name, size, dtype), shape, layout, dtype)
    return fast, old, calls


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("size", [4, 5], ids=["no-remainder", "remainder"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_ghost_path_equals_the_composed_formula_float64(
    monkeypatch, name: str, size: int, layout: str
) -> None:
    """N = 12: ghost size 4 is three full ghost batches (one call of the BatchNorm Function on
    3 * C pairs: on the view, or on a copy as pairs for channels-last input), 5 is two and a
    remainder of 2 (a second call on C channels, whose pairs are a view)."""
    shape, memory = SHAPES[layout]
    fast, old, calls = _both(monkeypatch, name, size, shape, memory, torch.float64)
    full = "pairs" if memory == "cl" else "view"
    expected = [(full, 3 * C)] if size == 4 else [(full, 2 * C), ("pairs", C)]
    assert calls == expected * STEPS
    for step_fast, step_old in zip(fast, old, strict=True):
        for a, b in zip(step_fast, step_old, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if name == "batchrenorm":  # the limits clip some pairs, not all
        for i in (6, 7):  # clip_fraction_r, clip_fraction_d
            assert any(0 < step[i].item() < 1 for step in fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_ghost_path_equals_the_composed_formula_in_low_precision(
    monkeypatch, name: str, dtype: torch.dtype
) -> None:
    """float32 to float32 rounding; half input is computed in float32, as before (its output
    half, its statistics float32 before the buffers' update)."""
    fast, old, _ = _both(monkeypatch, name, 5, (12, C, 3, 2), None, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for step_fast, step_old in zip(fast, old, strict=True):
        assert step_fast[0].dtype == dtype
        for a, b in zip(step_fast, step_old, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- the routes other than eager: the BatchNorm Function's own (torch.compile, torch.func,
# torch.jit.trace, create_graph) and torch.fx's one node, with ghost batches and a remainder


def _step(layer, x: Tensor, dy: Tensor) -> list[Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    return [y, *torch.autograd.grad(y, (x, *layer.parameters()), dy)]


def _inputs(shape: tuple[int, ...] = (12, C, 3, 2)) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


def _state(layer) -> list[Tensor]:
    names = ["running_mean", "running_var", "clip_fraction_r", "clip_fraction_d", "last_r"]
    return [getattr(layer, n) for n in names if hasattr(layer, n)]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ghost_batches_under_torch_compile(name: str) -> None:
    torch._dynamo.reset()  # recompile counts are per process: a pytest worker's other files add up
    eager, module = _layer(name, 5, torch.float64), _layer(name, 5, torch.float64)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for shape in ((12, C, 3, 2), (12, C)):
        x, dy = _inputs(shape)
        for a, b in zip(_step(compiled, x, dy), _step(eager, x, dy), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(_state(module), _state(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ghost_batches_under_vmap_and_grad() -> None:
    """vmap over 3 batches of ghost-batched BatchNorm (no running statistics: a transform
    cannot update them) equals the loop; grad of a loss equals autograd's."""
    layer = normzoo.build_norm("bn", C, ghost_batch_size=5, track_running_stats=False).double()
    params = {n: p.detach() + 0.1 * i for i, (n, p) in enumerate(layer.named_parameters())}
    xs = torch.randn(3, 12, C, 4, dtype=torch.float64) * 2 + 1
    dys = torch.randn(3, 12, C, 4, dtype=torch.float64)

    def loss(p: dict[str, Tensor], x: Tensor, dy: Tensor) -> Tensor:
        return (torch.func.functional_call(layer, p, (x,)) * dy).sum()

    ys = torch.func.vmap(lambda x: torch.func.functional_call(layer, params, (x,)))(xs)
    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(
        params, xs, dys
    )
    for i in range(3):
        x = xs[i].clone().requires_grad_(True)
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        y = torch.func.functional_call(layer, p, (x,))
        dx, *dp = torch.autograd.grad(y, (x, *p.values()), dys[i])
        torch.testing.assert_close(ys[i], y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[1][i], dx, rtol=1e-12, atol=1e-12)
        for n, g in zip(p, dp, strict=True):
            torch.testing.assert_close(grads[0][n][i], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ghost_batches_under_jit_trace(name: str) -> None:
    """A traced training-mode layer records the forward's tensor ops: the same outputs, grads and
    running statistics as the eager layer on new inputs."""
    eager, layer = _layer(name, 5, torch.float64), _layer(name, 5, torch.float64)
    x, dy = _inputs()
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(layer, x, check_trace=False)
    eager.load_state_dict(layer.state_dict())  # (tracing ran one training step)
    x, dy = x * 0.5 - 1, dy.flip(0)
    for a, b in zip(_step(traced, x, dy), _step(eager, x, dy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # (the traced running update holds its Python-number factors as float32 constants: ~1e-8
    # relative, as plain BatchNorm's traced m / (m - 1))
    for a, b in zip(_state(layer)[:2], _state(eager)[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("renorm", [False, True], ids=["BN", "BRN"])
def test_ghost_batches_are_twice_differentiable(renorm: bool) -> None:
    """create_graph: the Function's differentiable backward; N = 5, ghost 2 (a remainder of one
    sample with 3 values per channel). Batch Renorm's moving statistics are far from every ghost
    batch's, so r and d clip everywhere (their stop-gradient is then the true derivative)."""
    moving = None
    if renorm:
        ref_mean = torch.tensor([10.0, -10.0, 10.0], dtype=torch.float64)
        ref_var = torch.full((C,), 1e-4, dtype=torch.float64)
        moving = (ref_mean, ref_var, torch.tensor([1.1, 0.2], dtype=torch.float64))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, C, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return ghost.ghost_batch_norm(x, w, b, 1e-5, 2, moving)[0]

    if renorm:
        extra = ghost.ghost_batch_norm(x, w, b, 1e-5, 2, moving)[3]
        assert extra[0].item() == 1.0 and extra[1].item() == 1.0
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_ghost_batches_under_torch_fx() -> None:
    model = torch.nn.Sequential(_layer("batchrenorm", 5, torch.float64), torch.nn.Tanh())
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    x, _ = _inputs()
    torch.testing.assert_close(traced(x), eager(x), rtol=0, atol=0)
    layer = traced.get_submodule("0")
    torch.testing.assert_close(layer.running_var, eager[0].running_var, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("renorm", [False, True], ids=["bn", "brn"])
@pytest.mark.parametrize("shape", [(12, C), (12, C, 3, 2)], ids=["2d", "4d"])
def test_view_route_equals_the_pairs_route(shape, renorm: bool, dtype: torch.dtype) -> None:
    """The (K, G, C, R) view and the rearranged (ghost batch, channel) pairs it replaced give the
    same outputs, statistics, Batch Renorm extras and grads (gamma's and beta's summed over the
    ghost batches on the view, through the repeat on the pairs), to rounding."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    weight, bias = torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    moving = None
    if renorm:  # limits that clip some pairs
        moving = tuple(
            torch.tensor(v, dtype=dtype) for v in ([0.5, -0.5, 1.0], [0.3, 2.0, 1.0], [1.5, 0.5])
        )
    results = []
    for pairs_only in (False, True):
        inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        y, mean, var, extra = ghost.ghost_batch_norm(
            *inputs, 1e-5, 4, moving, _pairs_only=pairs_only
        )
        y.backward(dy)
        results.append([y.detach(), mean, var, *extra, *(t.grad for t in inputs)])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(*results, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
