"""Where the images come from: the ``data`` parameter resolved to folders of class sub-folders.

Accepted forms of ``data``:

* ``synthetic`` or ``synthetic:N`` -- the embedded procedural data set (N images per class);
* a folder of class sub-folders (ImageFolder layout);
* the Kaggle Intel layout, ``seg_train/[seg_train/]<class>/*`` and ``seg_test/[seg_test/]<class>/*``
  (``seg_pred`` has no labels and is ignored); ``seg_test`` becomes the test split;
* a ``.zip`` of either folder layout, extracted once into a cache keyed by the archive's hash.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from sceneml.data import synthetic
from sceneml.errors import SceneMLError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
FOLDER_NATIVE_SIZE = 150  # the Intel images are 150x150


@dataclass(frozen=True)
class DataSource:
    """A resolved ``data`` parameter. Manifest paths are relative to ``root``."""

    spec: str
    kind: str  # "synthetic" | "folder" | "kaggle"
    root: Path
    train_dir: Path  # class sub-folders; the whole pool when there is no test_dir
    test_dir: Path | None  # class sub-folders of a split the data bring themselves
    native_size: int


def cache_dir() -> Path:
    """Where decoded arrays, extracted zips and the synthetic images live (``$SCENEML_CACHE``).
    A path that is a file, or a folder this process cannot write, is a one-line error saying so."""
    path = Path(os.environ.get("SCENEML_CACHE", Path.home() / ".cache" / "sceneml")).expanduser()
    _check_writable(str(path))
    return path


@functools.lru_cache(maxsize=8)
def _check_writable(path: str) -> None:
    what = "SCENEML_CACHE" if os.environ.get("SCENEML_CACHE") else "the sceneml cache"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SceneMLError(f"{what} {path} is not a writable folder ({exc.strerror or exc}): point SCENEML_CACHE "
                           "at a folder you can write") from None


def ignored(name: str) -> bool:
    """Files and folders that are never data: hidden ones (``.DS_Store``), macOS resource forks
    (``._photo.jpg``) and the ``__MACOSX`` folder that macOS zips carry beside the real ones."""
    return name.startswith(".") or name == "__MACOSX"


# An archive is refused before extraction when an entry or the whole would pass these (a "zip bomb"
# is a small file that expands to fill the disk); raise them with these environment variables.
MAX_ZIP_ENTRY_MB = "SCENEML_MAX_ZIP_ENTRY_MB"  # default 256: no photo is that large
MAX_ZIP_TOTAL_GB = "SCENEML_MAX_ZIP_TOTAL_GB"  # default 32


def resolve_source(spec: str, cache: Path | None = None) -> DataSource:
    """Turn the ``data`` parameter into a :class:`DataSource`, extracting or rendering as needed."""
    cache = Path(cache) if cache is not None else cache_dir()
    spec = spec.strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        per_class = synthetic.DEFAULT_PER_CLASS
        if ":" in spec:
            try:
                per_class = int(spec.split(":", 1)[1])
            except ValueError:
                per_class = 0
            if per_class < 3:
                raise SceneMLError(f"data={spec!r}: use synthetic:N with N >= 3 images per class")
        folder = cache / "synthetic" / f"v{synthetic.RENDERER_VERSION}-n{per_class}-s0-{synthetic.DEFAULT_SIZE}px"
        synthetic.write_synthetic_dataset(folder, per_class=per_class)
        return DataSource(spec, "synthetic", folder, folder, None, synthetic.DEFAULT_SIZE)

    path = Path(spec).expanduser()
    if not path.exists():
        raise SceneMLError(f"data={spec!r} does not exist (expected 'synthetic', a folder or a .zip)")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise SceneMLError(f"data={spec!r} is a file but not a .zip archive")
        path = extract_zip(path, cache / "zips")
    return _resolve_folder(spec, _unwrap(path))


def _has_class_dirs(folder: Path) -> bool:
    return any(child.is_dir() and not ignored(child.name) for child in folder.iterdir())


def _unwrap(folder: Path) -> Path:
    """Descend through single wrapper folders (``archive/intel/seg_train`` -> ``archive/intel``)."""
    while True:
        children = [c for c in folder.iterdir() if not ignored(c.name)]
        dirs = [c for c in children if c.is_dir()]
        wrapper = len(dirs) == 1 and len(children) == 1 and dirs[0].name not in ("seg_train", "seg_test")
        if wrapper and _has_class_dirs(dirs[0]):
            folder = dirs[0]
            continue
        return folder


def _kaggle_split_dir(root: Path, name: str) -> Path | None:
    """``seg_train`` may hold the classes directly or wrap them once more (``seg_train/seg_train``)."""
    outer = root / name
    if not outer.is_dir():
        return None
    inner = outer / name
    return inner if inner.is_dir() else outer


def _resolve_folder(spec: str, root: Path) -> DataSource:
    train = _kaggle_split_dir(root, "seg_train")
    if train is not None:
        test = _kaggle_split_dir(root, "seg_test")
        return DataSource(spec, "kaggle", root, train, test, FOLDER_NATIVE_SIZE)
    if not _has_class_dirs(root):
        raise SceneMLError(f"data={spec!r}: no class sub-folders found in {root}")
    return DataSource(spec, "folder", root, root, None, FOLDER_NATIVE_SIZE)


def list_images(class_root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Sorted class names and (file, class) pairs under ``class_root/<class>/``.

    Files are found by extension; whether they really decode is checked later, when decoding.
    A class folder with no image file at all is an error that names it.
    """
    classes = sorted(c.name for c in class_root.iterdir() if c.is_dir() and not ignored(c.name))
    if len(classes) < 2:
        raise SceneMLError(f"{class_root}: need at least 2 class sub-folders, found {classes}")
    items: list[tuple[Path, str]] = []
    for name in classes:
        files = sorted(
            p for p in (class_root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(ignored(part) for part in p.relative_to(class_root).parts)
        )
        if not files:
            raise SceneMLError(f"class {name!r} has no image files in {class_root / name}")
        items.extend((p, name) for p in files)
    return classes, items


def listing_digest(spec: str) -> str:
    """A short digest of what ``spec`` holds: each image file's path under the data's root, class and size,
    without decoding anything (what the workers of a shared study must agree on)."""
    source = resolve_source(spec)
    sha = hashlib.sha256()
    for folder in (source.train_dir, source.test_dir):
        for path, name in (list_images(folder)[1] if folder is not None else []):
            sha.update(f"{path.relative_to(source.root).as_posix()}|{name}|{path.stat().st_size}\n".encode())
    return sha.hexdigest()[:16]


def image_files(input_path: str | Path) -> list[Path]:
    """The file itself, or every image file under the folder (recursively, sorted; hidden files skipped)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(ignored(part) for part in p.relative_to(path).parts))
        if not files:
            raise SceneMLError(f"input {str(input_path)!r}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return files
    raise SceneMLError(f"input {str(input_path)!r} does not exist")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def extract_zip(archive: Path, zip_cache: Path) -> Path:
    """Extract ``archive`` once into ``zip_cache/<sha256>``; refuse entries that escape the folder.

    Every entry is checked *before* anything is written, so a zip-slip archive leaves nothing behind.
    Extraction goes to a temporary folder renamed into place at the end, so a crash mid-way is redone.
    """
    target = zip_cache / file_digest(archive)[:20]
    if target.is_dir():
        return target
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise SceneMLError(f"{archive} is not a readable zip archive: {exc}") from None
    max_entry = int(float(os.environ.get(MAX_ZIP_ENTRY_MB, "256")) * 2**20)
    max_total = int(float(os.environ.get(MAX_ZIP_TOTAL_GB, "32")) * 2**30)
    with zf:
        total = 0
        for info in zf.infolist():
            name = info.filename
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            parts = Path(name.replace("\\", "/")).parts
            if is_link or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise SceneMLError(
                    f"{archive}: refusing unsafe zip entry {name!r} (absolute path, '..' or link)"
                )
            if info.flag_bits & 0x1:
                raise SceneMLError(f"{archive}: entry {name!r} is encrypted; unzip it yourself and pass the folder")
            if info.file_size > max_entry:
                raise SceneMLError(f"{archive}: entry {name!r} expands to {info.file_size / 2**20:.0f} MB, over the "
                                   f"limit of {max_entry / 2**20:.0f} MB ({MAX_ZIP_ENTRY_MB} raises it)")
            total += info.file_size
        if total > max_total:
            raise SceneMLError(f"{archive}: expands to {total / 2**30:.1f} GB, over the limit of "
                               f"{max_total / 2**30:.1f} GB ({MAX_ZIP_TOTAL_GB} raises it)")
        tmp = zip_cache / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            zf.extractall(tmp)  # zipfile checks every entry's CRC and stops at its declared size
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
                raise
            raise SceneMLError(f"{archive}: cannot extract it ({type(exc).__name__}: {exc})") from None
    try:
        tmp.rename(target)
    except OSError:  # a concurrent run won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target
