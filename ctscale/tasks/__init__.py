"""Tasks: GLUE, your own classification/regression tables, causal-LM JSONL and chat data,
behind one protocol."""

from ctscale.config import Config
from ctscale.tasks.base import TaskData
from ctscale.tasks.causal_lm import JsonlData
from ctscale.tasks.glue import (
    GLUE_TASKS,
    Examples,
    GlueTask,
    default_glue_dir,
    get_task,
    load_glue_split,
    pad_collate,
    tokenize,
)
from ctscale.tasks.glue_data import GlueData
from ctscale.tasks.metrics import compute_metrics

__all__ = [
    "GLUE_TASKS",
    "Examples",
    "GlueData",
    "GlueTask",
    "JsonlData",
    "TaskData",
    "compute_metrics",
    "default_glue_dir",
    "get_task",
    "load_glue_split",
    "load_task_data",
    "pad_collate",
    "tokenize",
]


def load_task_data(cfg: Config, tokenizer) -> TaskData:
    """``data.task``: ``jsonl`` (causal LM), ``chat``, ``classification``/``regression`` (your
    own table) or a GLUE task name."""
    if cfg.data.task == "jsonl":
        return JsonlData.from_config(cfg, tokenizer)
    if cfg.data.task == "chat":
        from ctscale.tasks.chat import load_chat

        return load_chat(cfg, tokenizer)
    if cfg.data.task in ("classification", "regression"):
        from ctscale.tasks.tabular import load_tabular

        return load_tabular(cfg, tokenizer)
    return GlueData.from_config(cfg, tokenizer)
