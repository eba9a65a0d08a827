"""Typed run config: dataclasses loaded from YAML/TOML, ``--set`` overrides, validation.

Every problem raises :class:`~ctscale.errors.ConfigError` with one line naming the key
path, the source (file or ``--set``), what is wrong and how to fix it.

- ``schema``: the sections (dataclasses), their defaults and fixed choices;
- ``parse``: files and ``--set`` overrides to a ``Config`` (keys, types, YAML quirks);
- ``checks``: ranges and rules across keys;
- ``messages``: how the errors word things.
"""

from ctscale.config.checks import FILE_TASKS, REPORT_TO, validate
from ctscale.config.parse import (
    HF_NAMES,
    ConfigDumper,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from ctscale.config.schema import (
    CHOICES,
    SECTIONS,
    Config,
    DataConfig,
    DistributedConfig,
    FisherConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "CHOICES",
    "FILE_TASKS",
    "HF_NAMES",
    "REPORT_TO",
    "SECTIONS",
    "Config",
    "ConfigDumper",
    "DataConfig",
    "DistributedConfig",
    "FisherConfig",
    "MethodConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "validate",
]
