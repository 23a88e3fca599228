"""Exact and near-duplicate images, and the groups that leak across splits or carry two labels.

Exact: the same decoded pixels (at the training size, what the model sees), by BLAKE2 of the array.
Near: a 64-bit perceptual hash (``imagehash.phash``: the sign pattern of the image's low DCT
frequencies, robust to re-encoding and resizing) within ``max_distance`` bits (Hamming). Measured on
the Intel photos and the embedded scenes: a JPEG re-encoded at quality 70 and resized to 80 % lies
0-4 bits from its original; the closest two *different* images lie 10 (embedded) and 14 (Intel)
bits apart; hence the default of 6. Pairs become groups by connected components (scipy).
"""

from __future__ import annotations

import hashlib

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DEFAULT_MAX_DISTANCE = 6


def exact_hashes(images) -> list[str]:
    return [hashlib.blake2b(np.ascontiguousarray(p).tobytes(), digest_size=16).hexdigest() for p in images]


def perceptual_hashes(images) -> np.ndarray:
    """One uint64 pHash per (H, W, 3) uint8 image."""
    return np.array([int(str(imagehash.phash(Image.fromarray(np.asarray(p)))), 16) for p in images], dtype=np.uint64)


def duplicate_pairs(phash: np.ndarray, exact: list[str], max_distance: int, chunk: int = 2048) -> tuple:
    """(i, j) with i < j for every pair within ``max_distance`` bits or with equal exact hashes."""
    rows, cols = [], []
    for start in range(0, len(phash), chunk):
        block = np.bitwise_count(phash[start:start + chunk, None] ^ phash[None, :])  # Hamming distances
        i, j = np.nonzero(block <= max_distance)
        i += start
        keep = i < j
        rows.append(i[keep])
        cols.append(j[keep])
    by_hash: dict[str, list[int]] = {}
    for k, h in enumerate(exact):
        by_hash.setdefault(h, []).append(k)
    for members in by_hash.values():  # equal pixels are duplicates whatever their pHash says
        rows.append(np.array(members[:-1]))
        cols.append(np.array(members[1:]))
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def find_duplicates(pixels: np.ndarray, index: np.ndarray, paths: list[str], splits: list[str],
                    classes: list[str], max_distance: int = DEFAULT_MAX_DISTANCE) -> pd.DataFrame:
    """Duplicates among ``pixels[index]`` (read one image at a time, so a memory-mapped array stays on
    disk); ``paths``, ``splits`` and ``classes`` align with ``index``. One row per image that has a
    duplicate: ``group``, ``path``, ``split``, ``class``, ``kind`` (``exact`` when another member has
    the same pixels, else ``near``). Empty when there is none."""
    columns = ["group", "path", "split", "class", "kind"]
    n = len(index)
    if n < 2:
        return pd.DataFrame(columns=columns)
    exact = exact_hashes(pixels[k] for k in index)
    i, j = duplicate_pairs(perceptual_hashes(pixels[k] for k in index), exact, max_distance)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    members = np.flatnonzero(sizes[component] > 1)
    if not len(members):
        return pd.DataFrame(columns=columns)
    # groups numbered 1.. in order of their first image
    order = {c: g for g, c in enumerate(dict.fromkeys(component[members]), 1)}
    rows = []
    for k in members:
        same_pixels = sum(exact[m] == exact[k] for m in members if component[m] == component[k]) > 1
        rows.append({"group": order[component[k]], "path": paths[k], "split": splits[k], "class": classes[k],
                     "kind": "exact" if same_pixels else "near"})
    return pd.DataFrame(rows, columns=columns).sort_values(["group", "split", "path"], ignore_index=True)


def duplicate_counts(table: pd.DataFrame) -> dict[str, float]:
    """``dup_groups``; ``dup_cross_split``: groups with a member in train and one in val or test
    (the evaluation sees an image the model trained on); ``dup_cross_class``: groups with two labels."""
    groups = table.groupby("group")
    splits, labels = groups["split"].agg(set), groups["class"].nunique()
    return {"dup_groups": float(len(splits)),
            "dup_cross_split": float(sum("train" in s and bool(s & {"val", "test"}) for s in splits)),
            "dup_cross_class": float((labels > 1).sum())}


def leaked_paths(table: pd.DataFrame) -> set[str]:
    """The val/test members of groups that also lie in train: what ``dedupe=cross_split`` drops."""
    in_train = set(table.loc[table["split"] == "train", "group"])
    return set(table.loc[table["group"].isin(in_train) & table["split"].isin(["val", "test"]), "path"])
