"""The "from scratch" rule: code under ``normzoo/norms/`` (``native.py`` aside) never calls torch's
fused normalisation ops. Checked twice:

* **statically** -- an AST scan of every ``normzoo/norms/*.py`` except ``native.py`` for a forbidden
  name reached through a torch module (``F.batch_norm``, ``torch.ops.aten.native_layer_norm``,
  ``nn.BatchNorm2d``, ``nn.utils.weight_norm`` ...), imported from one (``from torch.nn.functional
  import group_norm``), or looked up by string (``getattr(F, "instance_norm")``);
* **at run time** -- every registered from-scratch layer runs forward and backward (training and
  eval) under a ``TorchDispatchMode`` that records each aten op; none may be a normalisation kernel.
  Both checks are shown to be live: they catch the native references.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normzoo
import normzoo.norms

NORMS_DIR = Path(normzoo.norms.__file__).parent
ALLOWED_FILES = {"native.py"}  # the clearly separate native references

#: names of torch's fused normalisation ops and modules, wherever in torch they live
FORBIDDEN_NAMES = frozenset(
    {
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
        "weight_norm",
        "_weight_norm",
        "_weight_norm_interface",
        "norm_except_dim",
        "native_batch_norm",
        "native_layer_norm",
        "native_group_norm",
        "native_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_batch_norm_impl_index",
        "batch_norm_elemt",
        "batch_norm_stats",
        "batch_norm_gather_stats",
        "cudnn_batch_norm",
        "miopen_batch_norm",
        "_fused_rms_norm",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
        "LazyBatchNorm3d",
        "SyncBatchNorm",
        "LayerNorm",
        "GroupNorm",
        "RMSNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LazyInstanceNorm1d",
        "LazyInstanceNorm2d",
        "LazyInstanceNorm3d",
    }
)

#: substrings of the aten op names the runtime check rejects
FORBIDDEN_OPS = (
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "_weight_norm",
    "native_norm",
    "rms_norm",
)


def fused_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every use of a forbidden torch name in ``source``, as ``file:line: expression``."""
    tree = ast.parse(source, filename)
    torch_aliases: set[str] = set()  # local names bound to torch or one of its submodules
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or alias.name.startswith("torch."):
                    torch_aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                if alias.name in FORBIDDEN_NAMES:
                    found.append(
                        f"{filename}:{node.lineno}: from {node.module} import {alias.name}"
                    )
                else:
                    torch_aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_NAMES:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in torch_aliases:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in FORBIDDEN_NAMES
        ):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def scanned_files() -> list[Path]:
    return sorted(p for p in NORMS_DIR.glob("*.py") if p.name not in ALLOWED_FILES)


def test_static_scan_finds_no_fused_normalisation_call() -> None:
    files = scanned_files()
    assert {"batch.py", "sample.py", "weight.py"} <= {p.name for p in files}
    found = [hit for p in files for hit in fused_calls(p.read_text(), p.name)]
    assert not found, "fused normalisation ops used outside native.py:\n" + "\n".join(found)


def test_static_scan_is_live() -> None:
    native = NORMS_DIR / "native.py"
    hits = fused_calls(native.read_text(), native.name)
    assert any("F.batch_norm" in h for h in hits) and any("F.group_norm" in h for h in hits)
    snippet = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import layer_norm
def f(x, w):
    a = torch.ops.aten.native_batch_norm(x)
    b = nn.utils.parametrizations.weight_norm(w)
    c = getattr(F, "instance_norm")(x)
    d = nn.BatchNorm2d(3)
    return layer_norm(x)
def g(self, x):
    return self.group_norm(x) + group_norm(x)  # a layer's own helpers: not torch's
"""
    hits = fused_calls(snippet)
    assert len(hits) == 5, hits
    assert not any("self.group_norm" in h for h in hits)


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op dispatched while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def recorded_ops(name: str) -> set[str]:
    """The aten ops of training and eval forward+backward passes of the registry entry ``name``."""
    spec = normzoo.get_norm(name)
    torch.manual_seed(0)
    runs: list[tuple[nn.Module, torch.Tensor]] = []
    if spec.kind == "weight":
        groups: dict[str, Any] = {"num_groups": 2} if "num_groups" in spec.options() else {}
        runs.append((normzoo.build_norm(name, nn.Linear(5, 4), **groups), torch.randn(3, 5)))
        conv = normzoo.build_norm(name, nn.Conv2d(3, 4, 3), **groups)
        runs.append((conv, torch.randn(2, 3, 6, 6)))
    elif spec.kind == "last_dim":  # normalized_shape = the last dim
        x = torch.randn(4, 4, 5, 5)
        for training in (True, False):
            layer = normzoo.build_norm(name, 5).train(training)
            runs += [(layer, x), (layer, x.transpose(1, 2)), (layer, x[:, :, 0])]
    else:
        options: dict[str, Any] = {"num_groups": 2} if "num_groups" in spec.options() else {}
        if "track_running_stats" in spec.options():
            options["track_running_stats"] = True  # eval then takes the running-statistics path
        x = torch.randn(4, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        for training in (True, False):
            layer = normzoo.build_norm(name, 4, **options).train(training)
            runs += [(layer, x), (layer, x.contiguous()), (layer, x[:, :, 0])]
    recorder = OpRecorder()
    with recorder:
        for module, x in runs:
            if x.dim() < 3 and spec.needs_spatial:
                continue
            x = x.clone().requires_grad_(True)
            module(x).square().sum().backward()
            assert x.grad is not None
    return recorder.ops


FROM_SCRATCH = normzoo.list_norms(references=False)
# (torch's F.rms_norm on CPU is a composite of plain aten ops, no fused kernel to see at run time;
# the static scan is what keeps it out of the from-scratch files)
REFERENCES = [
    n for n in normzoo.list_norms() if normzoo.get_norm(n).reference and n != "native_rmsnorm"
]


@pytest.mark.parametrize("name", FROM_SCRATCH)
def test_no_fused_normalisation_op_at_run_time(name: str) -> None:
    ops = recorded_ops(name)
    assert ops  # the recorder saw the layer's work
    fused = sorted(op for op in ops if any(bad in op for bad in FORBIDDEN_OPS))
    assert not fused, f"{name} dispatched fused normalisation ops: {fused}"


@pytest.mark.parametrize("name", REFERENCES)
def test_runtime_check_catches_the_native_references(name: str) -> None:
    ops = recorded_ops(name)
    assert any(any(bad in op for bad in FORBIDDEN_OPS) for op in ops), sorted(ops)


def test_batch_layers_are_in_the_runtime_check() -> None:
    assert {"batchnorm", "batchrenorm"} <= set(FROM_SCRATCH)
    assert "native_batchnorm" in REFERENCES
    ops = recorded_ops("batchnorm")
    assert "aten::sum" in ops and "aten::native_batch_norm" not in ops
