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
from mlflow.exceptions import MlflowException

from sceneml import plots, tracking
from sceneml.data import load_split_from_manifest
from sceneml.errors import SceneMLError
from sceneml.metrics import classification_metrics, confusion_matrix
from sceneml.models import pick_device
from sceneml.scores import scores_from_csv, scores_to_csv
from sceneml.training import predict_scores

log = logging.getLogger(__name__)


def model_metadata(model_uri: str) -> dict:
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        raise SceneMLError(f"model_uri {model_uri!r} does not resolve: {str(exc).splitlines()[0]}") from None
    meta = (info.metadata or {}).get("sceneml")
    if not meta:
        raise SceneMLError(f"{model_uri} was not logged by sceneml (no sceneml metadata)")
    return {**meta, "model_id": info.model_id}


def registered_version(model_uri: str):
    """The ModelVersion behind ``models:/name@alias`` or ``models:/name/version``, else None."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
    except MlflowException:
        return None
    return None


def evaluate_model(model_uri: str, data: str = "", split: str = "test", device: str = "auto",
                   progress: bool = True) -> dict[str, float]:
    """Evaluate inside the active MLflow run; returns the logged metrics."""
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
    tracking.log_params_once(active.info.run_id, {"model_uri": model_uri, "model_id": meta["model_id"],
                                                  "split": split, "data_used": data, "training_run_id": run_id})
    artifact = f"scores_{split}.csv"
    tracking.with_retries(mlflow.log_text, scores_to_csv(split_data.paths, split_data.labels, scores, classes),
                          artifact)
    # read the file back from the artifact store and recompute everything from it
    _, y_back, s_back, _ = scores_from_csv(mlflow.artifacts.load_text(f"runs:/{active.info.run_id}/{artifact}"))
    again = classification_metrics(y_back, s_back, classes, split)
    diffs = [abs(metrics[k] - again[k]) for k in metrics if not (np.isnan(metrics[k]) and np.isnan(again[k]))]
    metrics["scores_reload_max_abs_diff"] = float(max(diffs))
    buffer = tracking.MetricBuffer(active.info.run_id)
    buffer.add_many(metrics, 0)
    buffer.flush()

    cm = confusion_matrix(split_data.labels, scores.argmax(1), len(classes))
    tracking.log_figure(plots.confusion_matrix_figure(cm, classes, f"Confusion matrix ({split}, n={len(split_data)})"),
                        f"figures/{split}_confusion_matrix.png")
    tracking.log_figure(plots.per_class_bars({c: metrics[f"{split}_ap_{c}"] for c in classes},
                                             f"Per-class average precision ({split})", "average precision", "mAP"),
                        f"figures/{split}_per_class_ap.png")
    tracking.log_figure(plots.per_class_bars({c: metrics[f"{split}_acc_{c}"] for c in classes},
                                             f"Per-class accuracy ({split})", "accuracy (recall)", "mean class acc"),
                        f"figures/{split}_per_class_acc.png")
    version = registered_version(model_uri)
    if version is not None:
        client = MlflowClient()
        for key in (f"{split}_acc", f"{split}_mAP", f"{split}_mean_class_acc", f"{split}_loss"):
            client.set_model_version_tag(version.name, version.version, key, f"{metrics[key]:.6f}")
        client.set_model_version_tag(version.name, version.version, "sceneml.evaluation_run_id", active.info.run_id)
    tracking.set_tags(active.info.run_id, {"sceneml.model_id": meta["model_id"]})
    return metrics

