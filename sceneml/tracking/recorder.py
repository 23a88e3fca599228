"""The MLflow recorder: what the training loop records (:class:`sceneml.engine.recorder.Recorder`),
written into one run. Per epoch: the metrics (the val ones linked to that epoch's LoggedModel), the val
scores file, ``history.csv``, the resumable checkpoint; at the end the best epoch, its tags and figures.
It also reads a run back for a resume: the checkpoint, what a crash left half logged.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from torch import nn

from sceneml import plots
from sceneml.config import TrainConfig
from sceneml.engine.recorder import Recorder
from sceneml.engine.saver import TrainState
from sceneml.errors import SceneMLError
from sceneml.metrics import best_row, confusion_matrix
from sceneml.scores import scores_from_csv
from sceneml.tracking.lease import BEAT_EVERY_S, heartbeat
from sceneml.tracking.models import (
    TAG_BEST,
    TAG_DIGEST,
    TAG_EPOCH,
    delete_checkpoint,
    epoch_checkpoints,
    log_checkpoint,
)
from sceneml.tracking.runs import MetricBuffer, delete_run_artifacts, log_csv, log_figure, log_params_once, set_tags
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"


def checkpoint_name(run_name: str, epoch: int) -> str:
    """The LoggedModel's name, e.g. ``adamw-lr0_001-e2`` (MLflow refuses '.', '/', ':' ... in model names)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{run_name}-e{epoch}")


def val_scores_path(epoch: int) -> str:
    return f"val_scores/epoch_{epoch:03d}.csv"


@dataclass
class MlflowRecorder(Recorder):
    """Records into run ``run_id`` (named ``run_name``) of ``cfg``; ``meta`` is what every checkpoint
    carries as MLflow model metadata (under "sceneml"), besides its epoch."""

    run_id: str
    run_name: str
    cfg: TrainConfig
    classes: list[str]
    meta: dict
    resumed: bool = False  # a resumed run writes each value once: what the crash kept is not written again
    logged_steps: int = 0  # train_batch_loss steps already in the run (a resumed run's crashed epoch)
    metrics: MetricBuffer = field(init=False)
    last_beat: float = field(init=False)
    log_seconds: float = 0.0  # time spent writing to MLflow in the current epoch

    def __post_init__(self) -> None:
        self.metrics = MetricBuffer(self.run_id)
        set_tags(self.run_id, heartbeat())
        self.last_beat = time.monotonic()

    def _timed(self, started: float) -> None:
        self.log_seconds += time.perf_counter() - started

    def log_batch_losses(self, first_step: int, values: list[float]) -> None:
        started = time.perf_counter()
        for step, value in enumerate(values, first_step):
            if step > self.logged_steps:  # a crash mid-epoch had already logged some: each step once
                self.metrics.add("train_batch_loss", value, step)
        if time.monotonic() - self.last_beat >= BEAT_EVERY_S:
            self.metrics.add_tags(heartbeat())
            self.last_beat = time.monotonic()
        self.metrics.flush_in_background()  # a busy store does not hold up the next batch
        self._timed(started)

    def log_model(self, epoch: int, model: nn.Module) -> str:
        started, cfg = time.perf_counter(), self.cfg
        model_id = log_checkpoint(
            model, name=checkpoint_name(self.run_name, epoch), step=epoch,
            params={"arch": cfg.arch, "optimizer": cfg.optimizer, "lr": cfg.lr, "epoch": epoch},
            tags={TAG_EPOCH: epoch, TAG_DIGEST: self.meta["data_digest"], "sceneml.run_id": self.run_id},
            metadata={"sceneml": {**self.meta, "epoch": epoch}})
        self._timed(started)
        return model_id

    def log_resumable(self, path: Path) -> None:
        started = time.perf_counter()
        with_retries(mlflow.log_artifact, str(path), Path(CHECKPOINT_ARTIFACT).parent.as_posix())
        self._timed(started)

    def log_epoch(self, history: list[dict], scores_csv: str, model_id: str | None, only_missing: bool = False) -> None:
        """The newest row's metrics (the val ones linked to the checkpoint), val scores file and history.csv.
        ``only_missing``: what a crash kept from the run (on resume), key by key."""
        started, row = time.perf_counter(), history[-1]
        epoch = row["epoch"]
        values = {k: v for k, v in row.items() if k != "epoch"}
        if only_missing:
            values = self.not_logged(values, epoch)
        val_keys = {k for k in values if k.startswith("val_")}
        self.metrics.add_many({k: values[k] for k in val_keys}, epoch, model_id=model_id)
        self.metrics.add_many({k: v for k, v in values.items() if k not in val_keys}, epoch)
        self.metrics.flush()
        if not only_missing or not MlflowClient().list_artifacts(self.run_id, val_scores_path(epoch)):
            with_retries(mlflow.log_text, scores_csv, val_scores_path(epoch))
        log_csv(history, "history.csv")
        self._timed(started)

    def drop_models(self, model_ids: list[str]) -> None:
        started = time.perf_counter()
        for model_id in model_ids:
            delete_checkpoint(model_id)
        self._timed(started)

    def log_timings(self, epoch: int, seconds: dict[str, float]) -> None:
        self.metrics.add_many({**seconds, "log_seconds": self.log_seconds}, epoch)
        self.metrics.flush()
        self.log_seconds = 0.0

    def log_plan(self, epoch: int, epochs: int) -> None:
        self.metrics.add("epochs_planned", epochs, epoch)
        self.metrics.flush()

    def log_stopped(self, epoch: int) -> None:
        self.metrics.add_many(self.once({"stopped_epoch": epoch}, epoch), epoch)

    def not_logged(self, values: dict[str, float], step: int) -> dict[str, float]:
        """The entries of ``values`` that the run does not hold at ``step`` yet (a resume's catch-up)."""
        client = MlflowClient()
        return {k: v for k, v in values.items()
                if not any(m.step == step for m in client.get_metric_history(self.run_id, k))}

    def once(self, values: dict[str, float], step: int) -> dict[str, float]:
        return self.not_logged(values, step) if self.resumed else values

    def finish(self, state: TrainState, epochs: int) -> None:
        """The best epoch by the select metric (the rule select uses too), its tags and the figures; then
        the resumable state is deleted (resuming a FINISHED run is refused anyway)."""
        cfg, metric = self.cfg, self.cfg.select_metric
        if cfg.time_budget:  # the plan as it ended (it may have moved after every epoch)
            log_params_once(self.run_id, {"epochs_resolved": epochs})
        best = best_row(state.history, metric)
        epoch = best["epoch"]
        # beside each final value, the best epoch's, named to sort next to it (val_mAP, val_mAP_best)
        summary = {"best_epoch": epoch, **{f"{k}_best": best[k] for k in
                                           ("val_mean_class_acc", "val_mAP", "val_acc", "val_loss")}}
        self.metrics.add_many(self.once(summary, epochs), epochs)  # a resumed run may have crashed in here
        self.metrics.flush()
        for e, model_id in state.models.items():
            with_retries(mlflow.set_logged_model_tags, model_id, {TAG_BEST: str(e == epoch).lower()})
        set_tags(self.run_id, {"sceneml.best_model_id": state.models[epoch], "sceneml.best_epoch": epoch,
                               "sceneml.select_metric": metric})
        self._log_figures(state, best)
        delete_run_artifacts(self.run_id, Path(CHECKPOINT_ARTIFACT).parent.as_posix())

    def _log_figures(self, state: TrainState, best: dict) -> None:
        cfg, epoch = self.cfg, best["epoch"]
        # the best epoch's predictions, read back from the file it logged (a resumed run has no others)
        _, y_true, scores, _, _ = scores_from_csv(
            mlflow.artifacts.load_text(f"runs:/{self.run_id}/{val_scores_path(epoch)}"))
        cm = confusion_matrix(y_true, np.asarray(scores).argmax(1), len(self.classes))
        label = f"{self.run_name} ({cfg.arch}, {cfg.optimizer}, lr {cfg.lr:g})"
        log_figure(plots.loss_curves(state.history, state.batch_losses, label), "figures/loss_curves.png")
        log_figure(plots.metric_curves(state.history, ["val_mAP", "val_mean_class_acc", "val_acc"],
                                       f"Validation scores per epoch\n{label}"), "figures/val_scores_per_epoch.png")
        for path, fig in plots.class_figures("val", best, cm, self.classes, label, f"best epoch {epoch}").items():
            log_figure(fig, path)

    def drain(self) -> None:
        self.metrics.drain()


