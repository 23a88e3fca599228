"""One epoch of training: ``train_one_epoch`` (as in torchvision's references/classification) and
:class:`EpochTrainer`, what every rank holds and does per epoch (model, optimizer, its schedule, EMA,
mixed precision, the frozen-backbone feature cache, DDP). Nothing here talks to MLflow: callers pass
callbacks for batch losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sceneml.architectures import arch_of
from sceneml.data import PreparedData
from sceneml.engine import distributed
from sceneml.engine.batches import Augmentation, iterate_batches, iterate_feature_batches
from sceneml.engine.features import cached_backbone_features
from sceneml.engine.inference import log_probs_from_features, predict_log_probs
from sceneml.engine.optim import make_ema
from sceneml.engine.precision import resolve_precision
from sceneml.errors import SceneMLError
from sceneml.models import AUX_LOSS_WEIGHT, head_of, split_logits

log = logging.getLogger(__name__)
FLUSH_EVERY = 20  # batch losses are fetched from the device every this many batches (one sync, not one each)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochLoss(NamedTuple):
    """An epoch's mean training loss: ``main`` of the classifier's own output (what ``val_loss``
    measures too), ``total`` the optimised one, GoogLeNet's auxiliary losses included (= main elsewhere)."""

    main: float
    total: float


@dataclass(frozen=True)
class StepRule:
    """How each optimizer step is taken: ``amp_dtype`` runs the forward pass under autocast, ``scaler``
    (fp16) scales the loss, ``label_smoothing`` spreads that share of each target over all classes (the
    losses are the smoothed ones, which the optimizer minimises); ``on_step`` is called after every step;
    ``reduce_losses`` (data-parallel runs: the mean over ranks) is applied to the batch losses before they
    are handed on."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    label_smoothing: float = 0.0
    on_step: Callable[[], None] | None = None
    reduce_losses: Callable[[torch.Tensor], torch.Tensor] | None = None


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule: StepRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(main, total) cross-entropy of one batch; labels are class indices, or soft targets (B, C) from
    MixUp/CutMix: the cross-entropy takes either."""
    with torch.autocast(x.device.type, dtype=rule.amp_dtype or torch.float32, enabled=rule.amp_dtype is not None):
        logits, aux = split_logits(model(x))
        main = F.cross_entropy(logits.float(), y, label_smoothing=rule.label_smoothing)
        total = main
        for aux_logits in aux:
            total = total + AUX_LOSS_WEIGHT * F.cross_entropy(aux_logits.float(), y,
                                                              label_smoothing=rule.label_smoothing)
    return main, total


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int, rule: StepRule = StepRule(),
                    on_losses: Callable[[list[float]], None] | None = None, progress: bool = True,
                    desc: str = "train") -> EpochLoss:
    """One pass over ``batches``, each step taken as ``rule`` says. Returns the mean training losses
    (weighted by batch size). The caller sets the training mode.

    Batch losses (of the main head) stay on the device and are fetched every ``FLUSH_EVERY`` batches,
    then handed to ``on_losses``. A batch of a single image is skipped (BatchNorm cannot train on it).
    """
    pending: list[torch.Tensor] = []
    sums, seen = None, 0  # (main, total) loss sums, on the device
    start = time.perf_counter()
    bar = tqdm(total=n_images, desc=desc, unit="img", disable=not progress, leave=False)

    def flush() -> None:
        if pending:
            stacked = torch.stack(pending)
            values = (rule.reduce_losses(stacked) if rule.reduce_losses is not None else stacked).tolist()
            pending.clear()
            if on_losses is not None:
                on_losses(values)
            bar.set_postfix(loss=f"{values[-1]:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")

    for x, y in batches:
        if len(y) == 1 and model.training:
            # BatchNorm cannot train on one image (its batch variance is 0): the last batch of an
            # epoch that holds a single image is dropped, as DataLoader(drop_last=True) would
            bar.update(1)
            continue
        main, total = _losses(model, x, y, rule)
        _step(optimizer, total, rule.scaler)
        detached = torch.stack([main.detach(), total.detach()])
        pending.append(detached[0])
        sums = detached * len(y) if sums is None else sums + detached * len(y)
        seen += len(y)
        bar.update(len(y))
        if len(pending) >= FLUSH_EVERY:
            flush()
        if rule.on_step is not None:
            rule.on_step()
    flush()
    bar.close()
    main_mean, total_mean = (sums / max(seen, 1)).tolist() if sums is not None else (float("nan"),) * 2
    if not np.isfinite(total_mean):
        raise SceneMLError(f"training diverged (loss={total_mean}); lower the learning rate")
    return EpochLoss(main_mean, total_mean)


@dataclass(frozen=True)
class Optimisation:
    """How a run trains besides its optimizer, schedule and augmentation: the engine's share of a run's
    config."""

    batch_size: int = 32
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of the weights' moving average; 0 = off
    precision: str = "fp32"
    compile: bool = False
    freeze_backbone: bool = False
    seed: int = 0


@dataclass(frozen=True)
class LrSchedule:
    """A torch LR scheduler and when it is told to step: after every optimizer step, or once an epoch."""

    scheduler: object | None = None
    per_step: bool = False


