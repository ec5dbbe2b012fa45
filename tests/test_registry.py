"""The norm registry: names, aliases, specs, building, errors and third-party plugins."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import normzoo
from normzoo import registry
from normzoo.norms.sample import GroupNorm

SIX = ["batchnorm", "batchrenorm", "layernorm", "groupnorm", "instancenorm", "weightnorm"]
ALIASES = {
    "bn": "batchnorm",
    "brn": "batchrenorm",
    "ln": "layernorm",
    "gn": "groupnorm",
    "in": "instancenorm",
    "wn": "weightnorm",
}
BATCH_STATS = {"batchnorm", "batchrenorm"}
ARXIV = {
    "batchnorm": "arXiv:1502.03167",
    "batchrenorm": "arXiv:1702.03275",
    "layernorm": "arXiv:1607.06450",
    "groupnorm": "arXiv:1803.08494",
    "instancenorm": "arXiv:1607.08022",
    "weightnorm": "arXiv:1602.07868",
}


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Snapshot the registry (and imported plugin modules) and put it back after the test."""
    registry.list_norms()  # built-ins and installed plugins loaded before the snapshot
    entries, aliases = dict(registry._REGISTRY), dict(registry._ALIASES)
    modules = set(sys.modules)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(entries)
    registry._ALIASES.clear()
    registry._ALIASES.update(aliases)
    for name in set(sys.modules) - modules:
        if name.startswith("nzplugin_"):
            del sys.modules[name]


def test_lists_the_six_layers_their_references_and_none() -> None:
    names = normzoo.list_norms()
    assert set(SIX) <= set(names)
    for name in SIX:
        native = normzoo.get_norm(name).native
        if name != "batchrenorm":  # torch has no Batch Renorm; it is checked against BatchNorm
            assert native in names, name
    assert "none" in names
    assert names == sorted(names)


def test_list_filters() -> None:
    scratch = normzoo.list_norms(references=False)
    assert set(SIX) <= set(scratch)
    assert not any(normzoo.get_norm(n).reference for n in scratch)
    assert {"native_batchnorm", "native_weightnorm"} <= set(normzoo.list_norms()) - set(scratch)
    weight = normzoo.list_norms(kind="weight")
    assert {"weightnorm", "native_weightnorm"} <= set(weight)
    assert all(normzoo.get_norm(n).kind == "weight" for n in weight)
    assert "weightnorm" not in normzoo.list_norms(kind="activation")
    assert set(normzoo.list_norms(batch_stats=True)) >= BATCH_STATS
    per_sample = {"layernorm", "groupnorm", "instancenorm", "weightnorm", "none"}
    assert per_sample <= set(normzoo.list_norms(batch_stats=False))
    assert not per_sample & set(normzoo.list_norms(batch_stats=True))


@pytest.mark.parametrize(("alias", "name"), list(ALIASES.items()))
def test_aliases_and_case_insensitive_names(alias: str, name: str) -> None:
    spec = normzoo.get_norm(name)
    assert normzoo.get_norm(alias) is spec
    assert normzoo.get_norm(alias.upper()) is spec
    assert normzoo.get_norm(name.upper()) is spec
    assert alias in spec.aliases


def test_underscores_and_dashes_are_ignored() -> None:
    spec = normzoo.get_norm("groupnorm")
    assert normzoo.get_norm("Group_Norm") is spec
    assert normzoo.get_norm("group-norm") is spec
    assert normzoo.get_norm(" GN ") is spec
    assert normzoo.get_norm("Native-GroupNorm") is normzoo.get_norm("native_groupnorm")


@pytest.mark.parametrize("name", SIX)
def test_spec_fields(name: str) -> None:
    spec = normzoo.get_norm(name)
    assert spec.name == name
    assert spec.kind == ("weight" if name == "weightnorm" else "activation")
    assert ARXIV[name] in spec.paper
    assert spec.uses_batch_stats is (name in BATCH_STATS)
    assert spec.reference is False
    assert spec.description
    assert spec.needs_spatial is (name == "instancenorm")


def test_native_specs_are_references_of_the_same_kind() -> None:
    natives = [normzoo.get_norm(n) for n in normzoo.list_norms() if n.startswith("native_")]
    assert len(natives) >= 5
    for spec in natives:
        assert spec.reference and spec.native is None
    for name in normzoo.list_norms(references=False):
        spec = normzoo.get_norm(name)
        if spec.native is None:
            continue
        ref = normzoo.get_norm(spec.native)
        assert ref.reference, f"{name}: {spec.native} is not marked as a reference"
        assert ref.kind == spec.kind, name
        assert ref.uses_batch_stats == spec.uses_batch_stats, name
        assert ref.needs_spatial == spec.needs_spatial, name


