"""The run's config: the schema (:mod:`.schema`), its checks (:mod:`.validate`), the layer
options a norm gets (:mod:`.options`), which keys make a result (:mod:`.identity`), the sweep
grid (:mod:`.grid`) and the one :func:`flatten` (:mod:`.flat`).

Importing this package registers the schemas and the norm alias nodes in Hydra's ``ConfigStore``.
The names below are the ones ``normzoo.config`` always exported.
"""

from __future__ import annotations

from normzoo.config.flat import flatten, plain
from normzoo.config.identity import (
    RESULT_NEUTRAL_KEYS,
    RUN_DIR_UNNAMED_KEYS,
    SERIES_NEUTRAL_KEYS,
    comparable_config,
)
from normzoo.config.options import explicit_norm_keys, layer_options_from_flat, norm_layer_options
from normzoo.config.schema import (
    ARCHS,
    CONF_DIR,
    DATASETS,
    HEADS,
    MODEL_SCHEMAS,
    NORM_RESERVED_KEYS,
    OPTIMIZERS,
    SECTIONS,
    CNNConf,
    Config,
    DataConf,
    Device,
    DiagnosticsConf,
    MLPConf,
    OptimConf,
    Progress,
    ReportConf,
    ResNetConf,
    TrainConf,
    TransformerConf,
    model_node,
    norm_choices,
    norm_node,
    register_configs,
)
from normzoo.config.validate import (
    RULES,
    check_override,
    check_value,
    suggest_norm,
    validate,
    validate_model,
    validate_norm,
)
from normzoo.errors import ConfigError, InvalidCombination

__all__ = [
    "ARCHS",
    "CONF_DIR",
    "DATASETS",
    "HEADS",
    "MODEL_SCHEMAS",
    "NORM_RESERVED_KEYS",
    "OPTIMIZERS",
    "RESULT_NEUTRAL_KEYS",
    "RULES",
    "RUN_DIR_UNNAMED_KEYS",
    "SECTIONS",
    "SERIES_NEUTRAL_KEYS",
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
    "TransformerConf",
    "check_override",
    "check_value",
    "comparable_config",
    "explicit_norm_keys",
    "flatten",
    "layer_options_from_flat",
    "model_node",
    "norm_choices",
    "norm_layer_options",
    "norm_node",
    "plain",
    "register_configs",
    "suggest_norm",
    "validate",
    "validate_model",
    "validate_norm",
]

register_configs()
