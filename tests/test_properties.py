"""Property tests (hypothesis) for every registered normalisation layer, driven by the registry.

Every from-scratch ``activation`` layer (and, to show that each property is a fact and not a wish,
its native torch reference) is tried on random shapes (rank 2..5, or 3..5 where the layer needs
spatial dims), dtypes (float32, float64), group counts (any divisor of C), eps, affine on/off and
random input scale/offset. The properties:

* finite outputs and finite gradients (input and parameters), also for constant input and large
  offsets, and in eval mode after a training step;
* before the affine step the output has zero mean and variance s2 / (s2 + eps) over each of the
  layer's statistic groups (s2: the group's biased input variance), and the affine step is
  y = gamma * z + beta per channel;
* invariance to a positive scale and a shift of each statistic group: per channel for BatchNorm
  and Batch Renorm at rmax = 1, dmax = 0 (in training), per sample for LayerNorm, per (sample,
  group) for GroupNorm and per (sample, channel) for InstanceNorm (so LN/GN/IN are invariant to
  scaling a sample). With eps > 0 the invariance is exact up to eps's known effect: a group scaled
  by a gets z * a * sqrt(s2 + eps) / sqrt(a^2 s2 + eps), which the test predicts rather than hides;
* a sample's output does not depend on the other samples of its batch for every layer without
  batch statistics (and for batch-statistics layers in eval mode with running statistics), and
  does depend on them for the layers the registry marks ``uses_batch_stats`` (in training);
  layers without running statistics compute the same function in train and eval mode;
* Batch Renorm with its limits relaxed: per channel mean d and variance r^2 s2 / (s2 + eps) with
  r, d clipped as in Ioffe (2017), and the running statistics updated with the unbiased variance;
* ``weight`` layers: tests/test_properties_weight.py.

Which axes a layer normalises over is declared once in :data:`AXES`; a newly registered activation
layer fails :func:`test_every_activation_layer_declares_its_axes` until it is added there.

Reproducible: every test runs under ``PROPERTY`` (tests/property_support.py: ``derandomize=True``,
no example database), so CI draws the same examples each time; the torch data come from a
hypothesis-drawn seed. Set ``NORMZOO_PROPERTY_EXAMPLES`` for a longer search (the default keeps
the file to a few seconds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_support import DTYPES, PROPERTY, RTOL, _check, _finite
from torch import Tensor, nn

import normzoo

#: How each from-scratch activation layer groups the values it takes one (mean, variance) over:
#: "channel" = over N and the spatial dims, one group per channel; otherwise the number of groups
#: each sample is split into (consecutive channels and all spatial dims); "position" = over the
#: C channels of each (sample, spatial position) (ConvNeXt's LayerNorm2d).
Axes = str | Callable[[nn.Module], int]
AXES: dict[str, Axes] = {
    "batchnorm": "channel",
    "batchrenorm": "channel",
    "layernorm2d": "position",
    "layernorm": lambda layer: 1,
    "groupnorm": lambda layer: layer.num_groups,
    "instancenorm": lambda layer: layer.num_features,
    # (the drawn batches hold N <= 8 samples, below the default ghost size 16: one ghost batch)
    "ghostbatchnorm": "channel",
    "meanonlybatchnorm": "channel",
    "batchinstancenorm": "channel",  # (and per (sample, channel): widening S serves both)
    "switchablenorm": "channel",  # (and per sample, per (sample, channel))
    "virtualbatchnorm": lambda layer: layer.num_features,  # (sample, channel) plus a reference
}
#: Activation entries that normalise nothing (no statistics, no axes).
NO_STATISTICS = {"none"}
#: Layers whose output is not standardised over one statistic group, so the two standardisation
#: properties (zero mean / unit variance per group, invariance to a per-group scale and shift) do
#: not hold for them; their formulas are checked against float64 references in
#: tests/test_variants.py. Their AXES entry above only sizes their drawn inputs.
NOT_STANDARDISED: dict[str, str] = {
    "meanonlybatchnorm": "centres per channel, no variance division",
    "batchinstancenorm": "a rho-weighted mix of BN- and IN-normalised values",
    "switchablenorm": "mean and variance are softmax mixes of IN, LN and BN statistics",
    "virtualbatchnorm": "statistics of a fixed reference batch combined with the sample",
}


#: Activation layers that are not a standardisation (their output has no zero mean / unit variance
#: per statistic group, and no plain scale-and-shift invariance), with the axes whose values count
#: towards ``min_group`` and the reason; their own formula is checked against a float64 reference
#: in the named test file. They still take the finiteness and batch-independence properties.
OWN_FORMULA: dict[str, tuple[Axes, str]] = {
    "filterresponsenorm": (
        lambda layer: layer.num_features,
        "x / RMS over S, no centring, then a threshold: tests/test_response_norms.py",
    ),
    "evonorms0": (
        lambda layer: layer.num_groups,
        "x sigmoid(v x) / group std, not centred: tests/test_response_norms.py",
    ),
    "evonormb0": (
        "channel",
        "x / max(batch std, v x + instance std): tests/test_response_norms.py",
    ),
    "batchchannelnorm": (
        "channel",
        "a batch step then a group step, z is the GN of the BN output: tests/test_standardize.py",
    ),
}


def _axes_of(name: str) -> Axes:
    """The axes of a layer's statistics (see :data:`AXES` and :data:`OWN_FORMULA`)."""
    family = _family(name)
    return AXES[family] if family in AXES else OWN_FORMULA[family][0]


