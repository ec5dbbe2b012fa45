"""Mismatch diagnostics on hand-built models whose answer is known."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo import precise_bn
from normzoo.diagnostics import find_norm_layers, population_stats, run_diagnostics
from normzoo.layers import _classes_for
from normzoo.norms.native import NativeBatchNorm


def _data(n_train: int = 64, n_test: int = 37, features: int = 6, classes: int = 3, shape=()):
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        train_x=torch.randn(n_train, features, *shape, generator=g) * 2 + 1,
        train_y=torch.randint(0, classes, (n_train,), generator=g),
        test_x=torch.randn(n_test, features, *shape, generator=g) * 2 + 1,
        test_y=torch.randint(0, classes, (n_test,), generator=g),
    )


def _build(norm: str, channels: int) -> nn.Module:
    kw = {"num_groups": 2} if "num_groups" in normzoo.get_norm(norm).options() else {}
    return normzoo.build_norm(norm, channels, **kw)


def _dense(norm: str, features: int = 6, hidden: int = 16, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, hidden),
        _build(norm, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def _conv(norm: str, channels: int = 4, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        _build(norm, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def _train(model: nn.Module, data: SimpleNamespace, steps: int = 20, batch: int = 4) -> None:
    """A few SGD steps so running statistics are an (imperfect) EMA, as after real training."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, data.train_x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {n: m.training for n, m in model.named_modules()}


def _assert_bitwise_same(model: nn.Module, snap) -> None:
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert {n: m.training for n, m in model.named_modules()} == flags


def _activation_norms(spatial: bool) -> list[str]:
    names = []
    for name in normzoo.list_norms(kind="activation"):
        if normzoo.get_norm(name).needs_spatial == spatial:
            names.append(name)
    return names


#: float rounding between batch shapes (the losses to rel 1e-6, the KL absolute): the exact
#: equality these tests asserted held in the suite's order only (run alone: 5.5e-16, -8.2e-17)
ROUNDING = 1e-12

#: layers with batch statistics whose eval state is a running variance alone
RUNNING_VAR_ONLY = {"evonormb0"}


@pytest.mark.parametrize("norm", ["none", "native_layernorm", *_activation_norms(spatial=False)])
def test_no_batch_stats_means_zero_mismatch_dense(norm: str) -> None:
    spec = normzoo.get_norm(norm)
    data = _data()
    model = _dense(norm)
    _train(model, data)
    out = run_diagnostics(model, data, batch_size=4, precise_samples=64)
    if spec.uses_batch_stats:
        assert out["batch_dependence"] > 1e-3
        # EvoNorm-B0 keeps a running variance only (no running_mean): no EMA/PreciseBN gap
        assert (out["ema_mean_gap"] is None) == (norm in RUNNING_VAR_ONLY)
    else:
        # measured, not assumed: the same batches through eval and train mode give identical logits
        assert out["test_error_batch_stats"] == out["test_error_ema"]
        assert out["test_loss_batch_stats"] == pytest.approx(out["test_loss_ema"], rel=1e-6)
        assert out["test_loss_precise"] == pytest.approx(out["test_loss_ema"], rel=1e-6)
        assert abs(out["kl_batch_vs_ema"]) <= ROUNDING
        assert out["batch_dependence"] <= 1e-6
        assert out["ema_mean_gap"] is None and out["brn_clip_r"] is None
    assert [layer["norm"] for layer in out["layers"]] == [spec.name]


@pytest.mark.parametrize("norm", ["native_groupnorm", *_activation_norms(spatial=True)])
def test_no_batch_stats_means_zero_mismatch_conv(norm: str) -> None:
    data = _data(n_train=32, n_test=11, features=4, shape=(5, 5))
    model = _conv(norm)
    _train(model, data, steps=5)
    out = run_diagnostics(model, data, batch_size=3, precise_samples=32)
    if not normzoo.get_norm(norm).uses_batch_stats:
        assert abs(out["kl_batch_vs_ema"]) <= ROUNDING
        assert out["test_loss_batch_stats"] == pytest.approx(out["test_loss_ema"], rel=1e-6)
        assert out["batch_dependence"] <= 1e-6


