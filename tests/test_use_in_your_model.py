"""The snippets of docs/use_in_your_model.md run (issue 15, item 4), and normzoo's layers are
norm_layer factories in torchvision (and timm, when installed: skipped with the reason printed)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import normzoo

DOC = Path(__file__).resolve().parents[1] / "docs" / "use_in_your_model.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_the_doc_has_its_four_hosts_and_the_transforms() -> None:
    text = "\n".join(SNIPPETS)
    assert len(SNIPPETS) == 7
    for needle in ("resnet18", "TransformerEncoderLayer", "timm.create_model", "convert_sync",
                   "vmap(grad(", "torch.jit.trace"):  # fmt: skip
        assert needle in text


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int) -> None:
    code = SNIPPETS[index]
    for module in ("timm", "torchvision"):
        if (f"import {module}" in code or f"from {module}" in code) and not _has(module):
            print(f"skipping snippet {index}: {module} is not installed")
            pytest.skip(f"{module} is not installed (pip install {module})")
    exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": "snippet"})


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    y = model(x).float()
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    assert all(
        not torch.equal(a, p) for a, p in zip(before, params, strict=True) if p.grad is not None
    )


@pytest.mark.parametrize("name", ["bn", "brn", "gn", "ln", "in", "layernorm2d", "none"])
def test_torchvision_resnet18_trains_a_step(name: str) -> None:
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    options = {"num_groups": 8} if name == "gn" else {}
    model = torchvision.models.resnet18(
        num_classes=10, norm_layer=normzoo.norm_layer(name, **options)
    )
    assert any(type(m).__module__.startswith("normzoo") for m in model.modules()) or name == "none"
    _train_step(model, torch.randn(2, 3, 64, 64))


def test_the_factory_is_what_timm_keeps_of_a_partial() -> None:
    factory = normzoo.norm_layer("gn", num_groups=8)
    assert isinstance(factory, functools.partial) and factory.args == ()
    rebuilt = functools.partial(factory.func, **factory.keywords)  # timm drops .args, keeps these
    assert isinstance(rebuilt(64), normzoo.get_norm("gn").cls)
    assert normzoo.build_norm(64, name="gn", num_groups=8).num_groups == 8
    with pytest.raises(ValueError, match="no norm_layer"):
        normzoo.norm_layer("wn")
    with pytest.raises(normzoo.UnknownNormError):
        normzoo.norm_layer("bogus")


@pytest.mark.parametrize("name", ["layernorm_last", "rmsnorm"])
def test_torchs_encoder_layer_with_normzoo_norms_trains_a_step(name: str) -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    reference = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    reference.load_state_dict(layer.state_dict())
    if name == "rmsnorm":
        reference.norm1, reference.norm2 = nn.RMSNorm(16), nn.RMSNorm(16)
    layer.norm1, layer.norm2 = normzoo.build_norm(name, 16), normzoo.build_norm(name, 16)
    layer.load_state_dict(reference.state_dict())  # torch's encoder checkpoint loads as it is
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    _train_step(layer, x)


TIMM_MODELS = {
    # (zero_init_last=False: timm zeroes each block's last gamma, so one step moves no conv
    # weight of the residual branches; test_timm_zero_init_reaches_normzoos_layers checks that)
    "resnet18": (
        {"norm_layer": normzoo.norm_layer("gn", num_groups=8), "zero_init_last": False},
        (2, 3, 64, 64),
    ),
    "vit_tiny_patch16_224": (
        {"img_size": 32, "patch_size": 8, "norm_layer": normzoo.norm_layer("layernorm_last")},
        (2, 3, 32, 32),
    ),
    # (ls_init_value=1: timm's layer scale of 1e-6 makes a block norm's gamma step ~1e-9, which
    # float32 rounds away at 1.0)
    "convnext_atto": (
        {"norm_layer": normzoo.norm_layer("layernorm2d"), "ls_init_value": 1.0},
        (2, 3, 64, 64),
    ),
}


def _import_timm() -> Any:
    if not _has("timm"):
        print(
            "timm is not installed: the timm host tests are skipped (pip install 'normzoo[timm]')"
        )
        pytest.skip("timm is not installed (optional extra: pip install 'normzoo[timm]')")
    import timm

    return timm


@pytest.mark.parametrize("arch", list(TIMM_MODELS))
def test_timm_models_train_a_step(arch: str) -> None:
    timm = _import_timm()

    kwargs, shape = TIMM_MODELS[arch]
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    assert any(type(m).__module__.startswith("normzoo") for m in model.modules())
    _train_step(model, torch.randn(shape))


def test_timm_zero_init_reaches_normzoos_layers() -> None:
    """timm's resnet zeroes the last norm's gamma of each block (``zero_init_last``) through
    ``nn.init`` on ``.weight``: normzoo's GroupNorm takes it as torch's would."""
    timm = _import_timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=10,
                              norm_layer=functools.partial(normzoo.build_norm, name="gn"))  # fmt: skip
    last = model.layer1[0].bn2
    assert isinstance(last, normzoo.get_norm("gn").cls) and last.num_groups == 32
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(model.layer1[0].bn1.weight)


def test_timms_norm_layer_slot_takes_the_keyword_partial_and_explains_the_positional_one() -> None:
    """timm keeps a partial's keywords and drops its positional arguments: the keyword form
    builds normzoo's layer, the positional form fails with a message that gives the keyword form."""
    timm = _import_timm()
    kept = timm.layers.get_norm_layer(functools.partial(normzoo.build_norm, name="ln"))
    assert isinstance(kept(8), normzoo.get_norm("ln").cls)
    dropped = timm.layers.get_norm_layer(functools.partial(normzoo.build_norm, "ln"))
    with pytest.raises(TypeError, match=r"name='gn'\) or normzoo.norm_layer"):
        dropped(8)
