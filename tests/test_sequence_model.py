"""model=transformer: each kind of norm normalises the axes its docstring states, every registered
norm builds into it, and the weight-kind ones wrap every Linear."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import normzoo
from normzoo.config import TransformerConf
from normzoo.models import build_model, check_batch_size
from normzoo.sequence_model import SequenceNorm

DIGITS = (1, 8, 8)
#: entries whose statistics need a spatial axis of their own beyond T (none so far) are tested too
ACTIVATION_AND_LAST = normzoo.list_norms(kind="activation") + normzoo.list_norms(kind="last_dim")


def transformer(name: str, **kw) -> nn.Module:
    cfg = OmegaConf.merge(OmegaConf.structured(TransformerConf), kw)
    opts = {"num_groups": 4} if "num_groups" in normzoo.get_norm(name).options() else {}
    return build_model(cfg, name, opts, DIGITS, 10)


def slot_input_and_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, T, D) tensor going into the first norm slot and what comes out."""
    seen = {}
    slot = model.blocks[0].norm1
    handle = slot.register_forward_hook(lambda _m, a, out: seen.update(a=a[0], out=out))
    model(x)
    handle.remove()
    return seen["a"], seen["out"]


@pytest.mark.parametrize("name", ["layernorm_last", "rmsnorm"])
def test_last_dim_norms_normalise_each_token_over_the_features(name: str) -> None:
    torch.manual_seed(0)
    model = transformer(name).train()
    a, out = slot_input_and_output(model, torch.randn(6, *DIGITS))
    assert a.shape == (6, 8, 32)
    assert not model.blocks[0].norm1.channels_first
    if name == "layernorm_last":
        mean, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
        expected = (a - mean) / torch.sqrt(var + 1e-5)
    else:
        eps = torch.finfo(a.dtype).eps  # RMSNorm's eps=None default, as torch.nn.RMSNorm
        expected = a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_batchnorm_normalises_each_feature_over_batch_and_time() -> None:
    torch.manual_seed(0)
    model = transformer("batchnorm").train()
    a, out = slot_input_and_output(model, torch.randn(6, *DIGITS))
    assert model.blocks[0].norm1.channels_first
    mean = a.mean(dim=(0, 1), keepdim=True)  # one statistic per feature d over (B, T)
    var = a.var(dim=(0, 1), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (a - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    # and not per token: the per-token statistics of the output are not 0 / 1
    assert out.mean(-1).abs().max() > 0.05


def test_layernorm_activation_kind_normalises_each_sample_over_features_and_time() -> None:
    torch.manual_seed(0)
    model = transformer("layernorm").train()
    a, out = slot_input_and_output(model, torch.randn(3, *DIGITS))
    mean = a.mean(dim=(1, 2), keepdim=True)
    var = a.var(dim=(1, 2), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (a - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)


def test_a_samples_output_depends_on_its_batch_only_with_batch_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, *DIGITS)
    for name, depends in [("batchnorm", True), ("layernorm_last", False), ("rmsnorm", False)]:
        model = transformer(name).train()
        alone = model(x[:4])[0]
        together = model(torch.cat([x[:1], x[4:]]))[0]
        assert (not torch.allclose(alone, together, atol=1e-6)) == depends, name


@pytest.mark.parametrize("name", ACTIVATION_AND_LAST)
def test_every_activation_and_last_dim_norm_fills_the_five_slots(name: str) -> None:
    model = transformer(name, depth=2)
    slots = [m for m in model.modules() if isinstance(m, SequenceNorm)]
    assert len(slots) == 5  # 2 per block + the final norm
    cls = normzoo.get_norm(name).cls
    assert sum(isinstance(m.norm, cls) for m in slots) == 5
    model.train()
    assert model(torch.randn(4, *DIGITS)).shape == (4, 10)


@pytest.mark.parametrize("name", normzoo.list_norms(kind="weight"))
def test_weight_norms_wrap_every_linear_and_leave_the_slots_empty(name: str) -> None:
    model = transformer(name, depth=1)
    assert not any(isinstance(m, SequenceNorm) for m in model.modules())
    bare = [m for m in model.modules() if type(m) is nn.Linear]
    assert bare == []  # embed, qkv, proj, the two MLP linears and the classifier are wrapped
    model.train()
    assert model(torch.randn(4, *DIGITS)).shape == (4, 10)


def test_rows_become_tokens() -> None:
    model = transformer("layernorm_last")
    assert model.embed.in_features == 8 and model.position.shape == (1, 8, 32)
    wide = build_model(OmegaConf.structured(TransformerConf), "rmsnorm", {}, (1, 16, 16), 10)
    assert wide.embed.in_features == 16 and wide.position.shape == (1, 16, 32)


def test_batchnorm_in_the_transformer_is_refused_only_where_it_has_one_value() -> None:
    model = transformer("batchnorm")
    check_batch_size(model, "batchnorm", DIGITS, 1)  # 1 sample x 8 tokens: 8 values per feature


def test_heads_must_divide_d_model() -> None:
    with pytest.raises(ValueError, match=r"multiple of model\.heads"):
        transformer("rmsnorm", d_model=30, heads=4)
