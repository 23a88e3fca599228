"""The data side: resolve ``data``, decode once, split, and hand out uint8 arrays per split.

``prepare_data`` is the one call the training code makes; ``load_split_from_manifest`` is what
evaluation uses, so it sees exactly the images the training run put in each split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sceneml.data.decode import decode_images, load_rgb
from sceneml.data.duplicates import DEFAULT_MAX_DISTANCE, duplicate_counts, find_duplicates, leaked_paths
from sceneml.data.sources import DataSource, cache_dir, list_images, resolve_source
from sceneml.data.splits import (
    limit_per_class,
    manifest_csv,
    manifest_digest,
    read_manifest,
    stratified_split,
)
from sceneml.errors import SceneMLError

log = logging.getLogger(__name__)

__all__ = [
    "DataSource", "PreparedData", "SplitData", "Splitting", "load_rgb", "load_split_from_manifest",
    "prepare_data", "resolve_source",
]


@dataclass
class SplitData:
    paths: list[str]  # relative to the source root, as in the manifest
    labels: np.ndarray  # (n,) int64 class indices
    pixels: np.ndarray  # (n, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class PreparedData:
    source: DataSource
    classes: list[str]
    image_size: int
    manifest: str  # CSV text: path, label, split
    digest: str  # hash of the manifest (images, labels and their splits): the split's identity in MLflow
    splits: dict[str, SplitData]
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> reason
    # images with an exact or near duplicate (group, path, split before dedupe, class, kind, dropped)
    duplicates: pd.DataFrame = field(default_factory=pd.DataFrame)
    # hash of the usable images and their labels, whatever the split: runs with other seeds or
    # fractions share it, runs on other data do not (what `select` refuses to mix)
    data_set_digest: str = ""

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


@dataclass(frozen=True)
class Splitting:
    """How the images are divided: ``val_fraction`` and ``test_fraction`` of each class held out,
    ``seed`` drawing the train/val division and ``split_seed`` (-1: ``seed``) the test split and the
    ``limit``-per-class subset (0: all); ``dedupe="cross_split"`` drops the val/test copies of training
    images, near duplicates being at most ``dup_distance`` hash bits apart."""

    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: int = 0
    split_seed: int = -1
    dedupe: str = "none"
    dup_distance: int = DEFAULT_MAX_DISTANCE

    @property
    def fixed_seed(self) -> int:
        return self.seed if self.split_seed < 0 else self.split_seed

    def check(self) -> None:
        v, t = self.val_fraction, self.test_fraction
        if not 0 < v < 1 or not 0 < t < 1 or v + t >= 1:
            raise SceneMLError(f"val_fraction={v} and test_fraction={t} must be in (0, 1) and sum to less than 1")


def prepare_data(spec: str = "synthetic", image_size: int = 0, splitting: Splitting = Splitting(),
                 workers: int = 2, progress: bool = True, cache: Path | None = None) -> PreparedData:
    """Resolve ``spec``, decode every image once (cached), skip bad files, split as ``splitting`` says,
    find duplicates (dropping the val/test copies of training images before the manifest is written
    when asked) and return arrays."""
    splitting.check()
    cache = Path(cache) if cache is not None else cache_dir()
    source = resolve_source(spec, cache)
    size = image_size or source.native_size
    classes, all_items, n_train_pool = _items(source, splitting)
    decoded = decode_images([p for p, _ in all_items], size, cache / "decoded", workers, progress)
    skipped = {_relative(all_items[i][0], source.root): why for i, why in decoded.errors.items()}
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), next(iter(skipped.items())))
    class_to_idx = {c: i for i, c in enumerate(classes)}
    labels_all = np.array([class_to_idx[c] for _, c in all_items], dtype=np.int64)
    for name, idx in class_to_idx.items():
        if not np.any(decoded.ok & (labels_all == idx)):
            raise SceneMLError(f"class {name!r} has no usable image (all {np.sum(labels_all == idx)} failed to decode)")
    split = _split(decoded.ok, labels_all, n_train_pool, classes, splitting, source.test_dir is not None)
    rel = [_relative(p, source.root) for p, _ in all_items]
    used = np.flatnonzero(decoded.ok)
    data_set_digest = manifest_digest(manifest_csv([rel[i] for i in used], [all_items[i][1] for i in used],
                                                   [""] * len(used)))
    duplicates = find_duplicates(decoded.pixels, used, [rel[i] for i in used], [split[i] for i in used],
                                 [all_items[i][1] for i in used], splitting.dup_distance)
    used = _dedupe(duplicates, split, used, rel, labels_all, classes, splitting.dedupe)
    manifest = manifest_csv([rel[i] for i in used], [all_items[i][1] for i in used], [split[i] for i in used])
    splits = {}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(split == name)
        # a contiguous in-memory copy: batches index it randomly, a memmap would page-fault
        splits[name] = SplitData([rel[i] for i in idx], labels_all[idx], np.ascontiguousarray(decoded.pixels[idx]))
    return PreparedData(source, classes, size, manifest, manifest_digest(manifest), splits, skipped, duplicates,
                        data_set_digest)


def _items(source: DataSource, splitting: Splitting) -> tuple[list[str], list[tuple[Path, str]], int]:
    """The classes, the (file, class) items of the training pool then of the data's own test split, each
    limited to a seeded subset per class, and how many of them are in the training pool."""
    classes, train_items = list_images(source.train_dir)
    test_items: list[tuple[Path, str]] = []
    if source.test_dir is not None:
        test_classes, test_items = list_images(source.test_dir)
        if test_classes != classes:
            raise SceneMLError(f"seg_test classes {test_classes} differ from seg_train classes {classes}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    pools = []
    for items in (train_items, test_items):
        labels = np.array([class_to_idx[c] for _, c in items], dtype=np.int64)
        keep = limit_per_class(labels, splitting.limit, splitting.fixed_seed) if len(items) else np.arange(0)
        pools.append([items[i] for i in keep])
    return classes, pools[0] + pools[1], len(pools[0])


def _split(ok: np.ndarray, labels: np.ndarray, n_train_pool: int, classes: list[str], splitting: Splitting,
           has_test: bool) -> np.ndarray:
    """Each item's split name (train, val, test; None for an image that did not decode)."""
    is_test_pool = np.arange(len(labels)) >= n_train_pool
    split = np.empty(len(labels), dtype=object)
    pool_idx = np.flatnonzero(ok & ~is_test_pool)
    split[pool_idx] = stratified_split(labels[pool_idx], classes, splitting.seed, splitting.val_fraction,
                                       splitting.test_fraction, has_test=has_test, test_seed=splitting.fixed_seed)
    if has_test:
        test_idx = np.flatnonzero(ok & is_test_pool)
        missing = [c for i, c in enumerate(classes) if not np.any(labels[test_idx] == i)]
        if missing:
            raise SceneMLError(f"the test split (seg_test) has no usable image of class(es) {missing}")
        split[test_idx] = "test"
    return split


