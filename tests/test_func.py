"""torch.func through the from-scratch layers (issue 15, item 6): per-sample gradients with
``vmap(grad(functional_call))`` equal the per-sample loop of ordinary ``backward()`` calls for a
small model with every registry layer, through the hand-derived backwards; where a transform
cannot apply (a running-statistics update, a cross-process all-reduce) the error says what to use."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import normzoo
from normzoo.layers import replace_all_batch_norm_modules_
from normzoo.norms import _base
from normzoo.norms._group_norm_function import GroupNormFunctionForTransforms
from normzoo.norms.batch import _BatchNormFunctionForTransforms
from normzoo.norms.sync_batch import _SyncBatchNormFunction
from normzoo.norms.weight import WeightNormFunctionForTransforms
from normzoo.testing import conformance_of

DT = torch.float64
FROM_SCRATCH = [n for n in normzoo.list_norms() if not n.startswith("native_")]
#: the layers that can keep running statistics (InstanceNorm: off by default, on here)
TRACKS_RUNNING_STATS = [
    n for n in FROM_SCRATCH if "track_running_stats" in normzoo.get_norm(n).options()
]
#: per-sample (1, 3, L) inputs: L = 6 takes the small-input paths in the per-sample loop, L = 500
#: with 40 channels (20000 values) the general Functions; under vmap both run the torch.func forms
SIZES = {"small": (4, 6), "large": (40, 500)}


def _model(name: str, channels: int, length: int, **options: object) -> nn.Module:
    """conv -> norm -> tanh -> linear (a weight norm wraps the conv; a last-dim norm gets (N, L, C))."""
    spec = normzoo.get_norm(name)
    torch.manual_seed(0)
    conv = nn.Conv1d(3, channels, 3, padding=1)
    if "num_groups" in spec.options():
        options["num_groups"] = 2
    if spec.kind == "weight":
        layers: list[nn.Module] = [normzoo.build_norm(name, conv, **options)]
    elif spec.kind == "last_dim":
        layers = [conv, Transpose(), normzoo.build_norm(name, channels), Transpose()]
    else:
        layers = [conv, normzoo.build_norm(name, channels, **options)]
    model = nn.Sequential(*layers, nn.Tanh(), nn.Flatten(), nn.Linear(channels * length, 2))
    model = model.to(DT)
    prepare = conformance_of(name).prepare  # (Virtual BatchNorm's reference batch)
    if prepare is not None:
        prepare(model[1])
    return model


class Transpose(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, target)


def _per_sample_by_vmap(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return _loss(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # type: ignore[no-any-return]


def _per_sample_by_loop(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    grads: dict[str, list[Tensor]] = {k: [] for k, _ in model.named_parameters()}
    saved = {k: v.clone() for k, v in model.named_buffers()}
    for i in range(x.shape[0]):
        model.zero_grad()
        _loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            grads[k].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        with torch.no_grad():  # (each step sees the same buffers, as the vmapped one does)
            for k, b in model.named_buffers():
                b.copy_(saved[k])
    return {k: torch.stack(v) for k, v in grads.items()}


def _mode(name: str) -> list[str]:
    """The modes a layer runs under torch.func: eval always; training unless it updates running
    statistics by default (then training after replace_all_batch_norm_modules_)."""
    tracks = getattr(_model(name, 4, 6)[1], "track_running_stats", False)
    return ["eval", "untracked" if tracks else "train"]


CASES = [(n, m, s) for n in FROM_SCRATCH for m in _mode(n) for s in SIZES]


@pytest.mark.parametrize(("name", "mode", "size"), CASES)
def test_per_sample_gradients_equal_the_per_sample_loop(name: str, mode: str, size: str) -> None:
    channels, length = SIZES[size]
    model = _model(name, channels, length)
    if mode == "untracked":
        replace_all_batch_norm_modules_(model)
    model.train(mode != "eval")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, length, generator=gen, dtype=DT) * 2 + 1
    y = torch.tensor([0, 1, 1])
    by_vmap, by_loop = _per_sample_by_vmap(model, x, y), _per_sample_by_loop(model, x, y)
    assert by_vmap.keys() == by_loop.keys() and by_vmap
    for k in by_loop:
        assert by_vmap[k].shape == (3, *dict(model.named_parameters())[k].shape)
        torch.testing.assert_close(by_vmap[k], by_loop[k], atol=1e-12, rtol=1e-10, msg=k)
    last = [k for k in by_vmap if k.endswith("weight")][-1]  # the linear layer's
    assert not torch.allclose(by_vmap[last][0], by_vmap[last][1])  # (not one sample broadcast)


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("batchnorm", _BatchNormFunctionForTransforms),
        ("groupnorm", GroupNormFunctionForTransforms),
        ("weightnorm", WeightNormFunctionForTransforms),
    ],
)
def test_vmap_runs_the_hand_derived_backward(
    name: str, function: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-sample gradients come from the layer's own backward (its torch.func form), not
    from autograd through a reference formula."""
    calls: list[int] = []
    backward = function.backward

    def counted(ctx: object, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        calls.append(1)
        return backward(ctx, *grads)  # type: ignore[no-any-return]

    monkeypatch.setattr(function, "backward", staticmethod(counted))
    model = _model(name, 4, 6)
    replace_all_batch_norm_modules_(model).train()
    _per_sample_by_vmap(model, torch.randn(2, 3, 6, dtype=DT), torch.tensor([0, 1]))
    assert calls


@pytest.mark.parametrize("name", TRACKS_RUNNING_STATS)
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_a_running_statistics_update_under_a_transform_says_what_to_use(
    name: str, transform: str
) -> None:
    model = _model(name, 4, 6, track_running_stats=True).train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    x, y = torch.randn(2, 3, 6, dtype=DT), torch.tensor([0, 1])
    with pytest.raises(RuntimeError) as raised:
        if transform == "vmap":
            _per_sample_by_vmap(model, x, y)
        else:
            params = {k: v.detach() for k, v in model.named_parameters()}
            grad(lambda p: _loss(functional_call(model, p, (x,)), y))(params)
    message = str(raised.value)
    assert message.startswith(type(model[1]).__name__ + " in training mode updates")
    for advice in ("eval mode", "track_running_stats=False", "replace_all_batch_norm_modules_"):
        assert advice in message
    for k, v in model.named_buffers():  # refused before any buffer moved
        assert torch.equal(v, before[k]), k


def test_replace_all_batch_norm_modules_covers_normzoos_and_torchs_layers() -> None:
    model = nn.Sequential(
        normzoo.build_norm("bn", 3), nn.BatchNorm1d(3), normzoo.build_norm("gn", 3, num_groups=1)
    )
    assert replace_all_batch_norm_modules_(model) is model
    for layer in model[:2]:
        assert layer.track_running_stats is False and layer.running_mean is None
        assert layer.running_var is None and layer.num_batches_tracked is None
    x = torch.randn(4, 3, 5) * 3 + 2
    model.eval()  # untracked layers normalise with the batch's statistics in eval too
    out = model[0](x)
    torch.testing.assert_close(out.mean((0, 2)), torch.zeros(3), atol=1e-5, rtol=0)


def test_sync_batchnorm_under_vmap_says_what_to_use() -> None:
    x, w = torch.randn(2, 4, 3, 5), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"no per-sample form.*eval mode"):
        vmap(lambda xi: _SyncBatchNormFunction.apply(xi, w, None, 1e-5, None)[0])(x)


def test_eager_calls_keep_the_ctx_form() -> None:
    """Outside a transform the layers call the ctx-form Functions (the setup_context form binds
    its signature with ``inspect`` on every call in torch 2.14, ~35 us per step)."""
    assert not _base._under_transform()
    layer = normzoo.build_norm("bn", 64)
    y = layer(torch.randn(8, 64, 8, 8, requires_grad=True))
    assert type(y.grad_fn).__name__ == "_BatchNormFunctionBackward"
    inside: list[bool] = []
    vmap(lambda t: inside.append(_base._under_transform()) or t)(torch.randn(2, 3))
    assert inside == [True]
