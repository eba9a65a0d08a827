"""Your own classification or regression data (``data.task: classification | regression``).

Rows come from :mod:`ctscale.tasks.sources` (files or a ``datasets`` dataset); the columns are
``data.text_column``, optional ``data.text_pair_column`` and ``data.label_column``. Class labels
are discovered from the training split (strings, or integers; a ``datasets`` ``ClassLabel``
keeps its own order), sorted, and travel with the exported model as ``id2label``/``label2id``,
so that evaluation and prediction map them the same way without the training data. Training,
batching and scoring are GLUE's (:class:`~ctscale.tasks.glue_data.GlueData`): a GLUE task
is this path with a fixed layout and label list.

Metrics: accuracy, macro-F1 and MCC (``main`` = accuracy) for classification; Pearson and
Spearman (``main`` = their mean) for regression.
"""

from __future__ import annotations

import math

from ctscale.config import Config, DataConfig
from ctscale.errors import DataError
from ctscale.tasks.base import subsample
from ctscale.tasks.glue import Examples, GlueTask
from ctscale.tasks.glue_data import GlueData
from ctscale.tasks.sources import Table, train_and_eval


def make_task(kind: str, label_list: tuple[str, ...] | None, eval_splits: tuple[str, ...]) -> GlueTask:
    """The task description of your own data: ``kind`` is classification or regression."""
    if kind == "regression":
        return GlueTask("regression", None, True, ("pearson", "spearman"), eval_splits)
    return GlueTask(
        "classification", label_list, False, ("accuracy", "macro_f1", "mcc"), eval_splits, ("accuracy",)
    )


def label_key(value, where: str) -> str:
    """A class label as the string the model config stores: ``"pos"``, ``"3"`` (from 3 or 3.0)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, float) and math.isfinite(value):
        raise DataError(
            f"{where}: label {value!r} has a fraction; a class label is a string or an integer "
            "(for numeric targets set data.task=regression)"
        )
    raise DataError(f"{where}: missing or empty label ({value!r}); fill it in or remove the row")


def _class_names(table: Table, column: str) -> list[str] | None:
    """A ``ClassLabel`` column's names (its integer values index them), else None."""
    feature = table.rows.features.get(column)
    return list(feature.names) if hasattr(feature, "names") else None


def raw_labels(table: Table, data: DataConfig) -> list[str]:
    """The label column of a classification table as label strings."""
    values = table.column(data.label_column, "data.label_column")
    names = _class_names(table, data.label_column)
    out = []
    for i, v in enumerate(values):
        where = table.where(i, data.label_column)
        if names is not None and isinstance(v, int) and 0 <= v < len(names):
            out.append(names[v])
        elif names is not None and isinstance(v, int):  # -1: datasets' "no label" (test splits)
            raise DataError(f"{where}: no label ({v}); score a split that has labels")
        else:
            out.append(label_key(v, where))
    return out


def discover_labels(table: Table, data: DataConfig) -> tuple[str, ...]:
    """The classes of the training table: ClassLabel order, else integers numerically, else sorted."""
    names = _class_names(table, data.label_column)
    found = set(raw_labels(table, data))
    if names is not None:
        labels = [n for n in names if n in found]
    elif all(s.lstrip("-").isdigit() for s in found):
        labels = sorted(found, key=int)
    else:
        labels = sorted(found)
    if len(labels) < 2:
        raise DataError(
            f"{table.name}, column {data.label_column!r}: only one label value ({', '.join(labels)}); "
            "a classifier needs at least two classes in the training data"
        )
    return tuple(labels)


def texts(table: Table, column: str, key: str) -> list[str]:
    """A text column; an empty or non-text cell is an error naming its row."""
    values = table.column(column, key)
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise DataError(
                f"{table.where(i, column)}: expected text, found {v!r}; fill it in or remove the row"
            )
    return [v.strip() for v in values]


def to_examples(table: Table, data: DataConfig, task: GlueTask) -> Examples:
    """Texts and label ids (or scores) of a table; a label outside ``task``'s classes is an
    error naming the row (at evaluation time the classes are the trained model's)."""
    text_a = texts(table, data.text_column, "data.text_column")
    text_b = texts(table, data.text_pair_column, "data.text_pair_column") if data.text_pair_column else None
    if task.is_regression:
        labels: list = []
        for i, v in enumerate(table.column(data.label_column, "data.label_column")):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise DataError(
                    f"{table.where(i, data.label_column)}: expected a number for regression, found {v!r}; "
                    "fix the value (or set data.task=classification for class labels)"
                )
            labels.append(float(v))
        return Examples(text_a, text_b, labels)
    assert task.label_list is not None
    ids = {label: i for i, label in enumerate(task.label_list)}
    labels = []
    for i, label in enumerate(raw_labels(table, data)):
        if label not in ids:
            raise DataError(
                f"{table.where(i, data.label_column)}: unknown label {label!r}; the model knows "
                f"{', '.join(task.label_list)} (the classes of its training data)"
            )
        labels.append(ids[label])
    return Examples(text_a, text_b, labels)


def load_tabular(cfg: Config, tokenizer, label_list: tuple[str, ...] | None = None) -> GlueData:
    """Train and validation data of ``cfg.data``; ``label_list`` fixes the classes (a trained
    model's), else they are discovered from the training rows."""
    d = cfg.data
    train_table, eval_table = train_and_eval(d, cfg.train.seed)
    if d.task == "classification" and label_list is None:
        label_list = discover_labels(train_table, d)
    task = make_task(d.task, label_list, ("validation",) if eval_table is not None else ())
    seed = cfg.train.seed
    train = subsample(to_examples(train_table, d, task), d.max_train_samples, seed)
    evals = {}
    if eval_table is not None:
        evals["validation"] = subsample(to_examples(eval_table, d, task), d.max_eval_samples, seed)
    return GlueData(task, train, evals, tokenizer, d.max_length)