def _family(name: str) -> str:
    """The from-scratch layer a registry entry is (its own name, or the layer whose native it is)."""
    spec = normzoo.get_norm(name)
    if not spec.reference:
        return spec.name
    for own in normzoo.list_norms(spec.kind, references=False):
        if normzoo.get_norm(own).native == spec.name:
            return own
    raise LookupError(f"reference {name!r} is the native of no registered layer")


ACTIVATION = normzoo.list_norms("activation", references=False)
REFERENCES = [n for n in normzoo.list_norms("activation") if normzoo.get_norm(n).reference]
NORMALISING = [n for n in ACTIVATION if n not in NO_STATISTICS | set(OWN_FORMULA)] + REFERENCES
BATCH_STATS = [n for n in NORMALISING if normzoo.get_norm(n).uses_batch_stats]
PER_SAMPLE = [n for n in ACTIVATION + REFERENCES if not normzoo.get_norm(n).uses_batch_stats]
STANDARDISED = [n for n in NORMALISING if n not in NOT_STANDARDISED]
RUNNING_STATS = [n for n in NORMALISING if "track_running_stats" in normzoo.get_norm(n).options()]


# ---------------------------------------------------------------------------------------------
# drawing a layer and its input


@dataclass
class Case:
    name: str
    layer: nn.Module
    x: Tensor  # the input, in the layer's dtype
    eps: float
    seed: int

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def gen(self, salt: int = 1) -> torch.Generator:
        """A generator for further random tensors of this example (reproducible from the seed)."""
        return torch.Generator().manual_seed(self.seed + salt)


def _groups(name: str, layer: nn.Module, t: Tensor) -> Tensor:
    """``t`` of shape (N, C, *S) as (K, m): one row per (mean, variance) the layer takes."""
    axes = _axes_of(name)
    if axes == "channel":
        return t.transpose(0, 1).reshape(t.shape[1], -1)
    if axes == "position":
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    assert callable(axes)
    return t.reshape(t.shape[0] * axes(layer), -1)


