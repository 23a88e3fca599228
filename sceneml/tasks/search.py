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
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from sceneml.config import LOWER_IS_BETTER, AnalyzeConfig, EvaluateConfig, SelectConfig, TrainConfig
from sceneml.data.sources import listing_digest
from sceneml.errors import SceneMLError
from sceneml.tasks.analyze import analyze
from sceneml.tasks.evaluate import evaluate
from sceneml.tasks.report import log_report
from sceneml.tasks.select import select
from sceneml.tasks.train import train
from sceneml.tracking.lease import BEAT_EVERY_S, STALE_AFTER_S, TAG_HEARTBEAT, beat_holder, heartbeat
from sceneml.tracking.runs import end_run_as, launched_by_mlflow_run, log_params_once, set_tags, task_run
from sceneml.tracking.store import schema_race, with_retries, without_password

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR, ERROR_ATTR, SKIPPED_ATTR = "mlflow_run_id", "error", "sceneml_skipped"
WORKER_ATTR = "sceneml_worker"  # the heartbeat of the worker that took a trial, written when it takes it
RETRY_OF = "sceneml_retry_of"  # a trial that trains again the cell of a trial whose worker died
CONTRACT_ATTR = "sceneml_contract"  # the parameters the first worker fixed
TAG_PRUNED, TAG_TRIAL = "sceneml.pruned", "sceneml.trial"
DEAD_WORKER = "the worker stopped answering"
# what may differ between the workers of one search: where and how each one runs
MACHINE_PARAMS = ("device", "num_workers", "compile", "precision", "experiment", "storage", "dist_timeout")
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
    if search.shared:
        end_dead_launches(search.task, search.name, parent_id, own=pointer)
    if pointer:
        set_tags(pointer, {**heartbeat(), "mlflow.runName": f"{search.task} worker -> {search.name}",
                           "mlflow.note.content": f"This launch ran trials of {search.name} (run {parent_id})."})
    if search.shared:
        print(f"search {search.name}: parent run {parent_id}, storage {describe_storage(search.storage)}",
              flush=True)
    ran = 0
    try:
        while (trial := next_trial(study, search)) is not None or (search.shared and reclaim(study, search)):
            if trial is None:
                continue  # a dead worker's cell went back to the grid: ask again
            run_trial(study, trial, search, plan(trial), parent_id)
            ran += 1
            if pointer:
                set_tags(pointer, heartbeat())
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
        check_contract(search, wait_for(study, CONTRACT_ATTR))
        return study, wait_for(study, PARENT_ATTR)
    # this worker created the search: it creates the parent run, then tells the others where it is
    with task_run(search.run_name, task=search.task, tags={"sceneml.search": search.name}, keep_running=True) as run:
        parent_id = run.info.run_id
        log_params_once(parent_id, search.params)
        set_tags(parent_id, {"mlflow.note.content": search.note})
        study.set_user_attr(CONTRACT_ATTR, contract(search))
        study.set_user_attr(PARENT_ATTR, parent_id)  # the run stays RUNNING for every worker's trials
    return study, parent_id


def wait_for(study: optuna.Study, attr: str, timeout: float = 120.0):
    """A user attribute the creating worker writes right after creating the study (the contract, then the
    parent run id)."""
    deadline = time.monotonic() + timeout
    while attr not in study.user_attrs:
        if time.monotonic() > deadline:
            raise SceneMLError(f"search {study.study_name} has no {attr} after {timeout:.0f} s: its creator "
                               "died early; start again with another study_name")
        time.sleep(0.5)
    return study.user_attrs[attr]


def contract(search: Search) -> dict[str, str]:
    """What every worker of a search must be given alike: the grid or space and the training parameters as
    the parent logs them (``MACHINE_PARAMS`` may differ), and the data's files (``data_files``: their
    digest, so the same path holding other images is another data set)."""
    fixed = {k: str(v) for k, v in search.params.items() if k not in MACHINE_PARAMS}
    return {**fixed, "data_files": listing_digest(str(search.params["data"]))} if "data" in search.params else fixed


def check_contract(search: Search, fixed: dict[str, str]) -> None:
    """Refuse, in one line naming the first difference, a worker started with other parameters than
    the worker that created the search."""
    mine = contract(search)
    for key in dict.fromkeys([*fixed, *mine]):
        if fixed.get(key) != mine.get(key):
            raise SceneMLError(f"search {search.name} was started with other parameters ({key}: "
                               f"{mine.get(key, 'not given')} != {fixed.get(key, 'not given')}); start this worker "
                               "with the same command, or give another study_name")


