"""One training run = one MLflow run: data, model, epochs, metrics, checkpoints, figures.

The loop itself lives in :mod:`sceneml.training`; this module decides what is logged and when.
Per epoch: metrics (val ones linked to that epoch's LoggedModel), the val scores file, history.csv
and a resumable checkpoint, so a crash loses at most the epoch in progress.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient

from sceneml import distributed, plots, tracking
from sceneml.config import TrainConfig
from sceneml.data import PreparedData, prepare_data
from sceneml.data.sources import cache_dir
from sceneml.errors import SceneMLError
from sceneml.metrics import classification_metrics, confusion_matrix, is_better
from sceneml.models import build_model, freeze_backbone, pick_device
from sceneml.scores import scores_from_csv, scores_to_csv
from sceneml.training import (
    EpochTrainer,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)
BEST_METRIC = "val_mean_class_acc"  # what "best epoch" means inside one run
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"


class StopAfterEpoch(Exception):
    """Raised by ``stop_after_epoch`` to simulate an interruption after a finished epoch."""

    marks_run_killed = True


def local_checkpoint_path(run_id: str) -> Path:
    """Where the resumable checkpoint is written before it is logged; the file name is the
    artifact's name (CHECKPOINT_ARTIFACT), one folder per run."""
    return cache_dir() / "checkpoints" / run_id / Path(CHECKPOINT_ARTIFACT).name


def _history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    keys = list(history[0])
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def _start_run(cfg: TrainConfig, run_name: str | None, nested: bool):
    """Continue ``resume``, adopt the run ``mlflow run`` created, or start a new (nested) run."""
    tracking.init_store()
    launched = tracking.launched_by_mlflow_run()
    if cfg.resume:
        tracking.raise_if_missing_run(cfg.resume)
        if launched and launched != cfg.resume:
            # `mlflow run -P resume=X` created a fresh run for this launch; say where the work went
            tracking.set_tags(launched, {"sceneml.resumed_into": cfg.resume,
                                         "mlflow.note.content": f"This launch resumed run {cfg.resume}."})
        return mlflow.start_run(run_id=cfg.resume)
    if launched and mlflow.active_run() is None:
        return mlflow.start_run(run_id=launched)
    return mlflow.start_run(run_name=run_name, nested=nested)


def _log_data(run_id: str, cfg: TrainConfig, data: PreparedData, weights_resolved: str, world_size: int) -> None:
    params = cfg.as_params()
    params.update(world_size=world_size,
        num_classes=len(data.classes), classes=",".join(data.classes), image_size_resolved=data.image_size,
        n_train=len(data.splits["train"]), n_val=len(data.splits["val"]), n_test=len(data.splits["test"]),
        images_skipped=len(data.skipped), weights_resolved=weights_resolved, data_digest=data.digest,
    )
    tracking.log_params_once(run_id, params)
    tracking.set_tags(run_id, {tracking.TAG_DIGEST: data.digest, "sceneml.arch": cfg.arch,
                               "sceneml.optimizer": cfg.optimizer})
    manifest_df = pd.read_csv(io.StringIO(data.manifest))
    dataset = mlflow.data.from_pandas(manifest_df, source=str(data.source.root), name=f"{data.source.kind}-splits",
                                      digest=data.digest)
    tracking.with_retries(mlflow.log_input, dataset, context="training")
    tracking.with_retries(mlflow.log_text, data.manifest, "data/split_manifest.csv")
    tracking.log_json(data.class_to_idx, "data/class_to_idx.json")
    tracking.log_json({**cfg.as_params(), "image_size_resolved": data.image_size,
                       "weights_resolved": weights_resolved, "source_root": str(data.source.root)}, "config.json")
    if data.skipped:
        tracking.log_json(data.skipped, "data/skipped_images.json")


def run_train(cfg: TrainConfig, run_name: str | None = None, nested: bool = False) -> str:
    """Train one model as one MLflow run; returns the run id ("" on the non-main ranks of a torchrun
    launch, which train their shards but do not talk to MLflow)."""
    cfg.validate()
    ctx, device_name = distributed.setup(cfg.device)
    if ctx is not None and cfg.resume:
        raise SceneMLError("resume under torchrun is not supported yet: resume the run in a single process")
    try:
        return _run_train(cfg, run_name, nested, ctx, pick_device(device_name))
    finally:
        if ctx is not None:
            distributed.teardown()


