"""`main`: the whole study as one MLflow run tree.

parent run
 |- <optimizer>-lr<lr>   one nested training run per optimizer x learning rate
 |- select               registers the best epoch checkpoint, alias `champion`
 |- evaluate             the champion on the test split of its own training run
 |- analyze              galleries, activation statistics and eigen-spectra of the champion
A failed child is reported and the study goes on; it fails only if every child fails.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import mlflow
import pandas as pd
from mlflow import MlflowClient

from sceneml import plots, tracking
from sceneml.analyze import AnalyzeConfig, analyze_model
from sceneml.config import TrainConfig
from sceneml.errors import SceneMLError
from sceneml.evaluation import evaluate_model
from sceneml.registry import select_champion
from sceneml.train import run_train

log = logging.getLogger(__name__)


def parse_list(text: str, kind=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SceneMLError(f"empty list: {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise SceneMLError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def run_study(base: TrainConfig, optimizers: list[str], lrs: list[float], model_name: str = "sceneml",
              select_metric: str = "val_mean_class_acc", analyze: AnalyzeConfig | None = None) -> dict:
    configs = [dataclasses.replace(base, optimizer=o, lr=lr) for o in optimizers for lr in lrs]
    for cfg in configs:
        cfg.validate()  # every child's params are checked before the first one trains
    analyze = dataclasses.replace(analyze or AnalyzeConfig(), model_uri=f"models:/{model_name}@champion",
                                  data=base.data, split="test", device=base.device).validate()
    tracking.init_store()
    launched = tracking.launched_by_mlflow_run()
    parent_ctx = mlflow.start_run(run_id=launched) if launched else mlflow.start_run(run_name="study")
    with parent_ctx as parent:
        parent_id = parent.info.run_id
        with tracking.failure_marks_run(parent_id):
            return _study_in_run(parent_id, configs, model_name, select_metric, analyze)


def _study_in_run(parent_id: str, configs: list[TrainConfig], model_name: str, select_metric: str,
                  analyze: AnalyzeConfig) -> dict:
    tracking.log_params_once(parent_id, {"optimizers": ",".join(c.optimizer for c in configs),
                                         "lrs": ",".join(f"{c.lr:g}" for c in configs),
                                         "model_name": model_name, "select_metric": select_metric,
                                         **{k: v for k, v in configs[0].as_params().items()
                                            if k not in ("optimizer", "lr")}})
    started = time.perf_counter()
    children, failures = {}, {}
    for cfg in configs:
        name = f"{cfg.optimizer}-lr{cfg.lr:g}"
        print(f"== training {name}", flush=True)
        try:
            children[name] = run_train(cfg, run_name=name, nested=True)
        except Exception as exc:  # one failed child must not kill the study
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.error("child %s failed: %s", name, failures[name])
    if not children:
        raise SceneMLError(f"every child run failed: {failures}")
    tracking.set_tags(parent_id, {"sceneml.failed_children": ",".join(failures) or "none"})

    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    with mlflow.start_run(run_name="select", nested=True) as sel, tracking.failure_marks_run(sel.info.run_id):
        version, best = select_champion([experiment_id], select_metric, model_name, "champion", parent_id)
        tracking.log_params_once(sel.info.run_id, {"select_metric": select_metric, "model_name": model_name})
        buffer = tracking.MetricBuffer(sel.info.run_id)
        buffer.add_many({f"champion_{select_metric}": best.value, "champion_epoch": best.epoch,
                         "champion_version": int(version.version)}, 0)
        buffer.flush()
    uri = f"models:/{model_name}@champion"
    with mlflow.start_run(run_name="evaluate", nested=True) as ev, tracking.failure_marks_run(ev.info.run_id):
        test_metrics = evaluate_model(uri, configs[0].data, "test", configs[0].device, not configs[0].quiet)
    with mlflow.start_run(run_name="analyze", nested=True) as an, tracking.failure_marks_run(an.info.run_id):
        analyze_model(analyze, not configs[0].quiet)

    _log_comparison(parent_id, children, failures, best, test_metrics, select_metric)
    summary = {"champion_run_id": best.run_id, "champion_epoch": best.epoch, "version": version.version,
               "study_seconds": time.perf_counter() - started, **test_metrics}
    buffer = tracking.MetricBuffer(parent_id)
    buffer.add_many({"study_seconds": summary["study_seconds"], "test_acc": test_metrics["test_acc"],
                     "test_mAP": test_metrics["test_mAP"],
                     "test_mean_class_acc": test_metrics["test_mean_class_acc"]}, 0)
    buffer.flush()
    print(f"champion: {best.run_id} epoch {best.epoch} ({select_metric}={best.value:.4f}) -> "
          f"{model_name} v{version.version}; test_acc={test_metrics['test_acc']:.4f} "
          f"test_mAP={test_metrics['test_mAP']:.4f}", flush=True)
    return summary


def _log_comparison(parent_id, children, failures, best, test_metrics, select_metric) -> None:
    client = MlflowClient()
    rows, curves = [], {}
    for name, run_id in children.items():
        run = client.get_run(run_id)
        m, p = run.data.metrics, run.data.params
        champion = run_id == best.run_id
        rows.append({"run": name, "run_id": run_id, "optimizer": p.get("optimizer"), "lr": p.get("lr"),
                     "best_epoch": int(m["best_epoch"]), "best_val_mean_class_acc": m["best_val_mean_class_acc"],
                     "best_val_mAP": m["best_val_mAP"], "best_val_loss": m.get("best_val_loss"),
                     "champion": champion,
                     "test_acc": test_metrics["test_acc"] if champion else None,
                     "test_mAP": test_metrics["test_mAP"] if champion else None,
                     "test_mean_class_acc": test_metrics["test_mean_class_acc"] if champion else None})
        curves[name] = [(h.step, h.value) for h in client.get_metric_history(run_id, select_metric)]
    for name, why in failures.items():
        rows.append({"run": name, "run_id": None, "optimizer": name.split("-lr")[0], "failed": why})
    table = pd.DataFrame(rows)
    # the children have ended, so the parent is the active run again
    tracking.with_retries(mlflow.log_table, table, "comparison.json", run_id=parent_id)
    tracking.with_retries(mlflow.log_text, table.to_csv(index=False), "comparison.csv", run_id=parent_id)
    tracking.log_figure(plots.compare_runs(curves, select_metric), f"figures/compare_{select_metric}.png")
