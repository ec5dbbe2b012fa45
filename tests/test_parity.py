"""Parity of every from-scratch layer with its native torch reference, driven by the registry.

Every registered, non-reference entry whose spec names a ``native`` reference is compared with it:

* ``activation`` layers: outputs, input gradients, parameter gradients and every buffer (running
  statistics, ``num_batches_tracked``) after several training steps, then eval outputs and gradients,
  over 2-D, 3-D, 4-D and 5-D inputs (no 2-D for ``needs_spatial`` layers) and channels_last 4-D/5-D,
  for the default options, ``affine=False``, ``momentum=None`` (cumulative average; where the layer
  has a momentum) and the non-default ``track_running_stats`` (where the layer has it). The reference
  starts from the same state dict.
* ``weight`` layers: a ``nn.Linear`` and a ``nn.Conv2d`` wrapped by both; outputs, input gradients
  and (where the parameter names agree with torch's) parameter gradients along a few SGD steps. The
  steps update the parameters with their gradients, so a parameter-gradient mismatch also shows up in
  the next step's output whatever the parameters are named.

**Relative error** of a result ``a`` against the reference ``b`` (same shape) is
``max|a - b| / max|b|``, the largest elementwise difference scaled by the largest reference
magnitude (``max|a - b|`` itself where ``b`` is all zeros). A case's error is the maximum over every
compared tensor. Tolerances: float64 <= 1e-10, float32 <= 1e-5.

``python tests/test_parity.py`` prints the parity table (max relative error per layer and dtype over
all cases) in markdown.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normzoo

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
C = 8  # channels; GroupNorm gets num_groups=2 (4 channels a group, 4 values even for 2-D input)
SHAPES: dict[str, tuple[tuple[int, ...], torch.memory_format]] = {
    "2d": ((8, C), torch.contiguous_format),
    "3d": ((4, C, 5), torch.contiguous_format),
    "4d": ((3, C, 5, 6), torch.contiguous_format),
    "5d": ((2, C, 3, 4, 5), torch.contiguous_format),
    "4d-cl": ((3, C, 5, 6), torch.channels_last),
    "5d-cl": ((2, C, 3, 4, 5), torch.channels_last_3d),
}
TRAIN_STEPS = 3


def relative_error(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` (``max|a - b|`` where ``b`` is all zeros); see the module docstring."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs reference {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff / scale if scale > 0 else diff


@dataclass
class Case:
    """One parity comparison: a layer, an input layout and a set of constructor options."""

    name: str
    native: str
    layout: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        return f"{self.name}-{self.layout}-{opts}"


def _default(spec: normzoo.NormSpec, option: str) -> Any:
    if option in spec.defaults:
        return spec.defaults[option]
    return inspect.signature(spec.cls).parameters[option].default


def _option_sets(spec: normzoo.NormSpec) -> list[dict[str, Any]]:
    """Defaults, affine=False, momentum=None (running stats on), flipped track_running_stats."""
    options = spec.options()
    base: dict[str, Any] = {"num_groups": 2} if "num_groups" in options else {}
    sets = [dict(base)]
    if "affine" in options:
        sets.append({**base, "affine": False})
    if "momentum" in options:
        extra = {"track_running_stats": True} if "track_running_stats" in options else {}
        sets.append({**base, **extra, "momentum": None})
    if "track_running_stats" in options:
        sets.append({**base, "track_running_stats": not _default(spec, "track_running_stats")})
    return sets


def activation_cases() -> Iterator[Case]:
    for name in normzoo.list_norms(kind="activation", references=False):
        spec = normzoo.get_norm(name)
        if spec.native is None:
            continue
        for layout, options in itertools.product(SHAPES, _option_sets(spec)):
            if spec.needs_spatial and layout == "2d":
                continue  # undefined without spatial dims (tested to raise elsewhere)
            yield Case(name, spec.native, layout, options)


def weight_cases() -> Iterator[Case]:
    for name in normzoo.list_norms(kind="weight", references=False):
        spec = normzoo.get_norm(name)
        if spec.native is None:
            continue
        for layout in ("linear", "conv2d"):
            yield Case(name, spec.native, layout)


ACTIVATION_CASES = list(activation_cases())
WEIGHT_CASES = list(weight_cases())


def _make_input(case: Case, dtype: torch.dtype) -> Tensor:
    shape, memory_format = SHAPES[case.layout]
    x = 1.5 * torch.randn(shape, dtype=dtype) + 0.5  # a non-zero mean exercises the centring
    return x.contiguous(memory_format=memory_format)


def _step(layer: nn.Module, x: Tensor, dy: Tensor) -> list[Tensor]:
    """Output, input gradient and parameter gradients of one forward/backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = [p.grad for _, p in sorted(layer.named_parameters())]
    return [y, x.grad, *grads]


