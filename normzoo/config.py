"""Structured configs: the schema every composed config is checked against.

Hydra merges ``conf/`` onto these dataclasses (stored in the ``ConfigStore``), so a misspelt key
(``data.bach_size=8``) or a wrong type (``data.batch_size=foo``) fails when the config is composed,
with the key named. Ranges OmegaConf cannot express (``data.batch_size >= 1``, ``optim.lr > 0``, ...)
and the registry-driven checks (the norm's options) are in :func:`validate`, which the runner calls
before any data is loaded; in a multirun it is called for every job before the first one starts.

Importing this module also registers

* the schemas (``base_config``, ``schema/model/<name>``), and
* one ``norm/<alias>`` node per registry alias (``norm=bn`` is ``norm=batchnorm``), with the content
  of ``conf/norm/<canonical>.yaml``; a registered norm without a YAML file (a third-party plugin) gets
  a ``norm/<name>`` node built from its spec.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from normzoo.registry import UnknownNormError, get_norm, list_norms

__all__ = [
    "CONF_DIR",
    "NORM_RESERVED_KEYS",
    "RULES",
    "CNNConf",
    "Config",
    "ConfigError",
    "DataConf",
    "Device",
    "DiagnosticsConf",
    "InvalidCombination",
    "MLPConf",
    "OptimConf",
    "Progress",
    "ReportConf",
    "ResNetConf",
    "TrainConf",
    "check_override",
    "check_value",
    "explicit_norm_keys",
    "flatten",
    "layer_options_from_flat",
    "model_node",
    "norm_choices",
    "norm_layer_options",
    "norm_node",
    "register_configs",
    "suggest_norm",
    "validate",
    "validate_model",
    "validate_norm",
]

#: ``conf/`` of the source checkout (the ``config_path`` of ``normzoo.train``).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: keys of the ``norm`` node that are not layer options.
NORM_RESERVED_KEYS = frozenset({"name", "data_init", "data_init_samples"})


class ConfigError(ValueError):
    """A config value that is out of range or does not fit the registry; names the key."""


class InvalidCombination(ValueError):
    """A combination of valid settings that cannot run (InstanceNorm on dense features, GroupNorm
    groups not dividing a layer's width, ...). A run records it as status ``invalid`` with this
    message, before any training."""


class Device(enum.Enum):
    """Where a run trains: ``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Progress(enum.Enum):
    """``auto``: a tqdm bar on a terminal, plain log lines otherwise."""

    auto = "auto"
    bar = "bar"
    log = "log"
    none = "none"


@dataclass
class MLPConf:
    """Dense net: [Linear -> norm -> ReLU] x len(widths) -> Linear."""

    name: str = "mlp"
    widths: list[int] = field(default_factory=lambda: [256, 256, 256])


@dataclass
class CNNConf:
    """Small conv net: [Conv kxk (stride s) -> norm -> ReLU] per channel width, a head, a classifier.

    ``head``: ``avg`` (global average pool) or ``flatten``; ``hidden``: widths of optional dense
    layers (Linear -> norm -> ReLU) between the head and the classifier.
    """

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 32, 32])
    strides: list[int] = field(default_factory=lambda: [1, 2, 2])
    kernel_size: int = 3
    head: str = "flatten"
    hidden: list[int] = field(default_factory=list)


@dataclass
class ResNetConf:
    """torchvision ResNet through its ``norm_layer=`` hook, with a 3x3 stem and no max-pool."""

    name: str = "resnet"
    arch: str = "resnet18"
    zero_init_residual: bool = False


@dataclass
class DataConf:
    """The data set and how training batches are drawn.

    ``classes_per_batch`` > 0 draws class-grouped (non-i.i.d.) batches of that many classes with
    ``batch_size / classes_per_batch`` images each (Batch Renorm paper: 16 classes x 2 images).
    ``train_subset``/``test_subset`` > 0 keep that many samples (a seeded, stratified choice for
    digits; the first ones otherwise) for quick runs.
    """

    name: str = "digits"
    root: str = "data"
    download: bool = False
    batch_size: int = 32
    eval_batch_size: int = 1000
    test_fraction: float = 0.2
    split_seed: int = 0
    classes_per_batch: int = 0
    train_subset: int = 0
    test_subset: int = 0


