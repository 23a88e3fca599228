"""Class names are folder names, and folders can be called anything: each becomes a safe, unique
metric key by one mapping (sceneml.class_keys), while params, scores files and reports keep the names."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.metrics import recall_score

from sceneml.class_keys import class_keys
from sceneml.scores import scores_from_csv

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
def test_odd_class_folders_train_to_a_finished_run_with_one_key_per_class(tracking_uri, tmp_path):
    from sceneml.config import TrainConfig
    from sceneml.tasks.train import train

    names = ["best", "sea&sky, calm", "forest (1)", "forêt", LONG]
    root = write_class_folders(tmp_path / "data", {n: 12 for n in names})
    train(TrainConfig(data=str(root), epochs=1, image_size=32, batch_size=8, weights="none", val_fraction=0.25,
                      test_fraction=0.25, quiet=True, device="cpu"))
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    classes = sorted(names)  # class index order
    assert json.loads(run.data.params["classes"]) == classes
    assert '"forêt"' in run.data.params["classes"]  # params are for people: no \u00ea escapes
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
