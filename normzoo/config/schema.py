"""Structured configs: the schema every composed config is checked against.

Hydra merges ``normzoo/conf/`` onto these dataclasses (stored in the ``ConfigStore``), so a
misspelt key (``data.bach_size=8``) or a wrong type (``data.batch_size=foo``) fails when the config
is composed, with the key named. Ranges and the registry-driven checks are in
:mod:`normzoo.config.validate`.

:func:`register_configs` stores

* the schemas (``base_config``, ``schema/model/<name>``), and
* one ``norm/<alias>`` node per registry alias (``norm=bn`` is ``norm=batchnorm``), with the content
  of ``conf/norm/<canonical>.yaml``; a registered norm without a YAML file (a third-party plugin) gets
  a ``norm/<name>`` node built from its spec.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from normzoo.registry import get_norm, list_norms

__all__ = [
    "ARCHS",
    "CONF_DIR",
    "DATASETS",
    "HEADS",
    "LR_RULES",
    "MODEL_SCHEMAS",
    "NORM_RESERVED_KEYS",
    "OPTIMIZERS",
    "SECTIONS",
    "CNNConf",
    "Config",
    "DataConf",
    "Device",
    "DiagnosticsConf",
    "MLPConf",
    "OptimConf",
    "Progress",
    "ReportConf",
    "ResNetConf",
    "TrainConf",
    "TransformerConf",
    "model_node",
    "norm_choices",
    "norm_node",
    "register_configs",
]

#: the Hydra config dir (the ``config_path`` of ``normzoo.train``).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: keys of the ``norm`` node that are not layer options.
NORM_RESERVED_KEYS = frozenset({"name", "data_init", "data_init_samples"})


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
    dropout: float = 0.0  # p of Dropout in each block; 0: no Dropout module
    dropout_position: str = "before_norm"  # before_norm | after_norm (see normzoo.models)


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
    dropout: float = 0.0  # p of Dropout in each block; 0: no Dropout module
    dropout_position: str = "before_norm"  # before_norm | after_norm (see normzoo.models)


@dataclass
class ResNetConf:
    """torchvision ResNet through its ``norm_layer=`` hook, with a 3x3 stem and no max-pool."""

    name: str = "resnet"
    arch: str = "resnet18"
    zero_init_residual: bool = False


@dataclass
class TransformerConf:
    """Pre-norm transformer encoder on image rows as tokens (:mod:`normzoo.sequence_model`)."""

    name: str = "transformer"
    d_model: int = 32
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2


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
    #: stratified share of the training part held out for validation (0 = none: old results)
    val_fraction: float = 0.0


@dataclass
class OptimConf:
    """Optimizer and its peak learning rate: ``lr_scale * rule``, the rule ``linear``
    (``base_lr * batch_size / reference_batch_size``, Goyal et al. 2017; ``scale_lr=false`` turns
    it off as before) or ``constant`` (``base_lr``); ``lr_scale``: a study's validation grid."""

    name: str = "sgd"
    base_lr: float = 0.1
    reference_batch_size: int = 32
    scale_lr: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_rule: str = "linear"
    lr_scale: float = 1.0


