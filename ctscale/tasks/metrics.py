"""Task metrics: accuracy, F1 (binary, macro), Matthews, Pearson and Spearman correlation."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ctscale.tasks.glue import GlueTask, get_task


def _as_array(values) -> np.ndarray:
    """Return ``values`` (list, numpy array or torch tensor) as a numpy array."""
    if hasattr(values, "detach"):  # torch tensor; avoids importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Return fn's correlation, or 0.0 when either side is constant.

    A constant prediction (common early in training) makes the correlation undefined;
    0.0 keeps "best checkpoint" comparisons working (sklearn's MCC does the same).
    """
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(predictions, labels)[0])
    return 0.0 if math.isnan(value) else value


_METRICS = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p, pos_label=1, zero_division=0.0)),
    "macro_f1": lambda p, y: float(f1_score(y, p, average="macro", zero_division=0.0)),
    "mcc": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _correlation(pearsonr, p.astype(float), y.astype(float)),
    "spearman": lambda p, y: _correlation(spearmanr, p.astype(float), y.astype(float)),
}


def compute_metrics(task: str | GlueTask, predictions, labels) -> dict[str, float]:
    """Return the task's metrics plus ``"main"``, its headline number.

    ``predictions`` are class ids (or logits of shape ``(n, num_labels)``, argmax'ed)
    for classification and scores (shape ``(n,)`` or ``(n, 1)``) for regression;
    ``labels`` likewise. ``main`` is the mean of the task's metrics: CoLA mcc,
    STS-B (pearson + spearman) / 2,
    MRPC and QQP (accuracy + f1) / 2, the others accuracy; a task with a ``headline`` averages
    only those (your own classification data: accuracy).
    """
    t = task if isinstance(task, GlueTask) else get_task(task)
    preds, gold = _as_array(predictions), _as_array(labels).reshape(-1)
    if preds.ndim == 2 and not t.is_regression:
        preds = preds.argmax(axis=-1)
    preds = preds.reshape(-1)
    if preds.shape != gold.shape:
        raise ValueError(f"{preds.shape[0]} predictions but {gold.shape[0]} labels")
    if gold.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if not t.is_regression:
        preds, gold = preds.astype(np.int64), gold.astype(np.int64)
    out = {name: _METRICS[name](preds, gold) for name in t.metrics}
    headline = t.headline or t.metrics
    out["main"] = sum(out[name] for name in headline) / len(headline)
    return out