@dataclass
class OptimConf:
    """Optimizer and the linear scaling rule lr = base_lr * batch_size / reference_batch_size."""

    name: str = "sgd"
    base_lr: float = 0.1
    reference_batch_size: int = 32
    scale_lr: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class TrainConf:
    """The schedule: a fixed epoch budget; linear warm-up over a fraction of it, then cosine.

    ``check_every``: on a GPU, how often (in steps) the losses kept on the device are checked for
    NaN/inf (the diverging step is found exactly either way; 0 = 50); on CPU every step is checked.
    ``mkldnn``: oneDNN conv kernels on CPU, ``on``/``off``/``auto`` (off at batch size <= 8, where
    torch's native kernels are faster for small models).
    ``checkpoint``: ``true`` saves ``checkpoint.pt`` (model, optimizer, step, RNG states, curves)
    into the run dir at the end of every epoch and continues from it when the run is started again;
    ``auto`` does so for long runs only (not on digits, or more than
    ``normzoo.train.AUTO_CHECKPOINT_STEPS`` optimizer steps); ``false`` never.
    """

    epochs: int = 10
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    compile: bool = False
    deterministic: bool = True
    check_every: int = 0
    mkldnn: str = "auto"
    progress: Progress = Progress.auto
    checkpoint: Any = "auto"  # auto | true | false (a bool or the string: checked by validate)


@dataclass
class DiagnosticsConf:
    """The train/inference mismatch diagnostics run at the end of every ok run."""

    enabled: bool = True
    precise_samples: int = 4096


@dataclass
class ReportConf:
    """Where ``normzoo.report.ReportCallback`` writes the report at the end of a multirun."""

    out: str | None = None


@dataclass
class Config:
    """The whole run. ``norm`` is free-form (each layer has its own options; :func:`validate`
    checks them against the registry); ``norm_options`` maps a norm name (or alias) to options
    applied only when that norm is the one selected (a study sweeping over norms sets, e.g.,
    ``norm_options.groupnorm.num_groups`` for its widths); a ``norm.<option>`` set on the command
    line wins over them (:func:`norm_layer_options`). ``resume``: a run whose dir already
    holds a finished result of the same config (``ok``, ``invalid`` or ``diverged``) is skipped;
    ``resume=false`` reruns it."""

    norm: dict[str, Any] = field(default_factory=dict)
    norm_options: dict[str, Any] = field(default_factory=dict)
    model: Any = MISSING
    data: DataConf = field(default_factory=DataConf)
    optim: OptimConf = field(default_factory=OptimConf)
    train: TrainConf = field(default_factory=TrainConf)
    diagnostics: DiagnosticsConf = field(default_factory=DiagnosticsConf)
    report: ReportConf = field(default_factory=ReportConf)
    seed: int = 0
    device: Device = Device.auto
    threads: int = 1
    study: str | None = None
    resume: bool = True


MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConf, "cnn": CNNConf, "resnet": ResNetConf}
OPTIMIZERS = ("sgd", "adamw")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
HEADS = ("avg", "flatten")
ARCHS = ("resnet18", "resnet34")


def norm_choices() -> list[str]:
    """Every accepted ``norm=`` value: the YAML files of ``conf/norm`` and the ConfigStore nodes."""
    files = {p.stem for p in (CONF_DIR / "norm").glob("*.yaml")}
    stored = set(ConfigStore.instance().repo.get("norm", {}))
    return sorted(files | {Path(s).stem for s in stored})


def suggest_norm(value: str) -> str:
    """A message for an unknown ``norm=`` value: the closest choice and the full list."""
    choices = norm_choices()
    close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
    hint = f" Did you mean norm={close[0]}?" if close else ""
    return f"unknown norm {value!r} (norm={value}).{hint} Choices: {', '.join(choices)}."


def norm_layer_options(cfg: DictConfig, explicit: Iterable[str] = ()) -> dict[str, Any]:
    """The layer options of the selected norm: the ``norm`` node without its reserved keys, then
    ``norm_options[<key>]`` for every key that names the selected norm (its canonical name or an
    alias) on top, then the ``norm`` keys in ``explicit`` (those set on the command line, see
    :func:`explicit_norm_keys`) on top again: an explicit ``norm.num_groups=4`` wins over a study's
    ``norm_options.groupnorm.num_groups``."""
    node = OmegaConf.to_container(cfg.norm, resolve=True)
    extra = OmegaConf.to_container(cfg.get("norm_options") or OmegaConf.create({}), resolve=True)
    return _merge_layer_options(str(cfg.norm.name), node, extra, explicit)


def explicit_norm_keys(overrides: Iterable[str] | None) -> set[str]:
    """The ``norm`` option keys a job's overrides set (``norm.<key>=``, ``+norm.<key>=``, ...)."""
    keys = set()
    for text in overrides or ():
        key = str(text).split("=", 1)[0].lstrip("+~")
        if key.startswith("norm.") and key[5:]:
            keys.add(key[5:].split(".")[0])
    return keys


def _merge_layer_options(
    name: str, node: dict[str, Any], norm_options: dict[str, Any], explicit: Iterable[str]
) -> dict[str, Any]:
    canonical = get_norm(name).name
    base = {k: v for k, v in node.items() if k not in NORM_RESERVED_KEYS}
    opts = dict(base)
    for key, extra in norm_options.items():
        try:
            target = get_norm(str(key)).name
        except UnknownNormError:
            continue
        if target == canonical and isinstance(extra, dict):
            opts.update(extra)
    for key in explicit:
        if key in base:
            opts[key] = base[key]
    return opts