def test_build_groupnorm_with_eight_groups() -> None:
    gn = normzoo.build_norm("gn", 64, num_groups=8)
    assert isinstance(gn, GroupNorm) and gn.num_groups == 8 and gn.num_features == 64
    x = 3.0 * torch.randn(4, 64, 5, 5) + 1.0
    y = gn(x)
    assert y.shape == x.shape
    groups = y.view(4, 8, -1)
    assert groups.mean(-1).abs().max() < 1e-5
    assert (groups.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    y.sum().backward()
    assert gn.weight.grad is not None and gn.weight.grad.shape == (64,)


def test_build_uses_the_spec_defaults_and_overrides() -> None:
    assert normzoo.build_norm("gn", 64).num_groups == 32  # the paper's default from the spec
    bn = normzoo.build_norm("BN", 16, momentum=None, eps=1e-3)
    assert bn.momentum is None and bn.eps == 1e-3


@pytest.mark.parametrize("name", normzoo.list_norms(kind="activation"))
def test_every_activation_entry_builds_and_keeps_the_shape(name: str) -> None:
    options = normzoo.get_norm(name).options()
    layer = normzoo.build_norm(name, 8, **({"num_groups": 4} if "num_groups" in options else {}))
    assert isinstance(layer, nn.Module)
    x = torch.randn(3, 8, 4, 5)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("name", normzoo.list_norms(kind="activation"))
def test_reset_parameters_restores_the_initial_state(name: str) -> None:
    """As torch's norms: parameters back to 1 / 0 and running statistics (where kept) to their
    start, for the from-scratch layers and the native references alike."""
    options = normzoo.get_norm(name).options()
    kwargs = {"num_groups": 4} if "num_groups" in options else {}
    if "track_running_stats" in options:
        kwargs["track_running_stats"] = True
    layer = normzoo.build_norm(name, 8, **kwargs)
    fresh = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5)
    layer(torch.randn(3, 8, 4, 5) + 2.0)  # a training step moves the running statistics
    layer.reset_parameters()
    state = layer.state_dict()
    assert state.keys() == fresh.keys()
    for key, value in fresh.items():
        assert torch.equal(state[key], value), key


#: weight entries that are not a (g, v) WeightNorm layout, and what they hand back instead
NOT_G_AND_V = {
    "weightstandardization": "the conv itself, one original (the trained W) and no g",
    "gn_ws": "Sequential(conv with WS, GroupNorm): the GN + WS baseline as one entry",
}


@pytest.mark.parametrize("name", normzoo.list_norms(kind="weight"))
def test_every_weight_entry_wraps_the_layer_it_is_given(name: str) -> None:
    conv = nn.Conv2d(3, 4, 3)
    options = {"num_groups": 2} if "num_groups" in normzoo.get_norm(name).options() else {}
    wrapped = normzoo.build_norm(name, conv, **options)
    assert wrapped(torch.randn(2, 3, 5, 5)).shape == (2, 4, 3, 3)
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
    if name in NOT_G_AND_V:
        assert any(k.endswith("parametrizations.weight.original") for k in wrapped.state_dict())
        return
    assert isinstance(wrapped, nn.Conv2d)
    assert "parametrizations.weight.original0" in wrapped.state_dict()


def test_unknown_name_lists_known_names_and_the_closest() -> None:
    with pytest.raises(normzoo.UnknownNormError) as info:
        normzoo.get_norm("groupnrom")
    message = str(info.value)
    assert "Did you mean 'groupnorm'?" in message
    for name in [*SIX, "none", "native_batchnorm"]:
        assert name in message
    assert "bn" in message and "wn" in message  # aliases listed
    assert isinstance(info.value, ValueError)
    with pytest.raises(normzoo.UnknownNormError, match="Did you mean 'layernorm'"):
        normzoo.build_norm("layer_nrm", 8)


def test_unknown_keyword_names_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"'layernorm' got unknown option\(s\) num_groups") as info:
        normzoo.build_norm("ln", 8, num_groups=2)
    assert "accepts: eps, affine, bias, device, dtype" in str(info.value)


