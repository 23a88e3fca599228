"""`main`: the whole study as one MLflow run tree.

parent run
 |- <optimizer>-lr<lr>   one nested training run per optimizer x learning rate (x repeat: -r<r>)
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
import pandas as pd
from mlflow import MlflowClient

from sceneml import plots
from sceneml.comparison import summarize, verdict
from sceneml.config import (
    LOWER_IS_BETTER,
    AnalyzeConfig,
    Child,
    EvaluateConfig,
    SelectConfig,
    StudyConfig,
    TrainConfig,
)
from sceneml.errors import SceneMLError
from sceneml.tasks.analyze import analyze
from sceneml.tasks.evaluate import evaluate
from sceneml.tasks.report import log_report
from sceneml.tasks.select import select
from sceneml.tasks.train import train
from sceneml.tracking.runs import (
    TAG_CONFIG,
    TAG_VERDICT,
    MetricBuffer,
    choose_experiment,
    log_figure,
    log_params_once,
    set_tags,
    task_run,
)
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)


def study(cfg: StudyConfig) -> dict:
    """The `main` task: train every child, then select, evaluate and analyze the champion."""
    cfg.validate()  # every child's params are checked before the first one trains
    choose_experiment(cfg.experiment, "main")
    runs = cfg.children()
    base = cfg.train
    with task_run(f"study {base.arch} {base.data}", task="study") as parent:
        parent_id = parent.info.run_id
        log_params_once(parent_id, {"optimizers": cfg.optimizers, "lrs": cfg.lrs, "repeats": cfg.repeats,
                                    "model_name": cfg.model_name,
                                    "experiment": cfg.experiment, "n_images": cfg.analyze.n_images,
                                    "compare": cfg.analyze.compare,
                                    **{k: v for k, v in base.as_params().items() if k not in ("optimizer", "lr")}})
        set_tags(parent_id, {"sceneml.machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, "
                                                f"Python {platform.python_version()}"})
        started = time.perf_counter()
        children, failures = {}, {}
        for child in runs:
            print(f"== training {child.name}", flush=True)
            try:
                children[child.name] = train(child.train, run_name=child.name, nested=True,
                                             tags={TAG_CONFIG: child.config})
            except Exception as exc:  # one failed child must not kill the study
                failures[child.name] = f"{type(exc).__name__}: {exc}"
                log.error("child %s failed: %s", child.name, failures[child.name])
        if not children:
            raise SceneMLError(f"every child run failed: {failures}")
        set_tags(parent_id, {"sceneml.failed_children": ",".join(failures) or "none"})

        best_config = _log_verdict(parent_id, [c for c in runs if c.name in children], children,
                                   base.select_metric, cfg)
        # with one run per configuration the best epoch of all is crowned, as the best configuration's is
        summary = crown_champion(parent_id, base, cfg.analyze, cfg.model_name,
                                 config=best_config if cfg.repeats > 1 else None)
        # with repeats, comparison.* compares the configurations (above) and children.* lists the runs
        _log_comparison(parent_id, children, failures, summary["champion_run_id"], summary, base.select_metric,
                        "comparison" if cfg.repeats == 1 else "children")
        summary["study_seconds"] = time.perf_counter() - started
        buffer = MetricBuffer(parent_id)
        buffer.add_many({k: summary[k] for k in ("study_seconds", "test_acc", "test_mAP", "test_mean_class_acc")}, 0)
        buffer.flush()
        summary["report"] = try_log_report(parent_id)
    if summary["report"]:
        print(f"report: {summary['report']}", flush=True)
    print(f"champion: {summary['champion_run_id']} epoch {summary['champion_epoch']} -> {cfg.model_name} "
          f"v{summary['version']}; test_acc={summary['test_acc']:.4f} test_mAP={summary['test_mAP']:.4f}",
          flush=True)
    return summary


def crown_champion(parent_id: str, train_cfg: TrainConfig, analyze_cfg: AnalyzeConfig, model_name: str,
                   config: str | None = None) -> dict:
    """How `main` and `tune` both end, inside their active parent run: register the best epoch of the
    parent's children (of configuration ``config`` only, when given) as ``<model_name>@champion`` (by
    ``train_cfg.select_metric``), evaluate it on the
    test split and analyze it, as nested runs. Evaluate and analyze read the *version* select
    registered, not the alias: another study with the same model name may move the alias meanwhile.
    Returns the champion's run, epoch and version and the test metrics."""
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
    found = verdict(by_repeat, higher, seed=cfg.train.seed, rerun_hint=f"repeats={max(5, cfg.repeats)}")
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


def try_log_report(parent_id: str) -> str | None:
    """The report of the study, logged to it; a failure is a warning, since the write-up must not cost
    the study and `mlflow run . -e report` rebuilds it. Returns the HTML's URI, or None."""
    try:
        return log_report(parent_id)["html"]
    except Exception as exc:
        log.warning("the study report failed (%s: %s); rebuild it with: mlflow run . -e report -P study_run_id=%s",
                    type(exc).__name__, exc, parent_id)
        return None


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