def next_trial(study: optuna.Study, search: Search) -> optuna.Trial | None:
    """A new trial while the search has fewer than ``n_trials`` (over all workers), else None.

    Trial numbers are unique across workers; a worker that loses the race for the last slot gets a
    number >= n_trials, marks that trial FAIL ("over budget") and stops.
    """
    trials = study.get_trials(deepcopy=False)
    if len([t for t in trials if t.number < search.n_trials]) >= search.n_trials and \
            not any(t.state == TrialState.WAITING for t in trials):
        return None
    trial = study.ask()  # a cell put back for retraining (WAITING) first
    trial.set_user_attr(WORKER_ATTR, heartbeat()[TAG_HEARTBEAT])
    if trial.number >= search.n_trials and RETRY_OF not in trial.user_attrs:
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
    try:
        trial.set_user_attr("run_name", plan.name)
    except optuna.exceptions.UpdateFinishedTrialError:  # taken for dead already (its worker seemed silent)
        log.warning("%s: trial %d was given to another worker; skipped here", plan.name, trial.number)
        return None
    try:
        run_id = train(plan.train, run_name=plan.name, on_epoch=on_epoch, parent_run_id=parent_id,
                       tags={TAG_PRUNED: "false", TAG_TRIAL: str(trial.number), **plan.tags})
    except KeyboardInterrupt:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # one failed trial must not end the search
        log.error("%s failed: %s: %s", plan.name, type(exc).__name__, exc)
        trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        return None
    if _frozen(study, trial.number).state.is_finished():  # taken for dead meanwhile: not counted
        log.warning("%s: trial %d was given to another worker after this one stopped answering; this run is "
                    "kept but not counted", plan.name, trial.number)
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
    """One trial per slot of the budget, by slot: trial n < n_trials, or the newest retry of its cell when
    its worker died (a lost race for the last slot makes one more trial, never run, never counted)."""
    latest: dict[int, optuna.trial.FrozenTrial] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        slot = t.user_attrs.get(RETRY_OF, t.number)
        if slot < n_trials:
            latest[slot] = t
    return [latest[slot] for slot in sorted(latest)]


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


# ------------------------------------------------------------------------------------- dead workers

def _trial_run(study: optuna.Study, number: int):
    """The training run of trial ``number`` (tag ``sceneml.trial``), or None before it opened."""
    parent_id = study.user_attrs[PARENT_ATTR]
    runs = MlflowClient().search_runs(
        [mlflow.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{TAG_TRIAL}` = '{number}'")
    return runs[0] if runs else None


def _holder(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[str | None, bool]:
    """Who trains a RUNNING trial (None: nobody, its worker is gone), from the newest heartbeat: the training
    run's, or the worker's own from when it took the trial (before the run opened); and whether that worker
    may be dead: on another host and silent for two beats (on this host its process says)."""
    run = _trial_run(study, trial.number)
    beat = (run.data.tags.get(TAG_HEARTBEAT) if run else None) or trial.user_attrs.get(WORKER_ATTR)
    if beat is None and trial.datetime_start is not None:  # taken a moment ago: its worker has yet to say who
        age = time.time() - trial.datetime_start.timestamp()
        return ("a worker that has just taken it", False) if age < STALE_AFTER_S else (None, True)
    # the worker holds the trial, not its run: between the end of the run (FINISHED) and the worker's tell the
    # trial is still RUNNING, and only a worker that is gone leaves it so
    holder = beat_holder(beat)
    if holder is None:
        return None, True
    host, _, written = beat.rsplit(" ", 2)
    return holder, host != socket.gethostname() and time.time() - float(written) > 2 * BEAT_EVERY_S


def _put_back(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> bool:
    """Fail a dead worker's trial and its run, and queue its cell again; False when another worker did."""
    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):  # another worker failed it first and
        return False  # queues the cell
    run = _trial_run(study, trial.number)
    if run is not None and run.info.status == "RUNNING":
        end_run_as(run.info.run_id, "FAILED", f"{DEAD_WORKER}: {why}")
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.user_attrs.get(RETRY_OF, trial.number),
                                                  "run_name": trial.user_attrs.get("run_name", "")})
    print(f"search {study.study_name}: trial {trial.number} ({trial.user_attrs.get('run_name', '')}) lost its "
          f"worker ({why}); its cell goes back to the grid", flush=True)
    return True


def reclaim(study: optuna.Study, search: Search, grace: float = STALE_AFTER_S) -> bool:
    """When no cell is free: put back the cells of RUNNING trials whose worker is gone (a process of this
    host that no longer exists, a heartbeat from another host older than ``STALE_AFTER_S``), waiting up to
    ``grace`` seconds for a silent one to beat again or go stale. True when a cell went back to the grid."""
    deadline = time.monotonic() + grace
    while True:
        running = [t for t in counted_trials(study, search.n_trials) if t.state == TrialState.RUNNING]
        holders = {t.number: _holder(study, t) for t in running}
        dead = [t for t in running if holders[t.number][0] is None]
        if dead:
            return any([_put_back(study, t, "no heartbeat from its process") for t in dead])
        silent = [n for n, (_, maybe_dead) in holders.items() if maybe_dead]
        if not silent or time.monotonic() > deadline:
            if running:
                print(f"search {search.name}: trial(s) {[t.number for t in running]} are trained by live workers "
                      f"({'; '.join(h for h, _ in holders.values())}); the worker that ends the last one finishes "
                      "the search", flush=True)
            return False
        time.sleep(min(BEAT_EVERY_S, max(1.0, deadline - time.monotonic())))


def end_dead_launches(task: str, name: str, parent_id: str, own: str | None) -> None:
    """The launch runs (``<task> worker -> <name>``) of this search's workers that died: KILLED, not RUNNING.
    Any worker ends them, however it was started; they are looked for in the experiment of the search's
    parent run and in that of this worker's own launch run ``own``, if any."""
    client = MlflowClient()
    experiments = sorted({client.get_run(run_id).info.experiment_id for run_id in (parent_id, own) if run_id})
    runs = client.search_runs(experiments, filter_string=f"attributes.status = 'RUNNING' and "
                                                         f"tags.mlflow.runName = '{task} worker -> {name}'")
    for run in runs:
        beat = run.data.tags.get(TAG_HEARTBEAT)
        if run.info.run_id != own and beat and beat_holder(beat) is None:
            end_run_as(run.info.run_id, "KILLED", f"{DEAD_WORKER}: its launch ended without closing this run")


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