@pytest.mark.parametrize("norm", normzoo.list_norms(kind="weight"))
def test_weight_norm_is_found_and_has_no_mismatch(norm: str) -> None:
    data = _data()
    model = nn.Sequential(normzoo.build_norm(norm, nn.Linear(6, 16)), nn.ReLU(), nn.Linear(16, 3))
    _train(model, data, steps=5)
    out = run_diagnostics(model, data, batch_size=4, precise_samples=64)
    assert [layer["norm"] for layer in out["layers"]] == [normzoo.get_norm(norm).name]
    assert abs(out["kl_batch_vs_ema"]) <= ROUNDING
    assert out["batch_dependence"] <= 1e-6


def test_batchnorm_has_batch_dependence_and_a_mismatch() -> None:
    data = _data()
    model = _dense("native_batchnorm")
    _train(model, data)
    out = run_diagnostics(model, data, batch_size=4, precise_samples=64)
    assert out["batch_dependence"] > 0.05
    assert out["batch_dependence_floor"] <= 1e-6  # eval mode: no companion effect
    assert out["layers"][0]["batch_dependence"] > 0.05
    assert out["kl_batch_vs_ema"] > 0.0
    assert out["ema_mean_gap"] > 0.0 and out["ema_log_std_gap"] > 0.0
    assert out["test_loss_batch_stats"] != out["test_loss_ema"]
    json.dumps(out)  # serialisable as it is stored in metrics.json
    again = run_diagnostics(model, data, batch_size=4, precise_samples=64)
    out.pop("diagnostics_seconds"), again.pop("diagnostics_seconds")
    assert again == out  # seeded: the same model and seed give the same numbers


def test_batch_dependence_grows_as_the_batch_shrinks() -> None:
    data = _data()
    model = _dense("native_batchnorm")
    _train(model, data)
    small = run_diagnostics(model, data, batch_size=2, precise_samples=64)["batch_dependence"]
    large = run_diagnostics(model, data, batch_size=32, precise_samples=64)["batch_dependence"]
    assert small > 2 * large


def test_state_is_bitwise_unchanged() -> None:
    data = _data()
    model = nn.Sequential(
        nn.Linear(6, 16),
        NativeBatchNorm(16, momentum=None),  # cumulative average: num_batches_tracked matters
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Linear(16, 3),
        NativeBatchNorm(3),
    )
    _train(model, data)
    model[2].eval()  # mixed training flags must come back as they were
    snap = _snapshot(model)
    assert int(model[1].num_batches_tracked) == 20
    run_diagnostics(model, data, batch_size=4, precise_samples=64)
    _assert_bitwise_same(model, snap)
    model.eval()
    snap = _snapshot(model)
    run_diagnostics(model, data, batch_size=5, precise_samples=50)
    _assert_bitwise_same(model, snap)


