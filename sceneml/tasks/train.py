"""`train`: fine-tune one torchvision CNN as one MLflow run: data, model, epochs, metrics, checkpoints, figures.

One loop for every rank (a single process is the trivial distributed case): each rank trains its
shard; the main process also validates on the whole val split, logs and checkpoints, while the
others wait at the barrier that closes each epoch. Per epoch the main process logs the metrics
(the val ones linked to that epoch's LoggedModel), the val scores file, ``history.csv`` and a
resumable checkpoint, so a crash loses at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient

from sceneml import plots
from sceneml.class_keys import class_keys
from sceneml.config import RESUME_MUST_MATCH, TrainConfig
from sceneml.data import PreparedData, prepare_data
from sceneml.data.duplicates import duplicate_counts
from sceneml.data.sources import cache_dir
from sceneml.engine import distributed
from sceneml.engine.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from sceneml.engine.loop import (
    PER_STEP_SCHEDULERS,
    BudgetPlan,
    EpochLoss,
    EpochTrainer,
    build_optimizer,
    build_scheduler,
    seed_everything,
    then,
)
from sceneml.errors import SceneMLError
from sceneml.metrics import best_row, classification_metrics, confusion_matrix, patience_ran_out
from sceneml.models import AUX_ARCHS, build_model, describe_device, freeze_backbone, pick_device
from sceneml.params import param_text
from sceneml.scores import scores_from_csv, scores_to_csv
from sceneml.tracking.lease import BEAT_EVERY_S, STALE_AFTER_S, heartbeat, live_holder
from sceneml.tracking.models import (
    TAG_BEST,
    TAG_DIGEST,
    TAG_EPOCH,
    delete_checkpoint,
    epoch_checkpoints,
    log_checkpoint,
)
from sceneml.tracking.runs import (
    TAG_DATA_SET,
    MetricBuffer,
    delete_run_artifacts,
    log_csv,
    log_figure,
    log_json,
    log_params_once,
    set_tags,
    task_of,
    task_run,
)
from sceneml.tracking.store import init_store, insert_race, with_retries

log = logging.getLogger(__name__)
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"
FAULT_ENV = "SCENEML_FAULT_AT_STEP"


def local_checkpoint_path(run_id: str) -> Path:
    """Where the resumable checkpoint is written before it is logged; the file name is the
    artifact's name (CHECKPOINT_ARTIFACT), one folder per run."""
    return cache_dir() / "checkpoints" / run_id / Path(CHECKPOINT_ARTIFACT).name


