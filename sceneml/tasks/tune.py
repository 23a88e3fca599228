"""`tune`: an Optuna search over `train` parameters, pruned per epoch, shared by any number of workers.

parent run  "tune <study name>"       created once, by the worker that creates the Optuna study
 |- trial-<n>                         one ordinary training run per trial (tag sceneml.trial=<n>)
 |- select / evaluate / analyze       once, by the worker that ends the last trial
Workers find each other through the Optuna storage (a journal file beside the MLflow store, or an
SQLAlchemy URL such as a team's PostgreSQL): the study's user attribute ``mlflow_parent_run_id``
names the parent run, Optuna's unique trial numbers decide who runs what, and creating a marker
study (which the storage lets only one worker do) elects the one that finishes the search.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from sceneml.config import LOWER_IS_BETTER, TuneConfig
from sceneml.errors import SceneMLError
from sceneml.space import Dimension, load_space
from sceneml.tasks.study import crown_champion, try_log_report
from sceneml.tasks.train import train
from sceneml.tracking.runs import (
    choose_experiment,
    launched_by_mlflow_run,
    log_csv,
    log_figure,
    log_params_once,
    set_tags,
    task_run,
)
from sceneml.tracking.store import init_store, schema_race, with_retries, without_password

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"
TAG_TRIAL, TAG_PRUNED = "sceneml.trial", "sceneml.pruned"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def tune(cfg: TuneConfig) -> dict:
    """The `tune` task: run trials until the search has ``n_trials``; the worker that ends the last one
    selects, evaluates, analyzes and reports the champion. Returns this worker's summary."""
    cfg.validate()
    space = load_space(cfg.space)  # a bad space file fails before any run or study exists
    init_store()
    choose_experiment(cfg.experiment, "tune")
    pointer = launched_by_mlflow_run()  # `mlflow run`'s own run: each worker's launch points to the search
    storage = open_storage(cfg.storage)
    study, parent_id = open_search(cfg, storage, space)
    if pointer:
        set_tags(pointer, {"mlflow.runName": f"tune worker -> {cfg.name()}",
                           "mlflow.note.content": f"This launch ran trials of search {cfg.name()} (run {parent_id})."})
    print(f"search {cfg.name()}: parent run {parent_id}, storage {describe_storage(cfg.storage)}", flush=True)
    ran = []
    while True:
        trial = next_trial(study, cfg.n_trials, cfg.train.seed)
        if trial is None:
            break
        ran.append(run_trial(study, trial, cfg, space, parent_id))
    summary = {"trials_run_here": len(ran), "parent_run_id": parent_id}
    if finish_search_if_last(study, storage, cfg, parent_id, summary):
        print(f"champion: {summary['champion_run_id']} epoch {summary['champion_epoch']} -> {cfg.model_name} "
              f"v{summary['version']}", flush=True)
    return summary


# --------------------------------------------------------------------------------------- storage

def open_storage(text: str) -> optuna.storages.BaseStorage:
    """An SQLAlchemy URL (``postgresql://...``, ``sqlite:///...``) or a journal file path; by default
    ``optuna.journal`` beside a local MLflow store (``mlflow.db`` or ``mlruns``), else in the cwd."""
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

