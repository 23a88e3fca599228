"""`train`: train one CNN as one MLflow run: data, model, the epoch loop, metrics, checkpoints, figures.

The task builds what the loop needs (:mod:`sceneml.engine.fit`): the data, the model and its optimizer
and schedule, the trainer, the checkpoint saver and a recorder (the MLflow one on the main process, the
silent one on the other ranks of a torchrun launch), puts a resumed run's state back, runs the loop and
closes the run. Per epoch the main process logs the metrics (the val ones linked to that epoch's
LoggedModel), the val scores file, ``history.csv`` and a resumable checkpoint, so a crash loses at most
the epoch in progress.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient

from sceneml.class_keys import class_keys
from sceneml.config import RESUME_MUST_MATCH, TrainConfig
from sceneml.data import PreparedData, Splitting, prepare_data
from sceneml.data.duplicates import duplicate_counts
from sceneml.data.sources import cache_dir
from sceneml.engine import distributed
from sceneml.engine.batches import Augmentation
from sceneml.engine.budget import BudgetPlan
from sceneml.engine.early_stop import EarlyStop
from sceneml.engine.fit import Fit, OnEpoch
from sceneml.engine.loop import EpochTrainer, LrSchedule, Optimisation, seed_everything, steps_per_epoch
from sceneml.engine.optim import PER_STEP_SCHEDULERS, build_optimizer, build_scheduler
from sceneml.engine.recorder import Recorder
from sceneml.engine.saver import CheckpointSaver, TrainState
from sceneml.engine.unfreeze import Unfreeze
from sceneml.errors import SceneMLError
from sceneml.models import build_model, describe_device, freeze_backbone, head_and_body, pick_device
from sceneml.params import param_text
from sceneml.tracking.lease import STALE_AFTER_S, live_holder
from sceneml.tracking.models import TAG_DIGEST
from sceneml.tracking.recorder import (
    CHECKPOINT_ARTIFACT,
    MlflowRecorder,
    planned_epochs,
    reconcile,
    resumable_path,
)
from sceneml.tracking.runs import TAG_DATA_SET, log_csv, log_json, log_params_once, set_tags, task_of, task_run
from sceneml.tracking.store import init_store, insert_race, with_retries

log = logging.getLogger(__name__)


def local_checkpoint_path(run_id: str) -> Path:
    """Where the resumable checkpoint is written before it is logged; the file name is the
    artifact's name (CHECKPOINT_ARTIFACT), one folder per run."""
    return cache_dir() / "checkpoints" / run_id / Path(CHECKPOINT_ARTIFACT).name


def check_resume(cfg: TrainConfig) -> None:
    """Refuse, before the run is touched, a resume of a run that is not an unfinished training run
    or whose data- and model-defining params differ from this launch's (one line naming them)."""
    client = MlflowClient()
    try:
        run = client.get_run(cfg.resume)
    except Exception:
        raise SceneMLError(f"resume={cfg.resume}: no such run in the tracking store {mlflow.get_tracking_uri()}") \
            from None
    name, task = run.info.run_name, task_of(run)
    if task != "train":
        raise SceneMLError(f"resume={cfg.resume}: run '{name}' is a {task or 'non-training'} run, not a training run")
    if run.info.status == "FINISHED":
        raise SceneMLError(f"resume={cfg.resume}: run '{name}' has FINISHED; there is nothing to resume")
    holder = live_holder(run)
    if holder:
        raise SceneMLError(f"resume={cfg.resume}: run '{name}' is still being trained ({holder}); stop that process "
                           f"first, or wait until its heartbeat is {STALE_AFTER_S} s old if it ran on another host")
    logged = run.data.params
    changed = [f"{key} was {logged[key]}, now {param_text(value)}" for key, value in cfg.as_params().items()
               if key in RESUME_MUST_MATCH and key in logged and not _same_param(logged[key], value)]
    if changed:
        raise SceneMLError(f"resume={cfg.resume}: {'; '.join(changed)} (a resume continues the same data and model; "
                           "start a new run to change them)")


def _same_param(logged: str, value: object) -> bool:
    """``mlflow run`` logs params as typed (``1e-3``); sceneml as ``param_text`` (``0.001``)."""
    if isinstance(value, bool):
        return logged.strip().lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
    if isinstance(value, (int, float)):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return logged == param_text(value)