def checkpoint_name(run_name: str, epoch: int) -> str:
    """The LoggedModel's name, e.g. ``adamw-lr0_001-e2`` (MLflow refuses '.', '/', ':' ... in model names)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{run_name}-e{epoch}")


OnEpoch = Callable[[int, dict], bool]


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
    cfg.validate()
    started = time.monotonic()  # a time_budget counts from here
    if os.environ.get("RANK", "0") == "0":
        init_store()  # a store that does not answer fails here, before the data are decoded
    if cfg.resume:
        check_resume(cfg)
    ctx, device_name = distributed.setup(cfg.device, cfg.dist_timeout)
    if ctx is not None and (cfg.resume or on_epoch is not None or cfg.time_budget):
        raise SceneMLError("resume, tune and time_budget under torchrun are not supported: run them in a single "
                           "process")
    try:
        return _train(cfg, run_name or f"{cfg.optimizer}-lr{cfg.lr:g}", nested, ctx, pick_device(device_name),
                      on_epoch, parent_run_id, tags, started)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, run_name: str, nested: bool, ctx: distributed.DistContext | None,
           device: torch.device, on_epoch: OnEpoch | None = None, parent_run_id: str | None = None,
           tags: dict | None = None, started: float = 0.0) -> str:
    seed_everything(cfg.seed)
    master = distributed.is_main_process()
    progress = not cfg.quiet and master
    if not master:
        distributed.barrier()  # rank 0 decodes into the shared cache first; the others then read it
    data = prepare_data(cfg.data, cfg.image_size, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                        cfg.limit_per_class, cfg.decode_workers(), progress, dedupe=cfg.dedupe,
                        dup_distance=cfg.dup_distance, split_seed=cfg.split_seed)
    if master:
        distributed.barrier()
    model, weights_resolved = build_model(cfg.arch, len(data.classes), cfg.weights)
    if cfg.freeze_backbone:
        freeze_backbone(cfg.arch, model)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    trainer = EpochTrainer(cfg, data, model, optimizer, device, ctx)
    plan = BudgetPlan(cfg.time_budget * 60, started, trainer.steps_per_epoch()) if cfg.time_budget else None
    if plan is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
    else:
        scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.epochs, cfg.warmup_epochs, trainer.steps_per_epoch())
    per_step = plan is not None or cfg.scheduler in PER_STEP_SCHEDULERS
    on_step = _fault_injector(run_name)
    if per_step:
        on_step = then(scheduler.step, on_step)

    # One loop for every rank; only the main process opens the run, validates, logs and checkpoints.
    opened = task_run(run_name, nested=nested, run_id=cfg.resume or None, task="train", parent_run_id=parent_run_id,
                      tags=tags, system_metrics=True)
    with opened if master else contextlib.nullcontext() as run:
        log_run = RunLog(run.info.run_id, run_name, cfg, data, trainer, scheduler) if master else None
        if master:
            set_tags(run.info.run_id, heartbeat())
        replan = plan is not None

        if master and cfg.resume:
            log_run.restore()
            planned = log_run.planned_epochs() if plan is not None else None
            if planned is not None:  # a resume keeps the plan (one cut short in its first epoch makes one)
                # and the lr line: from the lr the checkpoint holds to 0 at the plan's end
                plan.keep(planned, scheduler.last_epoch, optimizer.param_groups[0]["lr"] / scheduler.base_lrs[0])
                replan = False
                log_run.use_epochs(planned)
        elif master:
            log_run.log_data(weights_resolved, ctx.world_size if ctx else 1)

        def last_epoch(current: int) -> int:
            """cfg.epochs; under a time_budget the plan's, or this one while the first epoch measures."""
            return cfg.epochs if plan is None else plan.epochs or current

        epoch = log_run.next_epoch if master else 1
        try:
            while epoch <= last_epoch(epoch):
                # early stopping, decided before an epoch: a run resumed after its deciding epoch stops too
                if distributed.main_process_says(master and log_run.patience_ran_out(), device):
                    break
                lr = optimizer.param_groups[0]["lr"]
                epoch_started = time.monotonic()
                train_loss, train_seconds = trainer.train_pass(epoch, log_run.on_losses if master else None, on_step,
                                                               progress)
                if scheduler is not None and not per_step:
                    scheduler.step()
                if master:
                    epoch_seconds = log_run.end_epoch(epoch, lr, train_loss, train_seconds, epoch_started)
                    if replan:
                        log_run.fit_budget(plan, epoch, epoch_seconds)
                distributed.barrier()  # the other ranks wait here while the main process validates and logs
                if on_epoch is not None and epoch < last_epoch(epoch) and on_epoch(epoch, log_run.history[-1]):
                    log.info("%s: stopped after epoch %d of %d", run_name, epoch, last_epoch(epoch))
                    break
                epoch += 1
        except BaseException:
            if master:  # write the batch losses queued in the background, also on errors and signals
                with contextlib.suppress(Exception):  # without hiding the error that got us here
                    log_run.metrics.drain()
            raise
        if master:
            log_run.metrics.drain()
            log_run.finish()
    return run.info.run_id if master else ""


def superseded_epochs(history: list[dict], models: dict[int, str], keep: str, metric: str) -> list[int]:
    """The epochs whose checkpoints ``keep`` drops now: for ``best`` every one but the best so far,
    for ``improved`` the newest if it did not improve on the best before it, for ``all`` none."""
    if keep == "all" or not history:
        return []
    best = best_row(history, metric)["epoch"]
    if keep == "best":
        return [e for e in models if e != best]
    newest = history[-1]["epoch"]
    return [newest] if newest != best and newest in models else []


FAULT_CHECKPOINT_ENV = "SCENEML_FAULT_AFTER_CHECKPOINT"


