"""Ghost batches (Hoffer et al. 2017): every batch-statistics layer with ``ghost_batch_size`` equals
the layer run on each chunk of the batch separately (outputs and gradients), with one running
update per forward towards the chunks' size-weighted mean statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import normzoo

DT = torch.float64
C = 3

#: the layers that take ``ghost_batch_size``, with options that make their batch part visible
#: (Batch Renorm with limits that clip against moved running statistics)
GHOST_LAYERS: dict[str, dict] = {
    "batchnorm": {},
    "batchrenorm": {"rmax": 1.1, "dmax": 0.2, "schedule": "none"},
    "ghostbatchnorm": {},
    "meanonlybatchnorm": {},
    "batchinstancenorm": {},
    "switchablenorm": {},
    "evonormb0": {},
}
SPATIAL_ONLY = {"batchinstancenorm", "switchablenorm"}


def test_every_batch_statistics_layer_takes_a_ghost_batch_size() -> None:
    """A new layer with batch statistics must say here whether it takes ghost batches."""
    no_ghost = {n for n in normzoo.list_norms(batch_stats=True) if normzoo.get_norm(n).reference}
    # batch statistics of their own formula, not ghost-batched (yet): state it, do not hide it
    no_ghost |= {"batchchannelnorm"}
    assert "ghost_batch_size" not in normzoo.get_norm("batchchannelnorm").options()
    assert set(normzoo.list_norms(batch_stats=True)) - no_ghost == set(GHOST_LAYERS)
    for name in GHOST_LAYERS:
        assert "ghost_batch_size" in normzoo.get_norm(name).options()


def _layer(name: str, ghost: int | None, dtype: torch.dtype = DT) -> nn.Module:
    layer = normzoo.build_norm(name, C, ghost_batch_size=ghost, **GHOST_LAYERS[name]).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=dtype) * 0.8 + 0.2)
        if getattr(layer, "running_mean", None) is not None:  # (EvoNorm-B0 keeps a variance only)
            layer.running_mean.copy_(torch.tensor([0.5, -0.5, 1.0]))
        layer.running_var.copy_(torch.tensor([0.3, 2.0, 1.0]))
    return layer


def _shapes(name: str) -> list[tuple[int, ...]]:
    return [(10, C, 4)] if name in SPATIAL_ONLY else [(10, C), (10, C, 4), (10, C, 2, 3)]


def _grads(layer: nn.Module, xs: list[Tensor], dys: list[Tensor]) -> tuple[Tensor, ...]:
    """Output and (dx, dparams) of ``layer`` on ``xs``: one call on their concatenation if one
    tensor, else one call per chunk on a fresh copy of the layer (the same moving statistics)."""
    outs, inputs, params = [], [], []
    for x in xs:
        run = layer if len(xs) == 1 else copy.deepcopy(layer)
        x = x.clone().requires_grad_(True)
        outs.append(run(x))
        inputs.append(x)
        params.append(list(run.parameters()))
    loss = sum((y * dy).sum() for y, dy in zip(outs, dys, strict=True))
    grads = torch.autograd.grad(loss, inputs + [p for ps in params for p in ps])
    dx = torch.cat(grads[: len(xs)])
    per_param = [sum(g) for g in zip(*_chunks(grads[len(xs) :], len(params)), strict=True)]
    return (torch.cat(outs), dx, *per_param)


def _chunks(seq: tuple[Tensor, ...], k: int) -> list[tuple[Tensor, ...]]:
    n = len(seq) // k
    return [seq[i * n : (i + 1) * n] for i in range(k)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(GHOST_LAYERS))
def test_ghost_batches_equal_the_layer_run_on_each_chunk(name: str, dtype: torch.dtype) -> None:
    """Ghost size 4 on N = 10: chunks 4, 4, 2 (the last one smaller), outputs and the grads of
    the input and every parameter as three separate runs of the plain layer (whose parameter
    grads add up)."""
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == DT else {"rtol": 2e-5, "atol": 2e-5}
    for shape in _shapes(name):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen, dtype=DT) * 2 + 1).to(dtype)
        dy = torch.randn(shape, generator=gen, dtype=DT).to(dtype)
        ghost = _grads(_layer(name, 4, dtype), [x], [dy])
        plain = _grads(_layer(name, None, dtype), list(x.split(4)), list(dy.split(4)))
        for a, b in zip(ghost, plain, strict=True):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", list(GHOST_LAYERS))
def test_one_running_update_towards_the_size_weighted_chunk_statistics(name: str) -> None:
    """running <- (1 - m) running + m * target, once per forward, with target mean = sum_k m_k mu_k
    / sum_k m_k and target var = sum_k m_k var_k (unbiased) / sum_k m_k over the chunks 4, 4, 2."""
    shape = (10, C, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=DT) * 3 - 1
    layer = _layer(name, 4)
    has_mean = getattr(layer, "running_mean", None) is not None
    before_mean = layer.running_mean.clone() if has_mean else None
    before_var = layer.running_var.clone()
    layer(x)
    chunks = x.split(4)
    sizes = torch.tensor([c.shape[0] * c.shape[2] for c in chunks], dtype=DT)
    means = torch.stack([c.mean((0, 2)) for c in chunks])
    variances = torch.stack([c.transpose(0, 1).reshape(C, -1).var(1) for c in chunks])
    mean = (sizes[:, None] * means).sum(0) / sizes.sum()
    var = (sizes[:, None] * variances).sum(0) / sizes.sum()
    m = layer.momentum
    if has_mean:
        torch.testing.assert_close(layer.running_mean, (1 - m) * before_mean + m * mean)
    torch.testing.assert_close(layer.running_var, (1 - m) * before_var + m * var)
    assert int(layer.num_batches_tracked) == 1
    torch.testing.assert_close(mean, x.mean((0, 2)))  # size-weighted means: the batch mean


@pytest.mark.parametrize("name", ["batchnorm", "batchrenorm", "ghostbatchnorm"])
def test_a_ghost_size_of_at_least_n_is_the_plain_layer_bitwise(name: str) -> None:
    x = torch.randn(8, C, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    plain, ghost = _layer(name, None), _layer(name, 8)
    assert torch.equal(plain(x), ghost(x))
    assert torch.equal(plain.running_var, ghost.running_var)


def test_ghost_batchnorm_defaults_to_16_and_is_batchnorm_over_chunks_of_16() -> None:
    gbn = normzoo.build_norm("gbn", C).double()
    assert gbn.ghost_batch_size == 16 and normzoo.get_norm("gbn").uses_batch_stats
    x = torch.randn(40, C, generator=torch.Generator().manual_seed(4), dtype=DT)
    bn = normzoo.build_norm("bn", C).double()
    expected = torch.cat([copy.deepcopy(bn)(c) for c in x.split(16)])
    torch.testing.assert_close(gbn(x), expected, rtol=1e-13, atol=1e-13)


# (the instance part of the spatial-only layers already needs 2 values per sample and channel)
@pytest.mark.parametrize("name", [n for n in GHOST_LAYERS if n not in SPATIAL_ONLY])
def test_a_last_chunk_with_one_value_per_channel_raises_torchs_error(name: str) -> None:
    """N = 9, ghost size 4: chunks 4, 4, 1 -- the lone sample cannot be batch-normalised."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _layer(name, 4)(torch.randn(9, C, dtype=DT))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "16"])
