"""Registry-driven conformance checks, declared per entry.

A layer says what applies to it with a class attribute ``conformance = Conformance(...)`` (else
the defaults of its registry kind, every check but ``parity`` where the spec has no ``native``: ``activation`` entries get (N, C) and (N, C, L) inputs, or only
(N, C, L) with ``needs_spatial``; ``last_dim`` entries (B, T, D); ``weight`` entries wrap a
``nn.Linear``; the reference is the spec's ``native``). The checks, each on float64:

* ``parity`` -- forward and backward equal the declared reference's (a registry name or a factory
  taking the layer's arguments), train and eval, after the reference loads the layer's state dict;
* ``gradcheck`` -- the backward against finite differences (input and parameters);
* ``state_dict`` -- the state dict round-trips into a fresh layer (and both ways with the
  reference): same keys, same output;
* ``no_fused_ops`` -- forward and backward call none of torch's fused normalisation functions or
  aten kernels (recorded by a ``TorchFunctionMode`` and a ``TorchDispatchMode``);
* ``fx`` -- ``torch.fx.symbolic_trace`` of the layer computes what the layer does;
* ``compile`` -- ``torch.compile(fullgraph=True, backend="aot_eager")`` computes it too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from normzoo.registry import NormSpec, build_norm, get_norm

__all__ = [
    "CHECKS",
    "CheckResult",
    "Conformance",
    "assert_conforms",
    "conformance_of",
    "run_conformance",
]

CHECKS = ("parity", "gradcheck", "state_dict", "no_fused_ops", "fx", "compile")
#: substrings of torch's fused normalisation functions and aten ops
FUSED = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "_weight_norm")
DT = torch.float64


@dataclass(frozen=True)
class Conformance:
    """What the suite checks for one entry.

    Attributes:
        size: the first argument of ``build_norm`` (channels, normalized_shape; None: a
            ``nn.Linear(5, 4)`` for weight-kind entries).
        shapes: input shapes to run.
        options: keyword options for ``build_norm``.
        reference: a registry name or a factory ``f(size, **options) -> nn.Module`` of the same
            function and state dict layout (None: no parity check).
        checks: the checks that apply (a subset of :data:`CHECKS`).
        modes: ``"train"``, ``"eval"`` or both.
        tolerance: absolute and relative, float64.
        prepare: called on each built layer before any check (a layer that needs state first,
            such as Virtual BatchNorm's reference batch).
    """

    size: Any = 4
    shapes: tuple[tuple[int, ...], ...] = ((3, 4), (2, 4, 5))
    options: Mapping[str, Any] = field(default_factory=dict)
    reference: str | Callable[..., nn.Module] | None = None
    checks: tuple[str, ...] = CHECKS
    modes: tuple[str, ...] = ("train", "eval")
    tolerance: float = 1e-10
    prepare: Callable[[nn.Module], None] | None = None


@dataclass(frozen=True)
class CheckResult:
    check: str
    passed: bool
    message: str = ""


def conformance_of(name: str) -> Conformance:
    """The entry's declaration: its class's ``conformance`` attribute, or its kind's defaults."""
    spec = get_norm(name)
    declared = getattr(spec.cls, "conformance", None)
    if isinstance(declared, Conformance):
        return declared
    options = {"num_groups": 2} if "num_groups" in spec.options() else {}
    reference = spec.native
    checks = CHECKS if reference else tuple(c for c in CHECKS if c != "parity")
    if spec.kind == "last_dim":
        shapes = ((2, 3, 4), (2, 3, 2, 4))
        return Conformance(size=4, shapes=shapes, reference=reference, checks=checks)
    if spec.kind == "weight":
        return Conformance(size=None, shapes=((3, 5),), reference=reference, checks=checks)
    shapes = ((2, 4, 5),) if spec.needs_spatial else ((3, 4), (2, 4, 5))
    return Conformance(shapes=shapes, options=options, reference=reference, checks=checks)


def _build(spec: NormSpec, decl: Conformance, which: str | Callable[..., nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    size = nn.Linear(5, 4) if spec.kind == "weight" else decl.size
    if callable(which):
        layer = which(size, **decl.options)
    else:
        layer = build_norm(which, size, **decl.options)
    layer = layer.to(DT)
    if decl.prepare is not None:
        decl.prepare(layer)
    return layer


def _randomise(layer: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)


def _run(layer: nn.Module, x: Tensor, mode: str) -> tuple[Tensor, ...]:
    """(y, dx, *dparams) of one forward and backward with a fixed incoming gradient."""
    layer.train(mode == "train")
    x = x.clone().requires_grad_(True)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], dy, allow_unused=True, materialize_grads=True)
    return (y.detach(), *grads)


def _inputs(decl: Conformance) -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=gen, dtype=DT) * 1.5 + 0.5 for s in decl.shapes]


