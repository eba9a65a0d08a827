"""What a well-typed config must also satisfy: choices, ranges, rules across keys (the method's
and the engine's own rules live with them: ``check_method_config``, ``check_section``)."""

from __future__ import annotations

import re
import typing
from typing import Any

from ctscale.backends import check_section
from ctscale.config.messages import did_you_mean, show_value, where_from
from ctscale.config.schema import CHOICES, Config, DataConfig, default_value, get_value
from ctscale.errors import ConfigError
from ctscale.methods.registry import check_method_config, method_names

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
    where = where_from(source)
    for path, choices in {**CHOICES, "method.name": method_names()}.items():
        if (value := get_value(cfg, path)) not in choices:
            raise ConfigError(
                f"{path}: unknown value {value!r}{where}; choose one of "
                f"{', '.join(choices)}{did_you_mean(value, choices)}"
            )
    for req, ok, paths in _RULES:
        for path in paths:
            if not ok(value := get_value(cfg, path)):
                raise ConfigError(
                    f"{path} must be {req}: got {show_value(value)}{where}; "
                    f"set it to a value that is {req} (default: {show_value(default_value(path))})"
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
                f"{', '.join(REPORT_TO)} (or [] for none){did_you_mean(name, REPORT_TO)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(
            f"train.report_to lists a tracker twice: {show_value(names)}{where}; name each once"
        )


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
                f"data.{key}={show_value(value)} is read only by data.task {readers}, but data.task is "
                f"{data.task!r}{where}; remove data.{key} or change data.task"
            )
