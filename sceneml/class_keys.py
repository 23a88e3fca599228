"""Class names as parts of MLflow metric keys (``val_acc_<key>``, ``test_ap_<key>``): one mapping.

A class is a folder name, and a folder can be called anything: ``sea&sky``, ``forest (1)``, ``best``,
or 300 characters long. MLflow accepts keys of letters, digits, ``_ - . / :`` and spaces, up to 250
characters, and ``val_acc_best`` already means "val_acc at the best epoch". So each name maps to a key:

1. every run of characters other than letters, digits, ``_``, ``-`` and ``.`` becomes one ``_``;
   leading and trailing ``_`` go; an empty result becomes ``class``;
2. a key longer than 64 characters keeps its first 55 and gains ``_`` and 8 hex digits of the
   name's SHA-1 (two long names that share a start stay apart);
3. a key that is reserved (``best``) or already taken by an earlier class (in class-index order)
   gains ``_2``, ``_3``, ... until it is free.

Names that are keys already (``buildings``, ``sea``) map to themselves. Training logs the mapping as
``data/class_keys.json``; params, model metadata, scores files and reports keep the raw names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

RESERVED = frozenset({"best"})  # val_acc_best, val_mAP_best ...: the best-epoch summaries
MAX_KEY = 64


def _safe(name: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"
    if len(key) > MAX_KEY:
        key = f"{key[:MAX_KEY - 9]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return key


def class_keys(classes: Sequence[str]) -> list[str]:
    """The metric-key part of each class, in the order given (class-index order); unique."""
    keys: list[str] = []
    taken = set(RESERVED)
    for name in classes:
        base = key = _safe(name)
        n = 1
        while key in taken:
            n += 1
            key = f"{base}_{n}"
        taken.add(key)
        keys.append(key)
    return keys
