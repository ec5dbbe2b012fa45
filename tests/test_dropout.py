"""model.dropout / model.dropout_position in the mlp and cnn, and the variance shift in the record."""

from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from normzoo.config import CNNConf, MLPConf
from normzoo.diagnostics import run_diagnostics
from normzoo.models import build_model


def model(schema, **kw) -> nn.Sequential:
    return build_model(
        OmegaConf.merge(OmegaConf.structured(schema), kw), "batchnorm", {}, (1, 8, 8), 10
    )


def order(m: nn.Sequential) -> list[str]:
    return [type(child).__name__ for child in m.children()]


def test_no_dropout_builds_no_dropout_module_and_the_same_model() -> None:
    torch.manual_seed(0)
    plain = build_model(OmegaConf.structured(MLPConf), "batchnorm", {}, (1, 8, 8), 10)
    torch.manual_seed(0)
    zero = model(MLPConf, dropout=0.0, dropout_position="after_norm")
    assert not any(isinstance(m, nn.Dropout) for m in zero.modules())
    assert list(plain.state_dict()) == list(zero.state_dict())
    for a, b in zip(plain.state_dict().values(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schema", [MLPConf, CNNConf])
def test_dropout_goes_between_the_layer_and_its_norm_before_norm(schema) -> None:
    m = model(schema, dropout=0.3, dropout_position="before_norm")
    names = order(m)
    drops = [i for i, n in enumerate(names) if n == "Dropout"]
    assert len(drops) == len([n for n in names if n == "BatchNorm"])
    assert all(names[i + 1] == "BatchNorm" and names[i - 1] in ("Linear", "Conv2d") for i in drops)
    assert all(d.p == 0.3 for d in m.modules() if isinstance(d, nn.Dropout))


@pytest.mark.parametrize("schema", [MLPConf, CNNConf])
def test_dropout_follows_the_activation_after_norm(schema) -> None:
    names = order(model(schema, dropout=0.3, dropout_position="after_norm"))
    drops = [i for i, n in enumerate(names) if n == "Dropout"]
    assert drops and all(names[i - 1] == "ReLU" and names[i - 2] == "BatchNorm" for i in drops)


def test_an_unknown_position_is_refused() -> None:
    with pytest.raises(ValueError, match="dropout_position"):
        model(MLPConf, dropout=0.3, dropout_position="inside")


def _data(n: int = 256) -> types.SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return types.SimpleNamespace(train_x=x, train_y=y, test_x=x, test_y=y)


def _warm(m: nn.Module, data) -> None:
    """A few train-mode forwards so the running statistics hold the data's (no learning)."""
    m.train()
    with torch.no_grad():
        for _ in range(30):
            m(data.train_x[torch.randperm(256)[:64]])
    m.eval()


def test_variance_shift_in_the_record_is_one_over_keep_right_after_dropout() -> None:
    torch.manual_seed(0)
    data = _data()
    before = model(MLPConf, widths=[64, 64], dropout=0.5, dropout_position="before_norm")
    _warm(before, data)
    rec = run_diagnostics(
        before, data, batch_size=64, precise_samples=256, with_variance_shift=True
    )
    shifts = [row["variance_shift"] for row in rec["layers"]]
    assert len(shifts) == 2
    # first layer: Linear of a zero-mean input then Dropout(0.5): train var / eval var ~ 1 / 0.5
    assert 1.7 < shifts[0] < 2.3
    assert rec["variance_shift_mean"] == pytest.approx(sum(shifts) / 2)


def test_variance_shift_is_one_without_dropout_and_absent_when_not_asked() -> None:
    torch.manual_seed(0)
    data = _data()
    plain = model(MLPConf, widths=[64, 64])
    _warm(plain, data)
    rec = run_diagnostics(plain, data, batch_size=64, precise_samples=256, with_variance_shift=True)
    first, second = (row["variance_shift"] for row in rec["layers"])
    assert first == pytest.approx(1.0, abs=1e-6)  # its input is the same function in train and eval
    assert 0.8 < second < 1.2  # only batch vs running statistics upstream: no dropout's 1 / (1 - p)
    rec = run_diagnostics(plain, data, batch_size=64, precise_samples=256)
    assert "variance_shift_mean" not in rec and "variance_shift" not in rec["layers"][0]