class _FakeRenorm(NativeBatchNorm):
    """BatchNorm that, like Batch Renorm, records clip fractions in 0-dim tensors each step."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.clip_fraction_r = torch.tensor(0.25)
        self.clip_fraction_d = torch.tensor(0.5)
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.clip_fraction_r.fill_(1.0)
            self.clip_fraction_d = torch.tensor(1.0)
            self.steps += 1
        return super().forward(x)


def test_clip_fractions_are_read_before_and_restored_after() -> None:
    data = _data()
    model = nn.Sequential(nn.Linear(6, 8), _FakeRenorm(8), nn.Linear(8, 3))
    model.eval()
    out = run_diagnostics(model, data, batch_size=4, precise_samples=16)
    assert out["brn_clip_r"] == 0.25 and out["brn_clip_d"] == 0.5
    assert out["layers"][0]["clip_fraction_r"] == 0.25
    assert float(model[1].clip_fraction_r) == 0.25 and float(model[1].clip_fraction_d) == 0.5
    assert model[1].steps == 0


@pytest.mark.parametrize("shape", [(), (3, 3)])
def test_precise_bn_equals_statistics_over_the_whole_set(shape: tuple[int, ...]) -> None:
    data = _data(n_train=64, shape=shape)
    bn = NativeBatchNorm(6)
    model = nn.Sequential(bn, nn.Flatten(), nn.Linear(6 * (9 if shape else 1), 3))
    dims = (0, *range(2, 2 + len(shape)))
    stats = population_stats(model, data.train_x, batch_size=8, num_samples=64)
    mean, var, count = stats["0"]
    assert count == 64 * (9 if shape else 1)
    torch.testing.assert_close(mean, data.train_x.mean(dim=dims), rtol=0, atol=1e-6)
    torch.testing.assert_close(var, data.train_x.var(dim=dims, unbiased=True), rtol=0, atol=1e-5)
    assert bn.running_mean.abs().max() == 0 and int(bn.num_batches_tracked) == 0  # untouched


def test_precise_error_is_the_error_with_population_statistics() -> None:
    data = _data(n_train=64)
    model = _dense("native_batchnorm")
    model = nn.Sequential(NativeBatchNorm(6), *model)
    _train(model, data)
    out = run_diagnostics(model, data, batch_size=8, precise_samples=64)
    assert out["precise_samples"] == 64
    # the first layer's population statistics are exact; its gap is measured against them
    mean = data.train_x.mean(0)
    var = data.train_x.var(0, unbiased=True)
    eps = model[0].eps
    sigma = (var.double() + eps).sqrt()
    expected_gap = ((model[0].running_mean.double() - mean.double()).abs() / sigma).mean().item()
    assert out["layers"][0]["mean_gap"] == pytest.approx(expected_gap, rel=1e-5)
    # recomputing population stats and evaluating by hand gives the same precise loss
    stats = population_stats(model, data.train_x, batch_size=8, num_samples=64, seed=1)
    clone = _dense("native_batchnorm")
    clone = nn.Sequential(NativeBatchNorm(6), *clone)
    clone.load_state_dict(model.state_dict())
    for name, (m, v, _) in stats.items():
        clone.get_submodule(name).running_mean.copy_(m)
        clone.get_submodule(name).running_var.copy_(v)
    clone.eval()
    with torch.no_grad():
        loss = F.cross_entropy(clone(data.test_x), data.test_y).item()
    assert out["test_loss_precise"] == pytest.approx(loss, rel=1e-5)


def test_last_chunk_of_one_sample_is_filled_to_the_batch_size() -> None:
    # 9 test samples at batch 4: a naive last chunk holds 1 sample and BatchNorm would refuse it
    data = _data(n_test=9)
    model = _dense("native_batchnorm")
    _train(model, data)
    out = run_diagnostics(model, data, batch_size=4, precise_samples=16)
    wrong = out["test_error_batch_stats"] * 9
    assert abs(wrong - round(wrong)) < 1e-5  # every test sample counted exactly once


def test_find_norm_layers_finds_foreign_batchnorm_by_its_buffers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), normzoo.build_norm("none", 4))
    found = find_norm_layers(model)
    assert [(x.name, x.uses_batch_stats, x.has_running_stats) for x in found] == [
        ("1", True, True),
        ("2", False, False),
    ]


def test_bad_arguments_are_refused() -> None:
    model = _dense("none")
    with pytest.raises(ValueError, match="batch_size"):
        run_diagnostics(model, _data(), batch_size=0)
    with pytest.raises(TypeError, match="train_y"):
        run_diagnostics(model, SimpleNamespace(train_x=torch.zeros(2, 6)), batch_size=2)


def _two_bn_model(norm: str, conv: bool) -> nn.Sequential:
    if conv:
        return nn.Sequential(
            nn.Conv2d(6, 8, 3, padding=1),
            _build(norm, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            _build(norm, 8),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 3),
        )
    return nn.Sequential(
        nn.Linear(6, 16), _build(norm, 16), nn.ReLU(), nn.Linear(16, 16), _build(norm, 16)
    )


@pytest.mark.parametrize("norm", ["batchnorm", "batchrenorm", "native_batchnorm", "torch_bn"])
@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_ghost_batches_give_the_statistics_of_one_forward_per_batch(
    norm: str, conv: bool, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PreciseBN's ghost batches (many batches per forward, each normalised on its own) give the
    per-batch statistics of the one-forward-per-batch loop, including a last forward with fewer
    batches, and leave the model as it was (modules and state)."""
    monkeypatch.setattr(precise_bn, "GHOST_SAMPLES", 16)  # several forwards, the last one short
    data = _data(n_train=50, shape=(4, 4) if conv else ())
    if norm == "torch_bn":
        model = _two_bn_model("native_batchnorm", conv)
        for i in (1, 4):
            bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(model[i].num_features)
            bn.load_state_dict(model[i].state_dict())
            model[i] = bn
    else:
        model = _two_bn_model(norm, conv)
    if norm == "batchrenorm":  # clipping active, so the moving statistics enter the output
        for i in (1, 4):
            model[i].set_progress(1.0)
    model = model.double()
    _train(model, SimpleNamespace(**{k: v.double() if k.endswith("_x") else v
                                     for k, v in vars(data).items()}), steps=5)  # fmt: skip
    x = data.train_x.double()
    snap = _snapshot(model)
    modules = list(model.named_modules())
    kw = {"batch_size": batch_size, "num_samples": 90, "seed": 3}
    # which module normalised what: the class's forward records the calls of model[1] and of its
    # widened copies (deep copies: they carry the mark)
    layer, calls = model[1], []
    layer.probe_mark = True
    real_forward = type(layer).forward

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if getattr(m, "probe_mark", False):
            calls.append((m is layer, *x.shape[:2]))
        return real_forward(m, x)

    monkeypatch.setattr(type(layer), "forward", forward)
    channels = layer.num_features
    ghost = population_stats(model, x, ghost=True, **kw)
    # widened copies normalised several batches at once: (batch_size, G * channels), G > 1
    assert calls and all(
        not own and n == batch_size and c % channels == 0 and c > channels for own, n, c in calls
    )
    calls.clear()
    one_by_one = population_stats(model, x, ghost=False, **kw)
    batches = (90 + batch_size - 1) // batch_size
    assert calls == [(True, batch_size, channels)] * batches  # the layer itself, once per batch
    monkeypatch.undo()
    assert ghost.keys() == one_by_one.keys() == {"1", "4"}
    for key, (mean, var, count) in one_by_one.items():
        assert (
            ghost[key][2]
            == count
            == (90 + batch_size - 1)
            // batch_size
            * batch_size
            * (16 if conv and key == "1" else 4 if conv else 1)
        )
        torch.testing.assert_close(ghost[key][0], mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ghost[key][1], var, rtol=1e-10, atol=1e-12)
    _assert_bitwise_same(model, snap)
    assert list(model.named_modules()) == modules


