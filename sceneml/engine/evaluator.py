"""Validation: the model's scores on the whole val split and the metrics computed from them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sceneml.data import SplitData
from sceneml.engine.loop import EpochTrainer
from sceneml.metrics import classification_metrics
from sceneml.scores import scores_to_csv


@dataclass(frozen=True)
class Validation:
    """One validation pass: ``metrics`` keyed ``val_*``, the per-image ``scores`` file (CSV) they derive
    from, and the seconds the forward pass took."""

    metrics: dict[str, float]
    scores_csv: str
    seconds: float


def validate(trainer: EpochTrainer) -> Validation:
    """The evaluated model (EMA weights when on) on the trainer's whole val split; rank 0 only."""
    val: SplitData = trainer.data.splits["val"]
    started = time.perf_counter()
    log_probs = trainer.val_log_probs()
    seconds = time.perf_counter() - started
    return scored(val, log_probs, trainer.data.classes, seconds)


def scored(split: SplitData, log_probs: np.ndarray, classes: list[str], seconds: float = 0.0) -> Validation:
    """Metrics and scores file of ``log_probs`` (n, C) on ``split`` (the validation's pure part)."""
    scores, log_p = np.exp(log_probs), log_probs[np.arange(len(split)), split.labels]
    metrics = classification_metrics(split.labels, scores, classes, "val", log_p)
    return Validation(metrics, scores_to_csv(split.paths, split.labels, scores, classes, log_p), seconds)
