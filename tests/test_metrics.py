"""GLUE metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctscale.tasks import compute_metrics, get_task


def test_binary_f1_and_accuracy_from_a_confusion_matrix():
    # TP=3, FN=1, FP=2, TN=4: precision 3/5, recall 3/4, F1 = 2*0.6*0.75/1.35 = 2/3.
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    out = compute_metrics("mrpc", preds, labels)
    assert set(out) == {"accuracy", "f1", "main"}
    assert out["accuracy"] == pytest.approx(0.7)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["main"] == pytest.approx((0.7 + 2 / 3) / 2)


def test_mcc_for_cola():
    # Same confusion matrix: MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #   = (12 - 2) / sqrt(5 * 4 * 6 * 5) = 10 / sqrt(600).
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    out = compute_metrics("cola", preds, labels)
    assert set(out) == {"mcc", "main"}
    assert out["mcc"] == pytest.approx(10 / math.sqrt(600))
    assert out["main"] == out["mcc"]
    assert compute_metrics("cola", [0, 0, 0, 0], [0, 1, 0, 1])["mcc"] == 0.0  # degenerate


def test_accuracy_tasks_and_logits():
    out = compute_metrics("rte", [0, 1, 1, 0], [0, 1, 0, 0])
    assert out == {"accuracy": 0.75, "main": 0.75}
    # Logits (n, num_labels) are argmax'ed; torch tensors are accepted.
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = compute_metrics(get_task("mnli"), logits, torch.tensor([1, 0, 0]))
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_regression_perfect_and_anti_correlated():
    gold = [0.0, 1.0, 2.5, 4.0, 5.0]
    perfect = compute_metrics("stsb", [2 * y + 1 for y in gold], gold)
    assert perfect["pearson"] == pytest.approx(1.0)
    assert perfect["spearman"] == pytest.approx(1.0)
    assert perfect["main"] == pytest.approx(1.0)
    anti = compute_metrics("sts-b", np.array([[5.0 - y] for y in gold]), gold)  # shape (n, 1)
    assert anti["pearson"] == pytest.approx(-1.0)
    assert anti["spearman"] == pytest.approx(-1.0)
    assert anti["main"] == pytest.approx(-1.0)


def test_regression_partial_rank_correlation():
    # Ranks of preds (1,3,2,4) vs labels (1,2,3,4): sum d^2 = 2,
    # rho = 1 - 6*2/(4*15) = 0.8.
    out = compute_metrics("stsb", [0.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert out["spearman"] == pytest.approx(0.8)
    # Pearson by hand: cov = 3.375 - .375 - .125 + 2.625 = 5.5, var_x = 8.75, var_y = 5.
    assert out["pearson"] == pytest.approx(5.5 / math.sqrt(8.75 * 5.0))


def test_constant_regression_prediction_scores_zero():
    out = compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert out == {"pearson": 0.0, "spearman": 0.0, "main": 0.0}


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("rte", [0, 1, 0], [0, 1])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics("rte", [], [])