def open_search(cfg: TuneConfig, storage, space: list[Dimension]) -> tuple[optuna.Study, str]:
    """Create the Optuna study and the parent run, or join both when another worker made them."""
    metric = cfg.train.select_metric
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    kwargs = dict(study_name=cfg.name(), storage=storage, sampler=optuna.samplers.TPESampler(seed=cfg.train.seed),
                  pruner=make_pruner(cfg.pruner, cfg.train.epochs))
    try:
        study = optuna.create_study(direction=direction, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        if study.direction.name.lower() != direction:
            raise SceneMLError(f"search {cfg.name()} exists with direction {study.direction.name.lower()}; "
                               f"select_metric={metric} wants {direction}: use another study_name") from None
        return study, wait_for_parent(study)
    # this worker created the search: it creates the parent run, then tells the others where it is
    with task_run(f"tune {cfg.name()}", task="tune", tags={"sceneml.search": cfg.name()}, keep_running=True) as run:
        parent_id = run.info.run_id
        log_params_once(parent_id, {"n_trials": cfg.n_trials, "space": cfg.space or "default",
                                    "pruner": cfg.pruner, "storage": describe_storage(cfg.storage),
                                    "study_name": cfg.name(), "model_name": cfg.model_name,
                                    "experiment": cfg.experiment, "n_images": cfg.analyze.n_images,
                                    "compare": cfg.analyze.compare,
                                    # the fixed values only: what the space samples is each trial's param
                                    **{k: v for k, v in cfg.train.as_params().items()
                                       if k not in {d.name for d in space}}})
        set_tags(parent_id, {"mlflow.note.content": "Trials of this search nest here; the worker that ends the last "
                                                    "trial selects, evaluates and analyzes the champion."})
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


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose epoch is worse than the median of earlier trials at that epoch,
    once 2 trials have finished (Optuna's default waits for 5, too many for a small search)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


def next_trial(study: optuna.Study, n_trials: int, seed: int) -> optuna.Trial | None:
    """A new trial while the search has fewer than ``n_trials`` (over all workers), else None.

    Trial numbers are unique across workers; a worker that loses the race for the last slot gets a
    number >= n_trials, marks that trial FAIL ("over budget") and stops.
    """
    if len(study.get_trials(deepcopy=False)) >= n_trials:
        return None
    trial = study.ask()
    if trial.number >= n_trials:
        trial.set_user_attr("sceneml_skipped", "over budget: another worker took the last trial")
        study.tell(trial, state=TrialState.FAIL)
        return None
    # each trial draws from a sampler seeded by its number, not by which worker asked: a seeded search
    # samples the same first trials with one worker or many
    study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number)
    return trial


def suggest(trial: optuna.Trial, space: list[Dimension]) -> dict:
    values: dict = {}
    for dim in space:
        if not dim.active(values):
            continue
        if dim.choices is not None:
            values[dim.name] = trial.suggest_categorical(dim.name, dim.choices)
        elif dim.is_int:
            values[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
        else:
            values[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
    return values


def run_trial(study: optuna.Study, trial: optuna.Trial, cfg: TuneConfig, space: list[Dimension],
              parent_id: str) -> str | None:
    """One trial = one training run under the parent. Pruned: the run ends FINISHED with tag
    ``sceneml.pruned=true`` and all it logged. Crashed: FAILED in MLflow and in Optuna; the search goes on."""
    metric = cfg.train.select_metric
    pruned = [False]

    def on_epoch(epoch: int, row: dict) -> bool:
        trial.report(row[metric], epoch)
        pruned[0] = trial.should_prune()
        return pruned[0]

    name = f"trial-{trial.number}"
    print(f"== {name}", flush=True)
    try:
        values = suggest(trial, space)
        trial_cfg = dataclasses.replace(cfg.train, **values).validate()
        run_id = train(trial_cfg, run_name=name, on_epoch=on_epoch, parent_run_id=parent_id,
                       tags={TAG_TRIAL: trial.number, TAG_PRUNED: "false", "sceneml.search": cfg.name()})
    except KeyboardInterrupt:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # one failed trial must not end the search
        log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("mlflow_run_id", run_id)
    if pruned[0]:
        set_tags(run_id, {TAG_PRUNED: "true"})
        study.tell(trial, state=TrialState.PRUNED)
        print(f"{name}: pruned", flush=True)
    else:
        study.tell(trial, MlflowClient().get_run(run_id).data.metrics[f"{metric}_best"])
    return run_id


# ------------------------------------------------------------------------------- the search ends

def finish_search_if_last(study: optuna.Study, storage, cfg: TuneConfig, parent_id: str, summary: dict) -> bool:
    """When every trial of the budget has ended, one worker (the one that creates the marker study)
    registers, evaluates, analyzes and reports the champion under the parent and ends it."""
    counted = [t for t in study.get_trials(deepcopy=False) if t.number < cfg.n_trials]
    running = [t.number for t in counted if t.state not in FINISHED_STATES]
    if len(counted) < cfg.n_trials or running:
        print(f"search {cfg.name()}: trial(s) {running} still running in other workers; the worker that ends the "
              "last one selects the champion", flush=True)
        return False
    try:
        optuna.create_study(study_name=f"{cfg.name()}.finished.{cfg.n_trials}", storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        return False  # another worker is finishing it
    if not any(t.state == TrialState.COMPLETE or t.state == TrialState.PRUNED for t in counted):
        MlflowClient().set_terminated(parent_id, "FAILED")
        raise SceneMLError(f"every trial of search {cfg.name()} failed")
    with task_run(run_id=parent_id):
        summary.update(crown_champion(parent_id, cfg.train, cfg.analyze, cfg.model_name))
        log_search(study, cfg)
        summary["report"] = try_log_report(parent_id)
    return True


def log_search(study: optuna.Study, cfg: TuneConfig) -> None:
    """The trials table and Optuna's optimisation-history and parameter-importance figures."""
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    table = table[table["number"] < cfg.n_trials]
    log_csv(table, "tune/trials.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        from optuna.visualization import matplotlib as optuna_plots

        metric = cfg.train.select_metric
        figures = {"tune/optimization_history.png": lambda: optuna_plots.plot_optimization_history(
                       study, target_name=f"{metric} (best epoch)"),
                   "tune/param_importances.png": lambda: optuna_plots.plot_param_importances(study)}
        for path, draw in figures.items():
            try:
                ax = draw()
            except (ValueError, RuntimeError) as exc:  # e.g. fewer than 2 complete trials
                log.warning("no %s: %s", path, exc)
                continue
            ax.figure.set_size_inches(9, 4.5)
            ax.set_title(f"{ax.get_title()}: search {cfg.name()}")
            ax.figure.tight_layout()
            log_figure(ax.figure, path)