def _close(a: Sequence[Tensor], b: Sequence[Tensor], tol: float, what: str) -> None:
    if len(a) != len(b):
        raise AssertionError(f"{what}: {len(a)} vs {len(b)} outputs/grads")
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(u, v, atol=tol, rtol=tol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _check_parity(spec: NormSpec, decl: Conformance) -> None:
    if decl.reference is None:
        raise AssertionError("no reference declared (set Conformance.reference)")
    ours = _build(spec, decl, spec.name)
    _randomise(ours)
    theirs = _build(spec, decl, decl.reference)
    theirs.load_state_dict(ours.state_dict())
    for mode in decl.modes:
        for x in _inputs(decl):
            _close(
                _run(ours, x, mode),
                _run(theirs, x, mode),
                decl.tolerance,
                f"{mode} {tuple(x.shape)}",
            )


def _check_gradcheck(spec: NormSpec, decl: Conformance) -> None:
    layer = _build(spec, decl, spec.name)
    _randomise(layer)
    for mode in decl.modes:
        layer.train(mode == "train")
        for x in _inputs(decl):
            buffers = {n: b.clone() for n, b in layer.named_buffers()}
            params = [p for p in layer.parameters() if p.requires_grad]

            def f(x: Tensor, *_: Tensor, buffers: dict[str, Tensor] = buffers) -> Tensor:
                for n, b in buffers.items():  # (running statistics: every call starts alike;
                    owner, _, leaf = n.rpartition(".")  # new tensors: the saved ones stay intact)
                    layer.get_submodule(owner)._buffers[leaf] = b.clone()
                return layer(x)

            ok = torch.autograd.gradcheck(
                f, (x.clone().requires_grad_(True), *params), eps=1e-6, atol=1e-6, rtol=1e-4,
                raise_exception=False,
            )  # fmt: skip
            if not ok:
                raise AssertionError(f"gradcheck failed ({mode}, input {tuple(x.shape)})")


def _check_state_dict(spec: NormSpec, decl: Conformance) -> None:
    ours = _build(spec, decl, spec.name)
    _randomise(ours)
    x = _inputs(decl)[-1]
    ours.train()
    ours(x)  # (running statistics away from their initial values, where the layer has them)
    fresh = _build(spec, decl, spec.name)
    fresh.load_state_dict(ours.state_dict())
    _close(_run(fresh, x, "eval"), _run(ours, x, "eval"), 0.0, "round trip")
    if decl.reference is not None:
        theirs = _build(spec, decl, decl.reference)
        theirs.load_state_dict(ours.state_dict())
        back = _build(spec, decl, spec.name)
        back.load_state_dict(theirs.state_dict())
        if set(back.state_dict()) != set(ours.state_dict()):
            raise AssertionError("the reference's state dict has other keys")


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _check_no_fused_ops(spec: NormSpec, decl: Conformance) -> None:
    layer = _build(spec, decl, spec.name)
    functions, ops = _Recorder(), _OpRecorder()
    with functions, ops:
        for mode in decl.modes:
            for x in _inputs(decl):
                _run(layer, x, mode)
    fused = sorted(c for c in functions.calls | ops.calls if any(f in c for f in FUSED))
    if fused:
        raise AssertionError(f"calls torch's fused normalisation: {', '.join(fused)}")


def _check_traced(spec: NormSpec, decl: Conformance, trace: Callable[[nn.Module], Any]) -> None:
    layer = _build(spec, decl, spec.name)
    _randomise(layer)
    for mode in decl.modes:
        for x in _inputs(decl):
            reference = copy.deepcopy(layer).train(mode == "train")
            # (inside a container: a traced graph refers to its layers as the root's attributes)
            traced = trace(nn.Sequential(copy.deepcopy(layer)).train(mode == "train"))
            torch.testing.assert_close(traced(x), reference(x), atol=1e-12, rtol=1e-12)


def _compile(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    torch._dynamo.reset()
    return torch.compile(layer, fullgraph=True, backend="aot_eager")  # type: ignore[return-value]


_RUNNERS: dict[str, Callable[[NormSpec, Conformance], None]] = {
    "parity": _check_parity,
    "gradcheck": _check_gradcheck,
    "state_dict": _check_state_dict,
    "no_fused_ops": _check_no_fused_ops,
    "fx": lambda spec, decl: _check_traced(spec, decl, torch.fx.symbolic_trace),
    "compile": lambda spec, decl: _check_traced(spec, decl, _compile),
}


def run_conformance(name: str, checks: Sequence[str] | None = None) -> list[CheckResult]:
    """Run the checks that apply to ``name`` (its declaration's, or ``checks``); one result each."""
    spec = get_norm(name)
    decl = conformance_of(name)
    wanted = tuple(decl.checks if checks is None else checks)
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; the checks are {', '.join(CHECKS)}")
    results = []
    for check in wanted:
        try:
            _RUNNERS[check](spec, decl)
        except Exception as exc:  # a failing check is a result, not the end of the suite
            results.append(CheckResult(check, False, f"{type(exc).__name__}: {exc}"[:2000]))
        else:
            results.append(CheckResult(check, True))
    return results


def assert_conforms(name: str, checks: Sequence[str] | None = None) -> None:
    """Raise ``AssertionError`` listing every failed check of ``name``."""
    failed = [r for r in run_conformance(name, checks) if not r.passed]
    if failed:
        lines = "\n".join(f"  {r.check}: {r.message}" for r in failed)
        raise AssertionError(f"norm {name!r} fails {len(failed)} conformance check(s):\n{lines}")
