"""From YAML/TOML files and ``--set`` overrides to a checked :class:`Config`: duplicate keys,
unknown keys (with the Hugging Face name's home), types."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ctscale.config.checks import validate
from ctscale.config.messages import did_you_mean, show_value, where_from
from ctscale.config.schema import SECTIONS, Config, default_value
from ctscale.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under its PyPI name
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]  # only TOML loading needs it


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r}", again)
        self.key, self.first, self.again = key, first, again


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-5`` as a float (YAML 1.1 wants ``2.0e-5``) and refuses
    duplicate keys: ``lr: 1e-3`` then ``lr: 5.0`` in one section would silently train at 5.0."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:  # before merge keys (<<) are flattened: overriding one is fine
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:  # an unhashable key: SafeLoader reports it below
                pass
        return super().construct_mapping(node, deep=deep)


class ConfigDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings like ``1e3`` so ``_Loader`` keeps them str."""


yaml.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
    Loader=_Loader,
    Dumper=ConfigDumper,
)


def _base(tp: Any) -> tuple[Any, bool]:
    """Split ``X | None`` into ``(X, True)``; anything else into ``(tp, False)``."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _describe(tp: Any) -> str:
    base, optional = _base(tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(base, "a list of strings") + (" or null" if optional else "")


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints -> float)."""
    base, optional = _base(tp)
    if value is None and optional:
        return None
    if base is bool:  # no ints or strings: `1` or "yes" for a flag is too ambiguous
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif typing.get_origin(base) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    else:  # a programming error in this module, not a user error
        raise TypeError(f"unsupported annotation {tp!r} for {path}")
    if not ok:
        raise ConfigError(
            f"{path}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})"
            f"{where}; set it to {_describe(tp)} (default: {show_value(default_value(path))})"
        )
    return value


# Hugging Face TrainingArguments (and a few common script flags) -> the ctscale key that does
# the same job, so `learning_rate: 2e-5` or `--set train.learning_rate=2e-5` says where it lives.
HF_NAMES: dict[str, str] = {
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "per_device_train_batch_size": "train.batch_size (GLOBAL here: all ranks x micro-batches)",
    "train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size (global here)",
    "num_train_epochs": "train.epochs",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
    "bf16": "train.bf16",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_checkpoints",
    "logging_steps": "train.log_every",
    "resume_from_checkpoint": "train.resume",
    "overwrite_output_dir": "train.overwrite",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "task_name": "data.task",
    "max_seq_length": "data.max_length",
    "deepspeed": "distributed.deepspeed_config",
}


def _hf_hint(key: str) -> str:
    """'; did you mean train.lr?' for a Hugging Face argument name, else ''."""
    home = HF_NAMES.get(key.lower().replace("-", "_"))
    return f"; did you mean {home}? ({key} is a Hugging Face TrainingArguments name)" if home else ""


def _check_key(section: str, key: str | None, where: str) -> None:
    """Raise for an unknown section, or (``key`` given) an unknown key in a section."""
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown section '{section}'{where}; valid sections: {', '.join(SECTIONS)}"
            + (_hf_hint(section) or did_you_mean(section, list(SECTIONS)))
        )
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key is not None and key not in keys:
        # prefer a near match in this section; else the key's home in another section
        home = {f.name: s for s, c in SECTIONS.items() for f in dataclasses.fields(c)}
        hint = _hf_hint(key) or did_you_mean(key, keys, f"{section}.")
        if not hint and (other := difflib.get_close_matches(key, list(home), n=1)):
            hint = f"; did you mean '{home[other[0]]}.{other[0]}'?"
        raise ConfigError(
            f"unknown key '{section}.{key}'{where}; valid keys in '{section}': {', '.join(keys)}{hint}"
        )


def config_from_dict(data: Mapping, source: str = "<dict>") -> Config:
    """Build and validate a Config; missing keys default, unknown keys are errors."""
    where = where_from(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config{where}: expected a mapping of sections, got {type(data).__name__}")
    for name in data:
        _check_key(str(name), None, where)
    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name)
        raw = {} if raw is None else raw  # a bare "train:" in YAML loads as None
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{name}: expected a section (mapping of keys), got {raw!r}{where}; "
                f"write '{name}:' followed by indented 'key: value' lines"
            )
        hints = typing.get_type_hints(cls)
        for key in raw:
            _check_key(name, str(key), where)
        sections[name] = cls(**{k: _coerce(v, hints[k], f"{name}.{k}", where) for k, v in raw.items()})
    cfg = Config(**sections)
    validate(cfg, source=source)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (deep copy) of ``cfg``, suitable for YAML/JSON."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg_dict: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of ``cfg_dict`` with ``"section.key=value"`` overrides applied.

    Values are YAML scalars/flow values: ``2e-5``, ``null``, ``[layer, attn]``.
    """
    out = copy.deepcopy(dict(cfg_dict))
    for item in overrides:
        path, sep, raw = item.partition("=")
        path = path.strip()
        parts = path.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"bad override --set {item!r}: expected SECTION.KEY=VALUE, "
                "e.g. --set train.lr=2e-5 or --set fisher.candidates=[layer,attn]" + _hf_hint(parts[-1])
            )
        where = f" in --set {item}"
        _check_key(parts[0], parts[1], where)
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{path}: value {raw!r} is not valid YAML{where} "
                f"({getattr(err, 'problem', err)}); quote it: --set {path}='\"{raw}\"'"
            ) from None
        hint = typing.get_type_hints(SECTIONS[parts[0]])[parts[1]]
        # check the type here so the error names the --set item, not the file
        value = _coerce(value, hint, path, where)
        if not isinstance(out.get(parts[0]), dict):  # missing, or e.g. "train: 3"
            out[parts[0]] = {}
        out[parts[0]][parts[1]] = value
    return out


def _read_file(path: Path) -> dict:
    """Parse a .yaml/.yml/.toml file into a dict of sections."""
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"{path}: unsupported config type '{suffix}'; use .yaml, .yml or .toml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}; make it readable UTF-8") from None
    if suffix == ".toml":
        if tomllib is None:
            raise ConfigError(f"{path}: TOML configs need Python >= 3.11 or `pip install tomli`")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:  # message ends "(at line L, column C)"
            raise ConfigError(
                f"invalid TOML in {path}: {err}; fix the syntax there "
                "(key = value pairs, strings in quotes, [section] headers)"
            ) from None
    else:
        try:
            data = yaml.load(text, Loader=_Loader)
        except _DuplicateKey as err:
            raise ConfigError(
                f"{path}: key {err.key!r} appears twice at the same level (line {err.first.line + 1} "
                f"and line {err.again.line + 1}); YAML would silently keep only the last value, so "
                "remove one of them"
            ) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(
                f"invalid YAML in {path}{at}: {getattr(err, 'problem', None) or err}; fix "
                "the syntax there (indentation, 'key: value' pairs, closed quotes/brackets)"
            ) from None
    if data is None or (suffix == ".toml" and not data):
        # an empty file is more likely a mistake (wrong file, failed template) than a request for
        # the ~1 h default run; defaults are asked for explicitly
        raise ConfigError(
            f"{path} is empty (no settings); to run with every default, omit --config (or write "
            "'{}' in a YAML file), otherwise add sections such as 'train:' with 'key: value' lines"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got "
            f"{type(data).__name__}; use sections {', '.join(SECTIONS)}"
        )
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load defaults (``path=None``) or a YAML/TOML file, apply overrides, validate."""
    data = {} if path is None else _read_file(Path(path))
    source = "<dict>" if path is None else str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = "--set overrides" if path is None else f"{path} + --set overrides"
    return config_from_dict(data, source)