def steps_per_epoch(n_train: int, batch_size: int, ctx: distributed.DistContext | None, seed: int) -> int:
    """Optimizer steps of one epoch on this rank (at most: a last batch of one image makes none)."""
    if ctx is not None:
        n_train = len(distributed.shard_order(n_train, ctx, seed, 1))
    return math.ceil(n_train / batch_size)


@dataclass
class EpochTrainer:
    """What every rank holds and does per epoch: the training pass (on cached features when the backbone
    is frozen), shard and collectives included when launched by torchrun, and the validation pass."""

    arch: str
    data: PreparedData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    device: torch.device
    ctx: distributed.DistContext | None
    how: Optimisation
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        # A frozen backbone is a fixed function of the image (eval mode, see train_pass): compute its
        # features once and train only the head on them. Augmentation cannot act on cached features, so
        # it is off in this mode (the linear-probe protocol); random_crop=true keeps the per-epoch forward
        # pass with flips and crops instead.
        self.cached, self.feature_cache_seconds, self.features_from_disk = None, 0.0, False
        if self.how.freeze_backbone and not self.augmentation.random_crop:
            started = time.perf_counter()
            self.cached, self.features_from_disk = cached_backbone_features(self.arch, self.model, self.data,
                                                                            self.device)
            self.feature_cache_seconds = time.perf_counter() - started
            log.info("freeze_backbone: %d-d features of train and val ready in %.1fs; epochs train the head only",
                     self.cached["train"].shape[1], self.feature_cache_seconds)
        self.head = head_of(self.arch, self.model)
        # ema: validation, the logged checkpoints and so the champion are the averaged weights
        self.ema = make_ema(self.model, self.how.ema) if self.how.ema > 0 else None
        trained = self.head if self.cached is not None else self.model
        if self.ctx is not None:
            trained = torch.nn.parallel.DistributedDataParallel(
                trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # compiled for training only: validation and the checkpoint use the plain module
        self.trained = torch.compile(trained) if self.how.compile else trained
        self.amp_dtype = resolve_precision(self.how.precision, self.device, self.model)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def has_aux(self) -> bool:
        """Whether the optimised loss adds auxiliary heads' (a frozen GoogLeNet computes none)."""
        return arch_of(self.arch, self.model).aux and not self.how.freeze_backbone

    def _batches(self, epoch: int) -> tuple[Iterable, int]:
        how, ctx, train = self.how, self.ctx, self.data.splits["train"]
        # one generator per epoch (and rank): order and augmentation do not depend on where we resumed
        generator = torch.Generator().manual_seed(how.seed * 1000 + epoch + (7919 * ctx.rank if ctx else 0))
        order = distributed.shard_order(len(train), ctx, how.seed, epoch) if ctx is not None else None
        n = len(order) if order is not None else len(train)
        if self.cached is not None:
            return iterate_feature_batches(self.cached["train"], train.labels, how.batch_size, self.device,
                                           generator, order), n
        return iterate_batches(train.pixels, train.labels, how.batch_size, self.device, generator,
                               self.augmentation, order), n

    def _after_step(self) -> Callable[[], None] | None:
        calls = [lambda: self.ema.update_parameters(self.model)] if self.ema is not None else []
        if self.schedule.per_step:
            calls.append(self.schedule.scheduler.step)
        return (lambda: [call() for call in calls]) if calls else None

    def train_pass(self, epoch: int, epochs: int, on_losses: Callable[[list[float]], None] | None = None,
                   progress: bool = False) -> tuple[EpochLoss, float]:
        """Epoch ``epoch`` of ``epochs``: one pass of training, then the schedule's epoch step. Returns the
        mean losses over every rank's images and the seconds the pass took."""
        # A frozen backbone stays in eval mode (BatchNorm keeps its running statistics, dropout is off,
        # GoogLeNet computes no aux heads): a fixed function of the image, whose features can be cached.
        self.model.train(not self.how.freeze_backbone)
        batches, n = self._batches(epoch)
        rule = StepRule(self.amp_dtype, self.scaler, self.how.label_smoothing, self._after_step(),
                        distributed.mean_over_ranks if self.ctx is not None else None)
        started = time.perf_counter()
        # DDP all-reduces the gradients inside backward(): a rank that stopped shows up there
        with distributed.waiting_for_ranks(f"epoch {epoch}'s gradient all-reduce") if self.ctx is not None \
                else contextlib.nullcontext():
            loss = train_one_epoch(self.trained, self.optimizer, batches, n, rule, on_losses, progress,
                                   f"epoch {epoch}/{epochs}")
        seconds = time.perf_counter() - started
        if self.schedule.scheduler is not None and not self.schedule.per_step:
            self.schedule.scheduler.step()
        if self.ctx is not None:
            loss = EpochLoss(*(distributed.weighted_mean_over_ranks(v, n, self.device) for v in loss))
        return loss, seconds

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and logged: the EMA weights when ``ema`` is on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def val_log_probs(self) -> np.ndarray:
        """Log-softmax on the whole val split (rank 0 only: no collective inside)."""
        if self.cached is not None:
            head = head_of(self.arch, self.eval_model) if self.ema is not None else self.head
            return log_probs_from_features(head, self.cached["val"], self.device)
        return predict_log_probs(self.eval_model, self.data.splits["val"].pixels, self.device)
