"""`select`: register the best epoch checkpoint across a study's runs and move the `champion` alias.

The best *checkpoint*, not the last: each run logs one LoggedModel per epoch, and we compare the
epochs' val metrics with :func:`sceneml.metrics.best_index`, the rule each run used for its own best
epoch. (Registering ``runs:/<id>/model`` would take the run's last LoggedModel.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sceneml.config import SelectConfig
from sceneml.errors import SceneMLError
from sceneml.metrics import best_index
from sceneml.tracking.models import TAG_DIGEST, epoch_checkpoints
from sceneml.tracking.runs import TAG_DATA_SET, MetricBuffer, experiment_of, log_params_once, set_tags, task_run
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    run_id: str
    epoch: int
    model_id: str
    value: float
    val_loss: float
    digest: str
    data_set: str  # the data set's digest (tag sceneml.data_set_digest), "" for a run logged without one
    data: str  # the data param, to name the data set in an error
    n_classes: str


def candidates(experiment_ids: list[str], metric: str, parent_run_id: str | None = None,
               config: str | None = None) -> list[Candidate]:
    """Every (run, epoch) checkpoint of the finished training runs (of one study's configuration
    ``config``, tag ``sceneml.config``, when given), with its ``metric`` value."""
    client = MlflowClient()
    filt = "attributes.status = 'FINISHED'"
    if parent_run_id:
        filt += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    if config:
        filt += f" and tags.`sceneml.config` = '{config}'"
    runs = [r for r in client.search_runs(experiment_ids, filt, max_results=5000)
            if TAG_DIGEST in r.data.tags and "best_epoch" in r.data.metrics]
    models = epoch_checkpoints(experiment_ids)
    out = []
    # oldest run first, epochs in order: a full tie goes to the earlier checkpoint, as inside a run
    for run in sorted(runs, key=lambda r: r.info.start_time):
        losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
        for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step):
            model_id = models.get((run.info.run_id, m.step))
            if model_id:
                out.append(Candidate(run.info.run_id, m.step, model_id, m.value, losses.get(m.step, float("nan")),
                                     run.data.tags[TAG_DIGEST], run.data.tags.get(TAG_DATA_SET, ""),
                                     run.data.params.get("data", "?"), run.data.params.get("num_classes", "?")))
    return out


def one_data_set(cands: list[Candidate]) -> None:
    """Val scores of different data sets do not rank: refuse, naming two of them."""
    first = {}
    for c in cands:
        first.setdefault(c.data_set or f"data={c.data}", c)
    if len(first) > 1:
        a, b = list(first.values())[:2]
        raise SceneMLError(
            f"the runs to rank were trained on {len(first)} different data sets, e.g. data={a.data} "
            f"({a.n_classes} classes, data set {a.data_set or 'unrecorded'}, run {a.run_id}) and data={b.data} "
            f"({b.n_classes} classes, data set {b.data_set or 'unrecorded'}, run {b.run_id}); select within one "
            "data set: one experiment per data set, or parent_run_id of one study")


def best_candidate(cands: list[Candidate], metric: str) -> Candidate:
    return cands[best_index([c.value for c in cands], [c.val_loss for c in cands], metric)]


def select_champion(experiment_ids: list[str], metric: str = "val_mean_class_acc", model_name: str = "sceneml",
                    alias: str = "champion", parent_run_id: str | None = None, config: str | None = None):
    """Register the best checkpoint as a version of ``model_name`` and point ``alias`` at it.

    Idempotent: when that checkpoint is already registered, its version is reused.
    """
    cands = candidates(experiment_ids, metric, parent_run_id, config)
    if not cands:
        raise SceneMLError(f"no finished training run with {metric} checkpoints found"
                           + (f" under parent run {parent_run_id}" if parent_run_id else ""))
    one_data_set(cands)
    best = best_candidate(cands, metric)
    client = MlflowClient()
    try:
        with_retries(client.create_registered_model, model_name)
    except MlflowException:
        pass  # exists
    existing = _versions_of(client, model_name, best.model_id)
    if existing:
        version = existing[0]
    else:
        # register this exact checkpoint (models:/<model_id>), not runs:/<id>/model (the last one)
        version = with_retries(
            mlflow.register_model, f"models:/{best.model_id}", model_name,
            tags={"sceneml.model_id": best.model_id, "sceneml.run_id": best.run_id, "sceneml.epoch": best.epoch,
                  "sceneml.select_metric": metric, f"sceneml.{metric}": best.value,
                  "sceneml.data_digest": best.digest})
        # selects running at once may each have registered it: all keep the oldest version, each
        # deletes its own newer one (version numbers follow commit order, so the oldest is visible)
        oldest = _versions_of(client, model_name, best.model_id)[0]
        if oldest.version != version.version:
            with_retries(client.delete_model_version, model_name, version.version)
            version = oldest
    try:
        current = with_retries(client.get_model_version_by_alias, model_name, alias)
    except MlflowException:
        current = None
    if current is None or current.version != version.version:
        if current is not None:
            with_retries(client.set_registered_model_alias, model_name, "previous", current.version)
            set_tags(current.run_id, {"sceneml.champion": "false"})
        with_retries(client.set_registered_model_alias, model_name, alias, version.version)
    set_tags(best.run_id, {"sceneml.champion": "true"})
    log.info("%s@%s = version %s (run %s, epoch %d, %s=%.4f)", model_name, alias, version.version,
             best.run_id, best.epoch, metric, best.value)
    return version, best


def _versions_of(client: MlflowClient, model_name: str, model_id: str) -> list:
    """The versions of ``model_name`` that register the checkpoint ``model_id``, oldest first."""
    return sorted((v for v in client.search_model_versions(f"name = '{model_name}'")
                   if v.tags.get("sceneml.model_id") == model_id), key=lambda v: int(v.version))


def select(cfg: SelectConfig, nested: bool = False, config: str | None = None) -> dict[str, float]:
    """The `select` task: one run that registers the champion; returns its metrics, the champion's
    run id and its version (the version, not the alias, is what the study evaluates: the alias may
    move under it)."""
    metric = cfg.select_metric
    with task_run("select", nested=nested, task="select") as run:
        if cfg.experiment:
            exp = mlflow.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise SceneMLError(f"experiment {cfg.experiment!r} does not exist")
            ids = [exp.experiment_id]
        else:  # the study's own experiment, else this launch's
            ids = [experiment_of(cfg.parent_run_id) if cfg.parent_run_id else run.info.experiment_id]
        version, best = select_champion(ids, metric, cfg.model_name, cfg.alias, cfg.parent_run_id or None, config)
        log_params_once(run.info.run_id, {"select_metric": metric, "model_name": cfg.model_name, "alias": cfg.alias})
        set_tags(run.info.run_id, {"sceneml.champion_run_id": best.run_id, "sceneml.model_id": best.model_id})
        out = {f"champion_{metric}": best.value, "champion_epoch": best.epoch, "champion_version": int(version.version)}
        buffer = MetricBuffer(run.info.run_id)
        buffer.add_many(out, 0)
        buffer.flush()
    print(f"{cfg.model_name}@{cfg.alias} -> version {version.version} (run {best.run_id}, epoch {best.epoch}, "
          f"{metric}={best.value:.4f})", flush=True)
    return {**out, "champion_run_id": best.run_id}
