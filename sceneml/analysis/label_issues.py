"""Images whose given label the model contradicts, from out-of-sample scores (cleanlab).

``quality`` is cleanlab's label-quality score (self-confidence: the probability the model gives the
given label; low = suspicious); ``flagged`` is cleanlab's confident-learning verdict
(``find_label_issues``), which needs enough images per class and is left False when it cannot run.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

log = logging.getLogger(__name__)


def rank_label_issues(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """One row per image, most suspicious first: ``index`` (into ``labels``), ``quality``,
    ``suggested`` (the model's class index) and ``flagged``."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores / scores.sum(axis=1, keepdims=True)  # cleanlab checks rows sum to 1 exactly
    quality = get_label_quality_scores(labels, scores, method="self_confidence")
    flagged = np.zeros(len(labels), dtype=bool)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # one process: the sets are small, and a pool's workers would inherit the signal handlers
            flagged = find_label_issues(labels, scores, filter_by="prune_by_noise_rate", n_jobs=1)
    except Exception as exc:  # e.g. a class with too few images for its noise estimate
        log.warning("cleanlab could not flag label issues (%s); the ranking stands", exc)
    table = pd.DataFrame({"index": np.arange(len(labels)), "quality": quality, "suggested": scores.argmax(1),
                          "flagged": flagged})
    return table.sort_values(["quality", "index"], ignore_index=True)
