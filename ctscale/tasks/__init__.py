"""GLUE tasks: registry, loaders, tokenization and metrics."""

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
from ctscale.tasks.metrics import compute_metrics

__all__ = [
    "GLUE_TASKS",
    "Examples",
    "GlueTask",
    "compute_metrics",
    "default_glue_dir",
    "get_task",
    "load_glue_split",
    "pad_collate",
    "tokenize",
]