@dataclass
class TrainConf:
    """The schedule: a fixed epoch budget; linear warm-up over a fraction of it, then cosine.

    ``check_every``: on a GPU, how often (in steps) the losses kept on the device are checked for
    NaN/inf (the diverging step is found exactly either way; 0 = 50); on CPU every step is checked.
    ``mkldnn``: oneDNN conv kernels on CPU, ``on``/``off``/``auto`` (off at batch size <= 8, where
    torch's native kernels are faster for small models).
    ``checkpoint``: ``true`` saves ``checkpoint.pt`` (model, optimizer, step, RNG states, curves)
    into the run dir at the end of every epoch and continues from it when the run is started again;
    ``auto`` does so for long runs only (not on digits / digits_hard, or more than
    ``normzoo.train.AUTO_CHECKPOINT_STEPS`` optimizer steps); ``false`` never.
    ``compile``: ``true`` trains the forward through ``torch.compile``; ``auto`` does so for runs
    of at least ``normzoo.run.budget.AUTO_COMPILE_STEPS`` optimizer steps (where the compile time
    pays, measured: reports/bench/compile_rule.md); ``false`` never.
    ``steps`` > 0: exactly that many optimizer steps (as many epochs as needed, the last one
    partial; ``epochs`` is then ignored); 0: ``epochs`` whole epochs.
    ``keep_predictions`` / ``keep_model``: an ok run writes ``predictions.npz`` / ``model.pt``.
    ``sync_batchnorm``: with several processes (torchrun's ``WORLD_SIZE`` > 1) the BatchNorms
    take their statistics over all of them (:func:`normzoo.sync_bn.sync_batchnorm_for_run`).
    """

    epochs: int = 10
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    compile: Any = False  # false | true | auto (a bool or the string: checked by validate)
    deterministic: bool = True
    check_every: int = 0
    mkldnn: str = "auto"
    progress: Progress = Progress.auto
    checkpoint: Any = "auto"  # auto | true | false (a bool or the string: checked by validate)
    steps: int = 0
    keep_predictions: bool = True
    keep_model: bool = True
    sync_batchnorm: bool = False


@dataclass
class DiagnosticsConf:
    """The train/inference mismatch diagnostics run at the end of every ok run; ``panel``: also
    :func:`normzoo.inference.inference_panel` (its rows under ``inference_panel``)."""

    enabled: bool = True
    precise_samples: int = 4096
    panel: bool = False
    variance_shift: bool = False  # dropout's train/eval variance shift per batch-statistics layer


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
    ``resume=false`` reruns it; a result of another code revision is rerun unless
    ``resume=keep_any_revision``."""

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
    resume: Any = True  # true | false | keep_any_revision (checked in validate.RULES)


MODEL_SCHEMAS: dict[str, type] = {
    "mlp": MLPConf,
    "cnn": CNNConf,
    "resnet": ResNetConf,
    "transformer": TransformerConf,
}
OPTIMIZERS = ("sgd", "adamw")
DATASETS = ("digits", "digits_hard", "mnist", "fashion_mnist", "cifar10")
LR_RULES = ("linear", "constant")
HEADS = ("avg", "flatten")
ARCHS = ("resnet18", "resnet34")

#: the config nodes whose keys are fixed by a schema (``model`` depends on the model chosen)
SECTIONS: dict[str, type] = {
    "data": DataConf,
    "optim": OptimConf,
    "train": TrainConf,
    "diagnostics": DiagnosticsConf,
    "report": ReportConf,
}


def norm_choices() -> list[str]:
    """Every accepted ``norm=`` value: the YAML files of ``conf/norm`` and the ConfigStore nodes."""
    files = {p.stem for p in (CONF_DIR / "norm").glob("*.yaml")}
    stored = set(ConfigStore.instance().repo.get("norm", {}))
    return sorted(files | {Path(s).stem for s in stored})


def norm_node(option: str) -> DictConfig:
    """The ``norm`` node ``norm=<option>`` composes (a YAML file of ``conf/norm`` or an alias or
    plugin node of the ConfigStore)."""
    path = CONF_DIR / "norm" / f"{option}.yaml"
    if path.is_file():
        return OmegaConf.load(path)
    return copy.deepcopy(ConfigStore.instance().load(f"norm/{option}.yaml").node)


def model_node(name: str) -> DictConfig:
    """The ``model`` node ``model=<name>`` composes (its schema with ``conf/model/<name>.yaml``)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    content = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    # the schema is the model's own name (model=cnn16 is a cnn with other widths and strides)
    node = OmegaConf.structured(MODEL_SCHEMAS[str(content.get("name", name))])
    return OmegaConf.merge(node, {k: content[k] for k in content if k != "defaults"})


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
