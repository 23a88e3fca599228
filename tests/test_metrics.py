"""Metric functions against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import softmax

from sceneml.metrics import (
    best_index,
    classification_metrics,
    confusion_matrix,
    cross_entropy_from_probs,
    is_better,
    per_class_accuracy,
    per_class_average_precision,
)

CLASSES = ["a", "b", "c"]


def test_perfect_scores():
    y = np.array([0, 1, 2, 0])
    scores = np.eye(3)[y] * 0.8 + 0.2 / 3
    m = classification_metrics(y, scores, CLASSES, "val")
    assert m["val_acc"] == 1.0 and m["val_mAP"] == 1.0 and m["val_mean_class_acc"] == 1.0
    assert all(m[f"val_ap_{c}"] == 1.0 for c in CLASSES)


def test_inverted_scores_give_the_worst_ap():
    # class 0 positives get the lowest scores: AP = mean precision at each positive = (1/3 + 2/4) / 2
    y = np.array([0, 0, 1, 1])
    s0 = np.array([0.1, 0.2, 0.9, 0.8])
    ap = per_class_average_precision(y, np.stack([s0, 1 - s0], axis=1))
    assert ap[0] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert ap[1] == pytest.approx((1 / 3 + 2 / 4) / 2)  # 1 - s0 inverts class 1 as well


def test_tied_scores():
    # all scores equal: one threshold, precision = prevalence
    y = np.array([0, 1, 1, 1])
    scores = np.full((4, 2), 0.5)
    ap = per_class_average_precision(y, scores)
    assert ap[0] == pytest.approx(0.25) and ap[1] == pytest.approx(0.75)


def test_absent_class_is_nan_and_skipped_by_means():
    y = np.array([0, 0, 1])
    scores = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, scores, CLASSES, "test")
    assert math.isnan(m["test_ap_c"]) and math.isnan(m["test_acc_c"])
    assert m["test_mAP"] == 1.0 and m["test_mean_class_acc"] == 1.0


def test_per_class_accuracy_is_recall():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(per_class_accuracy(y, pred, 3), [1 / 3, 1.0, 0.0])
    assert confusion_matrix(y, pred, 3).tolist() == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]


def test_loss_matches_cross_entropy_of_logits():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    y = np.array([0, 2])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean([log_softmax[0, 0], log_softmax[1, 2]])
    assert cross_entropy_from_probs(y, softmax(logits, axis=1)) == pytest.approx(expected)


def test_a_confidently_wrong_image_counts_its_true_loss_not_a_clipping_floor():
    """Logits 900 apart: float32 and float64 softmax both give the true class p = 0. The loss of that
    image is 900 (by hand: log-softmax = -(900 + log(1 + e^-900)) = -900), not -log(tiny) = 708,
    through the engine and through a scores file read back."""
    import torch

    from sceneml.engine.inference import predict_log_probs
    from sceneml.scores import scores_from_csv, scores_to_csv

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 900.0, 0.0], [5.0, 0.0, 0.0]]).expand(len(x) // 2, 2, 3).reshape(-1, 3)

    y = np.array([0, 0])
    log_probs = predict_log_probs(Fixed(), np.zeros((2, 8, 8, 3), np.uint8), torch.device("cpu"))
    scores, log_p = np.exp(log_probs), log_probs[np.arange(2), y]
    assert scores[0, 0] == 0.0  # underflowed
    expected = (900.0 + np.log(1 + 2 * np.exp(-5.0))) / 2
    m = classification_metrics(y, scores, CLASSES, "val", log_p)
    assert m["val_loss"] == pytest.approx(expected, rel=1e-12)
    assert cross_entropy_from_probs(y, scores) < 360  # what the probabilities alone would say
    _, y_back, s_back, classes, log_p_back = scores_from_csv(scores_to_csv(["a", "b"], y, scores, CLASSES, log_p))
    assert classes == CLASSES
    assert classification_metrics(y_back, s_back, classes, "val", log_p_back)["val_loss"] == m["val_loss"]


def test_is_better_knows_the_direction():
    assert is_better(0.9, 0.8, "val_mean_class_acc") and not is_better(0.7, 0.8, "val_mAP")
    assert is_better(0.3, 0.5, "val_loss") and not is_better(0.6, 0.5, "val_loss")
    assert is_better(0.1, None, "val_mAP") and not is_better(float("nan"), 0.1, "val_mAP")


def test_best_index_breaks_ties_by_val_loss_then_order():
    # the same rule for a run's best epoch and for select's champion
    assert best_index([0.5, 0.9, 0.9, 0.7], [1.0, 0.8, 0.6, 0.1], "val_mean_class_acc") == 2
    assert best_index([0.9, 0.9], [0.5, 0.5], "val_mAP") == 0  # a full tie: the earlier one
    assert best_index([0.4, 0.3, 0.3], [0.4, 0.3, 0.3], "val_loss") == 1  # lower is better
    assert best_index([float("nan"), 0.2], [0.1, 0.9], "val_acc") == 1  # NaN never wins
