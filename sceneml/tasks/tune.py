"""`tune`: an Optuna search over `train` parameters, pruned per epoch, shared by any number of workers.

parent run  "tune <study name>"       created once, by the worker that creates the Optuna study
 |- trial-<n>                         one ordinary training run per trial (tag sceneml.trial=<n>)
 |- select / evaluate / analyze       once, by the worker that ends the last trial
The workers share the search through :mod:`sceneml.tasks.search`, the driver `main` runs its grid with.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import optuna

from sceneml import plots
from sceneml.config import STUDY_ANALYSIS, TuneConfig
from sceneml.space import Dimension, load_space
from sceneml.tasks.search import Plan, Search, crown_champion, describe_storage, drive, try_log_report
from sceneml.tracking.runs import choose_experiment, log_csv, log_figure
from sceneml.tracking.store import init_store

log = logging.getLogger(__name__)
TAG_TRIAL = "sceneml.trial"


def tune(cfg: TuneConfig) -> dict:
    """The `tune` task: run trials until the search has ``n_trials``; the worker that ends the last one
    selects, evaluates, analyzes and reports the champion. Returns this worker's summary."""
    space = load_space(cfg.space)  # a bad space file fails before any run or study exists
    init_store()
    choose_experiment(cfg.experiment, "tune")
    metric = cfg.train.select_metric
    search = Search(
        name=cfg.name(), task="tune", run_name=f"tune {cfg.name()}", n_trials=cfg.n_trials, metric=metric,
        storage=cfg.storage, shared=True,
        # each trial draws from a sampler seeded by its number: the same first trials with one worker or many
        sampler_for=lambda n: optuna.samplers.TPESampler(seed=cfg.train.seed + n),
        pruner=make_pruner(cfg.pruner, cfg.train.epochs),
        params={"n_trials": cfg.n_trials, "space": cfg.space or "default", "pruner": cfg.pruner,
                "storage": describe_storage(cfg.storage), "study_name": cfg.name(), "model_name": cfg.model_name,
                "experiment": cfg.experiment, **{k: getattr(cfg.analyze, k) for k in STUDY_ANALYSIS},
                # the fixed values only: what the space samples is each trial's param
                **{k: v for k, v in cfg.train.as_params().items() if k not in {d.name for d in space}}},
        note="Trials of this search nest here; the worker that ends the last trial selects, evaluates and "
             "analyzes the champion.")

    def plan(trial: optuna.Trial) -> Plan:
        train_cfg = dataclasses.replace(cfg.train, **suggest(trial, space))
        return Plan(f"trial-{trial.number}", train_cfg, {TAG_TRIAL: trial.number, "sceneml.search": cfg.name()})

    def finish(study: optuna.Study, parent_id: str) -> dict:
        summary = crown_champion(parent_id, cfg.train, cfg.analyze, cfg.model_name)
        log_search(study, cfg)
        summary["report"] = try_log_report(parent_id)
        print(f"champion: {summary['champion_run_id']} epoch {summary['champion_epoch']} -> {cfg.model_name} "
              f"v{summary['version']}", flush=True)
        return summary

    return drive(search, plan, finish)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose epoch is worse than the median of earlier trials at that epoch,
    once 2 trials have finished (Optuna's default waits for 5, too many for a small search)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


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
            plots.tight(ax.figure)
            log_figure(ax.figure, path)

