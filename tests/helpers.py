"""Builders of small on-disk data sets for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sceneml.data.synthetic import render_scene


def write_class_folders(root: Path, counts: dict[str, int], ext: str = ".jpg", seed: int = 0) -> Path:
    """``root/<class>/<i><ext>`` with real rendered scenes (class names mapped onto the renderer's)."""
    renderer_classes = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    for k, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = render_scene(renderer_classes[k % 6], i, seed, 40)
            Image.fromarray(img).save(folder / f"img_{i:03d}{ext}")
    return root


def rgb_noise(size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def assert_metrics_recompute(metrics: dict[str, float], scores_csv: str, split: str) -> None:
    """Every ``{split}_*`` metric of an evaluation run equals its recomputation from the scores file the
    run logged (read back from the store): the file alone reproduces the numbers."""
    from sceneml.metrics import classification_metrics
    from sceneml.scores import scores_from_csv

    _, y, scores, classes, log_p = scores_from_csv(scores_csv)
    again = classification_metrics(y, scores, classes, split, log_p)
    assert again and set(again) <= set(metrics)
    for key, value in again.items():
        assert (np.isnan(value) and np.isnan(metrics[key])) or metrics[key] == value, key
