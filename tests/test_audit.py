"""The data audit: duplicates and leakage across splits (real photos), likely label errors, Grad-CAM."""

from __future__ import annotations

import io
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from sceneml.config import TrainConfig
from sceneml.data import prepare_data, read_manifest
from sceneml.data.duplicates import duplicate_counts, find_duplicates
from sceneml.tasks.train import train

from .conftest import SHARED_DATA

INTEL_MINI = SHARED_DATA / "intel-mini"


def test_exact_and_near_copies_are_grouped_and_distinct_images_are_not():
    rng = np.random.default_rng(0)
    base = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)))
            for _ in range(5)]
    buffer = io.BytesIO()
    Image.fromarray(base[1]).resize((50, 50)).save(buffer, "JPEG", quality=70)
    near = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((64, 64)))
    # 5: an exact copy of 0 filed under another class; 6: a re-encoded, resized copy of 1
    pixels = np.stack([*base, base[0], near])
    table = find_duplicates(pixels, np.arange(7), [f"p{i}" for i in range(7)],
                            ["train", "train", "val", "val", "test", "test", "val"], list("aabbcda"))
    assert {tuple(sorted(g["path"])) for _, g in table.groupby("group")} == {("p0", "p5"), ("p1", "p6")}
    assert dict(zip(table["path"], table["kind"])) == {"p0": "exact", "p5": "exact", "p1": "near", "p6": "near"}
    assert duplicate_counts(table) == {"dup_groups": 2.0, "dup_cross_split": 2.0, "dup_cross_class": 1.0}


@pytest.mark.skipif(not INTEL_MINI.is_dir(), reason="../shared/data/intel-mini is not present")
def test_real_photos_copied_across_splits_are_found_logged_and_dropped_on_request(tmp_path, tracking_uri):
    folder = tmp_path / "intel"
    shutil.copytree(INTEL_MINI, folder)
    first = prepare_data(str(folder), 64, 0, 0.15, 0.15, 0, 2, False)
    assert len(first.duplicates) == 0  # the 360 photos hold no duplicate
    exact_src, near_src = first.splits["train"].paths[:2]
    # an exact copy of a training photo filed in seg_test under another class and name ...
    copy = first.source.test_dir / "street" / "copy_of_a_train_photo.jpg"
    shutil.copy(folder / exact_src, copy)
    copy_name = copy.relative_to(folder).as_posix()
    # ... and a re-encoded, resized copy of another, into seg_train where the seeded split may put it in val
    small = Image.open(folder / near_src).convert("RGB").resize((120, 120))
    near_name = f"{near_src.rsplit('/', 1)[0]}/zz_resized_copy.jpg"
    small.save(folder / near_name, "JPEG", quality=70)
    seed = next(s for s in range(100) if _split_of(folder, s, near_name) == "val"
                and _split_of(folder, s, near_src) == "train" and _split_of(folder, s, exact_src) == "train")

    cfg = TrainConfig(data=str(folder), image_size=64, epochs=1, weights="none", seed=seed, quiet=True)
    run_id = train(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["dup_cross_split"] >= 2 and run.data.metrics["dup_cross_class"] >= 1
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/data/duplicates.csv")))
    kinds = {p: k for p, k in zip(table["path"], table["kind"])}
    assert kinds[copy_name] == kinds[exact_src] == "exact"
    assert kinds[near_name] == kinds[near_src] == "near"

    deduped = prepare_data(str(folder), 64, seed, 0.15, 0.15, 0, 2, False, dedupe="cross_split")
    kept = {r["path"] for r in read_manifest(deduped.manifest)}
    assert copy_name not in kept and near_name not in kept
    assert exact_src in kept and near_src in kept  # the training copies stay


def _split_of(folder, seed: int, path: str) -> str:
    data = prepare_data(str(folder), 64, seed, 0.15, 0.15, 0, 2, False)
    return next(r["split"] for r in read_manifest(data.manifest) if r["path"] == path)
