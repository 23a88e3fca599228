"""The search driver of `main` and `tune`: the trials of one Optuna study, each one training run under
one MLflow parent run, shared by any number of workers.

parent run                          created once, by the worker that creates the Optuna study
 |- one training run per trial       main: a cell of its grid (configuration x repeat); tune: a sampled point
 |- select / evaluate / analyze      once, by the worker that ends the last trial, then the report
Workers find each other through the Optuna storage (a journal file beside the MLflow store, or an
SQLAlchemy URL such as a team's PostgreSQL): the study's user attribute ``mlflow_parent_run_id``
names the parent run, Optuna's unique trial numbers decide who runs what, and creating a marker
study (which the storage lets only one worker do) elects the one that finishes the search. A search
that is not shared lives in memory, in this one process, and its parent may be the run `mlflow run`
started for it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from sceneml.config import LOWER_IS_BETTER, AnalyzeConfig, EvaluateConfig, SelectConfig, TrainConfig
from sceneml.errors import SceneMLError
from sceneml.tasks.analyze import analyze
from sceneml.tasks.evaluate import evaluate
from sceneml.tasks.report import log_report
from sceneml.tasks.select import select
from sceneml.tasks.train import train
from sceneml.tracking.runs import launched_by_mlflow_run, log_params_once, set_tags, task_run
from sceneml.tracking.store import schema_race, with_retries, without_password

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR, ERROR_ATTR, SKIPPED_ATTR = "mlflow_run_id", "error", "sceneml_skipped"
TAG_PRUNED = "sceneml.pruned"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class Search:
    """One search as its driver sees it; `main` and `tune` each describe theirs."""

    name: str  # the Optuna study's name, shared by the workers
    task: str  # the parent's tag sceneml.task: "study" or "tune"
    run_name: str  # the parent run's name
    n_trials: int
    metric: str  # each trial's value: its run's best epoch of this metric
    storage: str  # an SQLAlchemy URL, a journal file, or "" (beside the MLflow store)
    shared: bool  # False: in memory, this process alone
    sampler_for: Callable[[int], optuna.samplers.BaseSampler]  # what samples trial n (and a new study: n=0)
    pruner: optuna.pruners.BasePruner
    params: dict  # the parent's params
    note: str  # the parent's description in the MLflow UI

    @property
    def direction(self) -> str:
        return "minimize" if self.metric in LOWER_IS_BETTER else "maximize"


@dataclass(frozen=True)
class Plan:
    """What one trial trains: a run name, the config and the run's own tags."""

    name: str
    train: TrainConfig
    tags: dict


