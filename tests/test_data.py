"""The data side: layouts, zip safety, splits, bad files, odd image modes, the embedded data set."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from sceneml.data import Splitting, load_rgb, load_split_from_manifest, prepare_data, read_manifest, resolve_source
from sceneml.data.sources import list_images
from sceneml.data.synthetic import CLASSES, render_scene
from sceneml.errors import SceneMLError

from .conftest import SHARED_DATA
from .helpers import rgb_noise, write_class_folders

COUNTS = {"alpha": 12, "beta": 9, "gamma": 15}


def split_counts(data) -> dict[str, Counter]:
    return {s: Counter(data.classes[i] for i in d.labels) for s, d in data.splits.items()}


# ------------------------------------------------------------------ layouts

def test_imagefolder_layout_is_discovered(tmp_path):
    write_class_folders(tmp_path / "imgs", COUNTS)
    data = prepare_data(str(tmp_path / "imgs"), progress=False)
    assert data.source.kind == "folder"
    assert data.classes == sorted(COUNTS)
    total = Counter()
    for counts in split_counts(data).values():
        total.update(counts)
    assert dict(total) == COUNTS
    assert data.image_size == 150  # folder data default to the Intel size
    assert data.splits["train"].pixels.shape[1:] == (150, 150, 3)


@pytest.mark.parametrize("nested", [True, False])
def test_kaggle_layout_uses_seg_test_as_test_split(tmp_path, nested):
    root = tmp_path / "intel"
    train = root / "seg_train" / ("seg_train" if nested else "")
    test = root / "seg_test" / ("seg_test" if nested else "")
    write_class_folders(train, {"forest": 10, "sea": 8})
    write_class_folders(test, {"forest": 4, "sea": 3}, seed=1)
    (root / "seg_pred" / "seg_pred").mkdir(parents=True)  # unlabelled: ignored
    Image.fromarray(rgb_noise()).save(root / "seg_pred" / "seg_pred" / "1.jpg")
    data = prepare_data(str(root), image_size=32, progress=False)
    assert data.source.kind == "kaggle"
    counts = split_counts(data)
    assert counts["test"] == Counter({"forest": 4, "sea": 3})
    assert counts["train"] + counts["val"] == Counter({"forest": 10, "sea": 8})
    assert all(p.startswith("seg_test/") for p in data.splits["test"].paths)


def _zip_folder(folder, archive, prefix=""):
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def test_zip_of_folders_is_extracted_once_and_discovered(tmp_path, hermetic_env):
    write_class_folders(tmp_path / "imgs", COUNTS)
    archive = _zip_folder(tmp_path / "imgs", tmp_path / "scenes.zip", prefix="scenes/")
    first = resolve_source(str(archive))
    second = resolve_source(str(archive))
    assert first.root == second.root and str(first.root).startswith(str(hermetic_env))
    classes, items = list_images(first.train_dir)
    assert classes == sorted(COUNTS) and len(items) == sum(COUNTS.values())


@pytest.mark.parametrize("evil", ["../escaped.txt", "/tmp/abs-escape.txt", "a/../../escaped.txt"])
def test_zip_slip_is_refused_and_writes_nothing(tmp_path, monkeypatch, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good/ok.txt", "fine")
        zf.writestr(evil, "owned")
    cache = tmp_path / "cache"  # its own: the session's is shared with tests running beside this one
    cache.mkdir()
    monkeypatch.setenv("SCENEML_CACHE", str(cache))
    with pytest.raises(SceneMLError, match="unsafe zip entry"):
        resolve_source(str(archive))
    assert list(cache.rglob("*")) == [], "a refused archive must not write anything"
    # where an escaping entry would land: beside the extraction folder in the cache, or at its absolute path
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("abs-escape.txt"))
    assert not Path("/tmp/abs-escape.txt").exists()


def test_zip_symlink_entry_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("cls/link.jpg")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(SceneMLError, match="link"):
        resolve_source(str(archive))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SceneMLError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))


def test_empty_class_folder_is_named(tmp_path):
    write_class_folders(tmp_path / "imgs", {"a": 5, "b": 5})
    (tmp_path / "imgs" / "empty").mkdir()
    with pytest.raises(SceneMLError, match="'empty'"):
        prepare_data(str(tmp_path / "imgs"), progress=False)


def test_class_with_single_image_cannot_be_stratified(tmp_path):
    write_class_folders(tmp_path / "imgs", {"a": 8, "lonely": 1})
    with pytest.raises(SceneMLError, match="'lonely' has 1 usable image"):
        prepare_data(str(tmp_path / "imgs"), progress=False)


# ------------------------------------------------------------------ splits

def test_split_is_stratified_deterministic_and_seeded(tmp_path):
    counts = {"a": 40, "b": 20, "c": 60}
    write_class_folders(tmp_path / "imgs", counts, ext=".png")
    one = prepare_data(str(tmp_path / "imgs"), image_size=32, splitting=Splitting(seed=1), progress=False)
    again = prepare_data(str(tmp_path / "imgs"), image_size=32, splitting=Splitting(seed=1), progress=False)
    other = prepare_data(str(tmp_path / "imgs"), image_size=32, splitting=Splitting(seed=2), progress=False)
    assert one.manifest == again.manifest  # byte-identical
    assert one.manifest != other.manifest
    per_split = split_counts(one)
    for split, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        for name, n in counts.items():
            assert abs(per_split[split][name] - share * n) <= 1.0 + 1e-9, (split, name)
    rows = read_manifest(one.manifest)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_limit_per_class_is_honoured(tmp_path):
    write_class_folders(tmp_path / "imgs", {"a": 30, "b": 12})
    data = prepare_data(str(tmp_path / "imgs"), image_size=32, splitting=Splitting(limit=10), progress=False)
    total = Counter()
    for counts in split_counts(data).values():
        total.update(counts)
    assert total == Counter({"a": 10, "b": 10})


def test_manifest_reload_gives_the_same_test_images(tmp_path):
    write_class_folders(tmp_path / "imgs", COUNTS)
    data = prepare_data(str(tmp_path / "imgs"), image_size=32, progress=False)
    test = load_split_from_manifest(str(tmp_path / "imgs"), data.manifest, data.classes, 32, "test", progress=False)
    assert test.paths == data.splits["test"].paths
    np.testing.assert_array_equal(test.labels, data.splits["test"].labels)
    np.testing.assert_array_equal(test.pixels, data.splits["test"].pixels)


# ------------------------------------------------------------------ bad and odd files

def _bad_files(folder):
    good = io.BytesIO()
    Image.fromarray(rgb_noise(64)).save(good, format="JPEG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    corrupt = bytearray(good.getvalue())
    corrupt[20:400] = b"\x00" * 380
    (folder / "corrupt.jpg").write_bytes(bytes(corrupt[:300]))
    return 4


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    write_class_folders(tmp_path / "imgs", {"a": 8, "b": 8})
    n_bad = _bad_files(tmp_path / "imgs" / "a")
    data = prepare_data(str(tmp_path / "imgs"), image_size=32, progress=False)
    assert len(data.skipped) == n_bad
    assert set(data.skipped) == {f"a/{n}" for n in ("zero.jpg", "text.jpg", "truncated.jpg", "corrupt.jpg")}
    assert sum(len(s) for s in data.splits.values()) == 16


def test_class_whose_files_all_fail_is_named(tmp_path):
    write_class_folders(tmp_path / "imgs", {"a": 8, "b": 8})
    (tmp_path / "imgs" / "broken").mkdir()
    _bad_files(tmp_path / "imgs" / "broken")
    with pytest.raises(SceneMLError, match="'broken' has no usable image"):
        prepare_data(str(tmp_path / "imgs"), image_size=32, progress=False)


def test_odd_modes_convert_to_rgb(tmp_path):
    base = rgb_noise(16)
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(base[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([base, np.full((16, 16), 255, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    sixteen = (base[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    for name in ("cmyk.jpg", "gray.png", "rgba.png", "pal.png", "gray16.png"):
        arr = load_rgb(tmp_path / name, 16)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8, name
    # 16-bit is scaled, not clipped: 257*v maps back to v
    np.testing.assert_allclose(load_rgb(tmp_path / "gray16.png")[..., 0], base[..., 0], atol=1)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 40k pixels > 2x the limit: refused
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150 * 150)  # between 1x and 2x: PIL only warns
    with pytest.raises(Image.DecompressionBombWarning):
        load_rgb(tmp_path / "bomb.png")


# ------------------------------------------------------------------ the embedded data set

def test_synthetic_is_deterministic():
    for name in CLASSES:
        np.testing.assert_array_equal(render_scene(name, 3, seed=0), render_scene(name, 3, seed=0))
    assert not np.array_equal(render_scene("sea", 3, seed=0), render_scene("sea", 4, seed=0))
    data1 = prepare_data("synthetic:30", progress=False)
    data2 = prepare_data("synthetic:30", progress=False)
    assert data1.manifest == data2.manifest and data1.classes == list(CLASSES)
    np.testing.assert_array_equal(data1.splits["train"].pixels, data2.splits["train"].pixels)


def test_mean_colour_does_not_separate_the_classes():
    """A logistic regression on per-image mean RGB must stay well below a CNN (< 60 %)."""
    data = prepare_data("synthetic", progress=False)
    train, test = data.splits["train"], data.splits["test"]

    def features(split):
        return split.pixels.reshape(len(split), -1, 3).mean(axis=1) / 255.0

    clf = LogisticRegression(max_iter=5000).fit(features(train), train.labels)
    accuracy = clf.score(features(test), test.labels)
    assert 1 / 6 - 0.05 < accuracy < 0.60, accuracy


INTEL_MINI = SHARED_DATA / "intel-mini"


@pytest.mark.skipif(not INTEL_MINI.is_dir(), reason="../shared/data/intel-mini is not present")
def test_real_intel_subset_is_discovered():
    source = resolve_source(str(INTEL_MINI))
    assert source.kind == "kaggle"
    classes, items = list_images(source.train_dir)
    assert classes == list(CLASSES)
    counts = Counter(c for _, c in items)
    assert all(counts[c] > 0 for c in CLASSES), counts
    print("intel-mini seg_train per-class counts:", dict(counts))


# ----------------------------------------------------- hostile archives, macOS leftovers, caches, EXIF

def _zip_of_two_classes(tmp_path: Path, archive: Path) -> Path:
    folder = write_class_folders(tmp_path / "src", {"a": 4, "b": 4})
    _zip_folder(folder, archive)
    return archive


def test_a_zip_with_a_bad_crc_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEML_CACHE", str(tmp_path / "cache"))
    archive = _zip_of_two_classes(tmp_path, tmp_path / "data.zip")
    raw = bytearray(archive.read_bytes())
    info = zipfile.ZipFile(archive).infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 5] ^= 0xFF  # one byte of the first entry's data: its CRC no longer matches
    archive.write_bytes(bytes(raw))
    with pytest.raises(SceneMLError, match="cannot extract it"):
        resolve_source(str(archive))
    assert list((tmp_path / "cache" / "zips").iterdir()) == []  # no .tmp-* folder, no half extraction


def test_an_encrypted_zip_is_refused_before_extraction(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEML_CACHE", str(tmp_path / "cache"))
    archive = _zip_of_two_classes(tmp_path, tmp_path / "data.zip")
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    for info in infos:  # set the "encrypted" flag bit in the local and the central headers
        raw[info.header_offset + 6] |= 0x1
    central = raw.find(b"PK\x01\x02")
    while central != -1:
        raw[central + 8] |= 0x1
        central = raw.find(b"PK\x01\x02", central + 4)
    archive.write_bytes(bytes(raw))
    with pytest.raises(SceneMLError, match="is encrypted"):
        resolve_source(str(archive))
    assert not (tmp_path / "cache" / "zips").exists() or list((tmp_path / "cache" / "zips").iterdir()) == []


def test_a_zip_bomb_entry_is_refused_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEML_CACHE", str(tmp_path / "cache"))
    folder = write_class_folders(tmp_path / "src", {"a": 4, "b": 4})
    archive = tmp_path / "bomb.zip"
    _zip_folder(folder, archive)
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/huge.bin", b"\0" * (3 * 2**20))  # 3 MB of zeros, a few KB compressed
    assert archive.stat().st_size < 200_000
    monkeypatch.setenv("SCENEML_MAX_ZIP_ENTRY_MB", "1")
    with pytest.raises(SceneMLError, match=r"'a/huge.bin' expands to 3 MB, over the limit of 1 MB"):
        resolve_source(str(archive))
    monkeypatch.setenv("SCENEML_MAX_ZIP_ENTRY_MB", "4")
    monkeypatch.setenv("SCENEML_MAX_ZIP_TOTAL_GB", "0.001")
    with pytest.raises(SceneMLError, match="over the limit of 0.0 GB"):
        resolve_source(str(archive))
    monkeypatch.setenv("SCENEML_MAX_ZIP_TOTAL_GB", "1")
    assert resolve_source(str(archive)).kind == "folder"


def test_macos_leftovers_are_ignored_in_every_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEML_CACHE", str(tmp_path / "cache"))
    folder = write_class_folders(tmp_path / "src", {"a": 4, "b": 4})
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "a" / "._img_000.jpg").write_bytes(b"\0\5\26\7 resource fork")
    archive = tmp_path / "mac.zip"
    _zip_folder(folder, archive)
    with zipfile.ZipFile(archive, "a") as zf:  # what Finder's "Compress" adds beside the class folders
        zf.writestr("__MACOSX/a/._img_001.jpg", b"\0\5\26\7 resource fork")
        zf.writestr("__MACOSX/._a", b"\0\5\26\7")
    for spec in (str(folder), str(archive)):
        source = resolve_source(spec)
        classes, items = list_images(source.train_dir)
        assert classes == ["a", "b"] and len(items) == 8, spec
    kaggle = tmp_path / "kaggle"
    write_class_folders(kaggle / "seg_train", {"a": 4, "b": 4})
    write_class_folders(kaggle / "seg_test", {"a": 2, "b": 2})
    (kaggle / "seg_train" / "__MACOSX").mkdir()
    (kaggle / "seg_train" / "__MACOSX" / "._x.jpg").write_bytes(b"\0")
    assert list_images(resolve_source(str(kaggle)).train_dir)[0] == ["a", "b"]


@pytest.mark.parametrize("kind", ["a file", "below a file"])
def test_an_unusable_cache_is_one_line_naming_it(tmp_path, monkeypatch, kind):
    # (a read-only folder gives the same error; these tests run as root, whom permissions do not stop)
    (tmp_path / "cache").write_text("not a folder")
    target = tmp_path / "cache" if kind == "a file" else tmp_path / "cache" / "sub"
    monkeypatch.setenv("SCENEML_CACHE", str(target))
    with pytest.raises(SceneMLError, match=f"SCENEML_CACHE {target} is not a writable folder"):
        resolve_source("synthetic:10")


def test_exif_orientation_is_applied_when_decoding(tmp_path):
    # a 40 x 20 image whose left half is red, stored with "rotate 90" in EXIF (tag 274 = 6), as phones do
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[274] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    upright = load_rgb(path)
    assert upright.shape == (40, 20, 3)  # turned: 40 high, 20 wide
    assert upright[:20, :, 0].mean() > 200 and upright[20:, :, 0].mean() < 60  # the red half is on top


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_cache_see_the_same_synthetic_data(tmp_path):
    from .conftest import subprocess_env
    from .processes import python

    code = ("from sceneml.data import prepare_data; d = prepare_data('synthetic:40', 0, workers=1, progress=False);"
            "print(d.digest, len(d.skipped))")
    env = subprocess_env(SCENEML_CACHE=str(tmp_path / "fresh"))
    procs = [python(code, [], env, tmp_path) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-800:] for _, e in outputs]
    assert len({out for out, _ in outputs}) == 1 and outputs[0][0].split()[1] == "0"  # one digest, none skipped
    assert [p.name for p in (tmp_path / "fresh" / "synthetic").iterdir() if p.name.startswith(".tmp")] == []