def _run_train(cfg: TrainConfig, run_name: str | None, nested: bool, ctx: distributed.DistContext | None,
               device: torch.device) -> str:
    seed_everything(cfg.seed)
    main = ctx is None or ctx.is_main
    progress = not cfg.quiet and main
    if not main:
        distributed.barrier()  # rank 0 decodes into the shared cache first; the others then read it
    data = prepare_data(cfg.data, cfg.image_size, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                        cfg.limit_per_class, cfg.decode_workers(), progress)
    if ctx is not None and main:
        distributed.barrier()
    model, weights_resolved = build_model(cfg.arch, len(data.classes), cfg.weights)
    if cfg.freeze_backbone:
        freeze_backbone(cfg.arch, model)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.epochs)
    run_name = run_name or f"{cfg.arch}-{cfg.optimizer}-lr{cfg.lr:g}"
    trainer = EpochTrainer(cfg, data, model, optimizer, device, ctx)
    if not main:
        for epoch in range(1, cfg.epochs + 1):
            trainer.train_pass(epoch, on_losses=None, progress=False)
            if scheduler is not None:
                scheduler.step()
            distributed.barrier()  # rank 0 validates, logs and checkpoints meanwhile
            if cfg.stop_after_epoch and epoch == cfg.stop_after_epoch:
                break
        return ""

    with _start_run(cfg, run_name, nested) as run:
        run_id = run.info.run_id
        with tracking.failure_marks_run(run_id):
            _train_in_run(run_id, cfg, data, trainer, scheduler, weights_resolved, progress)
    return run_id


def _train_in_run(run_id, cfg, data, trainer: EpochTrainer, scheduler, weights_resolved, progress) -> None:
    model, optimizer = trainer.model, trainer.optimizer
    client = MlflowClient()
    metrics = tracking.MetricBuffer(run_id, client)
    history: list[dict] = []
    batch_losses: list[tuple[int, float]] = []
    models: dict[int, str] = {}  # epoch -> LoggedModel id
    start_epoch = 1
    if cfg.resume:
        state = _restore(run_id, model, optimizer, scheduler)
        start_epoch = state["epoch"] + 1
        history, models = json.loads(state["history"]), {int(k): v for k, v in json.loads(state["models"]).items()}
        batch_losses = [tuple(x) for x in json.loads(state["batch_losses"])]
        log.info("resuming run %s after epoch %d", run_id, state["epoch"])
    else:
        _log_data(run_id, cfg, data, weights_resolved, trainer.ctx.world_size if trainer.ctx else 1)

    train, val = data.splits["train"], data.splits["val"]
    example = (val.pixels[:2].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    meta = {"sceneml": {"classes": data.classes, "image_size": data.image_size, "arch": cfg.arch,
                        "data": cfg.data, "data_digest": data.digest, "training_run_id": run_id,
                        # not in the state dict, but needed to rebuild the network (analysis hooks)
                        "transform_input": bool(getattr(model.backbone, "transform_input", False))}}
    if trainer.cached is not None:
        metrics.add_many({"feature_cache_seconds": trainer.feature_cache_seconds,
                          "features_from_disk": float(trainer.features_from_disk)}, start_epoch)

    log_seconds = [0.0]  # time spent writing to MLflow in the current epoch

    def on_losses(values: list[float]) -> None:
        started = time.perf_counter()
        for v in values:
            # batch_losses holds every earlier batch (restored on resume): its length is the global step
            batch_losses.append((len(batch_losses) + 1, v))
            metrics.add("train_batch_loss", v, len(batch_losses))
        metrics.flush()
        log_seconds[0] += time.perf_counter() - started

    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        log_seconds[0] = 0.0
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_seconds = trainer.train_pass(epoch, on_losses, progress)
        scores = trainer.val_scores()
        val_metrics = classification_metrics(val.labels, scores, data.classes, "val")
        logging_started = time.perf_counter()
        model_id = tracking.log_checkpoint(
            model, example, name=f"{cfg.arch}-epoch{epoch}", step=epoch,
            params={"arch": cfg.arch, "optimizer": cfg.optimizer, "lr": cfg.lr, "epoch": epoch},
            tags={tracking.TAG_EPOCH: epoch, tracking.TAG_DIGEST: data.digest, "sceneml.run_id": run_id},
            metadata=meta,
        )
        models[epoch] = model_id
        metrics.add_many(val_metrics, epoch, model_id=model_id)
        metrics.add_many({"train_loss": train_loss, "lr": lr}, epoch)
        metrics.flush()
        tracking.with_retries(mlflow.log_text, scores_to_csv(val.paths, val.labels, scores, data.classes),
                              f"val_scores/epoch_{epoch:03d}.csv")
        history.append({"epoch": epoch, "train_loss": train_loss, "lr": lr, **val_metrics})
        tracking.with_retries(mlflow.log_text, _history_csv(history), "history.csv")
        if scheduler is not None:
            scheduler.step()
        ckpt = local_checkpoint_path(run_id)
        save_checkpoint(ckpt, model, optimizer, scheduler, epoch, {
            "history": json.dumps(history), "models": json.dumps(models),
            "batch_losses": json.dumps(batch_losses)})
        tracking.with_retries(mlflow.log_artifact, str(ckpt), "checkpoints")
        log_seconds[0] += time.perf_counter() - logging_started
        metrics.add_many({"epoch_seconds": time.perf_counter() - epoch_started, "train_seconds": train_seconds,
                          "train_images_per_sec": len(train) / train_seconds, "log_seconds": log_seconds[0]}, epoch)
        metrics.flush()
        if trainer.ctx is not None:
            distributed.barrier()  # the other ranks wait here while this one validates and logs
        if progress:
            print(f"epoch {epoch}: train_loss {train_loss:.4f}  val_loss {val_metrics['val_loss']:.4f}  "
                  f"val_acc {val_metrics['val_acc']:.3f}  val_mAP {val_metrics['val_mAP']:.3f}", flush=True)
        if cfg.stop_after_epoch and epoch == cfg.stop_after_epoch and epoch < cfg.epochs:
            raise StopAfterEpoch(f"run {run_id} stopped after epoch {epoch} as asked (stop_after_epoch)")

    _finish(run_id, cfg, data, history, batch_losses, models, metrics)


def _restore(run_id: str, model, optimizer, scheduler) -> dict:
    path = local_checkpoint_path(run_id)
    if not path.exists():
        try:
            downloaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT)
        except Exception:
            raise SceneMLError(f"run {run_id} has no resumable checkpoint (no finished epoch?)") from None
        path = Path(downloaded)
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def best_epoch(history: list[dict], metric: str = BEST_METRIC) -> dict:
    """The best epoch by ``metric``; ties go to the lower val loss, then the earlier epoch."""
    best = None
    for row in history:
        if best is None or is_better(row[metric], best[metric], metric) or (
                row[metric] == best[metric] and row["val_loss"] < best["val_loss"]):
            best = row
    return best


