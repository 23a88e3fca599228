"""Decode images once: PIL -> RGB uint8 at a fixed size, cached as a memory-mapped ``.npy``.

The cache is keyed by the digest of (file list, sizes, modification times, image size), so epoch 2
and every later run on the same files never touches JPEG decoding again. Unreadable, truncated or
oversized files (decompression bombs: PIL's guard stays on) are skipped and reported, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from sceneml.errors import SceneMLError

CACHE_VERSION = 2  # 2: EXIF orientation applied


@dataclass
class DecodedImages:
    pixels: np.ndarray  # (N, H, W, 3) uint8, possibly a read-only memmap; rows of skipped files are 0
    ok: np.ndarray  # (N,) bool: False where the file could not be used
    errors: dict[int, str]  # index -> why it was skipped


def load_rgb(path: Path | str, size: int | None = None) -> np.ndarray:
    """Open one image as an (H, W, 3) uint8 RGB array, optionally resized to ``size`` x ``size``.

    Handles grayscale, RGBA, CMYK, palette (with transparency) and 16-bit images. Raises on
    unreadable, truncated or decompression-bomb files (PIL's size guard is not switched off).
    """
    with warnings.catch_warnings():
        # PIL only *warns* between 1x and 2x its pixel limit; treat that as a refusal too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            # phone photos store "rotate me" in EXIF rather than in the pixels
            img = _to_rgb(ImageOps.exif_transpose(img))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: PIL's own conversion clips to 255, so scale by the real range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning, keeps the palette colours
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def files_digest(paths: list[Path], size: int) -> str:
    sha = hashlib.sha256(f"v{CACHE_VERSION}|{size}".encode())
    for p in paths:
        st = os.stat(p)
        sha.update(f"|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return sha.hexdigest()[:24]


def decode_images(paths: list[Path], size: int, cache: Path, workers: int = 2,
                  progress: bool = True) -> DecodedImages:
    """Decode ``paths`` to a (N, size, size, 3) uint8 array, reusing the on-disk cache when present."""
    cache.mkdir(parents=True, exist_ok=True)
    key = files_digest(paths, size)
    array_file, meta_file = cache / f"{key}.npy", cache / f"{key}.json"
    if array_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        pixels = np.load(array_file, mmap_mode="r")
        ok = np.ones(len(paths), dtype=bool)
        errors = {int(k): v for k, v in meta["errors"].items()}
        ok[list(errors)] = False
        return DecodedImages(pixels, ok, errors)

    pixels = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            pixels[i] = load_rgb(paths[i], size)
        except Exception as exc:  # any undecodable file is skipped, whatever PIL raises
            errors[i] = f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(tqdm(pool.map(work, range(len(paths))), total=len(paths), desc="decode",
                  disable=not progress, leave=False))
    # write-then-rename so a crash or a concurrent run never leaves a half-written cache entry
    tmp = cache / f".{key}.{os.getpid()}.npy"
    tmp_meta = cache / f".{key}.{os.getpid()}.json"
    try:
        np.save(tmp, pixels)
        os.replace(tmp, array_file)
        tmp_meta.write_text(json.dumps({"errors": {str(k): v for k, v in sorted(errors.items())}}))
        os.replace(tmp_meta, meta_file)
    except OSError as exc:  # e.g. a full disk: leave no half-written temp file behind, say where
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
        raise SceneMLError(f"cannot write the decode cache in {cache} ({exc.strerror or exc}): free space there "
                           "or point SCENEML_CACHE at another disk") from None
    ok = np.ones(len(paths), dtype=bool)
    ok[list(errors)] = False
    return DecodedImages(pixels, ok, errors)
