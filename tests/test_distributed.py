"""`train` under torchrun: DistributedDataParallel on CPU (gloo), 2 processes, one MLflow run."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from sceneml.data import load_split_from_manifest
from sceneml.engine.loop import predict_scores
from sceneml.metrics import classification_metrics
from sceneml.scores import scores_from_csv

from .conftest import mlflow_run_in_tmp


@pytest.mark.slow
def test_two_process_ddp_logs_one_run_with_all_reduced_losses_and_whole_split_validation(tmp_path):
    uri, exp_id, _ = mlflow_run_in_tmp(tmp_path, "ddp", "train_ddp", {
        "nproc": "2", "data": "synthetic:30", "epochs": "2", "weights": "none", "batch_size": "16",
        "device": "cpu", "keep_checkpoints": "all"})
    client = MlflowClient()
    (run,) = client.search_runs([exp_id])  # rank 1 trained too, but only rank 0 talks to MLflow
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["world_size"] == "2"
    n_train, n_val = int(params["n_train"]), int(params["n_val"])

    # each rank ran ceil(n_train / 2) images per epoch in batches of 16; batch losses are rank means
    shard = -(-n_train // 2)
    sizes = [min(16, shard - s) for s in range(0, shard, 16)]
    batch = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_batch_loss"),
                                     key=lambda m: m.step)]
    assert len(batch) == 2 * len(sizes)
    train_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    for epoch in (1, 2):
        losses = batch[(epoch - 1) * len(sizes):epoch * len(sizes)]
        # the epoch loss is the mean over both ranks' images: batch-size weighted mean of the rank means
        assert train_loss[epoch] == pytest.approx(np.average(losses, weights=sizes), rel=1e-5)

    # validation ran on the whole val split, not on a shard, and equals a single-process evaluation
    models = {int(m.tags["sceneml.epoch"]): m.model_id
              for m in mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")}
    manifest = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/split_manifest.csv")
    classes = params["classes"].split(",")
    val = load_split_from_manifest("synthetic:30", manifest, classes, 64, "val", progress=False)
    for epoch in (1, 2):
        paths, labels, logged_scores, _ = scores_from_csv(
            mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/val_scores/epoch_{epoch:03d}.csv"))
        assert len(paths) == n_val == len(val)
        model = mlflow.pytorch.load_model(f"models:/{models[epoch]}")
        scores = predict_scores(model, val.pixels, torch.device("cpu"))
        np.testing.assert_allclose(scores, logged_scores, atol=1e-5)
        again = classification_metrics(val.labels, scores, classes, "val")
        for key in ("val_acc", "val_mAP", "val_mean_class_acc"):
            logged = next(h.value for h in client.get_metric_history(run.info.run_id, key) if h.step == epoch)
            assert logged == pytest.approx(again[key], abs=1e-6)
    mlflow.set_tracking_uri(None)