def train(cfg: TrainConfig, run_name: str | None = None, nested: bool = False, on_epoch: OnEpoch | None = None,
          parent_run_id: str | None = None, tags: dict | None = None) -> str:
    """Train one model as one MLflow run; returns the run id ("" on the other ranks of a torchrun
    launch, which train their shards but do not talk to MLflow).

    ``on_epoch(epoch, row)`` is called after each epoch is logged (``row``: the epoch's history row,
    val metrics included); returning True stops training there, and the run finishes normally with
    the epochs it has (how `tune` prunes a trial). ``parent_run_id`` nests the run under a run that
    is not active in this process (a `tune` worker); ``tags`` are set on the run when it opens.
    """
    started = time.monotonic()  # a time_budget counts from here
    if os.environ.get("RANK", "0") == "0":
        init_store()  # a store that does not answer fails here, before the data are decoded
    if cfg.resume:
        check_resume(cfg)
    ctx, device_name = distributed.setup(cfg.device, cfg.dist_timeout)
    if ctx is not None and (cfg.resume or on_epoch is not None or cfg.time_budget or cfg.freeze_epochs):
        raise SceneMLError("resume, tune, time_budget and freeze_epochs under torchrun are not supported: run them "
                           "in a single process")
    try:
        seed_everything(cfg.seed)
        parts = _build(cfg, ctx, pick_device(device_name), started)
        name = run_name or f"{cfg.optimizer}-lr{cfg.lr:g}"
        if not distributed.is_main_process():  # the same loop, recording nothing
            Fit(parts.trainer, Recorder(), None, cfg.epochs, parts.budget, parts.early_stop,
                unfreeze=parts.unfreeze)(TrainState())
            return ""
        with task_run(name, nested=nested, run_id=cfg.resume or None, task="train", parent_run_id=parent_run_id,
                      tags=tags, system_metrics=True) as run:
            run_id = run.info.run_id
            _run(cfg, parts, MlflowRecorder(run_id, name, cfg, parts.data.classes, _meta(cfg, parts.data, run_id)),
                 on_epoch)
            return run_id
    finally:
        distributed.teardown()


@dataclass
class _Parts:
    data: PreparedData
    trainer: EpochTrainer
    budget: BudgetPlan | None
    early_stop: EarlyStop | None
    weights_resolved: str
    unfreeze: Unfreeze | None


def _data(cfg: TrainConfig, progress: bool) -> PreparedData:
    """The data, decoded by rank 0 into the shared cache first; the other ranks then read it."""
    main = distributed.is_main_process()
    if not main:
        distributed.barrier()
    splitting = Splitting(cfg.seed, cfg.val_fraction, cfg.test_fraction, cfg.limit_per_class, cfg.split_seed,
                          cfg.dedupe, cfg.dup_distance)
    data = prepare_data(cfg.data, cfg.image_size, splitting, cfg.decode_workers(), progress)
    if main:
        distributed.barrier()
    return data


def _build(cfg: TrainConfig, ctx: distributed.DistContext | None, device: torch.device, started: float) -> _Parts:
    """Data, model, optimizer, schedule and trainer, the budget plan and early stopping of ``cfg``."""
    data = _data(cfg, not cfg.quiet and distributed.is_main_process())
    model, weights_resolved = build_model(cfg.arch, len(data.classes), cfg.weights)
    if cfg.freeze_backbone:
        freeze_backbone(cfg.arch, model)
    model = model.to(device, memory_format=torch.channels_last)
    head, body = head_and_body(cfg.arch, model)
    groups = [{"params": head, "lr": cfg.lr}, {"params": body, "lr": cfg.lr * cfg.backbone_lr_scale}]
    # a frozen body is still in the optimizer when freeze_epochs will unfreeze it
    params = groups if cfg.backbone_lr_scale != 1 or cfg.freeze_epochs else model.parameters()
    optimizer = build_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps = steps_per_epoch(len(data.splits["train"]), cfg.batch_size, ctx, cfg.seed)
    budget = BudgetPlan(cfg.time_budget * 60, started, steps) if cfg.time_budget else None
    if budget is not None:
        schedule = LrSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer, budget.factor), per_step=True)
    else:
        schedule = LrSchedule(build_scheduler(cfg.scheduler, optimizer, cfg.epochs, cfg.warmup_epochs, steps),
                              per_step=cfg.scheduler in PER_STEP_SCHEDULERS)
    how = Optimisation(cfg.batch_size, cfg.label_smoothing, cfg.ema, cfg.precision, cfg.compile,
                       cfg.freeze_backbone, cfg.seed)
    augmentation = Augmentation(cfg.random_crop, cfg.train_crop_size, cfg.auto_augment, cfg.random_erase,
                                cfg.mixup_alpha, cfg.cutmix_alpha, len(data.classes))
    trainer = EpochTrainer(cfg.arch, data, model, optimizer, schedule, device, ctx, how, augmentation)
    early_stop = EarlyStop(cfg.select_metric, cfg.early_stop) if cfg.early_stop else None
    unfreeze = Unfreeze(cfg.freeze_epochs, tuple(body)) if cfg.freeze_epochs else None
    return _Parts(data, trainer, budget, early_stop, weights_resolved, unfreeze)


