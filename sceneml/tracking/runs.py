"""One run's life and what it writes: the lifecycle every task runs in (:func:`task_run`), batched
metric writes, params, tags, JSON, tables and figures, all with retries.

All metrics go through :class:`MetricBuffer` and ``MlflowClient.log_batch`` with an explicit
``model_id`` (or none). Two reasons: one write per N batches instead of one per batch, and
``mlflow.log_metric`` without ``model_id`` silently links metrics to the most recently logged model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from sceneml.errors import SceneMLError
from sceneml.params import param_text
from sceneml.tracking import compat
from sceneml.tracking.store import init_store, with_retries

log = logging.getLogger(__name__)

TAG_ERROR = "sceneml.error"
TAG_TASK = "sceneml.task"  # which task a run is (train, study, select, evaluate, analyze, predict, tune ...)
TAG_DIGEST = "sceneml.data_digest"  # on training runs and their checkpoints: the split manifest's digest
TAG_DATA_SET = "sceneml.data_set_digest"  # on training runs: the images and labels, whatever the split
TAG_CONFIG = "sceneml.config"  # a study child's configuration, <optimizer>-lr<lr>: its repeats share it
TAG_VERDICT = "sceneml.verdict"  # a study's verdict between its best two configurations, one sentence


def task_of(run) -> str:
    """Which task ``run`` is (its ``sceneml.task`` tag); "" for a run sceneml did not open."""
    return run.data.tags.get(TAG_TASK, "")


@contextlib.contextmanager
def task_run(run_name: str | None = None, nested: bool = False, run_id: str | None = None,
             task: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
             keep_running: bool = False, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """The one run lifecycle of every task.

    Sets up the store, then continues ``run_id`` (resume), adopts the run ``mlflow run`` started for
    this process, or starts a new (nested) run named ``run_name``; ``task`` becomes its tag
    ``sceneml.task`` (how the report tells a study's runs apart). ``parent_run_id`` nests a new run
    under a run that is not active here (MLflow nests by the tag ``mlflow.parentRunId``). If the body
    raises, the run ends FAILED with the error in tag ``sceneml.error`` (KILLED for Ctrl-C or an exception that says
    ``marks_run_killed``), never RUNNING; the exception goes on to the caller. ``keep_running``: a body that
    ends normally leaves the run RUNNING, for other processes to add to (a search's parent run).
    ``system_metrics``: MLflow samples CPU, memory, disk, network (and GPU, with nvidia-ml-py installed)
    into ``system/*`` metrics while the run is active, every 10 s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``);
    a resumed run continues their steps.
    """
    system = system_metrics or None  # None: MLflow's own setting (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING)
    init_store()
    launched = launched_by_mlflow_run()
    if run_id:
        existing_run(run_id)
        if launched and launched != run_id:
            # `mlflow run -P resume=X` created a fresh run for this launch; say where the work went
            set_tags(launched, {"sceneml.resumed_into": run_id,
                                "mlflow.note.content": f"This launch resumed run {run_id}."})
        context = mlflow.start_run(run_id=run_id, log_system_metrics=system)
    elif launched and mlflow.active_run() is None:
        context = mlflow.start_run(run_id=launched, log_system_metrics=system)
        _ADOPTED.add(launched)
        if run_name:  # `mlflow run` names its runs at random; say what this one is
            set_tags(launched, {"mlflow.runName": run_name})
    elif parent_run_id:  # a child sits in its parent's experiment, whatever this process's active one is
        context = mlflow.start_run(run_name=run_name, experiment_id=experiment_of(parent_run_id),
                                   tags={"mlflow.parentRunId": parent_run_id}, log_system_metrics=system)
    elif nested and mlflow.active_run() is not None:
        context = mlflow.start_run(run_name=run_name, nested=True,
                                   experiment_id=mlflow.active_run().info.experiment_id, log_system_metrics=system)
    else:
        context = mlflow.start_run(run_name=run_name, nested=nested, log_system_metrics=system)
    with context as run:
        try:
            if task or tags:
                set_tags(run.info.run_id, {**({TAG_TASK: task} if task else {}), **(tags or {})})
            yield run
            if keep_running:
                mlflow.end_run("RUNNING")
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (sceneml.cli.Terminated)
            # ended here, so MLflow's own __exit__ cannot overwrite KILLED with FAILED
            end_run_as(run.info.run_id, "KILLED", f"interrupted ({type(exc).__name__}{f': {exc}' if str(exc) else ''})")
            if run.info.run_id in _ADOPTED:
                compat.keep_status_after_mlflow_run(run.info.run_id, "KILLED")
            raise
        except BaseException as exc:
            killed = getattr(exc, "marks_run_killed", False)
            end_run_as(run.info.run_id, "KILLED" if killed else "FAILED", f"{type(exc).__name__}: {exc}")
            raise


_ADOPTED: set[str] = set()  # runs this process took over from `mlflow run`


def end_run_as(run_id: str, status: str, error: str | None = None) -> None:
    """Terminate ``run_id`` with ``status`` (and the error as a tag), popping it if it is active."""
    with contextlib.suppress(Exception):
        if error:
            set_tags(run_id, {TAG_ERROR: error[:5000]})
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            MlflowClient().set_terminated(run_id, status)


def launched_by_mlflow_run() -> str | None:
    """The run id ``mlflow run`` created for this process, if any, taken out of the environment.

    MLflow's ``start_run`` re-uses ``MLFLOW_RUN_ID`` even for ``nested=True``, so once adopted it must
    go, or the first child run would silently be the parent again.
    """
    return os.environ.pop("MLFLOW_RUN_ID", None)


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default"


def choose_experiment(name: str, entry: str) -> None:
    """Put entry point ``entry``'s runs into experiment ``name``, unless the launch chose one (``mlflow run
    --experiment-name/--experiment-id``, ``MLFLOW_EXPERIMENT_NAME``/``_ID``). Plain ``mlflow run .``
    has already created its run in "Default": that run then points to the experiment and stays empty."""
    if not name or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return
    launched = os.environ.get("MLFLOW_RUN_ID")
    if not launched:
        if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            set_experiment(name)
        return
    init_store()
    if MlflowClient().get_run(launched).info.experiment_id != DEFAULT_EXPERIMENT_ID:
        return  # `mlflow run` was told where to go
    launched_by_mlflow_run()  # not adopted: the task starts its own run in `name`
    set_experiment(name)
    set_tags(launched, {"mlflow.runName": f"{entry} -> experiment {name}",
                        "mlflow.note.content": f"This launch ran `{entry}` in experiment '{name}'."})


def set_experiment(name: str) -> str:
    """Make experiment ``name`` (created if missing) the active one; returns its id.

    MLflow 3.17's ``set_experiment`` returns early without activating the experiment when another
    process creates it between its lookup and its create (two `tune` workers started together): this
    process's runs would then land in "Default". Activating by id afterwards closes that gap.
    """
    experiment = mlflow.set_experiment(name)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def experiment_of(run_id: str) -> str:
    return with_retries(MlflowClient().get_run, run_id).info.experiment_id


def existing_run(run_id: str) -> mlflow.entities.Run:
    """The run ``run_id``, or a one-line error naming the store when there is no such run."""
    try:
        return MlflowClient().get_run(run_id)
    except Exception:
        raise SceneMLError(f"run {run_id!r} does not exist in the tracking store {mlflow.get_tracking_uri()}") from None


class MetricBuffer:
    """Collects metrics (and tags) and writes them in batches (MLflow accepts up to 1000 metrics per call).

    :meth:`flush` writes and waits; :meth:`flush_in_background` hands the batch to one writer thread
    and returns at once, so a slow or busy store never holds up a training step. :meth:`drain` waits
    for the writer and raises what it could not write (call it before the run ends, also on errors
    and signals: nothing queued is lost)."""

    def __init__(self, run_id: str, client: MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.pending: list[Metric] = []
        self.pending_tags: dict[str, str] = {}
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._queued: list[concurrent.futures.Future] = []

    def add(self, key: str, value: float, step: int, model_id: str | None = None) -> None:
        self.pending.append(Metric(key, float(value), int(time.time() * 1000), int(step), model_id=model_id))

    def add_many(self, values: dict[str, float], step: int, model_id: str | None = None) -> None:
        for key, value in values.items():
            self.add(key, value, step, model_id)

    def add_tags(self, tags: dict[str, str]) -> None:
        """Tags to write with the next batch (e.g. a heartbeat, which must not hold up a step either)."""
        self.pending_tags.update(tags)

    def _take(self) -> tuple[list[Metric], dict[str, str]]:
        taken = self.pending, self.pending_tags
        self.pending, self.pending_tags = [], {}
        return taken

    def _write(self, metrics: list[Metric], tags: dict[str, str]) -> None:
        tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, max(len(metrics), 1), 1000):
            with_retries(self.client.log_batch, self.run_id, metrics=metrics[start:start + 1000],
                         tags=tag_list if start == 0 else [])

    def flush(self) -> None:
        """Write what is pending (after what is queued in the background) and wait."""
        self.drain()
        metrics, tags = self._take()
        if not metrics and not tags:
            return
        try:
            self._write(metrics, tags)
        except Exception:
            self.pending, self.pending_tags = metrics + self.pending, {**tags, **self.pending_tags}  # next flush
            raise

    def flush_in_background(self) -> None:
        """Queue what is pending for the writer thread; an earlier background failure is raised here."""
        done = [f for f in self._queued if f.done()]
        self._queued = [f for f in self._queued if not f.done()]
        for future in done:
            future.result()
        if self.pending or self.pending_tags:
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sceneml-metrics")
            self._queued.append(self._writer.submit(self._write, *self._take()))

    def drain(self) -> None:
        """Wait until every queued batch is written; raise the first that could not be."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()


def log_params_once(run_id: str, params: dict[str, object], client: MlflowClient | None = None) -> None:
    """Log params the run does not have yet. ``mlflow run`` already logged the entry-point params
    (as the strings given); logging the same key again with another spelling would be an error."""
    client = client or MlflowClient()
    existing = client.get_run(run_id).data.params
    new = [Param(k, param_text(v)[:6000]) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):
        with_retries(client.log_batch, run_id, params=new[start:start + 100])


def set_tags(run_id: str, tags: dict[str, object], client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    with_retries(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_json(data: object, artifact_file: str) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=False)  # names as written
    with_retries(mlflow.log_text, text, artifact_file)


def log_figure(fig, artifact_file: str) -> None:
    from sceneml.plots import PNG_OPTIONS, close

    try:
        with_retries(mlflow.log_figure, fig, artifact_file, save_kwargs=PNG_OPTIONS)
    finally:
        close(fig)


def rename_run(run_id: str, name: str) -> None:
    """Say what a run did once it is known (e.g. the model version an alias resolved to)."""
    set_tags(run_id, {"mlflow.runName": name})


def delete_run_artifacts(run_id: str, path: str) -> None:
    """Remove ``path`` from the run's artifacts (e.g. the resumable checkpoint of a finished run)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(MlflowClient().get_run(run_id).info.artifact_uri).delete_artifacts(path)
    except Exception as exc:  # e.g. a server without artifact deletion: keep the file, say so
        log.warning("could not delete artifact %s of run %s (%s)", path, run_id, exc)


def log_csv(table: pd.DataFrame | list[dict], artifact_file: str) -> None:
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    with_retries(mlflow.log_text, frame.to_csv(index=False, lineterminator="\n"), artifact_file)