def _fault_after_checkpoint(epoch: int) -> None:
    """``SCENEML_FAULT_AFTER_CHECKPOINT=N``: SIGKILL this process right after epoch N's resumable
    checkpoint is saved and before the epoch is logged (the crash test of that window)."""
    if os.environ.get(FAULT_CHECKPOINT_ENV) == str(epoch):
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_injector(run_name: str) -> Callable[[], None] | None:
    """``SCENEML_FAULT_AT_STEP=N:interrupt``, ``N:pause``, ``N:stop`` or ``N:raise``, optionally
    ``@<run name>``: after the N-th optimizer step of this run (of every run when no name is given),
    raise KeyboardInterrupt (what Ctrl-C does), wait for a signal, stop the process (SIGSTOP, until a
    SIGCONT), or raise a RuntimeError (a crash). The crash tests use it to hit a run at a known batch
    without sleeping; unset, it costs nothing."""
    spec = os.environ.get(FAULT_ENV, "")
    spec, _, only = spec.partition("@")
    if not spec or (only and only != run_name):
        return None
    at, _, action = spec.partition(":")
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] != int(at):
            return
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "raise":
            raise RuntimeError(f"fault injected after step {at} ({FAULT_ENV})")
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        print(f"sceneml: paused after step {at} ({FAULT_ENV})", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)

    return on_step