def test_ghost_batches_fall_back_for_a_layer_with_hooks() -> None:
    """A user's hook on a batch-statistics layer sees what it saw before ghost batches: the layer
    itself, one batch of (batch_size, C) per forward; statistics as the sequential loop."""
    model = _two_bn_model("batchnorm", conv=False).double()
    x = _data(n_train=40).train_x.double()
    calls: list[tuple[bool, int, int]] = []
    layer = model[1]
    layer.register_forward_hook(lambda m, a, out: calls.append((m is layer, *a[0].shape[:2])))
    with precise_bn._ghost_batches(model, find_norm_layers(model), 4) as wide:
        assert wide is None
    kw = {"batch_size": 4, "num_samples": 40}
    a = population_stats(model, x, ghost=True, **kw)
    assert calls == [(True, 4, layer.num_features)] * 10
    b = population_stats(model, x, ghost=False, **kw)
    for key in ("1", "4"):
        torch.testing.assert_close(a[key][1], b[key][1], rtol=0, atol=0)


def test_ghost_batches_fall_back_for_a_shared_layer() -> None:
    """A batch-statistics layer used at two places cannot be widened in one place only: one
    forward per batch, same statistics as the sequential loop."""
    bn = normzoo.build_norm("batchnorm", 6)
    model = nn.Sequential(bn, nn.ReLU(), bn).double()
    x = _data(n_train=40).train_x.double()
    layers = find_norm_layers(model)
    with precise_bn._ghost_batches(model, layers, 4) as wide:
        assert wide is None
    kw = {"batch_size": 4, "num_samples": 40}
    a = population_stats(model, x, ghost=True, **kw)
    b = population_stats(model, x, ghost=False, **kw)
    torch.testing.assert_close(a["0"][1], b["0"][1], rtol=0, atol=0)


