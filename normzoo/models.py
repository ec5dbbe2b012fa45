"""The models a study trains, with the norm taken from the registry by name.

* ``mlp`` — dense: ``[Linear -> norm -> ReLU] x len(widths) -> Linear`` on the flattened input.
* ``cnn`` — small conv net for 8x8 .. 32x32 inputs: ``[Conv kxk, stride s, padding k//2 -> norm ->
  ReLU]`` per entry of ``channels``/``strides``, a head (``avg``: global average pool; ``flatten``),
  optional dense ``[Linear -> norm -> ReLU]`` layers (``hidden``), a Linear classifier. Strides let
  the last conv layers be small spatially (8x8 -> 4x4 -> 2x2), where batch statistics are noisiest.
* ``transformer`` — a small pre-norm transformer encoder on images read row by row (one token per
  row; :mod:`normzoo.sequence_model`, whose docstring says which axes each kind of norm normalises).
* ``dropout`` (mlp, cnn; p, default 0: none) and ``dropout_position``: ``before_norm`` puts
  ``Dropout(p)`` between each hidden conv/linear and its norm (``layer -> Dropout -> norm -> ReLU``,
  the placement whose train/eval variance shift Li et al. 2019, arXiv:1801.05134, measure);
  ``after_norm`` after each block's activation (``layer -> norm -> ReLU -> Dropout``), so a norm
  sees dropout only through the next conv/linear.
* ``resnet`` — torchvision's ResNet-18/34 through its ``norm_layer=`` hook, adapted to small images
  as is usual for CIFAR (3x3 stride-1 stem, no max-pool). torchvision builds its convs without a
  bias (the norm after each supplies beta); with a norm that supplies none (a weight-kind norm, or
  ``none``) each of those convs gets a learnable per-output-channel bias, zero-initialised, so the
  net is affine as the ``mlp`` and ``cnn`` (whose convs/linears always carry a bias) and WeightNorm's
  data-dependent init sets b as well as g.

How the norm goes in (``normzoo.get_norm(norm).kind``):

* ``activation`` — ``build_norm(norm, C, **norm_overrides)`` after every conv/linear except the
  classifier;
* ``weight`` — no activation norm; every conv/linear, the classifier included, is reparametrised with
  ``build_norm(norm, module, **norm_overrides)``.

A combination that cannot apply raises :class:`InvalidCombination` (before any training): a
``needs_spatial`` norm (InstanceNorm) on dense features, GroupNorm whose ``num_groups`` does not divide
a layer's width.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normzoo.config import InvalidCombination
from normzoo.registry import NormSpec, build_norm, get_norm
from normzoo.sequence_model import SequenceNorm, Transformer

__all__ = [
    "DROPOUT_POSITIONS",
    "InvalidCombination",
    "build_model",
    "check_batch_size",
    "count_parameters",
]


class _Norms:
    """Builds the norm for each layer and turns a layer's refusal into :class:`InvalidCombination`."""

    def __init__(self, name: str, overrides: dict[str, Any]) -> None:
        self.spec: NormSpec = get_norm(name)
        self.overrides = dict(overrides)

    @property
    def supplies_shift(self) -> bool:
        """Whether the norm after a layer has a per-channel shift (beta) of its own: not for a
        weight-kind norm (nothing goes after the layer) nor for ``none`` (the identity)."""
        return self.spec.kind != "weight" and self.spec.name != "none"

    def activation(
        self, num_features: int, where: str, *, spatial: bool, tokens: bool = False
    ) -> nn.Module | None:
        """The norm after layer ``where`` (None for weight-kind norms: nothing goes there).
        ``spatial``: a channels-first (N, C, *S) feature map, or with ``tokens`` a sequence whose
        norm wrapper puts the features last for a last-dim layer."""
        spec = self.spec
        if spec.kind == "weight":
            return None
        if spec.kind == "last_dim" and spatial and not tokens:
            raise InvalidCombination(
                f"{spec.name} normalises the last dim of its input (a transformer's features, or "
                f"dense features), but {where} is a channels-first feature map; use layernorm2d "
                f"for a per-pixel LayerNorm over the channels, or layernorm over (C, H, W)"
            )
        if spec.needs_spatial and not spatial:
            raise InvalidCombination(
                f"{spec.name} needs spatial dims (its statistics are over H x W per sample and "
                f"channel) but {where} has dense features ({num_features}, no spatial dims); use "
                f"a conv model without dense hidden layers"
            )
        try:
            return build_norm(spec.name, num_features, **self.overrides)
        except ValueError as exc:
            raise InvalidCombination(
                f"{spec.name} cannot normalise {where} ({num_features} features): {exc}"
            ) from exc

    def reparametrise(self, model: nn.Module) -> nn.Module:
        """For a weight-kind norm: wrap every conv/linear of ``model`` in place."""
        if self.spec.kind != "weight":
            return model
        targets = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
        ]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            try:
                wrapped = build_norm(self.spec.name, module, **self.overrides)
            except ValueError as exc:
                raise InvalidCombination(f"{self.spec.name} cannot wrap {name}: {exc}") from exc
            setattr(parent, child, wrapped)
        return model