class RunLog:
    """What the main process writes to the run, epoch by epoch, and reads back on resume."""

    def __init__(self, run_id: str, run_name: str, cfg: TrainConfig, data: PreparedData, trainer: EpochTrainer,
                 scheduler) -> None:
        self.run_id, self.run_name, self.cfg, self.data = run_id, run_name, cfg, data
        self.trainer, self.scheduler = trainer, scheduler
        self.metrics = MetricBuffer(run_id)
        self.history: list[dict] = []
        self.batch_losses: list[tuple[int, float]] = []
        self.models: dict[int, str] = {}  # epoch -> LoggedModel id
        self.next_epoch = 1
        self.resumed = False  # set by restore()
        self.last_beat = time.monotonic()  # the run's heartbeat is written when it opens
        self.logged_steps = 0  # train_batch_loss steps already in the run (a resumed run's crashed epoch)
        self.log_seconds = 0.0  # time spent writing to MLflow in the current epoch
        self.epoch_seconds: list[float] = []  # a time_budget's measure of this process's epochs
        # what every checkpoint carries as MLflow model metadata (under "sceneml"), besides its epoch
        self.meta = {"classes": data.classes, "image_size": data.image_size, "arch": cfg.arch, "data": cfg.data,
                     "data_digest": data.digest, "training_run_id": run_id}

    def log_data(self, weights_resolved: str, world_size: int) -> None:
        cfg, data = self.cfg, self.data
        params = {**cfg.as_params(), "world_size": world_size, "num_classes": len(data.classes),
                  "classes": json.dumps(data.classes), "image_size_resolved": data.image_size,
                  "n_train": len(data.splits["train"]), "n_val": len(data.splits["val"]),
                  "n_test": len(data.splits["test"]), "images_skipped": len(data.skipped),
                  "weights_resolved": weights_resolved, "data_digest": data.digest,
                  "device_resolved": describe_device(self.trainer.device),
                  "precision_resolved": str(self.trainer.amp_dtype or torch.float32).removeprefix("torch.")}
        log_params_once(self.run_id, params)
        set_tags(self.run_id, {TAG_DIGEST: data.digest, TAG_DATA_SET: data.data_set_digest, "sceneml.arch": cfg.arch,
                               "sceneml.optimizer": cfg.optimizer})
        dataset = mlflow.data.from_pandas(pd.read_csv(io.StringIO(data.manifest)),
                                          source=str(data.source.root), name=f"{data.source.kind}-splits",
                                          digest=data.digest)
        with_retries(mlflow.log_input, dataset, context="training", transient=insert_race)
        with_retries(mlflow.log_text, data.manifest, "data/split_manifest.csv")
        log_json(data.class_to_idx, "data/class_to_idx.json")
        log_json(dict(zip(data.classes, class_keys(data.classes))), "data/class_keys.json")
        log_json({**cfg.as_params(), "image_size_resolved": data.image_size, "weights_resolved": weights_resolved,
                  "source_root": str(data.source.root)}, "config.json")
        if data.skipped:
            log_json(data.skipped, "data/skipped_images.json")
        # duplicates and leakage across splits, always: a test score is only as good as its split
        log_csv(data.duplicates, "data/duplicates.csv")
        self.metrics.add_many({**duplicate_counts(data.duplicates),
                               "dup_dropped": float(data.duplicates["dropped"].sum())}, 0)
        self.metrics.flush()
        if self.trainer.cached is not None:
            self.metrics.add_many({"feature_cache_seconds": self.trainer.feature_cache_seconds,
                                   "features_from_disk": float(self.trainer.features_from_disk)}, 1)

    def restore(self) -> None:
        """Model, optimizer, scheduler and RNG states, and this log's own state, from the last
        finished epoch's checkpoint (the local copy, else the logged one)."""
        path = local_checkpoint_path(self.run_id)
        if not path.exists():
            try:
                path = Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=CHECKPOINT_ARTIFACT))
            except Exception:
                raise SceneMLError(f"run {self.run_id} has no resumable checkpoint (no finished epoch?)") from None
        state = load_checkpoint(path)
        self.resumed = True
        trainer = self.trainer
        self.next_epoch = restore_checkpoint(state, trainer.model, trainer.optimizer, self.scheduler,
                                             trainer.scaler) + 1
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        self.history = json.loads(state["history"])
        # the checkpoints still there (a crash may have come between a deletion and this state's save)
        experiment_id = mlflow.get_run(self.run_id).info.experiment_id
        found = {e: m for (_, e), m in epoch_checkpoints([experiment_id], self.run_id).items()}
        # a checkpoint of an epoch after the saved one is from the attempt that crashed: that epoch is
        # trained again and logs its own
        for e in [e for e in found if e >= self.next_epoch]:
            delete_checkpoint(found.pop(e))
        self.models = found
        self.batch_losses = [tuple(x) for x in json.loads(state["batch_losses"])]
        # a crash mid-epoch had already logged some of that epoch's batches: log each step once
        logged = MlflowClient().get_metric_history(self.run_id, "train_batch_loss")
        self.logged_steps = max((m.step for m in logged), default=0)
        # the last saved epoch may have crashed before (or while) it was logged: log what is missing
        if self.history and "val_scores" in state:
            self.log_epoch(self.history[-1], state["val_scores"], only_missing=True)
        log.info("resuming run %s after epoch %d", self.run_id, state["epoch"])

    def on_losses(self, values: list[float]) -> None:
        started = time.perf_counter()
        for v in values:
            # batch_losses holds every earlier batch (restored on resume): its length is the global step
            self.batch_losses.append((len(self.batch_losses) + 1, v))
            if len(self.batch_losses) > self.logged_steps:
                self.metrics.add("train_batch_loss", v, len(self.batch_losses))
        if time.monotonic() - self.last_beat >= BEAT_EVERY_S:
            self.metrics.add_tags(heartbeat())
            self.last_beat = time.monotonic()
        self.metrics.flush_in_background()  # a busy store does not hold up the next batch
        self.log_seconds += time.perf_counter() - started

    def end_epoch(self, epoch: int, lr: float, losses: EpochLoss, train_seconds: float, epoch_started: float) -> float:
        """Validate on the whole val split, save the resumable state, then log the epoch. Returns the
        epoch's wall time since ``epoch_started`` (``time.monotonic()``): metric ``epoch_seconds``, the
        pace a time budget plans with.

        The checkpoint comes first and carries everything the epoch logs (its metrics, scores file
        and model id): a crash after it is caught up on resume (:meth:`restore`), a crash before it
        repeats the epoch, whose values were then never logged. Either way each metric holds one
        value per epoch."""
        cfg, data, trainer = self.cfg, self.data, self.trainer
        val = data.splits["val"]
        val_started = time.perf_counter()
        log_probs = trainer.val_log_probs()
        val_seconds = time.perf_counter() - val_started
        scores, log_p = np.exp(log_probs), log_probs[np.arange(len(val)), val.labels]
        val_metrics = classification_metrics(val.labels, scores, data.classes, "val", log_p)
        started = time.perf_counter()
        model_id = log_checkpoint(
            trainer.eval_model, name=checkpoint_name(self.run_name, epoch), step=epoch,
            params={"arch": cfg.arch, "optimizer": cfg.optimizer, "lr": cfg.lr, "epoch": epoch},
            tags={TAG_EPOCH: epoch, TAG_DIGEST: data.digest, "sceneml.run_id": self.run_id},
            metadata={"sceneml": {**self.meta, "epoch": epoch}})
        self.models[epoch] = model_id
        # train_loss is the classifier's own loss, comparable with val_loss; the optimised total of a
        # model with auxiliary heads (GoogLeNet) is logged beside it
        has_aux = cfg.arch in AUX_ARCHS and not cfg.freeze_backbone  # a frozen GoogLeNet computes no aux heads
        row = {"epoch": epoch, "train_loss": losses.main, "lr": lr,
               **({"train_loss_with_aux": losses.total} if has_aux else {}), **val_metrics}
        self.history.append(row)
        scores_csv = scores_to_csv(val.paths, val.labels, scores, data.classes, log_p)
        ckpt = local_checkpoint_path(self.run_id)
        save_checkpoint(ckpt, trainer.model, trainer.optimizer, self.scheduler, epoch, {
            **({"ema": trainer.ema.state_dict()} if trainer.ema is not None else {}),
            "history": json.dumps(self.history), "models": json.dumps(self.models),
            "batch_losses": json.dumps(self.batch_losses), "val_scores": scores_csv}, trainer.scaler)
        with_retries(mlflow.log_artifact, str(ckpt), "checkpoints")
        _fault_after_checkpoint(epoch)
        self.log_epoch(row, scores_csv)
        # only once the resumable state is safe: drop the checkpoints keep_checkpoints does not keep
        for e in superseded_epochs(self.history, self.models, cfg.keep_checkpoints, cfg.select_metric):
            delete_checkpoint(self.models.pop(e))
        self.log_seconds += time.perf_counter() - started
        # the epoch's wall time: training pass, validation, checkpoint and logging
        epoch_seconds = time.monotonic() - epoch_started
        self.metrics.add_many({"epoch_seconds": epoch_seconds,
                               "train_seconds": train_seconds, "val_seconds": val_seconds,
                               "train_images_per_sec": len(data.splits["train"]) / train_seconds,
                               "log_seconds": self.log_seconds}, epoch)
        self.metrics.flush()
        self.log_seconds = 0.0
        if not cfg.quiet:
            print(f"epoch {epoch}: train_loss {losses.main:.4f}  val_loss {val_metrics['val_loss']:.4f}  "
                  f"val_acc {val_metrics['val_acc']:.3f}  val_mAP {val_metrics['val_mAP']:.3f}", flush=True)
        return epoch_seconds

    def log_epoch(self, row: dict, scores_csv: str, only_missing: bool = False) -> None:
        """An epoch's metrics (the val ones linked to its checkpoint), val scores file and history.csv.
        ``only_missing``: what a crash kept from the run (on resume), key by key."""
        epoch = row["epoch"]
        values = {k: v for k, v in row.items() if k != "epoch"}
        if only_missing:
            values = self.not_logged(values, epoch)
        val_keys = {k for k in values if k.startswith("val_")}
        self.metrics.add_many({k: values[k] for k in val_keys}, epoch, model_id=self.models.get(epoch))
        self.metrics.add_many({k: v for k, v in values.items() if k not in val_keys}, epoch)
        self.metrics.flush()
        path = f"val_scores/epoch_{epoch:03d}.csv"
        if not only_missing or not MlflowClient().list_artifacts(self.run_id, path):
            with_retries(mlflow.log_text, scores_csv, path)
        log_csv(self.history, "history.csv")

    def not_logged(self, values: dict[str, float], step: int) -> dict[str, float]:
        """The entries of ``values`` that the run does not hold at ``step`` yet (a resume's catch-up)."""
        client = MlflowClient()
        return {k: v for k, v in values.items()
                if not any(m.step == step for m in client.get_metric_history(self.run_id, k))}

    def use_epochs(self, epochs: int) -> None:
        """The run's epochs as a time budget resolved them (the summary's step, the progress bars)."""
        self.cfg = dataclasses.replace(self.cfg, epochs=epochs)
        self.trainer.cfg = self.cfg

    def fit_budget(self, plan: BudgetPlan, done: int, epoch_seconds: float) -> None:
        """``time_budget``: after each epoch, the epochs that fit at the pace of the epochs so far (metric
        ``epochs_planned``). The pace leaves out the first epoch once a second has run: the first also pays
        one-time costs (kernel selection, the first checkpoint), and counting it would end runs early."""
        before = plan.epochs
        self.epoch_seconds.append(epoch_seconds)
        measured = self.epoch_seconds[1:] or self.epoch_seconds
        pace = sum(measured) / len(measured)
        epochs = plan.fit(done, pace)
        self.metrics.add("epochs_planned", epochs, done)
        self.metrics.flush()
        if epochs != before:
            log.info("%s: time_budget %.1f min: %d epochs of %.1f s fit", self.run_name, self.cfg.time_budget, epochs,
                     pace)
        self.use_epochs(epochs)

    def planned_epochs(self) -> int | None:
        """A resumed time-budget run's plan: the last ``epochs_planned`` of the epochs its checkpoint holds
        (None when the run stopped before the first epoch's plan was logged)."""
        history = MlflowClient().get_metric_history(self.run_id, "epochs_planned")
        plans = [m for m in history if m.step < self.next_epoch]
        return int(max(plans, key=lambda m: m.step).value) if plans else None

    def patience_ran_out(self) -> bool:
        """``early_stop``: the best epoch is that many epochs behind; logs ``stopped_epoch`` (once)."""
        if not patience_ran_out(self.history, self.cfg.select_metric, self.cfg.early_stop):
            return False
        stopped = self.history[-1]["epoch"]
        log.info("%s: early stop after epoch %d of %d: %s has not improved for %d epochs", self.run_name, stopped,
                 self.cfg.epochs, self.cfg.select_metric, self.cfg.early_stop)
        self.metrics.add_many(self.not_logged({"stopped_epoch": stopped}, stopped) if self.resumed
                              else {"stopped_epoch": stopped}, stopped)
        return True

    def finish(self) -> None:
        """The best epoch by the select metric (the rule select uses too), its tags and the figures."""
        cfg, data, history = self.cfg, self.data, self.history
        if cfg.time_budget:  # the plan as it ended (it may have moved after every epoch)
            log_params_once(self.run_id, {"epochs_resolved": cfg.epochs})
        metric = cfg.select_metric
        best = best_row(history, metric)
        epoch = best["epoch"]
        # beside each final value, the best epoch's, named to sort next to it (val_mAP, val_mAP_best)
        summary = {"best_epoch": epoch, **{f"{k}_best": best[k] for k in
                                           ("val_mean_class_acc", "val_mAP", "val_acc", "val_loss")}}
        # a resumed run may have crashed in here after logging them: each value once
        self.metrics.add_many(self.not_logged(summary, cfg.epochs) if self.resumed else summary, cfg.epochs)
        self.metrics.flush()
        for e, model_id in self.models.items():
            with_retries(mlflow.set_logged_model_tags, model_id, {TAG_BEST: str(e == epoch).lower()})
        set_tags(self.run_id, {"sceneml.best_model_id": self.models[epoch], "sceneml.best_epoch": epoch,
                               "sceneml.select_metric": metric})

        classes = data.classes
        # the best epoch's predictions, read back from the file it logged (a resumed run has no others)
        _, y_true, scores, _, _ = scores_from_csv(
            mlflow.artifacts.load_text(f"runs:/{self.run_id}/val_scores/epoch_{epoch:03d}.csv"))
        cm = confusion_matrix(y_true, np.asarray(scores).argmax(1), len(classes))
        label = f"{self.run_name} ({cfg.arch}, {cfg.optimizer}, lr {cfg.lr:g})"
        log_figure(plots.loss_curves(history, self.batch_losses, label), "figures/loss_curves.png")
        log_figure(plots.metric_curves(history, ["val_mAP", "val_mean_class_acc", "val_acc"],
                                       f"Validation scores per epoch\n{label}"), "figures/val_scores_per_epoch.png")
        for path, fig in plots.class_figures("val", best, cm, classes, label, f"best epoch {epoch}").items():
            log_figure(fig, path)
        # finished: the resumable state has done its job (resuming a FINISHED run is refused anyway)
        delete_run_artifacts(self.run_id, Path(CHECKPOINT_ARTIFACT).parent.as_posix())
        shutil.rmtree(local_checkpoint_path(self.run_id).parent, ignore_errors=True)