def activation_parity(case: Case, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Relative errors (by quantity) of ``case`` against its native reference."""
    gen = torch.manual_seed(seed)
    ours = normzoo.build_norm(case.name, C, **case.options).to(dtype)
    ref = normzoo.build_norm(case.native, C, **case.options).to(dtype)
    with torch.no_grad():
        for pname, p in ours.named_parameters():  # away from the ones/zeros initialisation
            p.copy_(torch.rand(p.shape, generator=gen, dtype=dtype) + 0.5)
            if pname.endswith("bias"):
                p.sub_(1.0)
    ref.load_state_dict(ours.state_dict())
    errors: dict[str, float] = {}

    def record(key: str, a: Tensor | None, b: Tensor | None) -> None:
        if (a is None) != (b is None):
            raise AssertionError(f"{key}: {a is None=} but reference {b is None=}")
        if a is not None and b is not None:
            errors[key] = max(errors.get(key, 0.0), relative_error(a, b))

    names = ["output", "grad_input"] + [f"grad_{n}" for n, _ in sorted(ours.named_parameters())]
    for mode in ["train"] * TRAIN_STEPS + ["eval"]:
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = _make_input(case, dtype)
        dy = torch.randn_like(x)
        for key, a, b in zip(names, _step(ours, x, dy), _step(ref, x, dy), strict=True):
            record(f"{mode}_{key}", a, b)
    ref_buffers = dict(ref.named_buffers())
    for bname, buf in ours.named_buffers():
        if buf.dtype == torch.long:  # num_batches_tracked: exact
            if not torch.equal(buf, ref_buffers[bname]):
                raise AssertionError(f"{bname}: {buf} != reference {ref_buffers[bname]}")
        else:
            record(f"buffer_{bname}", buf, ref_buffers[bname])
    if set(dict(ours.named_buffers())) != set(ref_buffers):
        raise AssertionError(f"buffers {set(dict(ours.named_buffers()))} != {set(ref_buffers)}")
    return errors


def _weight_module(layout: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[int, ...]]:
    if layout == "linear":
        return nn.Linear(5, 4).to(dtype), (6, 5)
    return nn.Conv2d(3, 4, 3, padding=1).to(dtype), (2, 3, 5, 5)


def weight_parity(case: Case, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Relative errors of a weight reparametrisation against its native reference along SGD steps."""
    torch.manual_seed(seed)
    module, in_shape = _weight_module(case.layout, dtype)
    ours = normzoo.build_norm(case.name, copy.deepcopy(module))
    ref = normzoo.build_norm(case.native, copy.deepcopy(module))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    errors: dict[str, float] = {}
    for _ in range(TRAIN_STEPS):
        x = torch.randn(in_shape, dtype=dtype)
        dy = torch.randn_like(ref(x))
        (y, gx, *grads), (yr, gxr, *grads_ref) = _step(ours, x, dy), _step(ref, x, dy)
        compared = [("output", y, yr), ("grad_input", gx, gxr)]
        names = [n for n, _ in sorted(ours.named_parameters())]
        if names == [
            n for n, _ in sorted(ref.named_parameters())
        ]:  # torch's names: compare directly
            compared += [
                (f"grad_{n}", a, b) for n, a, b in zip(names, grads, grads_ref, strict=True)
            ]
        for key, a, b in compared:
            errors[key] = max(errors.get(key, 0.0), relative_error(a, b))
        opt_ours.step()
        opt_ref.step()
    return errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=[c.id for c in ACTIVATION_CASES])
def test_activation_parity(case: Case, dtype: torch.dtype, stats_route: str) -> None:
    errors = activation_parity(case, dtype)
    assert {"train_output", "train_grad_input", "eval_output"} <= set(errors)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= TOLERANCE[dtype], f"{worst}: relative error {errors[worst]:.3g}"


if WEIGHT_CASES:  # collected once a weight reparametrisation with a native reference is registered

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
    @pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c.id for c in WEIGHT_CASES])
    def test_weight_parity(case: Case, dtype: torch.dtype) -> None:
        errors = weight_parity(case, dtype)
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] <= TOLERANCE[dtype], f"{worst}: relative error {errors[worst]:.3g}"


def test_harness_sees_batchnorm_and_catches_a_mismatch() -> None:
    """The harness is live: BatchNorm is in it, and a wrong eps is reported as an error."""
    assert any(c.name == "batchnorm" for c in ACTIVATION_CASES)
    case = Case("batchnorm", "native_batchnorm", "4d")
    assert max(activation_parity(case, torch.float64).values()) <= TOLERANCE[torch.float64]
    wrong = Case("batchnorm", "native_batchnorm", "4d", {"eps": 1e-3})
    ours = normzoo.build_norm("bn", C, eps=1e-3).double()
    ref = normzoo.build_norm("native_bn", C).double()
    x = _make_input(wrong, torch.float64)
    assert relative_error(ours(x), ref(x)) > 1e-5


def parity_table() -> str:
    """The markdown table of the worst relative error per layer and dtype over all cases."""
    rows = []
    by_layer: dict[tuple[str, str], list[Case]] = {}
    for case in [*ACTIVATION_CASES, *WEIGHT_CASES]:
        by_layer.setdefault((case.name, case.native), []).append(case)
    for (name, native), cases in by_layer.items():
        cells = []
        for dtype in (torch.float64, torch.float32):
            worst, where = 0.0, ""
            for case in cases:
                run = weight_parity if case in WEIGHT_CASES else activation_parity
                errors = run(case, dtype)
                key = max(errors, key=errors.__getitem__)
                if errors[key] >= worst:
                    worst, where = errors[key], f"{key} ({case.layout})"
            ok = "ok" if worst <= TOLERANCE[dtype] else "FAIL"
            cells.append(f"{worst:.2e} {ok} | {where}")
        rows.append(f"| {name} | {native} | {len(cases)} | {' | '.join(cells)} |")
    head = (
        "| layer | reference | cases | float64 max rel. err. | worst (float64) "
        "| float32 max rel. err. | worst (float32) |\n|---|---|---|---|---|---|---|"
    )
    tol = ", ".join(f"{str(d).removeprefix('torch.')} <= {t:g}" for d, t in TOLERANCE.items())
    note = (
        f"Relative error = max|a - b| / max|b| against the native reference; max over all cases "
        f"(layouts 2-D..5-D and channels_last, option sets, {TRAIN_STEPS} training steps then eval) "
        f"and all compared tensors. Tolerances: {tol}. torch {torch.__version__}."
    )
    return "\n".join([head, *rows, "", note])


if __name__ == "__main__":
    print(parity_table())
