"""`evaluate`: score a logged model on a split recorded by its training run.

The images come from the training run's split manifest (never a re-split, which could leak training
images into the test set). Every metric derives from the per-image scores file, which is logged beside
them, so anyone can recompute them from it.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
from mlflow import MlflowClient

from sceneml import plots
from sceneml.config import EvaluateConfig
from sceneml.engine.inference import predict_log_probs
from sceneml.metrics import classification_metrics, confusion_matrix, reliability_bins
from sceneml.models import pick_device
from sceneml.scores import scores_to_csv
from sceneml.tracking.models import resolve_model
from sceneml.tracking.runs import MetricBuffer, log_figure, log_params_once, rename_run, set_tags, task_run
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)
HEADLINE = ("acc", "mAP", "mean_class_acc", "loss")  # also tagged on the registered version


def evaluate(cfg: EvaluateConfig, nested: bool = False) -> dict[str, float]:
    """The `evaluate` task: one run; returns the logged metrics."""
    dev = pick_device(cfg.device)  # a bad device fails before any run starts
    with task_run("evaluate", nested=nested, task="evaluate") as run:
        model = resolve_model(cfg.model_uri)
        split = cfg.split
        data = model.load_split(cfg.data, split, progress=not cfg.quiet)
        log_probs = predict_log_probs(model.load_network(dev), data.pixels, dev, progress=not cfg.quiet,
                                      desc=f"evaluate {split}", tta=cfg.tta)
        scores, log_p = np.exp(log_probs), log_probs[np.arange(len(data)), data.labels]
        classes = model.meta["classes"]
        metrics = classification_metrics(data.labels, scores, classes, split, log_p)
        run_id = run.info.run_id
        log_params_once(run_id, {"model_uri": cfg.model_uri, "model_id": model.model_id, "split": split, "tta": cfg.tta,
                                 "data_used": cfg.data or model.meta["data"],
                                 "training_run_id": model.training_run_id})
        with_retries(mlflow.log_text, scores_to_csv(data.paths, data.labels, scores, classes, log_p),
                     f"scores_{split}.csv")
        buffer = MetricBuffer(run_id)
        buffer.add_many(metrics, 0)
        buffer.flush()

        caption = model.caption()
        cm = confusion_matrix(data.labels, scores.argmax(1), len(classes))
        for path, fig in plots.class_figures(split, metrics, cm, classes, caption).items():
            log_figure(fig, path)
        log_figure(plots.reliability_diagram(reliability_bins(data.labels, scores), metrics[f"{split}_ece"],
                                             f"Calibration ({split}, n={len(data)})\n{caption}"),
                   f"figures/{split}_reliability.png")
        set_tags(run_id, model.tags())
        rename_run(run_id, f"evaluate {model.label} {split}")
        if model.version is not None:
            client, name = MlflowClient(), model.registered_name
            tags = {**{f"{split}_{k}": f"{metrics[f'{split}_{k}']:.6f}" for k in HEADLINE},
                    "sceneml.evaluation_run_id": run_id}
            for key, value in tags.items():
                with_retries(client.set_model_version_tag, name, model.version, key, value)
    return metrics