def _dedupe(duplicates: pd.DataFrame, split: np.ndarray, used: np.ndarray, rel: list[str], labels: np.ndarray,
            classes: list[str], dedupe: str) -> np.ndarray:
    """Warn of duplicate groups across splits; with ``dedupe="cross_split"`` mark their val/test copies
    ``dropped`` (in ``split`` and ``duplicates``). Returns the items still used."""
    cross_split = duplicate_counts(duplicates)["dup_cross_split"]
    if cross_split:
        log.warning("%d group(s) of duplicate images span train and val/test: the evaluation sees images the "
                    "model trained on (data/duplicates.csv; dedupe=cross_split drops them)", int(cross_split))
    leaked = leaked_paths(duplicates) if dedupe == "cross_split" else set()
    duplicates["dropped"] = duplicates["path"].isin(leaked)
    for i in used:
        if rel[i] in leaked:
            split[i] = "dropped"
    kept = np.array([i for i in used if rel[i] not in leaked], dtype=np.int64)
    if leaked:
        log.warning("dedupe=cross_split dropped %d val/test copies of training images", len(leaked))
        _check_no_class_emptied(split, labels, kept, classes, leaked, rel)
    return kept


def _check_no_class_emptied(split: np.ndarray, labels: np.ndarray, used: np.ndarray, classes: list[str],
                            leaked: set[str], rel: list[str]) -> None:
    """A class that dedupe emptied from val or test would make its metrics NaN and the means silently
    skip it: one line before any training instead."""
    for name in ("val", "test"):
        for c, class_name in enumerate(classes):
            if not np.any((split[used] == name) & (labels[used] == c)):
                dropped = sum(1 for i in range(len(rel)) if rel[i] in leaked and labels[i] == c)
                raise SceneMLError(f"dedupe=cross_split dropped {dropped} val/test image(s) of class {class_name!r} "
                                   f"(copies of training images), leaving none in the {name} split; add distinct "
                                   "images of that class, or run with dedupe=none")


def load_split_from_manifest(spec: str, manifest: str, classes: list[str], image_size: int,
                             split: str, workers: int = 2, progress: bool = True,
                             cache: Path | None = None) -> SplitData:
    """The images a training run put in ``split``, read back from its manifest (never re-split)."""
    cache = Path(cache) if cache is not None else cache_dir()
    source = resolve_source(spec, cache)
    rows = [r for r in read_manifest(manifest) if r["split"] == split]
    if not rows:
        raise SceneMLError(f"the split manifest has no rows for split {split!r}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    files = [source.root / r["path"] for r in rows]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SceneMLError(f"{len(missing)} image(s) of the recorded {split} split are missing under "
                           f"{source.root}, e.g. {missing[0]}; pass the data the model was trained on")
    decoded = decode_images(files, image_size, cache / "decoded", workers, progress)
    if decoded.errors:
        i, why = next(iter(decoded.errors.items()))
        raise SceneMLError(f"{files[i]} no longer decodes ({why}); the recorded split cannot be reproduced")
    labels = np.array([class_to_idx[r["label"]] for r in rows], dtype=np.int64)
    return SplitData([r["path"] for r in rows], labels, np.ascontiguousarray(decoded.pixels))


__all__ += ["manifest_digest", "read_manifest"]
