"""Class names are folder names, and folders can be called anything: each becomes a safe, unique
metric key by one mapping (sceneml.class_keys), while params, scores files and reports keep the names."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.metrics import recall_score

from sceneml.class_keys import class_keys
from sceneml.scores import scores_from_csv

from .conftest import REPO, subprocess_env
from .helpers import write_class_folders

LONG = "glacier " + "very " * 46 + "cold"  # 242 characters, under the 255 a file name may hold


def test_the_mapping_by_its_documented_rules():
    keys = class_keys(["buildings", "best", "sea&sky, calm", "forest (1)", "forest_1", "***", LONG, LONG + "!"])
    assert keys[:6] == ["buildings", "best_2", "sea_sky_calm", "forest_1", "forest_1_2", "class"]
    # overlong: the first 55 characters of the safe key, then 8 hex digits of the name's SHA-1
    assert keys[6].startswith("glacier_very_very_") and len(keys[6]) == 64 and keys[6] != keys[7]
    assert len(set(keys)) == len(keys)
    assert all(len(f"test_acc_{k}") <= 250 and all(c.isalnum() or c in "_-." for c in k) for k in keys)


@pytest.mark.slow
def test_odd_class_folders_train_to_a_finished_run_with_one_key_per_class(tmp_path):
    names = ["best", "sea&sky, calm", "forest (1)", LONG]
    root = write_class_folders(tmp_path / "data", {n: 12 for n in names})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "train.py"), "--data", str(root),
                           "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--weights", "none",
                           "--val-fraction", "0.25", "--test-fraction", "0.25", "--quiet", "--device", "cpu"],
                          env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    classes = sorted(names)  # class index order
    assert json.loads(run.data.params["classes"]) == classes
    keys = class_keys(classes)
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/data/class_keys.json")) == dict(zip(classes, keys))
    # `best` did not overwrite the best-epoch summary: one value of val_acc_best, at the last step
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc_best")] == \
        [(1, run.data.metrics["val_acc"])]
    # each class's accuracy is sklearn's recall of that class, from the scores file (names as its header)
    _, y, scores, file_classes, _ = scores_from_csv(
        mlflow.artifacts.load_text(f"runs:/{run_id}/val_scores/epoch_001.csv"))
    assert file_classes == classes
    recall = recall_score(y, scores.argmax(1), labels=range(len(classes)), average=None, zero_division=np.nan)
    for key, expected in zip(keys, recall):
        assert run.data.metrics[f"val_acc_{key}"] == pytest.approx(expected)
    mlflow.set_tracking_uri(None)