def _meta(cfg: TrainConfig, data: PreparedData, run_id: str) -> dict:
    """What every checkpoint carries as MLflow model metadata (under "sceneml"), besides its epoch."""
    return {"classes": data.classes, "image_size": data.image_size, "arch": cfg.arch, "data": cfg.data,
            "data_digest": data.digest, "training_run_id": run_id}


def _run(cfg: TrainConfig, parts: _Parts, recorder: MlflowRecorder, on_epoch: OnEpoch | None) -> None:
    """The main process's loop in the open run: a fresh run logs its inputs, a resumed one its state back."""
    saver = CheckpointSaver(local_checkpoint_path(recorder.run_id), cfg.keep_checkpoints, cfg.select_metric)
    state = _resume(saver, parts, recorder) if cfg.resume else TrainState()
    if not cfg.resume:
        _log_inputs(recorder, cfg, parts)
    fit = Fit(parts.trainer, recorder, saver, cfg.epochs, parts.budget, parts.early_stop, on_epoch, not cfg.quiet,
              parts.unfreeze)
    try:
        fit(state)
    except BaseException:
        with contextlib.suppress(Exception):  # write the batch losses queued in the background, without
            recorder.drain()  # hiding the error (or signal) that got us here
        raise
    recorder.drain()
    recorder.finish(state, fit.last_epoch(state.epoch))
    shutil.rmtree(saver.path.parent, ignore_errors=True)


def _resume(saver: CheckpointSaver, parts: _Parts, recorder: MlflowRecorder) -> TrainState:
    """The state of the last finished epoch put back, and the run made to agree with it. A time-budget
    run keeps its plan (one cut short in its first epoch makes one) and its lr line, from the lr the
    checkpoint holds to 0 at the plan's end."""
    state = saver.restore(parts.trainer, resumable_path(recorder.run_id, saver.path))
    reconcile(recorder, state)
    planned = planned_epochs(recorder.run_id, state) if parts.budget is not None else None
    if planned is not None:
        scheduler = parts.trainer.schedule.scheduler
        parts.budget.resume(planned, scheduler.last_epoch, parts.trainer.lr / scheduler.base_lrs[0])
    return state


def _log_inputs(recorder: MlflowRecorder, cfg: TrainConfig, parts: _Parts) -> None:
    """A fresh run's params, tags, data set, split manifest, class files, config and duplicates."""
    data, trainer, run_id = parts.data, parts.trainer, recorder.run_id
    params = {**cfg.as_params(), "world_size": trainer.ctx.world_size if trainer.ctx else 1,
              "num_classes": len(data.classes), "classes": json.dumps(data.classes, ensure_ascii=False),
              "image_size_resolved": data.image_size, "n_train": len(data.splits["train"]),
              "n_val": len(data.splits["val"]), "n_test": len(data.splits["test"]), "images_skipped": len(data.skipped),
              "weights_resolved": parts.weights_resolved, "data_digest": data.digest,
              "device_resolved": describe_device(trainer.device),
              "precision_resolved": str(trainer.amp_dtype or torch.float32).removeprefix("torch.")}
    log_params_once(run_id, params)
    set_tags(run_id, {TAG_DIGEST: data.digest, TAG_DATA_SET: data.data_set_digest, "sceneml.arch": cfg.arch,
                      "sceneml.optimizer": cfg.optimizer})
    dataset = mlflow.data.from_pandas(pd.read_csv(io.StringIO(data.manifest)), source=str(data.source.root),
                                      name=f"{data.source.kind}-splits", digest=data.digest)
    with_retries(mlflow.log_input, dataset, context="training", transient=insert_race)
    with_retries(mlflow.log_text, data.manifest, "data/split_manifest.csv")
    log_json(data.class_to_idx, "data/class_to_idx.json")
    log_json(dict(zip(data.classes, class_keys(data.classes))), "data/class_keys.json")
    log_json({**cfg.as_params(), "image_size_resolved": data.image_size, "weights_resolved": parts.weights_resolved,
              "source_root": str(data.source.root)}, "config.json")
    if data.skipped:
        log_json(data.skipped, "data/skipped_images.json")
    # duplicates and leakage across splits, always: a test score is only as good as its split
    log_csv(data.duplicates, "data/duplicates.csv")
    metrics = recorder.metrics
    metrics.add_many({**duplicate_counts(data.duplicates), "dup_dropped": float(data.duplicates["dropped"].sum())}, 0)
    if trainer.cached is not None:
        metrics.add_many({"feature_cache_seconds": trainer.feature_cache_seconds,
                          "features_from_disk": float(trainer.features_from_disk)}, 1)
    metrics.flush()
