"""The epoch loop, the same on every rank, as torchvision's references/classification's:

    for epoch in range(start, epochs):  train_one_epoch; lr_scheduler.step(); evaluate; save_on_master

:func:`fit` asks the trainer for the training pass (the schedule steps inside it), and, on the rank that
validates, the evaluator for the val metrics, the saver for the resumable state and the checkpoints to
drop, and the recorder to tell the outside world. The budget planner and early stopping decide how many
epochs run, the unfreezing schedule when the pretrained body trains; ``on_epoch`` (how `tune` prunes a
trial) may end training after any epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sceneml.engine import distributed
from sceneml.engine.budget import BudgetPlan
from sceneml.engine.early_stop import EarlyStop
from sceneml.engine.evaluator import validate
from sceneml.engine.loop import EpochLoss, EpochTrainer
from sceneml.engine.recorder import Recorder
from sceneml.engine.saver import CheckpointSaver, TrainState
from sceneml.engine.unfreeze import Unfreeze

log = logging.getLogger(__name__)
OnEpoch = Callable[[int, dict], bool]


@dataclass
class Fit:
    """One run's loop. ``saver`` is None on the ranks that neither validate nor save; ``epochs`` is the
    plan without a ``budget``."""

    trainer: EpochTrainer
    recorder: Recorder
    saver: CheckpointSaver | None
    epochs: int
    budget: BudgetPlan | None = None
    early_stop: EarlyStop | None = None
    on_epoch: OnEpoch | None = None
    verbose: bool = False  # progress bars and a line per epoch
    unfreeze: Unfreeze | None = None  # freeze_epochs: when the pretrained body joins the head

    def last_epoch(self, current: int) -> int:
        return self.epochs if self.budget is None else self.budget.last_epoch(current)

    def __call__(self, state: TrainState) -> TrainState:
        """Train from the epoch after ``state.epoch`` to the last one; returns the state at the end."""
        main, epoch = self.saver is not None, state.epoch + 1
        while epoch <= self.last_epoch(epoch):
            if distributed.main_process_says(main and self._early_stop(state), self.trainer.device):
                break
            if self.unfreeze is not None:
                self.unfreeze.before_epoch(epoch)
            started, lr = time.monotonic(), self.trainer.lr
            on_losses = (lambda values: self._on_losses(state, values)) if main else None
            losses, train_seconds = self.trainer.train_pass(epoch, self.last_epoch(epoch), on_losses,
                                                            self.verbose and main)
            if main:
                epoch_seconds = self._end_epoch(state, epoch, lr, losses, train_seconds, started)
                if self.budget is not None:
                    self._plan(epoch, epoch_seconds)
            distributed.barrier()  # the other ranks wait here while the main process validates and saves
            if self.on_epoch is not None and epoch < self.last_epoch(epoch) and self.on_epoch(epoch,
                                                                                             state.history[-1]):
                log.info("stopped after epoch %d of %d", epoch, self.last_epoch(epoch))
                break
            epoch += 1
        return state

    def _on_losses(self, state: TrainState, values: list[float]) -> None:
        # batch_losses holds every earlier batch (restored on resume): its length is the global step
        first = len(state.batch_losses) + 1
        state.batch_losses.extend((first + i, v) for i, v in enumerate(values))
        self.recorder.log_batch_losses(first, values)

    def _end_epoch(self, state: TrainState, epoch: int, lr: float, losses: EpochLoss, train_seconds: float,
                   started: float) -> float:
        """Validate, save, record; returns the epoch's whole wall time since ``started`` (the pace a budget
        plans with).

        The resumable state is saved before the epoch is recorded and carries all it records (metrics,
        scores file, checkpoint id): a crash after the save is caught up on resume, a crash before it
        repeats the epoch, whose values were then never recorded. Either way each metric holds one value
        per epoch. Checkpoints are dropped only once the state that no longer lists them is safe."""
        trainer, recorder = self.trainer, self.recorder
        val = validate(trainer)
        model_id = recorder.log_model(epoch, trainer.eval_model)
        # train_loss is the classifier's own loss, comparable with val_loss; the optimised total of a
        # model with auxiliary heads (GoogLeNet) is logged beside it
        row = {"epoch": epoch, "train_loss": losses.main, "lr": lr,
               **({"train_loss_with_aux": losses.total} if trainer.has_aux else {}), **val.metrics}
        state.epoch, state.val_scores = epoch, val.scores_csv
        state.history.append(row)
        state.models[epoch] = model_id
        self.saver.save(trainer, state)
        recorder.log_resumable(self.saver.path)
        recorder.log_epoch(state.history, val.scores_csv, model_id)
        recorder.drop_models(self.saver.prune(state))
        epoch_seconds = time.monotonic() - started  # training pass, validation, checkpoint and records
        recorder.log_timings(epoch, {"epoch_seconds": epoch_seconds, "train_seconds": train_seconds,
                                     "val_seconds": val.seconds,
                                     "train_images_per_sec": len(trainer.data.splits["train"]) / train_seconds})
        if self.verbose:
            m = val.metrics
            print(f"epoch {epoch}: train_loss {losses.main:.4f}  val_loss {m['val_loss']:.4f}  "
                  f"val_acc {m['val_acc']:.3f}  val_mAP {m['val_mAP']:.3f}", flush=True)
        return epoch_seconds

    def _plan(self, epoch: int, epoch_seconds: float) -> None:
        before = self.budget.epochs
        measures = self.unfreeze is None or epoch > self.unfreeze.epochs  # a head-only epoch is no pace
        epochs = self.budget.after_epoch(epoch, epoch_seconds, measures=measures)
        if not self.budget.fixed and epochs:
            self.recorder.log_plan(epoch, epochs)
        if epochs != before:
            log.info("time_budget %.1f min: %d epochs of %.1f s fit", self.budget.budget_s / 60, epochs,
                     self.budget.pace)

    def _early_stop(self, state: TrainState) -> bool:
        stopped = self.early_stop.stopped_at(state.history) if self.early_stop is not None else None
        if stopped is None:
            return False
        log.info("early stop after epoch %d of %d: %s has not improved for %d epochs", stopped,
                 self.last_epoch(stopped), self.early_stop.metric, self.early_stop.patience)
        self.recorder.log_stopped(stopped)
        return True