def test_register_rejects_a_taken_name_and_a_bad_kind(restore_registry: None) -> None:
    with pytest.raises(ValueError, match="'gn' is already registered"):
        normzoo.register_norm("mygn", aliases=("gn",))(GroupNorm)
    with pytest.raises(ValueError, match="kind must be 'activation', 'weight' or 'last_dim'"):
        normzoo.register_norm("odd", kind="other")(GroupNorm)  # type: ignore[arg-type]


def _fake_plugin(root: Path, entry_points: str, modules: dict[str, str]) -> None:
    """A distribution "installed" in ``root``: its dist-info (METADATA, entry_points.txt) and modules."""
    dist = root / "fakeplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


def test_entry_point_plugin_is_listed_and_buildable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_registry: None
) -> None:
    mod = f"nzplugin_{uuid.uuid4().hex[:8]}"
    _fake_plugin(
        tmp_path,
        f"""
        [normzoo.norms]
        fakenorm = {mod}
        specnorm = {mod}:SPEC
        """,
        {
            mod: """
            from torch import nn
            from normzoo import NormSpec, register_norm

            @register_norm("fakenorm", aliases=("fk",), paper="Nobody 2024, arXiv:0000.00000")
            class FakeNorm(nn.Module):
                '''A test plugin: y = 2 x.'''

                def __init__(self, num_features, *, scale=2.0):
                    super().__init__()
                    self.scale = scale

                def forward(self, x):
                    return self.scale * x

            class SpecNorm(FakeNorm):
                '''Registered through a NormSpec object.'''

            SPEC = NormSpec(name="specnorm", cls=SpecNorm, uses_batch_stats=True)
            """
        },
    )
    assert "fakenorm" not in normzoo.list_norms()
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reload_plugins()
    names = normzoo.list_norms()
    assert {"fakenorm", "specnorm"} <= set(names)
    layer = normzoo.build_norm("FK", 4, scale=3.0)
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), 3.0 * x)
    assert normzoo.get_norm("fakenorm").paper == "Nobody 2024, arXiv:0000.00000"
    assert normzoo.get_norm("specnorm").uses_batch_stats
    with pytest.raises(TypeError, match="accepts: scale"):
        normzoo.build_norm("fakenorm", 4, momentum=0.1)
    registry.reload_plugins()  # loading again is harmless
    assert normzoo.list_norms().count("fakenorm") == 1


def test_restore_fixture_removed_the_plugin() -> None:
    """Runs after the plugin test: the registry is back to its own entries."""
    assert "fakenorm" not in normzoo.list_norms()
    assert "brokenplugin" not in normzoo.list_norms()
    assert "goodafter" not in normzoo.list_norms()


def test_broken_plugin_warns_and_the_registry_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_registry: None
) -> None:
    mod = f"nzplugin_{uuid.uuid4().hex[:8]}"
    _fake_plugin(
        tmp_path,
        f"""
        [normzoo.norms]
        brokenplugin = {mod}
        missingplugin = nzplugin_does_not_exist_{mod}
        clashname = {mod}_specs:NAME_TAKEN
        clashalias = {mod}_specs:ALIAS_TAKEN
        goodafter = {mod}_specs:GOOD
        """,
        {
            mod: "raise ImportError('this plugin is broken on purpose')\n",
            f"{mod}_specs": """
            from torch import nn
            from normzoo import NormSpec

            class Scale(nn.Module):
                def __init__(self, num_features):
                    super().__init__()

                def forward(self, x):
                    return x

            NAME_TAKEN = NormSpec(name="layernorm", cls=Scale)
            ALIAS_TAKEN = NormSpec(name="clashy", cls=Scale, aliases=("ln",))
            GOOD = NormSpec(name="goodafter", cls=Scale)
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning) as record:
        registry.reload_plugins()
    messages = [str(w.message) for w in record]
    assert any(
        "could not load norm plugin 'brokenplugin'" in m and "broken on purpose" in m
        for m in messages
    )
    assert any("could not load norm plugin 'missingplugin'" in m for m in messages)
    # a plugin whose name or alias is taken is skipped with a warning, and the plugins after it
    # still load (an alias clash used to raise out of the loader and stop it)
    assert any("'clashname'" in m and "'layernorm'" in m for m in messages)
    assert any("'clashalias'" in m and "'ln'" in m for m in messages)
    assert "goodafter" in normzoo.list_norms() and "clashy" not in normzoo.list_norms()
    assert normzoo.get_norm("ln").name == "layernorm"
    assert set(SIX) <= set(normzoo.list_norms())
    assert normzoo.build_norm("ln", 4)(torch.randn(2, 4)).shape == (2, 4)
