"""`main`: the whole study as one MLflow run tree.

parent run
 |- <optimizer>-lr<lr>   one nested training run per optimizer x learning rate (x repeat: -r<r>), in an
 |                       order Optuna's grid sampler draws; any number of workers share the grid
 |                       (study_name, storage: :mod:`sceneml.tasks.search`, the driver of `tune` too)
 |- select               registers the best epoch checkpoint of the best configuration, alias `champion`
 |- evaluate             the champion on the test split of its own training run
 |- analyze              galleries, activation statistics and eigen-spectra of the champion
and, last, the write-up of it all on the parent: report/report.html and report/report.md.
A failed child is reported and the study goes on; it fails only if every child fails. The study's
``select_metric`` decides each child's best epoch and the champion alike. With ``repeats`` > 1 every
configuration is trained that many times with paired seeds; the parent then holds the comparison of the
configurations over their repeats (mean, Student-t interval) and the verdict between the best two
(:mod:`sceneml.comparison`), and the champion is the best epoch of the configuration with the best mean.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time

import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient

from sceneml import plots
from sceneml.comparison import summarize, verdict
from sceneml.config import LOWER_IS_BETTER, STUDY_ANALYSIS, Child, StudyConfig
from sceneml.tasks.search import (
    ERROR_ATTR,
    RUN_ATTR,
    GridSampler,
    Plan,
    Search,
    counted_trials,
    crown_champion,
    describe_storage,
    drive,
    try_log_report,
)
from sceneml.tracking.runs import (
    TAG_CONFIG,
    TAG_VERDICT,
    MetricBuffer,
    choose_experiment,
    log_figure,
    set_tags,
)
from sceneml.tracking.store import init_store, with_retries

log = logging.getLogger(__name__)


def study(cfg: StudyConfig) -> dict:
    """The `main` task: train every child, then select, evaluate and analyze the champion."""
    init_store()
    choose_experiment(cfg.experiment, "main")
    children = cfg.children()
    by_cell = {(c.config, c.repeat): c for c in children}
    configs = list(dict.fromkeys(c.config for c in children))
    base = cfg.train
    metric = base.select_metric
    grid = {"config": configs, "repeat": list(range(cfg.repeats))}
    # trial n trains cell n of the grid, shuffled alike in every worker (seeded): each cell once
    sampler = GridSampler(grid, seed=base.seed)
    search = Search(
        name=cfg.name(), task="study", run_name=f"study {base.arch} {base.data}", n_trials=len(children),
        metric=metric, storage=cfg.storage, shared=cfg.shared,
        sampler_for=lambda n: sampler,
        pruner=optuna.pruners.NopPruner(),
        params={"optimizers": cfg.optimizers, "lrs": cfg.lrs, "repeats": cfg.repeats, "model_name": cfg.model_name,
                "experiment": cfg.experiment, **{k: getattr(cfg.analyze, k) for k in STUDY_ANALYSIS},
                **({"study_name": cfg.name(), "storage": describe_storage(cfg.storage)} if cfg.shared else {}),
                **{k: v for k, v in base.as_params().items() if k not in ("optimizer", "lr")}},
        note="The training runs of this study nest here, then select, evaluate and analyze of its champion.")

    def plan(trial: optuna.Trial) -> Plan:
        cell = (trial.suggest_categorical("config", configs), trial.suggest_categorical("repeat", grid["repeat"]))
        child = by_cell[cell]
        return Plan(child.name, child.train, {TAG_CONFIG: child.config})

    def finish(optuna_study: optuna.Study, parent_id: str) -> dict:
        return _finish_study(cfg, children, optuna_study, parent_id)

    summary = drive(search, plan, finish)
    if "champion_run_id" in summary:
        if summary["report"]:
            print(f"report: {summary['report']}", flush=True)
        print(f"champion: {summary['champion_run_id']} epoch {summary['champion_epoch']} -> {cfg.model_name} "
              f"v{summary['version']}; test_acc={summary['test_acc']:.4f} test_mAP={summary['test_mAP']:.4f}",
              flush=True)
    return summary


def _finish_study(cfg: StudyConfig, children: list[Child], optuna_study: optuna.Study, parent_id: str) -> dict:
    """Inside the parent, once every child has ended (in whichever worker): the verdict, the champion,
    the tables, the figures and the report."""
    set_tags(parent_id, {"sceneml.machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, "
                                            f"Python {platform.python_version()}"})
    ended = {t.user_attrs.get("run_name"): t for t in counted_trials(optuna_study, len(children))}
    trained = {name: t.user_attrs[RUN_ATTR] for name, t in ended.items() if RUN_ATTR in t.user_attrs}
    failures = {name: t.user_attrs.get(ERROR_ATTR, "interrupted") for name, t in ended.items() if name not in trained}
    for name, why in failures.items():
        log.error("child %s failed: %s", name, why)
    set_tags(parent_id, {"sceneml.failed_children": ",".join(failures) or "none"})
    runs = {c.name: trained[c.name] for c in children if c.name in trained}  # in grid order
    metric = cfg.train.select_metric
    best_config = _log_verdict(parent_id, [c for c in children if c.name in runs], runs, metric, cfg)
    # with one run per configuration the best epoch of all is crowned, as the best configuration's is
    summary = crown_champion(parent_id, cfg.train, cfg.analyze, cfg.model_name,
                             config=best_config if cfg.repeats > 1 else None)
    # with repeats, comparison.* compares the configurations (above) and children.* lists the runs
    _log_comparison(parent_id, runs, failures, summary["champion_run_id"], summary, metric,
                    "comparison" if cfg.repeats == 1 else "children")
    summary["study_seconds"] = time.time() - mlflow.get_run(parent_id).info.start_time / 1000
    buffer = MetricBuffer(parent_id)
    buffer.add_many({k: summary[k] for k in ("study_seconds", "test_acc", "test_mAP", "test_mean_class_acc")}, 0)
    buffer.flush()
    summary["report"] = try_log_report(parent_id)
    return summary


def _log_verdict(parent_id: str, runs: list[Child], children: dict[str, str], metric: str, cfg: StudyConfig) -> str:
    """The verdict between the best two configurations (tag, and metrics when there are pairs to compare)
    and, with repeats, the comparison of the configurations over them, logged on the parent; returns the
    configuration with the best mean value of ``metric`` (at each run's best epoch)."""
    client = MlflowClient()
    by_repeat: dict[str, dict[int, float]] = {}
    for child in runs:
        value = client.get_run(children[child.name]).data.metrics[f"{metric}_best"]
        by_repeat.setdefault(child.config, {})[child.repeat] = value
    higher = metric not in LOWER_IS_BETTER
    rows = summarize({c: [v for _, v in sorted(r.items())] for c, r in by_repeat.items()}, higher)
    if cfg.repeats > 1:
        _log_frame(parent_id, pd.DataFrame([dataclasses.asdict(r) for r in rows]), "comparison")
    found = verdict(by_repeat, higher, seed=cfg.train.seed, repeats=cfg.repeats)
    if found is not None:
        set_tags(parent_id, {TAG_VERDICT: found.sentence})
        if found.pairs > 1:
            buffer = MetricBuffer(parent_id)
            buffer.add_many({"verdict_p_better": found.p_better, "verdict_p_better_ci_low": found.ci_low,
                             "verdict_p_better_ci_high": found.ci_high}, 0)
            buffer.flush()
        print(f"verdict: {found.sentence}", flush=True)
    return rows[0].config


def _log_frame(run_id: str, table: pd.DataFrame, name: str) -> None:
    """``table`` as ``<name>.json`` (an MLflow table, shown in the UI) and ``<name>.csv``."""
    with_retries(mlflow.log_table, table, f"{name}.json", run_id=run_id)
    with_retries(mlflow.log_text, table.to_csv(index=False), f"{name}.csv", run_id=run_id)


def _log_comparison(parent_id: str, children: dict[str, str], failures: dict[str, str], champion_run_id: str,
                    test_metrics: dict[str, float], select_metric: str, table_name: str = "comparison") -> None:
    client = MlflowClient()
    rows, curves, losses = [], {}, {}
    for name, run_id in children.items():
        run = client.get_run(run_id)
        m, p = run.data.metrics, run.data.params
        champion = run_id == champion_run_id
        rows.append({"run": name, "run_id": run_id, "optimizer": p.get("optimizer"), "lr": p.get("lr"),
                     "best_epoch": int(m["best_epoch"]), "val_mean_class_acc_best": m["val_mean_class_acc_best"],
                     "val_mAP_best": m["val_mAP_best"], "val_loss_best": m.get("val_loss_best"),
                     "champion": champion,
                     "test_acc": test_metrics["test_acc"] if champion else None,
                     "test_mAP": test_metrics["test_mAP"] if champion else None,
                     "test_mean_class_acc": test_metrics["test_mean_class_acc"] if champion else None})
        curves[name] = [(h.step, h.value) for h in client.get_metric_history(run_id, select_metric)]
        train_loss = {h.step: h.value for h in client.get_metric_history(run_id, "train_loss")}
        losses[name] = [(h.step, train_loss.get(h.step, float("nan")), h.value)
                        for h in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda h: h.step)]
    for name, why in failures.items():
        rows.append({"run": name, "run_id": None, "optimizer": name.split("-lr")[0], "failed": why})
    _log_frame(parent_id, pd.DataFrame(rows), table_name)
    study_name = mlflow.get_run(parent_id).info.run_name
    log_figure(plots.compare_runs(curves, select_metric, f"{select_metric} per epoch: {study_name}"),
               f"figures/compare_{select_metric}.png")
    log_figure(plots.compare_losses(losses, f"Train and val loss per epoch: {study_name}"), "figures/compare_loss.png")
