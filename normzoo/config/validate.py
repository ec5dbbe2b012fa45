"""Checks the schema cannot make: ranges (:data:`RULES`), the types and keys of a command-line
override before Hydra composes (:func:`check_override`), and the norm's options against the
registry (:func:`validate_norm` builds the layer once). The runner calls :func:`validate` before
any data is loaded; in a multirun it is called for every job before the first one starts."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normzoo.config.flat import plain as _plain
from normzoo.config.option_types import check_option_types
from normzoo.config.options import _layer_options, _merge_layer_options
from normzoo.config.schema import (
    ARCHS,
    DATASETS,
    HEADS,
    LR_RULES,
    MODEL_SCHEMAS,
    NORM_RESERVED_KEYS,
    OPTIMIZERS,
    SECTIONS,
    Config,
    Device,
    Progress,
    norm_choices,
)
from normzoo.errors import ConfigError
from normzoo.registry import UnknownNormError, get_norm

__all__ = [
    "KEEP_ANY_REVISION",
    "RULES",
    "check_override",
    "check_value",
    "suggest_norm",
    "validate",
    "validate_model",
    "validate_norm",
]


def suggest_norm(value: str) -> str:
    """A message for an unknown ``norm=`` value: the closest choice and the full list."""
    choices = norm_choices()
    close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
    hint = f" Did you mean norm={close[0]}?" if close else ""
    return f"unknown norm {value!r} (norm={value}).{hint} Choices: {', '.join(choices)}."


#: the ``resume`` value that keeps finished results of any code revision (normzoo.run.resume)
KEEP_ANY_REVISION = "keep_any_revision"

#: range rules for single keys: key -> (test, the allowed values in words)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, ">= 0"),
    "resume": (
        lambda v: isinstance(v, bool) or v == KEEP_ANY_REVISION,
        f"true, false or {KEEP_ANY_REVISION}",
    ),
    "threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    "data.name": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "data.test_fraction": (lambda v: 0 < v < 1, "0 < value < 1"),
    "data.classes_per_batch": (lambda v: v >= 0, ">= 0 (0 = i.i.d. batches)"),
    "data.train_subset": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "data.test_subset": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "data.val_fraction": (lambda v: 0 <= v < 1, "0 <= value < 1 (0 = no validation split)"),
    "optim.lr_rule": (lambda v: v in LR_RULES, f"one of {', '.join(LR_RULES)}"),
    "optim.lr_scale": (lambda v: v > 0, "> 0"),
    "train.steps": (lambda v: v >= 0, ">= 0 (0 = use train.epochs)"),
    "optim.name": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "optim.base_lr": (lambda v: v > 0, "> 0"),
    "optim.reference_batch_size": (lambda v: v >= 1, ">= 1"),
    "optim.momentum": (lambda v: 0 <= v < 1, "0 <= value < 1"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "> 0"),
    "train.epochs": (lambda v: v >= 1, ">= 1"),
    "train.warmup_fraction": (lambda v: 0 <= v < 1, "0 <= value < 1"),
    "train.final_lr_fraction": (lambda v: 0 <= v <= 1, "0 <= value <= 1"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "0 <= value < 1"),
    "train.grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "train.check_every": (lambda v: v >= 0, ">= 0 (0 = auto)"),
    "train.mkldnn": (lambda v: v in ("auto", "on", "off"), "one of auto, on, off"),
    "train.checkpoint": (lambda v: v == "auto" or isinstance(v, bool), "one of auto, true, false"),
    "train.compile": (lambda v: v == "auto" or isinstance(v, bool), "one of auto, true, false"),
    "diagnostics.precise_samples": (lambda v: v >= 1, ">= 1"),
    "norm.data_init_samples": (lambda v: v >= 1, ">= 1"),
    "model.widths": (lambda v: len(v) >= 1 and all(w >= 1 for w in v), "one or more widths >= 1"),
    "model.channels": (lambda v: len(v) >= 1 and all(c >= 1 for c in v), "one or more widths >= 1"),
    "model.strides": (lambda v: len(v) >= 1 and all(s >= 1 for s in v), "one or more strides >= 1"),
    "model.hidden": (lambda v: all(w >= 1 for w in v), "widths >= 1"),
    "model.kernel_size": (lambda v: v >= 1, ">= 1"),
    "model.head": (lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
    "model.arch": (lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.dropout_position": (
        lambda v: v in ("before_norm", "after_norm"),
        "one of before_norm, after_norm",
    ),
    "model.d_model": (lambda v: v >= 1, ">= 1"),
    "model.depth": (lambda v: v >= 1, ">= 1"),
    "model.heads": (lambda v: v >= 1, ">= 1"),
    "model.mlp_ratio": (lambda v: v >= 1, ">= 1"),
}


def check_value(key: str, value: Any) -> None:
    """Check one value against its range rule (keys without a rule pass).

    Raises:
        ConfigError: ``"data.batch_size=0 is out of range: >= 1"``.
    """
    rule = RULES.get(key)
    if rule is None:
        return
    test, allowed = rule
    plain = _plain(value)
    try:
        ok = bool(test(plain))
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{key}={plain!r} is out of range: allowed {allowed}")


_GROUPS = ("norm", "model", "data", "optim", "experiment")
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _schema_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _closest(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {prefix}{close[0]}?" if close else ""


def check_override(text: str, model: str | None = None) -> None:
    """Check one command-line override against the schema before Hydra composes the config, so
    that the message names the key *and* what is allowed (Hydra's names only the key).

    Unknown keys of ``data``/``optim``/``train``/``diagnostics``/``report``/``model`` (for
    ``model``: of the chosen ``model`` when given, else of any model) and of the top level, and
    values of the wrong type (each value of a sweep) are refused. ``+``/``++``/``~`` overrides,
    ``hydra.*``, group choices and the free-form ``norm``/``norm_options`` nodes are left to Hydra
    and :func:`validate`; text Hydra cannot parse is left to Hydra's own error.

    Raises:
        ConfigError: ``"data.bach_size: no such key. Did you mean data.batch_size? data accepts
        ..."`` or ``"data.batch_size='foo' is not an integer: allowed >= 1"``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer

    try:
        override = OverridesParser.create().parse_override(text)
    except Exception:
        return
    key = override.key_or_group
    if (
        override.is_hydra_override()
        or key.startswith("hydra")
        or override.is_add()
        or override.is_force_add()
        or override.is_delete()
    ):
        return
    section, _, rest = key.partition(".")
    field_name = rest.split(".")[0]
    top = _schema_types(Config)
    if not rest:
        if key in _GROUPS:
            return
        if key not in top:
            raise ConfigError(
                f"{key}: no such key.{_closest(key, sorted(top))} Top-level keys: "
                f"{', '.join(sorted(top))}"
            )
        types = top
        field_name = key
    elif section in SECTIONS:
        types = _schema_types(SECTIONS[section])
    elif section == "model":
        schemas = [MODEL_SCHEMAS[model]] if model in MODEL_SCHEMAS else list(MODEL_SCHEMAS.values())
        types = {k: v for schema in schemas for k, v in _schema_types(schema).items()}
        which = f"model={model}" if model in MODEL_SCHEMAS else "the models"
        if field_name not in types:
            raise ConfigError(
                f"{key}: no such key for {which}.{_closest(field_name, sorted(types), 'model.')} "
                f"Allowed: {', '.join(f'model.{k}' for k in sorted(types))}"
            )
    elif section in top:  # the free-form norm / norm_options nodes: checked by validate()
        return
    else:
        raise ConfigError(
            f"{key}: no such key.{_closest(section, sorted(top))} Top-level keys: "
            f"{', '.join(sorted(top))}"
        )
    if field_name not in types:
        raise ConfigError(
            f"{key}: no such key.{_closest(field_name, sorted(types), section + '.')} {section} "
            f"accepts: {', '.join(sorted(types))}"
        )
    if field_name != (rest or key):  # a nested key below a field: left to Hydra
        return
    if override.is_sweep_override():
        try:
            values = list(override.sweep_iterator(transformer=Transformer.identity))
        except Exception:
            return
    else:
        values = [override.value()]
    for value in values:
        if not (isinstance(value, str) and "${" in value):  # interpolations resolve later
            _check_type(key, types[field_name], value)
            if types[field_name] == "Any" and key in RULES:  # no type to check: its rule says
                check_value(key, value)


def _check_type(key: str, type_name: str, value: Any) -> None:
    allowed = RULES[key][1] if key in RULES else None
    enum_type = {"Progress": Progress, "Device": Device}.get(type_name)
    if enum_type is not None:
        names = [m.name for m in enum_type]
        if str(value) not in names:
            raise ConfigError(f"{key}={value!r}: allowed one of {', '.join(names)}")
        return
    kind = _KINDS.get(type_name)
    if kind is None:
        return
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[type_name]
    if not ok:
        raise ConfigError(
            f"{key}={value!r} is not {kind}" + (f": allowed {allowed}" if allowed else "")
        )


def validate(cfg: DictConfig, *, skip: tuple[str, ...] = (), explicit: Iterable[str] = ()) -> None:
    """Check what the schema cannot: ranges, choices and the norm's options against the registry
    (the layer is built once with them: a value it refuses is a :class:`ConfigError`).

    ``skip``: top-level nodes not to check (a multirun pre-check skips the groups it sweeps).
    ``explicit``: the ``norm`` keys set on the command line (see :func:`norm_layer_options`).

    Raises:
        ConfigError: naming the key, the value and the allowed values.
    """
    if "norm" not in skip:
        validate_norm(cfg.norm, cfg.get("norm_options") or {}, explicit)
    if "model" not in skip:
        validate_model(cfg.model)
    for key in RULES:
        if key.split(".")[0] in skip:
            continue
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            check_value(key, value)


_ABSENT = object()


def validate_model(model: Any) -> None:
    """Check a ``model`` node: a known model, and what its schema cannot say.

    Raises:
        ConfigError: naming the key and the value.
    """
    if not isinstance(model, DictConfig) or model.get("name") not in MODEL_SCHEMAS:
        raise ConfigError(
            f"model.name must be one of {', '.join(MODEL_SCHEMAS)} (choose model=<name>)"
        )
    if model.name == "cnn" and len(model.strides) != len(model.channels):
        raise ConfigError(
            f"model.strides={list(model.strides)} must give one stride per conv layer "
            f"(model.channels={list(model.channels)})"
        )
    if model.name == "transformer" and model.d_model % model.heads:
        raise ConfigError(
            f"model.d_model={model.d_model} must be a multiple of model.heads={model.heads}"
        )


def validate_norm(norm: Any, norm_options: Any, explicit: Iterable[str] = ()) -> None:
    """Check a ``norm`` node and the ``norm_options`` beside it: known names and options, and the
    layer built once (a tiny one, on the CPU) with the options a run would use, so that a value
    the layer refuses (``norm.momentum=2``, ``norm.eps=-1``, ``norm.momentum=foo``) is refused
    before anything runs rather than recorded per run.

    Raises:
        ConfigError: naming the key or the options and the layer's own message.
    """
    if "name" not in norm:
        raise ConfigError("norm.name is missing: choose a norm with norm=<name>")
    try:
        spec = get_norm(str(norm.name))
    except UnknownNormError as exc:
        raise ConfigError(f"norm.name: {exc}") from None
    accepted, takes_any = _layer_options(spec.name)
    for key in norm:
        if key not in NORM_RESERVED_KEYS and key not in accepted and not takes_any:
            raise ConfigError(
                f"norm.{key}: {spec.name!r} has no option {key!r}; it accepts "
                f"{', '.join(sorted(accepted)) or 'no options'}"
            )
    if norm.get("data_init", False) and spec.kind != "weight":
        raise ConfigError(
            f"norm.data_init=true applies to weight-kind norms only, not {spec.name!r}"
        )
    seen: dict[str, str] = {}
    for name, opts in norm_options.items():
        try:
            other = get_norm(str(name))
        except UnknownNormError as exc:
            raise ConfigError(f"norm_options.{name}: {exc}") from None
        if other.name in seen:
            raise ConfigError(
                f"norm_options.{seen[other.name]} and norm_options.{name} both set options of "
                f"{other.name!r}; keep one (norm_options.{other.name})"
            )
        seen[other.name] = str(name)
        if not isinstance(opts, DictConfig):
            raise ConfigError(f"norm_options.{name} must be a mapping of layer options")
        ok, any_ok = _layer_options(other.name)
        for key in opts:
            if key not in ok and not any_ok:
                raise ConfigError(
                    f"norm_options.{name}.{key}: {other.name!r} has no option {key!r}; it accepts "
                    f"{', '.join(sorted(ok)) or 'no options'}"
                )
    node = OmegaConf.to_container(norm, resolve=True) if isinstance(norm, DictConfig) else norm
    extra = norm_options
    if isinstance(extra, DictConfig):
        extra = OmegaConf.to_container(extra, resolve=True)
    check_option_types(spec, dict(node))
    for name, opts in dict(extra).items():
        check_option_types(get_norm(str(name)), dict(opts), f"norm_options.{name}")
    _build_once(spec, _merge_layer_options(spec.name, dict(node), dict(extra), explicit))


def _build_once(spec: Any, options: dict[str, Any]) -> None:
    """Build the layer once with ``options``; a ``ValueError``/``TypeError`` is a config error.
    An activation layer is built with a few widths (one that ``num_groups`` divides first), so that
    only a refusal of the options themselves counts, not one of a width (that depends on the
    model: :class:`InvalidCombination` when the model is built)."""
    from torch import nn

    from normzoo.registry import build_norm

    groups = options.get("num_groups")
    widths = [1, 840]
    if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0:
        widths.insert(0, groups)
    errors: list[Exception] = []
    for width in widths if spec.kind != "weight" else [None]:
        try:
            build_norm(spec.name, nn.Linear(2, 2) if width is None else width, **options)
            return
        except (ValueError, TypeError) as exc:
            errors.append(exc)
    params = list(inspect.signature(spec.cls).parameters.values())[1:]
    defaults = {p.name: p.default for p in params} | dict(spec.defaults)
    changed = {k: v for k, v in options.items() if defaults.get(k, _ABSENT) != v}
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())) or "its defaults"
    raise ConfigError(
        f"norm={spec.name} cannot be built with {shown}: {errors[0]} (from norm.* or "
        f"norm_options.{spec.name}.*)"
    )