def _ungroup(name: str, layer: nn.Module, rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_groups`."""
    if _axes_of(name) == "channel":
        return rows.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if AXES[_family(name)] == "position":
        return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return rows.reshape(shape)


def _group_size(name: str, layer: nn.Module, shape: tuple[int, ...]) -> int:
    """m: how many values each of the layer's statistic groups holds for input of ``shape``."""
    axes = _axes_of(name)
    if axes == "position":
        return shape[1]
    groups = shape[1] if axes == "channel" else shape[0] * axes(layer)  # type: ignore[operator]
    return math.prod(shape) // groups


def _divisors(c: int) -> list[int]:
    return [g for g in range(1, c + 1) if c % g == 0]


def _draw_case(
    data: st.DataObject,
    name: str,
    *,
    min_group: int = 1,
    plain_bn: bool = True,
    max_offset: float = 20.0,
    constant_input: bool = False,
    track: bool | None = None,
) -> Case:
    """A layer built through the registry with drawn options, and a drawn input it accepts.

    ``min_group``: the fewest values per statistic group (training with batch or instance
    statistics needs 2). ``plain_bn``: Batch Renorm at rmax = 1, dmax = 0, else relaxed limits.
    ``max_offset``: the largest |mean| of the input in units of its scale. ``constant_input``: may
    draw a zero scale. ``track``: ``track_running_stats`` (drawn for layers without batch
    statistics when None).
    """
    spec = normzoo.get_norm(name)
    options = spec.options()
    if spec.reference:  # torch's group norm refuses a lone sample with one value per group
        min_group = max(min_group, 2)
    min_rank = 3 if spec.needs_spatial else 2
    rank = data.draw(st.integers(min_rank, 5), label="rank")
    n = data.draw(st.integers(1, 4), label="N")
    c = data.draw(st.integers(1, 6), label="C")
    spatial = data.draw(
        st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2), label="S"
    )
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    eps = 10.0 ** data.draw(st.floats(-6.0, -1.0), label="log10 eps")
    kw: dict[str, Any] = {"eps": eps}
    if "affine" in options:
        kw["affine"] = data.draw(st.booleans(), label="affine")
    if "num_groups" in options:
        kw["num_groups"] = data.draw(st.sampled_from(_divisors(c)), label="num_groups")
    if "rmax" in options:
        if plain_bn:
            kw.update(rmax=1.0, dmax=0.0, schedule="none")  # exactly BatchNorm
        else:
            for key in ("rmax", "dmax"):
                kw[key] = data.draw(st.floats(1.0 if key == "rmax" else 0.0, 4.0), label=key)
            kw["schedule"] = "none"
    if "track_running_stats" in options and track is not None:
        kw["track_running_stats"] = track
    elif "track_running_stats" in options and not spec.uses_batch_stats:
        kw["track_running_stats"] = data.draw(st.booleans(), label="track_running_stats")
    layer = normzoo.build_norm(name, c, **kw).to(dtype)
    shape = [n, c, *spatial]
    has_axes = _family(name) in AXES or _family(name) in OWN_FORMULA
    if has_axes and _group_size(name, layer, tuple(shape)) < min_group:
        # widen one axis the groups span (by min_group: each group holds at least that many)
        if rank > 2 and _axes_of(name) != "position":
            shape[2] *= min_group
        elif _axes_of(name) == "channel":
            shape[0] *= min_group
        else:  # (N, C): C / G values per group; a multiple of C keeps every G a divisor
            shape[1] = c = c * min_group
            layer = normzoo.build_norm(name, c, **kw).to(dtype)
    if spec.needs_spatial and math.prod(shape[2:]) < min_group:  # an instance part's values
        shape[2] *= min_group
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():  # gamma with either sign, away from 0; beta anywhere
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0) * (0.5 + u))
    scale = 10.0 ** data.draw(st.floats(-3.0, 3.0), label="log10 scale")
    offset = data.draw(st.floats(-max_offset, max_offset), label="offset / scale") * scale
    if constant_input and data.draw(st.booleans(), label="constant input"):
        scale = 0.0
    chan = (1, shape[1]) + (1,) * (len(shape) - 2)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    # channels with their own spread and centre, so a wrong axis or a swapped gamma shows
    z = z * torch.exp(0.5 * torch.randn(chan, generator=gen, dtype=torch.float64))
    z = z + torch.randn(chan, generator=gen, dtype=torch.float64)
    x = (offset + scale * z).to(dtype)
    return Case(name, layer, x, eps, seed)


def _affine(layer: nn.Module, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(gamma, beta) shaped to broadcast against the input (ones and zeros without affine)."""
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    w, b = getattr(layer, "weight", None), getattr(layer, "bias", None)
    gamma = torch.ones(view, dtype=torch.float64) if w is None else w.detach().double().view(view)
    beta = torch.zeros(view, dtype=torch.float64) if b is None else b.detach().double().view(view)
    return gamma, beta


def _stats(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row (float64): mean, biased variance and the condition 1 + |mean| / std."""
    rows = rows.double()
    var, mean = torch.var_mean(rows, dim=1, correction=0)
    cond = 1.0 + mean.abs() / var.sqrt()
    return mean, var, torch.where(var > 0, cond, torch.full_like(cond, math.inf))


# ---------------------------------------------------------------------------------------------
# the registry covers what the properties need


def test_every_activation_layer_declares_its_axes() -> None:
    """A new activation layer must say which axes it normalises over before it is property-tested,
    and ``uses_batch_stats`` must agree with the axes (per channel over the batch)."""
    assert set(ACTIVATION) == set(AXES) | NO_STATISTICS | set(OWN_FORMULA)
    assert not set(AXES) & set(OWN_FORMULA)
    assert set(NOT_STANDARDISED) <= set(AXES)
    for name in NORMALISING:
        assert (AXES[_family(name)] == "channel") == normzoo.get_norm(name).uses_batch_stats, name
    assert {_family(n) for n in REFERENCES} <= set(AXES)


# ---------------------------------------------------------------------------------------------
# activation layers


@pytest.mark.parametrize("name", ACTIVATION + REFERENCES)
@PROPERTY
@given(data=st.data())
def test_outputs_and_gradients_are_finite(name: str, data: st.DataObject) -> None:
    spec = normzoo.get_norm(name)
    case = _draw_case(
        data,
        name,
        # one value per group: LN/GN give beta, batch and instance statistics refuse it
        min_group=2 if spec.uses_batch_stats or spec.needs_spatial else 1,
        plain_bn=data.draw(st.booleans(), label="plain BN"),
        max_offset=1e3,
        constant_input=True,
    )
    layer = case.layer.train()
    x = case.x.clone().requires_grad_(True)
    y = layer(x)
    _finite("output", y)
    y.backward(torch.randn(y.shape, generator=case.gen(), dtype=torch.float64).to(y.dtype))
    _finite("grad x", x.grad)
    for pname, p in layer.named_parameters():
        _finite(f"grad {pname}", p.grad)
    for bname, b in layer.named_buffers():
        _finite(f"buffer {bname} after a training step", b)
    with torch.no_grad():
        _finite("eval output", layer.eval()(case.x))


@pytest.mark.parametrize("name", STANDARDISED)
@PROPERTY
@given(data=st.data())
def test_zero_mean_and_unit_variance_before_the_affine_step(name: str, data: st.DataObject) -> None:
    """z = (y - beta) / gamma has, over each statistic group, mean 0 and variance s2 / (s2 + eps);
    the layer's y is gamma * z + beta (gamma, beta drawn away from 1, 0)."""
    case = _draw_case(data, name, min_group=2, max_offset=1e3)
    with torch.no_grad():
        y = case.layer.train()(case.x)
    gamma, beta = _affine(case.layer, y.shape)
    z = (y.double() - beta) / gamma
    _, var_x, cond = _stats(_groups(name, case.layer, case.x))
    mean_z, var_z, _ = _stats(_groups(name, case.layer, z))
    tol = RTOL[case.dtype] * cond / gamma.abs().min()
    _check("mean of z per group", mean_z, torch.zeros_like(mean_z), tol)
    _check("variance of z per group", var_z, var_x / (var_x + case.eps), tol)


@pytest.mark.parametrize("name", STANDARDISED)
@PROPERTY
@given(data=st.data())
def test_invariant_to_scaling_and_shifting_each_statistic_group(
    name: str, data: st.DataObject
) -> None:
    """x -> a * x + b with a > 0 and b constant per group (per channel for BatchNorm, per sample for
    LayerNorm, per (sample, group) for GroupNorm, per (sample, channel) for InstanceNorm) leaves z
    unchanged but for eps: z' = z * a * sqrt(s2 + eps) / sqrt(a^2 s2 + eps)."""
    case = _draw_case(data, name, min_group=2, max_offset=1e3)
    layer = case.layer.train()
    rows = _groups(name, layer, case.x).double()
    k = rows.shape[0]
    gen = case.gen()
    same_scale = data.draw(st.booleans(), label="one scale for every group")
    log_a = torch.empty(1 if same_scale else k, dtype=torch.float64).uniform_(-2, 2, generator=gen)
    a = (10.0**log_a).expand(k)
    _, var_x, _ = _stats(rows)
    b = a * var_x.sqrt() * torch.empty(k, dtype=torch.float64).uniform_(-10, 10, generator=gen)
    moved = _ungroup(name, layer, a[:, None] * rows + b[:, None], case.x.shape).to(case.dtype)
    with torch.no_grad():
        y = layer(case.x)
        y_moved = layer(moved.contiguous())
    gamma, beta = _affine(layer, y.shape)
    z = _groups(name, layer, (y.double() - beta) / gamma)
    z_moved = _groups(name, layer, (y_moved.double() - beta) / gamma)
    _, var_moved, cond_moved = _stats(_groups(name, layer, moved))
    _, _, cond = _stats(_groups(name, layer, case.x))
    eps_effect = a * torch.sqrt((var_x + case.eps) / (var_moved + case.eps))
    tol = RTOL[case.dtype] * torch.maximum(cond, cond_moved)[:, None] * (1 + z.abs())
    _check("z after the group transform", z_moved, z * eps_effect[:, None], tol / gamma.abs().min())


def _per_sample_cases() -> list[tuple[str, str]]:
    cases = [(n, "train") for n in PER_SAMPLE]
    return cases + [(n, "eval") for n in RUNNING_STATS]


@pytest.mark.parametrize(("name", "mode"), _per_sample_cases())
@PROPERTY
@given(data=st.data())
def test_a_samples_output_does_not_depend_on_the_rest_of_its_batch(
    name: str, mode: str, data: st.DataObject
) -> None:
    """Layers without batch statistics (in training), and layers with running statistics in eval
    mode: sample i's output is the same alone, in its batch, and with the other samples replaced.
    Layers without running statistics are also the same function in eval."""
    spec = normzoo.get_norm(name)
    case = _draw_case(
        data, name, min_group=2 if spec.needs_spatial else 1, track=True if mode == "eval" else None
    )
    layer, x = case.layer, case.x
    gen = case.gen()
    if mode == "eval":
        # running statistics away from their 0 / 1 start, at the input's scale
        with torch.no_grad():
            mu, var, _ = _stats(x.transpose(0, 1).reshape(x.shape[1], -1))
            spread = var.sqrt().clamp_min(1e-3)
            rm = mu + spread * torch.randn(mu.shape, generator=gen, dtype=torch.float64)
            rv = var * torch.exp(torch.randn(mu.shape, generator=gen, dtype=torch.float64))
            layer.running_mean.copy_(rm)
            layer.running_var.copy_(rv.clamp_min(1e-6))
        layer.eval()
    else:
        layer.train()
    i = data.draw(st.integers(0, x.shape[0] - 1), label="sample")
    others = (3.0 * x.double() + 1.0 + torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(
        x.dtype
    )
    others[i] = x[i]
    with torch.no_grad():
        y = layer(x)
        alone = layer(x[i : i + 1])[0]
        mixed = layer(others)[i]
    tol = RTOL[case.dtype] * (10.0 + alone.abs())  # rounding only (e.g. a different reduction path)
    _check("sample in its batch vs alone", y[i], alone, tol)
    _check("sample among other samples vs alone", mixed, alone, tol)
    if mode == "train" and not getattr(layer, "track_running_stats", False):
        with torch.no_grad():
            _check("eval vs train output", layer.eval()(x), y, RTOL[case.dtype] * (1 + y.abs()))


#: layers whose batch dependence is scaled by a learned mix (Batch-Instance Norm at rho = 0 is
#: InstanceNorm, Switchable Norm with the BN share 0 is batch-free): the dependence test puts
#: these parameters back at their init (rho = 1; equal IN / LN / BN shares)
MIXING_PARAMETERS: dict[str, tuple[str, ...]] = {
    "batchinstancenorm": ("rho",),
    "switchablenorm": ("mean_weight", "var_weight"),
}


@pytest.mark.parametrize("name", BATCH_STATS)
@PROPERTY
@given(data=st.data())
def test_batch_statistics_layers_depend_on_the_batch_in_training(
    name: str, data: st.DataObject
) -> None:
    """The registry's ``uses_batch_stats`` is true to the layer: in training, the same sample gets
    a different output in a different batch. The rest of the batch is the sample shifted by +D or
    by -D (D >> its values): with p = 1/N of each channel's values its own, BatchNorm maps it to
    about -sqrt((1 - p) / p) resp. +sqrt((1 - p) / p), outputs 2 |gamma| sqrt(N - 1) >= 1 apart."""
    # (an instance part, as Batch-Instance and Switchable Norm's, needs 2 values per instance)
    min_group = 2 if normzoo.get_norm(name).needs_spatial else 1
    case = _draw_case(data, name, min_group=min_group, max_offset=5.0)
    with torch.no_grad():
        for pname in MIXING_PARAMETERS.get(name, ()):
            getattr(case.layer, pname).fill_(1.0)
    x = case.x
    n = max(x.shape[0], 2)
    first = x[:1]
    shift = 100.0 * (first.abs().max().item() + case.eps**0.5)
    with torch.no_grad():
        layer = case.layer.train()
        above = layer(torch.cat([first, *[first + shift] * (n - 1)]))[0]
        below = layer(torch.cat([first, *[first - shift] * (n - 1)]))[0]
    change = (above - below).abs().min().item()
    assert change > 0.5, f"sample 0's output moved by {change:.3g} only"


@PROPERTY
@given(data=st.data())
def test_batch_renorm_corrects_towards_the_moving_statistics(data: st.DataObject) -> None:
    """Relaxed limits (rmax, dmax) and moving statistics (mu, sigma^2) away from the batch's: per
    channel z = (y - beta) / gamma has mean d and variance r^2 s2 / (s2 + eps), with
    r = clip(sqrt(s2 + eps) / sigma, 1/rmax, rmax), d = clip((mu_B - mu) / sigma, +-dmax) and
    sigma = sqrt(sigma^2 + eps); then mu, sigma^2 move towards mu_B and the unbiased variance."""
    name = "batchrenorm"
    case = _draw_case(data, name, min_group=2, plain_bn=False, max_offset=5.0)
    layer = case.layer.train()
    rows = _groups(name, layer, case.x)
    mu_b, var_b, cond = _stats(rows)
    m = rows.shape[1]
    gen = case.gen()
    with torch.no_grad():
        spread = var_b.sqrt()
        rm = mu_b + 3 * spread * torch.randn(mu_b.shape, generator=gen, dtype=torch.float64)
        rv = var_b * 10.0 ** torch.empty(mu_b.shape, dtype=torch.float64).uniform_(
            -2, 2, generator=gen
        )
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
        rm, rv = layer.running_mean.double().clone(), layer.running_var.double().clone()
        y = layer(case.x)
    sigma = torch.sqrt(rv + case.eps)
    r = (torch.sqrt(var_b + case.eps) / sigma).clamp(1 / layer.rmax, layer.rmax)
    d = ((mu_b - rm) / sigma).clamp(-layer.dmax, layer.dmax)
    gamma, beta = _affine(layer, y.shape)
    mean_z, var_z, _ = _stats(_groups(name, layer, (y.double() - beta) / gamma))
    tol = RTOL[case.dtype] * cond * (1 + r + d.abs()) / gamma.abs().min()
    _check("mean of z per channel (= d)", mean_z, d, tol)
    _check("variance of z per channel", var_z, r**2 * var_b / (var_b + case.eps), tol * r)
    mom = layer.momentum
    _check("running mean", layer.running_mean, rm + mom * (mu_b - rm), tol * (1 + rm.abs()))
    _check(
        "running var", layer.running_var, rv + mom * (var_b * m / (m - 1) - rv), tol * (rv + var_b)
    )


@pytest.mark.parametrize("schedule", ["none", "auto"])
def test_batch_renorm_limits_are_exact_in_float64(schedule: str) -> None:
    """A case the properties above found (dmax = 0.1, float64 layer, d clipped): the limits are
    rounded once, to the layer's dtype, also after .double() and after set_progress."""
    layer = normzoo.build_norm("batchrenorm", 1, rmax=1.0, dmax=0.1, schedule=schedule).double()
    if schedule == "auto":
        layer.set_progress(1.0)
    layer(torch.tensor([[0.0], [1.0]], dtype=torch.float64))  # d_raw = 0.5 / sqrt(1 + eps) > dmax
    assert layer.last_d.item() == 0.1
    assert layer.current_dmax == 0.1
    layer.float()  # and back: float32(0.1), as a float32 layer built directly holds it
    direct = normzoo.build_norm("batchrenorm", 1, rmax=1.0, dmax=0.1, schedule=schedule)
    if schedule == "auto":
        direct.set_progress(1.0)
    assert layer._limits_now().tolist() == direct._limits_now().tolist()