@pytest.mark.parametrize("name", list(GHOST_LAYERS))
def test_a_bad_ghost_size_is_a_value_error(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match="ghost_batch_size"):
        normzoo.build_norm(name, C, ghost_batch_size=bad)


@pytest.mark.parametrize("name", list(GHOST_LAYERS))
def test_eval_ignores_ghost_batches(name: str) -> None:
    """Eval with running statistics: the ghost size changes nothing."""
    x = torch.randn(10, C, 4, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert torch.equal(_layer(name, 4).eval()(x), _layer(name, None).eval()(x))


def test_batch_renorm_clips_each_ghost_batch_against_the_same_moving_statistics() -> None:
    """r, d per ghost batch: clip fractions over all (chunk, channel) pairs; last_r / last_d the
    chunks' mean."""
    x = torch.randn(12, C, 5, generator=torch.Generator().manual_seed(6), dtype=DT) * 2
    layer = _layer("batchrenorm", 4)
    ref_mean, ref_sigma = layer.running_mean.clone(), (layer.running_var + layer.eps).sqrt()
    layer(x)
    rs, ds = [], []
    for c in x.split(4):
        var, mean = torch.var_mean(c, (0, 2), correction=0)
        rs.append(((var + layer.eps).sqrt() / ref_sigma).clamp(1 / 1.1, 1.1))
        ds.append(((mean - ref_mean) / ref_sigma).clamp(-0.2, 0.2))
    r, d = torch.stack(rs), torch.stack(ds)
    torch.testing.assert_close(layer.last_r, r.mean(0))
    torch.testing.assert_close(layer.last_d, d.mean(0))
    raw_r = torch.stack(
        [
            (torch.var_mean(c, (0, 2), correction=0)[0] + layer.eps).sqrt() / ref_sigma
            for c in x.split(4)
        ]
    )
    assert layer.clip_fraction_r.item() == pytest.approx((raw_r != r).double().mean().item())
    assert 0 < layer.clip_fraction_r.item() <= 1


@pytest.mark.parametrize("name", ["batchnorm", "batchrenorm", "meanonlybatchnorm"])
def test_gradcheck_with_ghost_batches(name: str) -> None:
    """Batch Renorm's r, d are stop-gradient: the backward is the forward's derivative where they
    are clipped, so its moving statistics are put far from every ghost batch's (all clip)."""
    layer = _layer(name, 2)
    if name == "batchrenorm":
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor([4.0, -4.0, 5.0]))
            layer.running_var.copy_(torch.tensor([0.01, 100.0, 0.01]))
    names = [n for n, _ in layer.named_parameters()]
    buffers = {n: b.clone() for n, b in layer.named_buffers()}

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        state = {**dict(zip(names, ps, strict=True)), **{n: b.clone() for n, b in buffers.items()}}
        return torch.func.functional_call(layer, state, (x,))

    x = torch.randn(5, C, 3, dtype=DT, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    if name == "batchrenorm":
        probe = copy.deepcopy(layer)
        probe(x)
        assert probe.clip_fraction_r.item() == 1.0 and probe.clip_fraction_d.item() == 1.0
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_ghost_batchnorm_state_dict_loads_into_batchnorm_and_torchs_both_ways() -> None:
    gbn = _layer("ghostbatchnorm", 4)
    gbn(torch.randn(10, C, dtype=DT))
    for other in (normzoo.build_norm("bn", C).double(), nn.BatchNorm1d(C).double()):
        other.load_state_dict(gbn.state_dict())
        back = normzoo.build_norm("gbn", C).double()
        back.load_state_dict(other.state_dict())
        for key, value in gbn.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