def drive(search: Search, plan: Callable[[optuna.Trial], Plan],
          finish: Callable[[optuna.Study, str], dict]) -> dict:
    """Run trials until the search has ``n_trials`` over all its workers; the worker that ends the last
    one calls ``finish(study, parent_run_id)`` inside the parent run, which then ends. Returns this
    worker's summary (with ``finish``'s when this worker finished the search)."""
    # `mlflow run` started a run for this launch: a search of one process makes it its parent; a shared
    # one has a parent of its own, and each worker's launch points to it
    pointer = launched_by_mlflow_run() if search.shared else None
    storage = open_storage(search.storage if search.shared else None)
    study, parent_id = open_search(search, storage)
    if pointer:
        set_tags(pointer, {"mlflow.runName": f"{search.task} worker -> {search.name}",
                           "mlflow.note.content": f"This launch ran trials of {search.name} (run {parent_id})."})
    if search.shared:
        print(f"search {search.name}: parent run {parent_id}, storage {describe_storage(search.storage)}",
              flush=True)
    ran = 0
    try:
        while (trial := next_trial(study, search)) is not None:
            run_trial(study, trial, search, plan(trial), parent_id)
            ran += 1
    except BaseException:
        if not search.shared:  # nobody else will end this parent: it ends FAILED (or KILLED) here
            with task_run(run_id=parent_id):
                raise
        raise
    summary = {"trials_run_here": ran, "parent_run_id": parent_id}
    finish_if_last(study, storage, search, parent_id, finish, summary)
    return summary


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, which gives trial n (n < the grid's size) cell n of its seeded shuffle of
    the grid, for ask-and-tell: its own ``after_trial`` stops ``study.optimize`` once the grid is
    exhausted and raises outside it; here the driver stops at ``n_trials``, the grid's size."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


# --------------------------------------------------------------------------------------- storage

def open_storage(text: str | None) -> optuna.storages.BaseStorage:
    """None: in memory. Else an SQLAlchemy URL (``postgresql://...``, ``sqlite:///...``) or a journal
    file path; "" is ``optuna.journal`` beside a local MLflow store (``mlflow.db`` or ``mlruns``), else in
    the cwd."""
    if text is None:
        return optuna.storages.InMemoryStorage()
    if "://" in text:
        return with_retries(optuna.storages.RDBStorage, text, transient=schema_race, attempts=5)
    path = Path(text).expanduser() if text else default_journal()
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def default_journal() -> Path:
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "optuna.journal"
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://")).parent / "optuna.journal"
    log.warning("MLflow store %s is remote: the Optuna journal is ./optuna.journal, on this machine only; "
                "workers on other machines need storage=<SQLAlchemy URL>", uri)
    return Path("optuna.journal").resolve()


def describe_storage(text: str) -> str:
    """The storage for logs and params, without a password."""
    if "://" not in text:
        return str(Path(text).expanduser().resolve()) if text else str(default_journal())
    return without_password(text)


# ---------------------------------------------------------------------------------- the search

def open_search(search: Search, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, str]:
    """Create the Optuna study and the parent run, or join both when another worker made them."""
    kwargs = dict(study_name=search.name, storage=storage, sampler=search.sampler_for(0), pruner=search.pruner)
    try:
        study = optuna.create_study(direction=search.direction, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        if study.direction.name.lower() != search.direction:
            raise SceneMLError(f"search {search.name} exists with direction {study.direction.name.lower()}; "
                               f"select_metric={search.metric} wants {search.direction}: use another study_name") \
                from None
        return study, wait_for_parent(study)
    # this worker created the search: it creates the parent run, then tells the others where it is
    with task_run(search.run_name, task=search.task, tags={"sceneml.search": search.name}, keep_running=True) as run:
        parent_id = run.info.run_id
        log_params_once(parent_id, search.params)
        set_tags(parent_id, {"mlflow.note.content": search.note})
        study.set_user_attr(PARENT_ATTR, parent_id)  # the run stays RUNNING for every worker's trials
    return study, parent_id


def wait_for_parent(study: optuna.Study, timeout: float = 120.0) -> str:
    """The parent run id the creating worker writes right after creating the study."""
    deadline = time.monotonic() + timeout
    while PARENT_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise SceneMLError(f"search {study.study_name} has no parent run after {timeout:.0f} s: its creator "
                               "died early; start again with another study_name")
        time.sleep(0.5)
    return study.user_attrs[PARENT_ATTR]


def next_trial(study: optuna.Study, search: Search) -> optuna.Trial | None:
    """A new trial while the search has fewer than ``n_trials`` (over all workers), else None.

    Trial numbers are unique across workers; a worker that loses the race for the last slot gets a
    number >= n_trials, marks that trial FAIL ("over budget") and stops.
    """
    if len(study.get_trials(deepcopy=False)) >= search.n_trials:
        return None
    trial = study.ask()
    if trial.number >= search.n_trials:
        trial.set_user_attr(SKIPPED_ATTR, "over budget: another worker took the last trial")
        study.tell(trial, state=TrialState.FAIL)
        return None
    # a trial's values come from a sampler chosen by its number, not by which worker asked: a seeded
    # search samples the same trials with one worker or many
    study.sampler = search.sampler_for(trial.number)
    return trial


def run_trial(study: optuna.Study, trial: optuna.Trial, search: Search, plan: Plan, parent_id: str) -> str | None:
    """One trial = one training run under the parent, its epochs reported to the pruner. Pruned: the run
    ends FINISHED with tag ``sceneml.pruned=true`` and all it logged. Crashed: FAILED in MLflow and in
    Optuna, the error in the trial's user attribute ``error``; the search goes on."""
    pruned = [False]

    def on_epoch(epoch: int, row: dict) -> bool:
        trial.report(row[search.metric], epoch)
        pruned[0] = trial.should_prune()
        return pruned[0]

    print(f"== {plan.name}", flush=True)
    trial.set_user_attr("run_name", plan.name)
    try:
        run_id = train(plan.train, run_name=plan.name, on_epoch=on_epoch, parent_run_id=parent_id,
                       tags={TAG_PRUNED: "false", **plan.tags})
    except KeyboardInterrupt:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # one failed trial must not end the search
        log.error("%s failed: %s: %s", plan.name, type(exc).__name__, exc)
        trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr(RUN_ATTR, run_id)
    if pruned[0]:
        set_tags(run_id, {TAG_PRUNED: "true"})
        study.tell(trial, state=TrialState.PRUNED)
        print(f"{plan.name}: pruned", flush=True)
    else:
        study.tell(trial, MlflowClient().get_run(run_id).data.metrics[f"{search.metric}_best"])
    return run_id


def counted_trials(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """The trials of the budget, by number (a lost race for the last slot makes one more, never run)."""
    return sorted((t for t in study.get_trials(deepcopy=False) if t.number < n_trials), key=lambda t: t.number)


# ------------------------------------------------------------------------------- the search ends

def finish_if_last(study: optuna.Study, storage, search: Search, parent_id: str,
                   finish: Callable[[optuna.Study, str], dict], summary: dict) -> bool:
    """When every trial of the budget has ended, one worker (the one that creates the marker study)
    calls ``finish`` inside the parent run, which then ends."""
    counted = counted_trials(study, search.n_trials)
    running = [t.number for t in counted if t.state not in FINISHED_STATES]
    if len(counted) < search.n_trials or running:
        print(f"search {search.name}: trial(s) {running} still running in other workers; the worker that ends "
              "the last one selects the champion", flush=True)
        return False
    try:
        optuna.create_study(study_name=f"{search.name}.finished.{search.n_trials}", storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        return False  # another worker is finishing it
    with task_run(run_id=parent_id):
        if not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted):
            errors = {t.user_attrs.get("run_name", t.number): t.user_attrs.get(ERROR_ATTR, "interrupted")
                      for t in counted}
            raise SceneMLError(f"every trial of {search.name} failed: {errors}")
        summary.update(finish(study, parent_id))
    return True


def crown_champion(parent_id: str, train_cfg: TrainConfig, analyze_cfg: AnalyzeConfig, model_name: str,
                   config: str | None = None) -> dict:
    """How every search ends, inside its active parent run: register the best epoch of the parent's
    children (of configuration ``config`` only, when given) as ``<model_name>@champion`` (by
    ``train_cfg.select_metric``), evaluate it on the test split and analyze it, as nested runs.
    Evaluate and analyze read the *version* select registered, not the alias: another study with the
    same model name may move the alias meanwhile. Returns the champion's run, epoch and version and
    the test metrics."""
    experiment = mlflow.get_experiment(mlflow.get_run(parent_id).info.experiment_id).name
    chosen = select(SelectConfig(experiment, parent_id, train_cfg.select_metric, model_name), nested=True,
                    config=config)
    uri = f"models:/{model_name}/{chosen['champion_version']}"
    test_metrics = evaluate(EvaluateConfig(uri, train_cfg.data, "test", train_cfg.device, train_cfg.quiet),
                            nested=True)
    analyze(dataclasses.replace(analyze_cfg, model_uri=uri, data=train_cfg.data, split="test",
                                device=train_cfg.device, quiet=train_cfg.quiet), nested=True)
    return {"champion_run_id": chosen["champion_run_id"], "champion_epoch": chosen["champion_epoch"],
            "version": chosen["champion_version"], **test_metrics}


def try_log_report(parent_id: str) -> str | None:
    """The report of the search, logged to it; a failure is a warning, since the write-up must not cost
    the study and `mlflow run . -e report` rebuilds it. Returns the HTML's URI, or None."""
    try:
        return log_report(parent_id)["html"]
    except Exception as exc:
        log.warning("the study report failed (%s: %s); rebuild it with: mlflow run . -e report -P study_run_id=%s",
                    type(exc).__name__, exc, parent_id)
        return None
