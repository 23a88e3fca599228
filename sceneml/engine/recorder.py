"""What the training loop tells the outside world, and to whom: :class:`Recorder` tells no one. It is
what the other ranks of a torchrun launch and library use without tracking get; the MLflow recorder
(:mod:`sceneml.tracking.recorder`) writes the same calls into a run. The loop calls each method on the
rank that validates, in this order per epoch: ``log_model``, ``log_resumable``, ``log_epoch``,
``drop_models``, ``log_timings``, then ``log_plan`` under a time budget."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sceneml.engine.saver import TrainState


class Recorder:
    """The recorder that records nothing (model ids are ``epoch-<n>``, so retention works the same)."""

    def log_batch_losses(self, first_step: int, values: list[float]) -> None:
        """Training losses of consecutive batches, the first at global step ``first_step``."""

    def log_model(self, epoch: int, model: nn.Module) -> str:
        """Store epoch ``epoch``'s model checkpoint; returns its id."""
        return f"epoch-{epoch}"

    def log_resumable(self, path: Path) -> None:
        """The resumable state was just written to ``path``."""

    def log_epoch(self, history: list[dict], scores_csv: str, model_id: str) -> None:
        """The newest epoch's history row (``history[-1]``: losses, lr, ``val_*`` metrics) and its val scores file."""

    def drop_models(self, model_ids: list[str]) -> None:
        """The checkpoints the saver no longer keeps."""

    def log_timings(self, epoch: int, seconds: dict[str, float]) -> None:
        """Where epoch ``epoch``'s time went."""

    def log_plan(self, epoch: int, epochs: int) -> None:
        """``time_budget``: after ``epoch``, ``epochs`` epochs fit."""

    def log_stopped(self, epoch: int) -> None:
        """``early_stop`` ended training after ``epoch``."""

    def finish(self, state: TrainState, epochs: int) -> None:
        """Training is over after ``state.epoch`` of ``epochs`` planned epochs."""

    def drain(self) -> None:
        """Write whatever is still queued (also when training ends with an error)."""