DROPOUT_POSITIONS = ("before_norm", "after_norm")


def _block(
    layer: nn.Module, norm: nn.Module | None, where: str, cfg: Any = None
) -> list[tuple[str, nn.Module]]:
    """``layer -> norm -> ReLU`` as named modules (no norm module for weight-kind norms), with
    ``Dropout`` before the norm or after the ReLU when ``cfg.dropout`` > 0."""
    norm_part = [] if norm is None else [(f"{where}_norm", norm)]
    p = float(getattr(cfg, "dropout", 0.0) or 0.0)  # plain objects too (not only DictConfig)
    if p == 0:  # no module at all: the model (and its state dict) as without the option
        return [(where, layer), *norm_part, (f"{where}_act", nn.ReLU())]
    position = str(getattr(cfg, "dropout_position", "before_norm"))
    if position not in DROPOUT_POSITIONS:
        raise ValueError(
            f"model.dropout_position={position!r}: expected one of {', '.join(DROPOUT_POSITIONS)}"
        )
    drop = [(f"{where}_dropout", nn.Dropout(p))]
    if position == "before_norm":
        return [(where, layer), *drop, *norm_part, (f"{where}_act", nn.ReLU())]
    return [(where, layer), *norm_part, (f"{where}_act", nn.ReLU()), *drop]


