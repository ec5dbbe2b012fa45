"""Batch Renorm (Ioffe 2017) against the paper's formulas written out plainly, its equality with
BatchNorm at rmax = 1, dmax = 0, the progress-driven limits schedule with its step fallback, the clip
fractions, and the compiled module (whose backward reads r and d)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import Tensor, nn

import normzoo
from normzoo.norms.batch import BatchNorm, BatchRenorm, set_progress

C = 6
LAYOUTS = {
    "2d": ((16, C), torch.contiguous_format),
    "4d": ((4, C, 3, 5), torch.contiguous_format),
    "4d-cl": ((4, C, 3, 5), torch.channels_last),
}


def paper_batch_renorm(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mu: Tensor,
    var: Tensor,
    *,
    rmax: float,
    dmax: float,
    eps: float,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One training step of Algorithm 1 of the paper, in plain autograd ops (float64).

    Returns y, the updated moving mean and (unbiased) variance, and the unclipped r and d.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    mu_b = x.mean(dims)
    var_b = ((x - mu_b.view(shape)) ** 2).sum(dims) / m  # biased
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(var + eps)  # the moving statistics from before this step's update
    r_raw = (sigma_b / sigma).detach()
    d_raw = ((mu_b - mu) / sigma).detach()
    r = torch.clamp(r_raw, 1.0 / rmax, rmax)
    d = torch.clamp(d_raw, -dmax, dmax)
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape)
    y = gamma.view(shape) * (x_hat * r.view(shape) + d.view(shape)) + beta.view(shape)
    new_mu = mu + momentum * (mu_b.detach() - mu)
    new_var = var + momentum * (var_b.detach() * m / (m - 1) - var)
    return y, new_mu, new_var, r_raw, d_raw


def _layer(**options: object) -> BatchRenorm:
    brn = normzoo.build_norm("batchrenorm", C, **options).double()
    with torch.no_grad():  # moving statistics far enough from the batches' for r and d to clip
        brn.running_mean.copy_(torch.linspace(-1.5, 1.5, C))
        brn.running_var.copy_(torch.linspace(0.1, 4.0, C))
        brn.weight.uniform_(0.5, 1.5)
        brn.bias.normal_()
    return brn  # type: ignore[return-value]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_the_papers_formulas_with_clipping_active(layout: str, stats_route: str) -> None:
    rmax, dmax, eps, momentum = 1.5, 0.5, 1e-5, 0.2
    brn = _layer(rmax=rmax, dmax=dmax, schedule="none", momentum=momentum)
    gamma = brn.weight.detach().clone().requires_grad_(True)
    beta = brn.bias.detach().clone().requires_grad_(True)
    mu, var = brn.running_mean.clone(), brn.running_var.clone()
    shape, memory_format = LAYOUTS[layout]
    clipped_r = clipped_d = unclipped = 0
    for step in range(4):
        x = (torch.randn(shape, dtype=torch.float64) * (0.5 + step) + 0.3 * step).contiguous(
            memory_format=memory_format
        )
        dy = torch.randn_like(x)
        xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = brn(xs)
        y.backward(dy)
        yr, mu, var, r_raw, d_raw = paper_batch_renorm(
            xr, gamma, beta, mu, var, rmax=rmax, dmax=dmax, eps=eps, momentum=momentum
        )
        yr.backward(dy)
        tol = {"rtol": 1e-10, "atol": 1e-10}
        torch.testing.assert_close(y, yr, **tol)
        torch.testing.assert_close(xs.grad, xr.grad, **tol)
        torch.testing.assert_close(brn.weight.grad, gamma.grad, **tol)
        torch.testing.assert_close(brn.bias.grad, beta.grad, **tol)
        torch.testing.assert_close(brn.running_mean, mu, **tol)
        torch.testing.assert_close(brn.running_var, var, **tol)
        r_out = (r_raw < 1 / rmax) | (r_raw > rmax)
        d_out = d_raw.abs() > dmax
        assert brn.clip_fraction_r.item() == pytest.approx(r_out.double().mean().item())
        assert brn.clip_fraction_d.item() == pytest.approx(d_out.double().mean().item())
        clipped_r += int(r_out.sum())
        clipped_d += int(d_out.sum())
        unclipped += int((~r_out & ~d_out).sum())
        brn.zero_grad()
        gamma.grad = beta.grad = None
    assert clipped_r > 0 and clipped_d > 0 and unclipped > 0  # both branches of both clips ran
    brn.eval()
    x = torch.randn(shape, dtype=torch.float64)
    view = [1, -1] + [1] * (x.dim() - 2)
    expected = (x - mu.view(view)) / torch.sqrt(var.view(view) + eps) * gamma.view(
        view
    ) + beta.view(view)
    torch.testing.assert_close(brn(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_is_exactly_batchnorm_at_rmax_1_dmax_0(
    layout: str, momentum: float | None, stats_route: str
) -> None:
    brn = _layer(rmax=1.0, dmax=0.0, momentum=momentum)
    bn = BatchNorm(C, momentum=momentum).double()
    bn.load_state_dict(brn.state_dict())  # same state-dict keys
    shape, memory_format = LAYOUTS[layout]
    for _ in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).contiguous(
            memory_format=memory_format
        )
        dy = torch.randn_like(x)
        outs = []
        for layer in (brn, bn):
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(dy)
            outs.append((layer(xi.detach()).detach(), xi.grad, layer.weight.grad, layer.bias.grad))
            layer.zero_grad()
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)
        assert brn.clip_fraction_r.item() == 1.0  # every r is clipped to 1 ...
        assert torch.equal(brn.running_var, bn.running_var)
        assert torch.equal(brn.num_batches_tracked, bn.num_batches_tracked)
    for layer in (brn, bn):
        layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(brn(x), bn(x))


def test_progress_zero_is_batchnorm_and_progress_one_is_fully_relaxed() -> None:
    brn = BatchRenorm(C, rmax=3.0, dmax=5.0)
    brn.set_progress(0.0)
    assert (brn.current_rmax, brn.current_dmax) == (1.0, 0.0)
    brn.set_progress(1.0)
    assert (brn.current_rmax, brn.current_dmax) == (3.0, 5.0)
    assert brn.progress == 1.0


def test_schedule_follows_the_progress_fractions() -> None:
    brn = BatchRenorm(C, rmax=3.0, dmax=5.0, relax_start=0.1, rmax_relaxed=0.5, dmax_relaxed=0.3)
    grid = [i / 100 for i in range(101)]
    limits = []
    for p in grid:
        brn.set_progress(p)
        limits.append((brn.current_rmax, brn.current_dmax))
    rmaxs, dmaxs = zip(*limits, strict=True)
    assert all(a <= b for a, b in itertools.pairwise(rmaxs))  # monotone
    assert all(a <= b for a, b in itertools.pairwise(dmaxs))
    assert all(limits[i] == (1.0, 0.0) for i in range(11))  # plain BN until relax_start
    assert rmaxs[12] > 1.0 and dmaxs[12] > 0.0
    assert rmaxs[30] == pytest.approx(2.0) and dmaxs[20] == pytest.approx(2.5)  # linear
    assert rmaxs[49] < 3.0 and rmaxs[50] == pytest.approx(3.0) and rmaxs[100] == 3.0
    assert dmaxs[29] < 5.0 and dmaxs[30] == pytest.approx(5.0)


def test_the_limits_reach_the_forward_pass() -> None:
    """The schedule is read at every step (no build-time snapshot): relaxing it changes y."""
    torch.manual_seed(1)
    brn = _layer(rmax=3.0, dmax=5.0)
    x = torch.randn(8, C, 4, dtype=torch.float64) * 3.0 + 2.0
    outputs = []
    for p in (0.0, 1.0):
        brn.set_progress(p)
        layer = copy.deepcopy(brn)
        outputs.append(layer(x))
    bn = BatchNorm(C).double()
    bn.load_state_dict(brn.state_dict())
    torch.testing.assert_close(outputs[0], bn(x), rtol=0, atol=0)
    assert (outputs[0] - outputs[1]).abs().max() > 0.1


def test_without_set_progress_the_papers_step_schedule_applies() -> None:
    brn = BatchRenorm(C, rmax=3.0, dmax=5.0)  # schedule="auto", nobody calls set_progress
    assert brn.progress is None

    def limits_at(step: int) -> tuple[float, float]:
        brn.num_batches_tracked.fill_(step)
        return brn.current_rmax, brn.current_dmax

    assert limits_at(0) == (1.0, 0.0)
    assert limits_at(5000) == (1.0, 0.0)
    assert limits_at(22500) == pytest.approx((2.0, 4.375))  # rmax halfway 5k..40k, dmax 5k..25k
    assert limits_at(25000) == pytest.approx((1 + 2 * 20 / 35, 5.0))
    assert limits_at(40000) == (3.0, 5.0)
    steps = range(0, 50001, 2500)
    seq = [limits_at(s) for s in steps]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(seq))
    # training advances it
    brn.num_batches_tracked.fill_(29999)
    brn(torch.randn(4, C))
    assert int(brn.num_batches_tracked) == 30000
    assert brn.current_dmax == 5.0
    # once progress drives the schedule, the step count no longer does
    brn.set_progress(0.0)
    assert limits_at(40000) == (1.0, 0.0)


def test_steps_and_none_schedules_ignore_progress() -> None:
    steps = BatchRenorm(C, schedule="steps", relax_start_step=0, rmax_relaxed_step=10)
    steps.set_progress(1.0)
    steps.num_batches_tracked.fill_(5)
    assert steps.current_rmax == pytest.approx(2.0)
    fixed = BatchRenorm(C, schedule="none", rmax=1.5, dmax=0.5)
    fixed.set_progress(0.0)
    assert (fixed.current_rmax, fixed.current_dmax) == (1.5, 0.5)


def test_set_progress_reaches_every_submodule_that_has_it() -> None:
    class Scheduled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[float] = []

        def set_progress(self, p: float) -> None:
            self.seen.append(p)

    model = nn.Sequential(
        nn.Linear(C, C), BatchRenorm(C), nn.Sequential(BatchNorm(C), BatchRenorm(C)), Scheduled()
    )
    set_progress(model, 0.5)
    assert model[1].progress == 0.5 and model[2][1].progress == 0.5
    assert model[3].seen == [0.5]
    assert model[1].current_rmax > 1.0
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="progress"):
            set_progress(model, bad)
    with pytest.raises(TypeError):
        set_progress("not a module", 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model[1].set_progress("half")  # type: ignore[arg-type]


def test_clip_fractions_on_a_hand_built_batch(stats_route: str) -> None:
    """Moving stats mu = 0, sigma^2 = 1 (eps = 0+); batch channels built with known std and mean."""
    brn = BatchRenorm(4, rmax=2.0, dmax=1.0, schedule="none", eps=1e-12, momentum=0.0).double()
    z = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # mean 0, biased variance 1
    std = torch.tensor([0.1, 1.0, 10.0, 1.5], dtype=torch.float64)  # r: clip, -, clip, -
    mean = torch.tensor([0.0, 0.5, 0.0, 3.0], dtype=torch.float64)  # d: -, -, -, clip
    x = z * std + mean
    y = brn(x)
    for frac in (brn.clip_fraction_r, brn.clip_fraction_d):
        assert frac.dim() == 0 and not frac.requires_grad
    assert not brn.last_r.requires_grad and "last_r" not in brn.state_dict()
    assert brn.clip_fraction_r.item() == 0.5
    assert brn.clip_fraction_d.item() == 0.25
    r = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    d = torch.tensor([0.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(y, z * r + d)
    torch.testing.assert_close(brn.last_r, r)
    torch.testing.assert_close(brn.last_d, d)


def test_without_running_stats_it_is_plain_batchnorm() -> None:
    brn = BatchRenorm(C, track_running_stats=False, schedule="none").double()
    bn = BatchNorm(C, track_running_stats=False).double()
    x = torch.randn(5, C, 3, dtype=torch.float64) * 2 + 1
    for mode in (True, False):
        torch.testing.assert_close(brn.train(mode)(x), bn.train(mode)(x), rtol=0, atol=0)
    assert (brn.current_rmax, brn.current_dmax) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rmax": 0.5}, "rmax"),
        ({"dmax": -1.0}, "dmax"),
        ({"rmax": math.inf}, "rmax"),
        ({"schedule": "cosine"}, "schedule"),
        ({"relax_start": 0.5, "rmax_relaxed": 0.4}, "relax_start"),
        ({"dmax_relaxed": 1.5}, "relax_start"),
        ({"relax_start_step": 100, "dmax_relaxed_step": 50}, "step"),
        ({"rmax_relaxed_step": 1.5}, "step"),
    ],
)
def test_bad_options_are_rejected(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchRenorm(C, **options)  # type: ignore[arg-type]


def test_compiled_module_matches_eager_with_the_step_schedule() -> None:
    """The backward reads r and d; the step schedule makes them depend on num_batches_tracked, all
    updated in the same step -- the compiled gradients must use the values from before the update."""
    torch.manual_seed(2)
    eager = _layer(
        rmax=2.0, dmax=1.0, schedule="steps", relax_start_step=0, rmax_relaxed_step=2
    ).float()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", dynamic=False)
    for _ in range(3):
        x = torch.randn(8, C, 3) * 2 + 0.5
        dy = torch.randn_like(x)
        grads = []
        for layer in (eager, compiled):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(dy)
            grads.append((y.detach(), xi.grad))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for name in ("weight", "bias"):
            torch.testing.assert_close(
                getattr(eager, name).grad, getattr(compiled_layer, name).grad, rtol=1e-5, atol=1e-5
            )
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(eager, name), getattr(compiled_layer, name))
        for name in ("clip_fraction_r", "clip_fraction_d", "last_r", "last_d"):
            torch.testing.assert_close(getattr(eager, name), getattr(compiled_layer, name))
        eager.zero_grad()
        compiled_layer.zero_grad()
    assert eager.clip_fraction_r.item() + eager.clip_fraction_d.item() > 0.0


def test_a_traced_layer_treats_r_and_d_as_constants() -> None:
    """Under torch.jit.trace autograd differentiates the forward's tensor ops: r and d must be
    stop-gradient there too, so the traced layer's grads equal the eager layer's (general route:
    20000 values, limits that do not clip, where a gradient through r and d would show)."""
    eager = _layer(rmax=3.0, dmax=5.0, schedule="none").double()
    with torch.no_grad():
        eager.running_mean.fill_(0.3)
        eager.running_var.fill_(1.2)
    layer = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, C, 500, generator=gen, dtype=torch.float64) * 2 + 0.5
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(layer, x, check_trace=False)
    eager.load_state_dict(layer.state_dict())  # (tracing ran one training step)
    x, dy = x.flip(0) * 0.5, torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grads = []
    for module in (traced, eager):
        xi = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(module(xi), (xi, *module.parameters()), dy))
    assert eager.clip_fraction_r.item() == 0.0 and eager.clip_fraction_d.item() == 0.0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