def resumable_path(run_id: str, local: Path) -> Path:
    """A run's resumable checkpoint: the local copy, else the logged one."""
    if local.exists():
        return local
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT))
    except Exception:
        raise SceneMLError(f"run {run_id} has no resumable checkpoint (no finished epoch?)") from None


def reconcile(recorder: MlflowRecorder, state: TrainState) -> None:
    """Make the run agree with the checkpoint ``state`` a resume starts from: the checkpoints still there
    (a crash may have come between a deletion and the state's save), none of an epoch after it (the
    attempt that crashed: that epoch is trained again and logs its own), each batch loss once, and the
    last saved epoch logged in full (it may have crashed before, or while, it was logged)."""
    run_id = recorder.run_id
    recorder.resumed = True
    found = {e: m for (_, e), m in epoch_checkpoints([mlflow.get_run(run_id).info.experiment_id], run_id).items()}
    for e in [e for e in found if e > state.epoch]:
        delete_checkpoint(found.pop(e))
    state.models = found
    logged = MlflowClient().get_metric_history(run_id, "train_batch_loss")
    recorder.logged_steps = max((m.step for m in logged), default=0)
    if state.history and state.val_scores:
        recorder.log_epoch(state.history, state.val_scores, found.get(state.epoch), only_missing=True)
    log.info("resuming run %s after epoch %d", run_id, state.epoch)


def planned_epochs(run_id: str, state: TrainState) -> int | None:
    """A resumed time-budget run's plan: the last ``epochs_planned`` of the epochs its checkpoint holds
    (None when the run stopped before the first epoch's plan was logged)."""
    history = MlflowClient().get_metric_history(run_id, "epochs_planned")
    plans = [m for m in history if m.step <= state.epoch]
    return int(max(plans, key=lambda m: m.step).value) if plans else None
