"""Stratified, seeded train/val/test splits and the split manifest (CSV: path, label, split)."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter

import numpy as np
from sklearn.model_selection import train_test_split

from sceneml.errors import SceneMLError

SPLITS = ("train", "val", "test")


def limit_per_class(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of at most ``limit`` items per class (0 = keep all), sorted."""
    if limit <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) > limit:
            members = np.sort(rng.choice(members, size=limit, replace=False))
        keep.append(members)
    return np.sort(np.concatenate(keep))


def stratified_split(labels: np.ndarray, class_names: list[str], seed: int, val_fraction: float,
                     test_fraction: float, has_test: bool, test_seed: int | None = None) -> np.ndarray:
    """Assign each item of ``labels`` to "train", "val" or (unless ``has_test``) "test". ``test_seed``
    (default ``seed``) draws the test split, ``seed`` the train/val division of the rest: runs with one
    ``test_seed`` and other seeds are tested on the same images.

    Uses ``sklearn.model_selection.train_test_split(stratify=...)`` so every class keeps its share in
    every split, to within one image. A class too small to appear in every split is a
    :class:`SceneMLError` naming it.
    """
    needed = 2 if has_test else 3
    counts = Counter(labels.tolist())
    for label, name in enumerate(class_names):
        if counts.get(label, 0) < needed:
            raise SceneMLError(
                f"class {name!r} has {counts.get(label, 0)} usable image(s); a stratified split into "
                f"{'train/val' if has_test else 'train/val/test'} needs at least {needed} per class"
            )
    split = np.empty(len(labels), dtype=object)
    idx = np.arange(len(labels))
    try:
        if has_test:
            trainval = idx
        else:
            trainval, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                              random_state=seed if test_seed is None else test_seed)
            split[test] = "test"
        val_share = val_fraction if has_test else val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(trainval, test_size=val_share, stratify=labels[trainval],
                                      random_state=seed)
    except ValueError as exc:  # e.g. fewer val images than classes
        raise SceneMLError(f"cannot make a stratified split of {len(labels)} images: {exc}") from None
    split[train] = "train"
    split[val] = "val"
    present = {s: set(labels[split == s].tolist()) for s in SPLITS if s != "test" or not has_test}
    for name_of_split, labels_present in present.items():
        for label, name in enumerate(class_names):
            if label not in labels_present:
                raise SceneMLError(f"the {name_of_split} split lost class {name!r}; "
                                   "raise val_fraction/test_fraction or add images")
    return split


def manifest_csv(paths: list[str], labels: list[str], splits: list[str]) -> str:
    """The split manifest as CSV text, rows sorted by path, so equal inputs give equal bytes."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for row in sorted(zip(paths, labels, splits)):
        writer.writerow(row)
    return buf.getvalue()


def read_manifest(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def manifest_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
