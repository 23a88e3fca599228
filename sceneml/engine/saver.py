"""The checkpoint saver: the resumable state of a run (one file, rewritten atomically after each epoch)
and which epochs' model checkpoints a run keeps, as timm's ``CheckpointSaver`` owns best / last / history.

The model checkpoints themselves are stored by the recorder (MLflow LoggedModels); the saver keeps their
ids by epoch in :class:`TrainState` and says which ones ``keep`` drops. Nothing here talks to MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sceneml.engine.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from sceneml.engine.loop import EpochTrainer
from sceneml.metrics import best_row


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch, and what a resume puts back besides the tensors."""

    epoch: int = 0  # the last finished epoch
    history: list[dict] = field(default_factory=list)  # one row per finished epoch: losses, lr, val metrics
    batch_losses: list[tuple[int, float]] = field(default_factory=list)  # (global step, loss) of every batch
    models: dict[int, str] = field(default_factory=dict)  # epoch -> id of its stored model checkpoint
    val_scores: str = ""  # the last epoch's val scores file: what a resume logs if the crash came first


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


@dataclass(frozen=True)
class CheckpointSaver:
    """Writes and reads ``path``, the resumable state; ``keep`` (best, improved, all) by ``metric`` says
    which model checkpoints stay."""

    path: Path
    keep: str = "best"
    metric: str = "val_mean_class_acc"

    def save(self, trainer: EpochTrainer, state: TrainState) -> None:
        """Model, optimizer, schedule, loss scaler, EMA, every RNG and ``state``, atomically."""
        extra = {"history": json.dumps(state.history), "models": json.dumps(state.models),
                 "batch_losses": json.dumps(state.batch_losses), "val_scores": state.val_scores}
        if trainer.ema is not None:
            extra["ema"] = trainer.ema.state_dict()
        save_checkpoint(self.path, trainer.model, trainer.optimizer, trainer.schedule.scheduler, state.epoch, extra,
                        trainer.scaler)

    def restore(self, trainer: EpochTrainer, path: Path | None = None) -> TrainState:
        """Put the saved state (``path``, by default this saver's) back into ``trainer``; returns the rest."""
        saved = load_checkpoint(path or self.path)
        epoch = restore_checkpoint(saved, trainer.model, trainer.optimizer, trainer.schedule.scheduler,
                                   trainer.scaler)
        if trainer.ema is not None:
            trainer.ema.load_state_dict(saved["ema"])
        models = {int(e): m for e, m in json.loads(saved.get("models", "{}")).items()}
        return TrainState(epoch, json.loads(saved["history"]), [tuple(x) for x in json.loads(saved["batch_losses"])],
                          models, saved.get("val_scores", ""))

    def prune(self, state: TrainState) -> list[str]:
        """Take the checkpoints ``keep`` drops now out of ``state``; returns their ids (for the store)."""
        return [state.models.pop(e) for e in superseded_epochs(state.history, state.models, self.keep, self.metric)]
