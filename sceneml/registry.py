"""`select`: register the best epoch checkpoint across a study's runs and move the `champion` alias.

The best *checkpoint*, not the last: each run logs one LoggedModel per epoch, and we compare the
epochs' val metrics. (Registering ``runs:/<id>/model`` would take the run's last LoggedModel.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sceneml import tracking
from sceneml.errors import SceneMLError
from sceneml.metrics import SELECT_METRICS, is_better

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    run_id: str
    epoch: int
    model_id: str
    value: float
    digest: str


def candidates(experiment_ids: list[str], metric: str, parent_run_id: str | None = None) -> list[Candidate]:
    """Every (run, epoch) checkpoint of the finished training runs, with its ``metric`` value."""
    client = MlflowClient()
    filt = "attributes.status = 'FINISHED'"
    if parent_run_id:
        filt += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = [r for r in client.search_runs(experiment_ids, filt, max_results=5000)
            if tracking.TAG_DIGEST in r.data.tags and "best_epoch" in r.data.metrics]
    models = {}
    for lm in mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list"):
        if tracking.TAG_EPOCH in lm.tags:
            models[(lm.source_run_id, int(lm.tags[tracking.TAG_EPOCH]))] = lm.model_id
    out = []
    for run in runs:
        for m in client.get_metric_history(run.info.run_id, metric):
            model_id = models.get((run.info.run_id, m.step))
            if model_id:
                out.append(Candidate(run.info.run_id, m.step, model_id, m.value, run.data.tags[tracking.TAG_DIGEST]))
    return out


def best_candidate(cands: list[Candidate], metric: str) -> Candidate:
    best = None
    for c in cands:
        if best is None or is_better(c.value, best.value, metric):
            best = c
    return best


def select_champion(experiment_ids: list[str], metric: str = "val_mean_class_acc", model_name: str = "sceneml",
                    alias: str = "champion", parent_run_id: str | None = None):
    """Register the best checkpoint as a version of ``model_name`` and point ``alias`` at it.

    Idempotent: when that checkpoint is already registered, its version is reused.
    """
    if metric not in SELECT_METRICS:
        raise SceneMLError(f"unknown select_metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
    cands = candidates(experiment_ids, metric, parent_run_id)
    if not cands:
        raise SceneMLError(f"no finished training run with {metric} checkpoints found"
                           + (f" under parent run {parent_run_id}" if parent_run_id else ""))
    best = best_candidate(cands, metric)
    client = MlflowClient()
    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # exists
    existing = [v for v in client.search_model_versions(f"name = '{model_name}'")
                if v.tags.get("sceneml.model_id") == best.model_id]
    if existing:
        version = existing[0]
    else:
        # register this exact checkpoint (models:/<model_id>), not runs:/<id>/model (the last one)
        version = tracking.with_retries(
            mlflow.register_model, f"models:/{best.model_id}", model_name,
            tags={"sceneml.model_id": best.model_id, "sceneml.run_id": best.run_id, "sceneml.epoch": best.epoch,
                  "sceneml.select_metric": metric, f"sceneml.{metric}": best.value,
                  "sceneml.data_digest": best.digest})
    try:
        current = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        current = None
    if current is None or current.version != version.version:
        if current is not None:
            client.set_registered_model_alias(model_name, "previous", current.version)
            tracking.set_tags(current.run_id, {"sceneml.champion": "false"})
        client.set_registered_model_alias(model_name, alias, version.version)
    tracking.set_tags(best.run_id, {"sceneml.champion": "true"})
    log.info("%s@%s = version %s (run %s, epoch %d, %s=%.4f)", model_name, alias, version.version,
             best.run_id, best.epoch, metric, best.value)
    return version, best
