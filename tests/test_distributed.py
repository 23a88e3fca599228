"""`train` under torchrun: DistributedDataParallel on CPU (gloo), 2 processes, one MLflow run."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from sceneml.data import load_split_from_manifest
from sceneml.engine.inference import predict_scores
from sceneml.metrics import classification_metrics
from sceneml.scores import scores_from_csv

from .conftest import mlflow_run_in_tmp


@pytest.mark.slow
def test_two_process_ddp_logs_one_run_with_all_reduced_losses_and_whole_split_validation(tmp_path):
    uri, exp_id, _ = mlflow_run_in_tmp(tmp_path, "ddp", "train_ddp", {
        "nproc": "2", "data": "synthetic:30", "epochs": "2", "weights": "none", "batch_size": "16",
        "device": "cpu", "keep_checkpoints": "all", "image_size": "32"})
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
    classes = json.loads(params["classes"])
    val = load_split_from_manifest("synthetic:30", manifest, classes, 32, "val", progress=False)
    for epoch in (1, 2):
        paths, labels, logged_scores, _, _ = scores_from_csv(
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


RANK_SCRIPT = """
import time
from sceneml.cli import user_errors_as_one_line
from sceneml.engine import distributed

def main():
    distributed.setup("cpu", timeout_s=3)
    if distributed.is_main_process():
        distributed.barrier()
    else:
        time.sleep(600)  # rank 1 never reaches the barrier: it waits until the test kills it

user_errors_as_one_line(main)()
"""


@pytest.mark.slow
def test_a_rank_that_never_arrives_ends_the_other_after_dist_timeout_in_one_line(tmp_path):
    """Rank 1 joins, then blocks; rank 0's barrier gives up after dist_timeout=3 s with one line
    naming the parameter, instead of a gloo traceback (or a wait of the default half hour)."""
    import time

    from .conftest import free_port, subprocess_env
    from .processes import python

    env = subprocess_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    ranks = [python(RANK_SCRIPT, [], {**env, "RANK": str(r), "LOCAL_RANK": str(r)}, tmp_path) for r in (0, 1)]
    try:
        _, err = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        ranks[1].kill()
        ranks[1].wait(timeout=60)
    assert ranks[0].returncode != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: rank 0 of 2: the barrier failed after waiting up to dist_timeout=3s"), err
    assert "Traceback" not in err
    assert waited < 30