def _finish(run_id, cfg, data, history, batch_losses, models, metrics) -> None:
    best = best_epoch(history)
    epoch = best["epoch"]
    metrics.add_many({"best_epoch": epoch, "best_val_mean_class_acc": best["val_mean_class_acc"],
                      "best_val_mAP": best["val_mAP"], "best_val_loss": best["val_loss"]}, cfg.epochs)
    metrics.flush()
    for e, model_id in models.items():
        tracking.with_retries(mlflow.set_logged_model_tags, model_id, {tracking.TAG_BEST: str(e == epoch).lower()})
    tracking.set_tags(run_id, {"sceneml.best_model_id": models[epoch], "sceneml.best_epoch": epoch})

    classes = data.classes
    val = data.splits["val"]
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/val_scores/epoch_{epoch:03d}.csv")
    _, y_true, scores, _ = scores_from_csv(text)
    cm = confusion_matrix(y_true, scores.argmax(1), len(classes))
    tracking.log_figure(plots.loss_curves(history, batch_losses), "figures/loss_curves.png")
    tracking.log_figure(plots.per_class_bars({c: best[f"val_ap_{c}"] for c in classes},
                                             f"Per-class average precision (val, best epoch {epoch})",
                                             "average precision", "mAP"), "figures/val_per_class_ap.png")
    tracking.log_figure(plots.per_class_bars({c: best[f"val_acc_{c}"] for c in classes},
                                             f"Per-class accuracy (val, best epoch {epoch})",
                                             "accuracy (recall)", "mean class acc"), "figures/val_per_class_acc.png")
    tracking.log_figure(plots.metric_curves(history, ["val_mAP", "val_mean_class_acc", "val_acc"],
                                            "Validation scores per epoch"), "figures/val_scores_per_epoch.png")
    tracking.log_figure(plots.confusion_matrix_figure(cm, classes, f"Confusion matrix (val, epoch {epoch}, "
                                                      f"n={len(val)})"), "figures/val_confusion_matrix.png")
