"""Classification metrics as pure functions over numpy arrays (no torch, no MLflow).

Conventions: ``y_true`` is an (n,) int array of class indices, ``scores`` an (n, C) array of softmax
probabilities. A class absent from ``y_true`` has an undefined AP and accuracy: NaN, never a crash,
and the means skip NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score

from sceneml.class_keys import class_keys
from sceneml.config import LOWER_IS_BETTER


def cross_entropy_from_probs(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean negative log-probability of the true class (the loss, recomputable from a scores file)."""
    p = np.clip(scores[np.arange(len(y_true)), y_true], np.finfo(np.float64).tiny, 1.0)
    return float(-np.mean(np.log(p)))


def per_class_average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AP per class (sklearn ``average_precision_score``); NaN for a class with no positive."""
    n_classes = scores.shape[1]
    ap = np.full(n_classes, np.nan)
    for c in range(n_classes):
        positives = y_true == c
        if positives.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ap[c] = average_precision_score(positives, scores[:, c])
    return ap


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class: the share of its images predicted as it; NaN for an absent class."""
    acc = np.full(n_classes, np.nan)
    for c in range(n_classes):
        members = y_true == c
        if members.any():
            acc[c] = float(np.mean(y_pred[members] == c))
    return acc


def nanmean_or_nan(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def reliability_bins(y_true: np.ndarray, scores: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Top-1 confidence against accuracy in ``n_bins`` equal-width confidence bins ``(lo, hi]``.

    One row per bin: ``lo``, ``hi``, ``count``, ``confidence`` (mean top-1 probability) and
    ``accuracy`` (share of top-1 predictions that are right); NaN for an empty bin.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    confidence = scores.max(axis=1)
    correct = scores.argmax(axis=1) == y_true
    # bin i holds confidences in (i/n, (i+1)/n]; 0 (impossible for a softmax) falls into the first
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = []
    for i in range(n_bins):
        members = which == i
        rows.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": int(members.sum()),
                     "confidence": float(confidence[members].mean()) if members.any() else float("nan"),
                     "accuracy": float(correct[members].mean()) if members.any() else float("nan")})
    return rows


def expected_calibration_error(y_true: np.ndarray, scores: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): the count-weighted mean |accuracy - confidence| over :func:`reliability_bins`."""
    rows = [r for r in reliability_bins(y_true, scores, n_bins) if r["count"]]
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows)) if n else float("nan")


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, class_names: list[str],
                           prefix: str, log_p_label: np.ndarray | None = None) -> dict[str, float]:
    """Every logged metric of one split, keyed as in the MLflow contract (``{prefix}_ap_<key>`` ..., the
    class's key from :func:`sceneml.class_keys.class_keys`).

    The loss is the mean of ``-log_p_label`` (the true class's log-probability, from a log-softmax)
    when given, else it is taken from ``scores``. A scores file holds both, so it reproduces every value.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    y_pred = scores.argmax(axis=1)
    ap = per_class_average_precision(y_true, scores)
    acc = per_class_accuracy(y_true, y_pred, len(class_names))
    out = {
        f"{prefix}_loss": (float(-np.mean(log_p_label)) if log_p_label is not None
                           else cross_entropy_from_probs(y_true, scores)),
        f"{prefix}_acc": float(np.mean(y_pred == y_true)),
        f"{prefix}_mAP": nanmean_or_nan(ap),
        f"{prefix}_mean_class_acc": nanmean_or_nan(acc),
        f"{prefix}_ece": expected_calibration_error(y_true, scores),
    }
    keys = class_keys(class_names)
    for key, value in zip(keys, ap):
        out[f"{prefix}_ap_{key}"] = float(value)
    for key, value in zip(keys, acc):
        out[f"{prefix}_acc_{key}"] = float(value)
    return out


# ---------------------------------------------------------------- "best": one rule for every caller

def is_better(candidate: float, incumbent: float | None, metric: str) -> bool:
    """Strictly better by ``metric`` (NaN is never better; anything beats a NaN or missing incumbent)."""
    if incumbent is None or np.isnan(incumbent):
        return not np.isnan(candidate)
    if np.isnan(candidate):
        return False
    return candidate < incumbent if metric in LOWER_IS_BETTER else candidate > incumbent


def best_index(values: Sequence[float], val_losses: Sequence[float], metric: str) -> int:
    """Index of the best entry by ``metric``; ties go to the lower val loss, then to the earlier entry.

    The one definition of "best": a run's best epoch (tag ``sceneml.best``, metric ``best_epoch``)
    and ``select``'s champion across runs both call it, with the same metric.
    """
    if not len(values):
        raise ValueError("no candidates")
    best = 0
    for i in range(1, len(values)):
        if is_better(values[i], values[best], metric) or (
                values[i] == values[best] and is_better(val_losses[i], val_losses[best], "val_loss")):
            best = i
    return best


def patience_ran_out(history: Sequence[dict], metric: str, patience: int) -> bool:
    """Early stopping: the best epoch so far (:func:`best_row`) is ``patience`` or more epochs behind the
    last one. ``patience`` 0 never stops."""
    return patience > 0 and bool(history) and history[-1]["epoch"] - best_row(history, metric)["epoch"] >= patience


def best_row(history: Sequence[dict], metric: str) -> dict:
    """The best epoch's row of a run's history (rows hold ``metric`` and ``val_loss``), by :func:`best_index`."""
    return history[best_index([h[metric] for h in history], [h["val_loss"] for h in history], metric)]
