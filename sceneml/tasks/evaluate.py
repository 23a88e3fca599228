"""`evaluate`: score a logged model on a split recorded by its training run, and prove the numbers.

The images come from the training run's split manifest (never a re-split, which could leak training
images into the test set). Every metric derives from the per-image scores file, which is logged,
read back from the artifact store and recomputed: ``scores_reload_max_abs_diff`` must be 0.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
from mlflow import MlflowClient

from sceneml import plots
from sceneml.data import load_split_from_manifest
from sceneml.engine.loop import predict_scores
from sceneml.metrics import classification_metrics, confusion_matrix, reliability_bins
from sceneml.models import pick_device
from sceneml.scores import scores_from_csv, scores_to_csv
from sceneml.tracking.models import model_caption, model_label, model_metadata
from sceneml.tracking.runs import MetricBuffer, log_figure, log_params_once, rename_run, set_tags, task_run
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)


def evaluate(model_uri: str = "models:/sceneml@champion", data: str = "", split: str = "test",
             device: str = "auto", progress: bool = True, nested: bool = False) -> dict[str, float]:
    """The `evaluate` task: one run; returns the logged metrics."""
    pick_device(device)  # a bad device name fails before any run starts
    with task_run("evaluate", nested=nested, task="evaluate"):
        return _evaluate(model_uri, data, split, device, progress)


def _evaluate(model_uri: str, data: str, split: str, device: str, progress: bool) -> dict[str, float]:
    meta = model_metadata(model_uri)
    classes, run_id = meta["classes"], meta["training_run_id"]
    manifest = mlflow.artifacts.load_text(f"runs:/{run_id}/data/split_manifest.csv")
    data = data or meta["data"]
    split_data = load_split_from_manifest(data, manifest, classes, int(meta["image_size"]), split,
                                          progress=progress)
    model = mlflow.pytorch.load_model(model_uri)
    dev = pick_device(device)
    model = model.to(dev)
    scores = predict_scores(model, split_data.pixels, dev, progress=progress, desc=f"evaluate {split}")
    metrics = classification_metrics(split_data.labels, scores, classes, split)

    active = mlflow.active_run()
    log_params_once(active.info.run_id, {"model_uri": model_uri, "model_id": meta["model_id"],
                                                  "split": split, "data_used": data, "training_run_id": run_id})
    artifact = f"scores_{split}.csv"
    with_retries(mlflow.log_text, scores_to_csv(split_data.paths, split_data.labels, scores, classes),
                          artifact)
    # read the file back from the artifact store and recompute everything from it
    _, y_back, s_back, _ = scores_from_csv(mlflow.artifacts.load_text(f"runs:/{active.info.run_id}/{artifact}"))
    again = classification_metrics(y_back, s_back, classes, split)
    diffs = [abs(metrics[k] - again[k]) for k in metrics if not (np.isnan(metrics[k]) and np.isnan(again[k]))]
    metrics["scores_reload_max_abs_diff"] = float(max(diffs))
    buffer = MetricBuffer(active.info.run_id)
    buffer.add_many(metrics, 0)
    buffer.flush()

    cm = confusion_matrix(split_data.labels, scores.argmax(1), len(classes))
    caption = model_caption(meta)
    n = len(split_data)
    log_figure(plots.confusion_matrix_figure(cm, classes, f"Confusion matrix ({split}, n={n})\n{caption}"),
               f"figures/{split}_confusion_matrix.png")
    log_figure(plots.per_class_bars({c: metrics[f"{split}_ap_{c}"] for c in classes},
                                    f"Per-class average precision ({split})\n{caption}", "average precision", "mAP"),
               f"figures/{split}_per_class_ap.png")
    log_figure(plots.per_class_bars({c: metrics[f"{split}_acc_{c}"] for c in classes},
                                    f"Per-class accuracy ({split})\n{caption}", "accuracy (recall)", "mean class acc"),
               f"figures/{split}_per_class_acc.png")
    log_figure(plots.reliability_diagram(reliability_bins(split_data.labels, scores), metrics[f"{split}_ece"],
                                         f"Calibration ({split}, n={n})\n{caption}"),
               f"figures/{split}_reliability.png")
    # which model produced these numbers, even after the alias moves on
    set_tags(active.info.run_id, {"sceneml.model_id": meta["model_id"], "sceneml.training_run_id": run_id,
                                  "sceneml.model_version": meta["version"] or "none"})
    rename_run(active.info.run_id, f"evaluate {model_label(meta)} {split}")
    if meta["version"] is not None:
        client = MlflowClient()
        name, version = meta["registered_name"], meta["version"]
        for key in (f"{split}_acc", f"{split}_mAP", f"{split}_mean_class_acc", f"{split}_loss"):
            client.set_model_version_tag(name, version, key, f"{metrics[key]:.6f}")
        client.set_model_version_tag(name, version, "sceneml.evaluation_run_id", active.info.run_id)
    return metrics

