"""``torch.jit.trace`` and the legacy (TorchScript-based) ONNX exporter for every registry layer,
train and eval, on small inputs (the small-input paths) and large ones (the general Functions)
(issue 15, item 6). Under tracing the layers record their forward's tensor ops (no Python
``autograd.Function``), so a traced layer saves, loads and computes what the eager one does, and the
legacy exporter writes a graph of plain ONNX ops. With ``onnx`` installed the exported model is
checked and run by onnx's reference evaluator; without it (torch 2.14's legacy exporter imports
onnx only to append onnxscript functions, which these graphs have none of) that one step is
bypassed and the written model is checked for the absence of fused normalisation ops."""

from __future__ import annotations

import copy
import importlib.util
import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import normzoo
from normzoo.testing import conformance_of

FROM_SCRATCH = [n for n in normzoo.list_norms() if not n.startswith("native_")]
HAS_ONNX = importlib.util.find_spec("onnx") is not None
#: ONNX's own normalisation operators: a from-scratch layer exports none of them
FUSED_ONNX_OPS = (
    b"BatchNormalization",
    b"LayerNormalization",
    b"GroupNormalization",
    b"InstanceNormalization",
    b"RMSNormalization",
)


def _layer_and_shape(name: str, size: str) -> tuple[nn.Module, tuple[int, ...]]:
    spec, decl = normzoo.get_norm(name), conformance_of(name)
    torch.manual_seed(0)
    if spec.kind == "weight":
        options = {"num_groups": 2} if "num_groups" in spec.options() else {}
        width = 5 if size == "small" else 5000
        return normzoo.build_norm(name, nn.Linear(width, 4), **options), (3, width)
    layer = normzoo.build_norm(name, decl.size, **decl.options)
    if decl.prepare is not None:
        decl.prepare(layer)
    shape = decl.shapes[-1]
    if size == "large":  # > normzoo.norms._base._SMALL_NUMEL values: the general Functions
        # (a last-dim norm keeps its normalised dim and gets more positions)
        shape = (shape[0], 5000, shape[-1]) if spec.kind == "last_dim" else (*shape[:-1], 5000)
    return layer, shape


def _traced_round_trip(layer: nn.Module, x: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # (TracerWarnings: shape checks become constants)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(layer, x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", FROM_SCRATCH)
def test_jit_trace_saves_loads_and_matches_eager(name: str, mode: str, size: str) -> None:
    layer, shape = _layer_and_shape(name, size)
    layer.train(mode == "train")
    eager = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen)
    loaded = _traced_round_trip(layer, x)
    eager(x)  # (tracing ran one forward: a training step's running update)
    for step in range(2):
        xs = torch.randn(shape, generator=gen) * 2 + 1
        torch.testing.assert_close(loaded(xs), eager(xs), atol=1e-5, rtol=1e-5)
        state = loaded.state_dict()  # (a ScriptModule lists non-persistent buffers too)
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5, msg=f"{key} {step}")


def test_a_traced_layer_is_differentiable() -> None:
    """The traced graph's aten ops carry autograd: gradients equal the eager layer's."""
    layer = normzoo.build_norm("gn", 8, num_groups=2)
    x = torch.randn(4, 8, 600)
    loaded = _traced_round_trip(copy.deepcopy(layer), x)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    (loaded(xs[0]) ** 3).sum().backward()
    (layer(xs[1]) ** 3).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-4, rtol=1e-4)


def _export(layer: nn.Module, x: Tensor, path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if not HAS_ONNX:  # (the one step that imports onnx; nothing to append to these graphs)
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

        monkeypatch.setattr(onnx_proto_utils, "_add_onnxscript_fn", lambda proto, opsets: proto)
    training = torch.onnx.TrainingMode.TRAINING if mode == "train" else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer, (x,), str(path), dynamo=False, training=training, input_names=["x"]
        )


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", FROM_SCRATCH)
def test_legacy_onnx_export_writes_a_graph_of_plain_ops(
    name: str, mode: str, size: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer, shape = _layer_and_shape(name, size)
    layer.train(mode == "train")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "layer.onnx"
    _export(copy.deepcopy(layer), x, path, mode, monkeypatch)
    written = path.read_bytes()
    assert len(written) > 100 and b"pytorch" in written  # a ModelProto from torch's exporter
    for op in FUSED_ONNX_OPS:
        assert op not in written, op
    if HAS_ONNX and mode == "eval":
        import onnx
        from onnx.reference import ReferenceEvaluator

        onnx.checker.check_model(str(path))
        (out,) = ReferenceEvaluator(str(path)).run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), layer.eval()(x), atol=1e-4, rtol=1e-4)
