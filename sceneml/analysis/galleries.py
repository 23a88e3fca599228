"""Galleries: which images of a class the model scores highest and lowest for it."""

from __future__ import annotations

import numpy as np


def gallery_indices(labels: np.ndarray, scores: np.ndarray, class_index: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Among images whose true class is ``class_index``: the ``k`` with the highest score for it (best
    first) and the ``k`` with the lowest (worst first). Ties keep file order."""
    members = np.flatnonzero(labels == class_index)
    order = members[np.argsort(-scores[members, class_index], kind="stable")]
    return order[:k], order[::-1][:k]
