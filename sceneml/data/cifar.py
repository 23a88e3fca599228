"""Read a CIFAR-10 ``cifar-10-batches-py`` folder as it comes from the tarball, without torchvision's
downloader. The batches are pickles; they are read with an unpickler that only admits what those
files contain (dicts, lists, numpy arrays), so a doctored file cannot run code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from sceneml.errors import SceneMLError

BATCH_FILES = ("test_batch", *(f"data_batch_{i}" for i in range(1, 6)))
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"), ("builtins", "bytearray"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR batch file")


def is_cifar10_folder(path: Path | str) -> bool:
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in BATCH_FILES)


def read_cifar10(path: Path | str, limit: int | None = None) -> np.ndarray:
    """Up to ``limit`` images as (N, 32, 32, 3) uint8, test batch first, then the training batches."""
    folder = Path(path)
    arrays, have = [], 0
    for name in BATCH_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            batch = _ArraysOnly(io.BytesIO(file.read_bytes()), encoding="latin1").load()
            data = np.asarray(batch.get("data", batch.get(b"data")), dtype=np.uint8)
        except Exception as exc:
            raise SceneMLError(f"{file} is not a CIFAR-10 python batch: {exc}") from None
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        arrays.append(images)
        have += len(images)
        if limit is not None and have >= limit:
            break
    if not arrays:
        raise SceneMLError(f"{folder}: no CIFAR-10 batch files ({', '.join(BATCH_FILES)})")
    out = np.concatenate(arrays)
    return np.ascontiguousarray(out[:limit] if limit is not None else out)