def _mlp(cfg: Any, norms: _Norms, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = 1
    for d in input_shape:
        width *= int(d)
    for i, w in enumerate(cfg.widths, start=1):
        norm = norms.activation(int(w), f"fc{i}", spatial=False)
        layers += _block(nn.Linear(width, int(w)), norm, f"fc{i}", cfg)
        width = int(w)
    layers.append(("classifier", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _cnn(cfg: Any, norms: _Norms, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise InvalidCombination(
            f"model=cnn needs (C, H, W) inputs, got shape {tuple(input_shape)}"
        )
    chans, strides = [int(c) for c in cfg.channels], [int(s) for s in cfg.strides]
    if len(chans) != len(strides):
        raise ValueError(f"model.strides {strides} needs one stride per conv layer {chans}")
    k = int(cfg.kernel_size)
    c_in, h, w = (int(d) for d in input_shape)
    layers: list[tuple[str, nn.Module]] = []
    for i, (c, s) in enumerate(zip(chans, strides, strict=True), start=1):
        h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        norm = norms.activation(c, f"conv{i} ({c}x{h}x{w})", spatial=True)
        layers += _block(nn.Conv2d(c_in, c, k, stride=s, padding=k // 2), norm, f"conv{i}", cfg)
        c_in = c
    if cfg.head == "avg":
        layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        width = c_in
    elif cfg.head == "flatten":
        layers.append(("flatten", nn.Flatten()))
        width = c_in * h * w
    else:
        raise ValueError(f"model.head={cfg.head!r}: expected 'avg' or 'flatten'")
    for i, hw in enumerate(cfg.hidden, start=1):
        norm = norms.activation(int(hw), f"fc{i}", spatial=False)
        layers += _block(nn.Linear(width, int(hw)), norm, f"fc{i}", cfg)
        width = int(hw)
    layers.append(("classifier", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _resnet(cfg: Any, norms: _Norms, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    import torchvision

    if len(input_shape) != 3:
        raise InvalidCombination(
            f"model=resnet needs (C, H, W) inputs, got shape {tuple(input_shape)}"
        )
    arch = str(cfg.arch)
    factories: dict[str, Callable[..., nn.Module]] = {
        "resnet18": torchvision.models.resnet18,
        "resnet34": torchvision.models.resnet34,
    }
    if arch not in factories:
        raise ValueError(f"model.arch={arch!r}: expected one of {', '.join(factories)}")
    counter = iter(range(1, 1_000_000))

    def norm_layer(num_features: int) -> nn.Module:
        norm = norms.activation(num_features, f"{arch} norm #{next(counter)}", spatial=True)
        return nn.Identity() if norm is None else norm

    model = factories[arch](weights=None, num_classes=num_classes, norm_layer=norm_layer)
    # small images: 3x3 stride-1 stem and no max-pool (as the usual CIFAR ResNets)
    model.conv1 = nn.Conv2d(int(input_shape[0]), 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    if not norms.supplies_shift:
        _add_conv_biases(model)
    if cfg.get(
        "zero_init_residual", False
    ):  # torchvision's own loop assumes every norm has .weight
        resnet = torchvision.models.resnet
        for block in model.modules():
            if isinstance(block, resnet.Bottleneck | resnet.BasicBlock):
                last = block.bn3 if isinstance(block, resnet.Bottleneck) else block.bn2
                if getattr(last, "weight", None) is not None:
                    nn.init.zeros_(last.weight)
    return model


def _transformer(
    cfg: Any, norms: _Norms, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    if len(input_shape) != 3:
        raise InvalidCombination(
            f"model=transformer needs (C, H, W) inputs (rows become tokens), got {tuple(input_shape)}"
        )
    d_model, tokens = int(cfg.d_model), int(input_shape[1])

    def make_norm(where: str) -> nn.Module:
        norm = norms.activation(d_model, f"{where} ({tokens} tokens x {d_model})", spatial=True,
                                tokens=True)  # fmt: skip
        if norm is None:
            return nn.Identity()
        return SequenceNorm(norm, channels_first=norms.spec.kind != "last_dim")

    return Transformer(
        input_shape, num_classes, make_norm, d_model=d_model, depth=int(cfg.depth),
        heads=int(cfg.heads), mlp_ratio=int(cfg.mlp_ratio),
    )  # fmt: skip


def _add_conv_biases(model: nn.Module) -> None:
    """Give every conv of ``model`` built without a bias a zero-initialised per-channel one (in the
    place ``bias=True`` would have put it, so the state dict reads as a biased conv's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_channels, dtype=m.weight.dtype))


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet, "transformer": _transformer}


def build_model(
    cfg_model: Any,
    norm: str,
    norm_overrides: dict[str, Any] | None,
    input_shape: Sequence[int],
    num_classes: int,
) -> nn.Module:
    """Build ``cfg_model.name`` (``mlp``, ``cnn``, ``resnet`` or ``transformer``) with the registry's norm ``norm``.

    Args:
        cfg_model: the ``model`` config node (see ``normzoo.config.MLPConf`` etc.).
        norm: a registry name or alias.
        norm_overrides: layer options passed to every ``build_norm`` call.
        input_shape: one sample's shape, (C, H, W).
        num_classes: outputs of the classifier.

    Raises:
        InvalidCombination: the norm cannot apply to this model (message says why).
        UnknownNormError: ``norm`` is not registered.
    """
    name = str(cfg_model.name)
    if name not in _BUILDERS:
        raise ValueError(f"model.name={name!r}: expected one of {', '.join(_BUILDERS)}")
    norms = _Norms(norm, norm_overrides or {})
    model = _BUILDERS[name](cfg_model, norms, tuple(input_shape), int(num_classes))
    return norms.reparametrise(model)


def check_batch_size(
    model: nn.Module, norm: str, input_shape: Sequence[int], batch_size: int
) -> None:
    """Refuse a batch size at which the model's norm layers have nothing to normalise over.

    A layer with batch statistics (BatchNorm, Batch Renorm) sees ``batch_size * H * W`` values per
    channel, so at batch size 1 on dense features (an mlp, a cnn's ``hidden`` layers, a 1x1 feature
    map) it has one value and its variance is undefined (torch: "Expected more than 1 value per
    channel when training"); a ``needs_spatial`` layer (InstanceNorm) sees ``H * W`` values per
    sample and channel. The spatial sizes come from one eval-mode forward of a zero sample (no
    statistics are updated, no random numbers drawn). Training batches are always full
    (``drop_last``), so ``batch_size`` is the smallest batch a layer sees.

    Raises:
        InvalidCombination: naming the first layer concerned.
    """
    spec = get_norm(norm)
    if spec.kind == "weight" or not (
        (spec.uses_batch_stats and batch_size < 2) or spec.needs_spatial
    ):
        return

    def check(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            per_sample = int(args[0][0, 0].numel())  # H * W of one sample and channel; dense: 1
            if spec.uses_batch_stats and batch_size * per_sample < 2:
                what = "dense features" if args[0].dim() == 2 else "a 1x1 feature map"
                raise InvalidCombination(
                    f"{spec.name} normalises with batch statistics, but at data.batch_size="
                    f"{batch_size} its layer {name} sees a single value per channel ({what}): "
                    f"its variance is undefined; use data.batch_size >= 2 or a per-sample norm"
                )
            if spec.needs_spatial and per_sample < 2:
                raise InvalidCombination(
                    f"{spec.name} normalises over H x W per sample and channel, but its layer "
                    f"{name} sees a 1x1 feature map: a single value, its variance is undefined"
                )

        return hook

    hooks = [
        module.register_forward_pre_hook(check(name))
        for name, module in model.named_modules()
        if isinstance(module, spec.cls)
    ]
    was_training = model.training
    try:
        model.eval()  # the hooks stop the forward at the first layer concerned
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        with torch.no_grad():
            model(torch.zeros(1, *(int(d) for d in input_shape), device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
