"""The resolved config a run records in its directory (``config.yaml``): YAML that
``ctscale.config.load_config`` reads back to the same ``Config``."""

from __future__ import annotations

from pathlib import Path

import yaml

from ctscale.config import Config, ConfigDumper, config_to_dict
from ctscale.errors import ConfigError
from ctscale.storage import atomic


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (``ctscale.storage.atomic``)."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: save_config writes YAML; use a .yaml or .yml path")
    atomic.write_text(path, yaml.dump(config_to_dict(cfg), Dumper=ConfigDumper, sort_keys=False))