def test_eval_mode_passes_take_the_eval_batch_size() -> None:
    """EMA and PreciseBN logits do not depend on the batch in eval mode: a large eval batch gives
    the numbers of training-size batches; a layer without running statistics keeps the batch size
    (it normalises with batch statistics in eval mode too)."""
    data = _data(n_test=37)
    model = _dense("batchnorm")
    _train(model, data)
    small = run_diagnostics(model, data, batch_size=4, precise_samples=16)
    large = run_diagnostics(model, data, batch_size=4, precise_samples=16, eval_batch_size=1000)
    assert small["diagnostics_eval_batch_size"] == 4
    assert large["diagnostics_eval_batch_size"] == 1000
    for key in ("test_error_ema", "test_error_precise", "test_error_batch_stats"):
        assert large[key] == small[key], key
    for key in ("test_loss_ema", "test_loss_precise", "kl_batch_vs_ema"):
        assert large[key] == pytest.approx(small[key], rel=1e-5, abs=1e-9), key
    untracked = _dense("batchnorm")
    untracked[1] = normzoo.build_norm("batchnorm", 16, track_running_stats=False)
    out = run_diagnostics(untracked, data, batch_size=4, precise_samples=16, eval_batch_size=1000)
    assert out["diagnostics_eval_batch_size"] == 4
    with pytest.raises(ValueError, match="eval_batch_size"):
        run_diagnostics(model, data, batch_size=4, eval_batch_size=0)


def test_finding_the_registered_classes_leaves_the_global_rng_alone() -> None:
    """The probe nn.Linear(2, 2) that teaches it a weight-kind factory's class drew its init from
    torch's global RNG on the first call, so a run's draws depended on when that call came."""
    _classes_for.cache_clear()
    before = torch.get_rng_state()
    classes = dict(_classes_for(tuple(normzoo.list_norms())))
    assert torch.equal(torch.get_rng_state(), before)
    # the factory-registered weight norms are still learnt from the probe
    assert {spec.name for spec in classes.values()} >= set(normzoo.list_norms(kind="weight"))


@pytest.mark.parametrize("norm", ["bn", "brn", "gbn", "bin"])
def test_batch_dependence_in_grouped_forwards_equals_one_forward_per_probe(
    norm, monkeypatch
) -> None:
    from normzoo import batched

    data = _data(shape=(5, 5))
    torch.manual_seed(0)
    model = _conv(norm, channels=6)
    _train(model, data, batch=8)
    grouped = run_diagnostics(model, data, batch_size=8, precise_samples=16, probe_samples=20)
    monkeypatch.setattr(batched, "ghost_sizes", lambda layers, size: None)  # the loop
    looped = run_diagnostics(model, data, batch_size=8, precise_samples=16, probe_samples=20)
    assert looped["batch_dependence"] > 1e-3
    assert grouped["batch_dependence"] == pytest.approx(looped["batch_dependence"], rel=1e-5)
    for a, b in zip(grouped["layers"], looped["layers"], strict=True):
        assert a["batch_dependence"] == pytest.approx(b["batch_dependence"], rel=1e-5)
    assert grouped["test_error_batch_stats"] == looped["test_error_batch_stats"]
