"""The study (`main`), `select` and `evaluate`, against independent recomputations."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from sceneml.config import TrainConfig
from sceneml.data import load_split_from_manifest
from sceneml.registry import select_champion
from sceneml.train import run_train

from .conftest import mlflow_run_in_tmp


@pytest.fixture(scope="module")
def study(tmp_path_factory, hermetic_env):
    uri, exp_id = mlflow_run_in_tmp(tmp_path_factory.mktemp("study"), "study-test", "main",
                                    {"data": "synthetic:60", "epochs": "2", "optimizers": "adamw,sgd",
                                     "weights": "none"})
    yield uri, exp_id
    mlflow.set_tracking_uri(None)


def _runs(exp_id):
    runs = MlflowClient().search_runs([exp_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    return parent[0], children


@pytest.mark.slow
def test_children_select_and_evaluate_runs_hang_under_the_parent(study):
    _, exp_id = study
    parent, children = _runs(exp_id)
    assert set(children) == {"adamw-lr0.001", "sgd-lr0.001", "select", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in (parent, *children.values()))
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"comparison.json", "comparison.csv", "figures"} <= artifacts


@pytest.mark.slow
def test_champion_is_the_best_checkpoint_of_all_epochs(study):
    _, exp_id = study
    _, children = _runs(exp_id)
    client = MlflowClient()
    # independent: every child's val_mean_class_acc per epoch, mapped to that epoch's LoggedModel
    models = {(m.source_run_id, int(m.tags["sceneml.epoch"])): m.model_id
              for m in mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")}
    scored = []
    for name in ("adamw-lr0.001", "sgd-lr0.001"):
        run_id = children[name].info.run_id
        for h in client.get_metric_history(run_id, "val_mean_class_acc"):
            scored.append((h.value, models[(run_id, h.step)]))
    best_value = max(v for v, _ in scored)
    champion = client.get_model_version_by_alias("sceneml", "champion")
    # the version's source is the exact checkpoint (this store does not fill ModelVersion.model_id)
    assert champion.source.removeprefix("models:/") in {m for v, m in scored if v == best_value}
    assert champion.tags["sceneml.model_id"] == champion.source.removeprefix("models:/")
    assert champion.tags["sceneml.select_metric"] == "val_mean_class_acc"
    assert float(champion.tags["sceneml.val_mean_class_acc"]) == best_value


@pytest.mark.slow
def test_evaluation_test_acc_equals_a_recomputation_with_the_loaded_champion(study):
    _, exp_id = study
    _, children = _runs(exp_id)
    evaluation = children["evaluate"]
    assert evaluation.data.metrics["scores_reload_max_abs_diff"] == 0.0
    champion = MlflowClient().get_model_version_by_alias("sceneml", "champion")
    manifest = mlflow.artifacts.load_text(f"runs:/{champion.run_id}/data/split_manifest.csv")
    classes = MlflowClient().get_run(champion.run_id).data.params["classes"].split(",")
    test = load_split_from_manifest("synthetic:60", manifest, classes, 64, "test", progress=False)
    model = mlflow.pytorch.load_model("models:/sceneml@champion")
    with torch.no_grad():
        logits = model(torch.from_numpy(test.pixels).permute(0, 3, 1, 2).float() / 255.0)
    accuracy = float(np.mean(logits.argmax(1).numpy() == test.labels))
    assert evaluation.data.metrics["test_acc"] == pytest.approx(accuracy, abs=1e-12)
    assert champion.tags["test_acc"] == f"{accuracy:.6f}"


@pytest.mark.slow
def test_select_is_idempotent_and_a_better_run_moves_the_alias(study, monkeypatch):
    _, exp_id = study
    client = MlflowClient()
    before = client.search_model_versions("name = 'sceneml'")
    version, _ = select_champion([exp_id])
    assert len(client.search_model_versions("name = 'sceneml'")) == len(before)  # no new version
    old = client.get_model_version_by_alias("sceneml", "champion")
    assert version.version == old.version

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)  # scoped to this test, unlike set_experiment
    better = run_train(TrainConfig(data="synthetic:100", epochs=3, weights="none", quiet=True))
    new_version, best = select_champion([exp_id])
    assert best.run_id == better
    assert int(new_version.version) == int(old.version) + 1
    assert client.get_model_version_by_alias("sceneml", "champion").version == new_version.version
    assert client.get_model_version_by_alias("sceneml", "previous").version == old.version
    assert client.get_run(better).data.tags["sceneml.champion"] == "true"
    assert client.get_run(old.run_id).data.tags["sceneml.champion"] == "false"