def layer_options_from_flat(
    flat: dict[str, Any], overrides: Iterable[str] | None = None
) -> dict[str, Any] | None:
    """:func:`norm_layer_options` from a :func:`flatten`-ed config (a ``metrics.json`` record's
    ``config``) and the job's overrides; None when the norm is not registered."""
    node: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("norm."):
            node[key[5:]] = value
        elif key.startswith("norm_options."):
            which, _, option = key[len("norm_options.") :].partition(".")
            if option:
                extra.setdefault(which, {})[option] = value
    try:
        return _merge_layer_options(
            str(node.get("name")), node, extra, explicit_norm_keys(overrides)
        )
    except UnknownNormError:
        return None


def _layer_options(name: str) -> tuple[set[str], bool]:
    spec = get_norm(name)
    params = list(inspect.signature(spec.cls).parameters.values())[1:]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    return set(spec.options()), takes_any


#: range rules for single keys: key -> (test, the allowed values in words)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, ">= 0"),
    "threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    "data.name": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "data.test_fraction": (lambda v: 0 < v < 1, "0 < value < 1"),
    "data.classes_per_batch": (lambda v: v >= 0, ">= 0 (0 = i.i.d. batches)"),
    "data.train_subset": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "data.test_subset": (lambda v: v >= 0, ">= 0 (0 = all)"),
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
    "diagnostics.precise_samples": (lambda v: v >= 1, ">= 1"),
    "norm.data_init_samples": (lambda v: v >= 1, ">= 1"),
    "model.widths": (lambda v: len(v) >= 1 and all(w >= 1 for w in v), "one or more widths >= 1"),
    "model.channels": (lambda v: len(v) >= 1 and all(c >= 1 for c in v), "one or more widths >= 1"),
    "model.strides": (lambda v: len(v) >= 1 and all(s >= 1 for s in v), "one or more strides >= 1"),
    "model.hidden": (lambda v: all(w >= 1 for w in v), "widths >= 1"),
    "model.kernel_size": (lambda v: v >= 1, ">= 1"),
    "model.head": (lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
    "model.arch": (lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
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


#: the config nodes whose keys are fixed by a schema (``model`` depends on the model chosen)
SECTIONS: dict[str, type] = {
    "data": DataConf,
    "optim": OptimConf,
    "train": TrainConf,
    "diagnostics": DiagnosticsConf,
    "report": ReportConf,
}
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


def norm_node(option: str) -> DictConfig:
    """The ``norm`` node ``norm=<option>`` composes (a YAML file of ``conf/norm`` or an alias or
    plugin node of the ConfigStore)."""
    path = CONF_DIR / "norm" / f"{option}.yaml"
    if path.is_file():
        return OmegaConf.load(path)
    return copy.deepcopy(ConfigStore.instance().load(f"norm/{option}.yaml").node)


def model_node(name: str) -> DictConfig:
    """The ``model`` node ``model=<name>`` composes (its schema with ``conf/model/<name>.yaml``)."""
    node = OmegaConf.structured(MODEL_SCHEMAS[name])
    path = CONF_DIR / "model" / f"{name}.yaml"
    if path.is_file():
        content = OmegaConf.load(path)
        node = OmegaConf.merge(node, {k: content[k] for k in content if k != "defaults"})
    return node


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


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay lists, enums become their names."""
    out: dict[str, Any] = {}
    if isinstance(node, DictConfig | dict):
        items = node.items()
        if isinstance(node, DictConfig):
            items = ((k, node[k]) for k in node)
        for key, value in items:
            full = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, DictConfig | dict) and len(value) > 0:
                out.update(flatten(value, full))
            else:
                out[full] = _plain(value)
        return out
    return {prefix: _plain(node)}


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, enum.Enum):
        return value.name
    return value


_registered = False


def register_configs() -> None:
    """Store the schemas and the norm alias nodes in the ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="schema/model", name=name, node=schema)
    norm_dir = CONF_DIR / "norm"
    for name in list_norms():
        spec = get_norm(name)
        path = norm_dir / f"{name}.yaml"
        if path.is_file():
            node = OmegaConf.load(path)
        else:  # a plugin's norm: usable as norm=<name> without a YAML file
            node = OmegaConf.create({"name": name, **dict(spec.defaults)})
            cs.store(group="norm", name=name, node=node)
        for alias in spec.aliases:
            if not (norm_dir / f"{alias}.yaml").is_file():
                cs.store(group="norm", name=alias, node=node)
    _registered = True


register_configs()
