"""The inference panel and dropout's variance shift, on models whose answer is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo.diagnostics import run_diagnostics
from normzoo.inference import inference_panel, variance_shift


def _data(n_train: int = 96, n_test: int = 37) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        train_x=torch.randn(n_train, 6, generator=g) * 2 + 1,
        train_y=torch.randint(0, 3, (n_train,), generator=g),
        test_x=torch.randn(n_test, 6, generator=g) * 2 + 1,
        test_y=torch.randint(0, 3, (n_test,), generator=g),
    )


def _trained(norm: str, data: SimpleNamespace, **options) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), normzoo.build_norm(norm, 16, **options), nn.ReLU(), nn.Linear(16, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(20):
        idx = torch.randint(0, data.train_x.shape[0], (8,), generator=g)
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _rows(rows: list[dict], statistics: str) -> list[dict]:
    return [row for row in rows if row["statistics"] == statistics]


def test_panel_agrees_with_run_diagnostics_where_they_measure_the_same() -> None:
    data = _data()
    model = _trained("bn", data)
    panel = inference_panel(model, data, batch_size=8, precise_counts=(64,), seed=4)
    diag = run_diagnostics(model, data, batch_size=8, precise_samples=64, seed=4)
    (ema,) = _rows(panel, "ema")
    (precise,) = _rows(panel, "precise")
    at_8 = [row for row in _rows(panel, "batch") if row["test_batch_size"] == 8]
    assert (ema["test_error"], ema["test_loss"]) == (diag["test_error_ema"], diag["test_loss_ema"])
    assert precise["test_loss"] == diag["test_loss_precise"]
    assert precise["samples"] == diag["precise_samples"] == 64
    assert at_8[0]["test_loss"] == diag["test_loss_batch_stats"]
    assert precise["test_loss"] != ema["test_loss"]  # the EMA of 20 steps is not the population


def test_panel_caps_the_sample_counts_and_test_batches_and_restores_the_model() -> None:
    data = _data()
    model = _trained("bn", data).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    panel = inference_panel(model, data, batch_size=8)
    precise = _rows(panel, "precise")
    assert [row["requested_samples"] for row in precise] == [16, 64, 256, 1024, 4096]
    assert [row["samples"] for row in precise] == [16, 64, 96, 96, 96]  # 96 training samples
    assert len({row["test_loss"] for row in precise[2:]}) == 1  # the same 96 samples each time
    assert [row["test_batch_size"] for row in _rows(panel, "batch")] == [2, 8, 32, 37]
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_panel_batch_statistics_of_the_whole_test_set_are_one_train_mode_forward() -> None:
    data = _data()
    model = _trained("bn", data)
    (whole,) = [
        r for r in inference_panel(model, data, batch_size=8) if r.get("test_batch_size") == 37
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        logits = model(data.test_x)
    model.load_state_dict(state)
    wrong = (logits.argmax(1) != data.test_y).float().mean().item()
    assert whole["test_error"] == wrong
    assert math.isclose(
        whole["test_loss"], F.cross_entropy(logits, data.test_y).item(), rel_tol=1e-6
    )


def test_panel_of_a_layer_without_batch_statistics_is_one_number() -> None:
    data = _data()
    model = _trained("gn", data, num_groups=4)
    panel = inference_panel(model, data, batch_size=8)
    assert _rows(panel, "precise") == []  # nothing to re-estimate
    # EMA == batch statistics at every test batch size (the loss up to the batch's float rounding)
    panel = [row for row in panel if row["statistics"] != "ema_shifted"]  # another input
    assert len({row["test_error"] for row in panel}) == 1
    losses = [row["test_loss"] for row in panel]
    assert max(losses) - min(losses) <= 1e-6 * losses[0]


def _dropout_bn(p: float, channels: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(p),
        normzoo.build_norm("bn", channels),
        nn.Linear(channels, channels),
        nn.Dropout(p),
        normzoo.build_norm("bn", channels),
    )


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_variance_shift_of_dropout_before_bn_is_one_over_the_keep_rate(p: float) -> None:
    x = torch.randn(8192, 16, generator=torch.Generator().manual_seed(5))  # zero mean, unit var
    model = _dropout_bn(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    shifts = variance_shift(model, x, batch_size=512)
    assert list(shifts) == ["1", "4"]
    assert shifts["1"] == pytest.approx(1 / (1 - p), rel=0.03)
    assert shifts["4"] > 1.05  # the second BN's input carries dropout's extra variance too
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert variance_shift(model, x, batch_size=512) == shifts  # seeded masks


def test_no_dropout_before_bn_means_no_variance_shift() -> None:
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(6))
    model = nn.Sequential(normzoo.build_norm("bn", 16), nn.Dropout(0.5), nn.Linear(16, 4))
    assert variance_shift(model, x, batch_size=64) == {"0": 1.0}  # 1000 -> 960: whole batches


@pytest.mark.parametrize(
    ("norm", "options"),
    [
        ("bn", {}),
        ("brn", {}),
        ("bn", {"ghost_batch_size": 2}),
        ("bn", {"ghost_batch_size": 3}),
        ("bn", {"ghost_batch_size": 4}),
    ],
)
def test_batch_statistics_in_one_forward_equal_one_forward_per_test_batch(norm, options) -> None:
    from normzoo.batched import batch_stat_logits, batched_logits
    from normzoo.layers import find_norm_layers, preserved_state, set_norm_mode

    data = _data(n_test=37)
    model = _trained(norm, data, **options)
    layers = find_norm_layers(model)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    with preserved_state(model, layers) as volatile:
        set_norm_mode(model, layers, norm_training=True)
        fast = {}
        for size in (2, 6, 36):
            loop = batched_logits(model, data.test_x, order, size, volatile)
            fast[size] = batch_stat_logits(model, layers, data.test_x, order, size, volatile)
            torch.testing.assert_close(fast[size], loop, rtol=1e-5, atol=1e-6)
    if options.get("ghost_batch_size") != 2:  # batch statistics of 2 and 6 samples differ
        assert not torch.allclose(fast[2], fast[6])
    assert [m.ghost_batch_size for m in model.modules() if hasattr(m, "ghost_batch_size")] == [
        options.get("ghost_batch_size")
    ]


def test_panel_gives_evonorm_b0_its_precise_bn_rows() -> None:
    data = _data()
    panel = inference_panel(_trained("evonormb0", data), data, batch_size=8, precise_counts=(64,))
    (precise,) = _rows(panel, "precise")
    assert precise["samples"] == 64
    assert len(_rows(panel, "adabn")) == len(_rows(panel, "adabn_shifted")) == 1


def test_adabn_rows_are_eval_mode_after_adapt_bn_on_that_view() -> None:
    from normzoo.inference import shifted_view
    from normzoo.precise_bn import adapt_bn

    data = _data()
    model = _trained("bn", data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    panel = inference_panel(model, data, batch_size=8, precise_counts=(64,), seed=3)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    shifted = shifted_view(data.test_x, 3)
    assert torch.equal(shifted, shifted_view(data.test_x, 3))  # seeded, the same every time
    assert not torch.allclose(shifted, data.test_x)
    for view, suffix in ((data.test_x, ""), (shifted, "_shifted")):
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            ema_ok = model(view).argmax(1) == data.test_y
            adapt_bn(model, view, batch_size=8, seed=5)
            ada_ok = model(view).argmax(1) == data.test_y
        (row,) = _rows(panel, "adabn" + suffix)
        assert row["test_error"] == pytest.approx(1 - ada_ok.float().mean().item())
        assert row["ema_wrong_only"] == int((~ema_ok & ada_ok).sum())
        assert row["adabn_wrong_only"] == int((ema_ok & ~ada_ok).sum())
    (ema_shifted,) = _rows(panel, "ema_shifted")
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        wrong = (model(shifted).argmax(1) != data.test_y).float().mean().item()
    assert ema_shifted["test_error"] == pytest.approx(wrong)


def test_panel_of_a_batch_free_layer_has_no_adabn_rows() -> None:
    data = _data()
    panel = inference_panel(_trained("gn", data, num_groups=4), data, batch_size=8)
    assert _rows(panel, "adabn") == _rows(panel, "adabn_shifted") == []
    assert len(_rows(panel, "ema_shifted")) == 1


def test_a_shared_population_cache_changes_no_number_and_computes_a_count_once() -> None:
    data = _data()
    model = _trained("bn", data)
    plain = inference_panel(model, data, batch_size=8, precise_counts=(16, 64), seed=4)
    cache: dict = {}
    diag = run_diagnostics(model, data, batch_size=8, precise_samples=64, seed=4,
                           population_cache=cache)  # fmt: skip
    populations = sorted(k for k in cache if k[0] != "test_logits")
    assert populations == [(64, 8, 5)]  # (samples, batch, seed + 1)
    first = cache[(64, 8, 5)]
    logits = {k for k in cache if k[0] == "test_logits"}
    assert len(logits) == 2  # the EMA's and PreciseBN-64's test logits
    calls = [0]  # the model's forwards
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    shared = inference_panel(
        model, data, batch_size=8, precise_counts=(16, 64), seed=4, population_cache=cache
    )
    with_cache, calls[0] = calls[0], 0
    inference_panel(model, data, batch_size=8, precise_counts=(16, 64), seed=4)
    # from the cache: three test passes (the EMA, AdaBN's EMA side, PreciseBN-64's) and the one
    # grouped forward of PreciseBN-64's 64 training samples
    assert calls[0] - with_cache == 3 * math.ceil(len(data.test_y) / 8) + 1
    assert sorted(k for k in cache if k[0] != "test_logits") == [(16, 8, 5), (64, 8, 5)]
    assert cache[(64, 8, 5)] is first
    assert shared == plain
    assert _rows(shared, "precise")[1]["test_loss"] == diag["test_loss_precise"]
    assert _rows(shared, "ema")[0]["test_loss"] == diag["test_loss_ema"]
