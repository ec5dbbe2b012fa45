"""AdaBN and the PreciseBN statistics context, on models whose answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo.precise_bn import adapt_bn, population_stats, precise_statistics


def _affine_bn(features: int = 4, hidden: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(features, hidden),
        normzoo.build_norm("bn", hidden),
        nn.ReLU(),
        nn.Linear(hidden, 2),
    )
    return model.double()


def test_adapt_bn_stores_the_shifted_datas_statistics_through_the_first_layer() -> None:
    model = _affine_bn()
    g = torch.Generator().manual_seed(1)
    target = torch.randn(64, 4, generator=g, dtype=torch.float64) * 3 + 5  # shifted and scaled
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    adapt_bn(model, target, batch_size=8)  # the whole set once, in 8 batches
    with torch.no_grad():
        a = model[0](target)  # the first BN layer's input
    torch.testing.assert_close(model[1].running_mean, a.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, a.var(0, correction=1), rtol=0, atol=1e-12)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())  # nothing else moved


def _blobs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + (2.0 * y - 1).unsqueeze(1) * 0.8
    return x, y


def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


def test_adapt_bn_recovers_the_error_on_a_shifted_domain() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = _blobs(512, g)
    x_test, y_test = _blobs(512, g)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, 16), normzoo.build_norm("bn", 16), nn.ReLU(), nn.Linear(16, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(300):
        idx = torch.randint(0, 512, (32,), generator=g)
        model.train()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    source = _error(model, x_test, y_test)
    shifted = x_test * 2 + 3  # the target domain: same labels, moved and stretched inputs
    before = _error(model, shifted, y_test)
    adapt_bn(model, shifted, batch_size=32)
    after = _error(model, shifted, y_test)
    assert source < 0.15
    assert before > source + 0.2  # the source statistics do not fit the target
    assert after < source + 0.05  # the target's own statistics undo the shift


def test_precise_statistics_holds_the_given_statistics_then_restores() -> None:
    model = _affine_bn()
    x = torch.randn(40, 4, dtype=torch.float64) + 2
    pop = population_stats(model, x, batch_size=4)
    ema = model[1].running_mean.clone()
    with precise_statistics(model, pop):
        assert torch.equal(model[1].running_mean, pop["1"][0])
        assert torch.equal(model[1].running_var, pop["1"][1])
    assert torch.equal(model[1].running_mean, ema)
    with pytest.raises(RuntimeError), precise_statistics(model, pop):
        raise RuntimeError("restored on the way out, too")
    assert torch.equal(model[1].running_mean, ema)


def test_population_stats_of_evonorm_b0_is_the_variance_of_its_input() -> None:
    """EvoNorm-B0 keeps a running variance only: PreciseBN / AdaBN re-estimate it all the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), normzoo.build_norm("evonormb0", 3)).double()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    (stats,) = population_stats(model, x, batch_size=8, num_samples=64).values()
    with torch.no_grad():
        a = model[0](x)
    torch.testing.assert_close(stats[1], a.var(0, correction=1), rtol=0, atol=1e-12)
    with precise_statistics(model, {"1": stats}):
        torch.testing.assert_close(model[1].running_var, stats[1])
    assert torch.equal(model[1].running_var, torch.ones(3, dtype=torch.float64))  # EMA back
