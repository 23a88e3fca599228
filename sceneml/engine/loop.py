"""The epoch loop: ``train_one_epoch`` and its sibling ``predict_log_probs`` (as in torchvision's
references/classification), the optimizers we sweep, and :class:`EpochTrainer`, what every rank does
per epoch. Nothing here talks to MLflow: callers pass callbacks for batch losses and steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sceneml.config import FP16_NEEDS_CUDA, ONECYCLE_WARMS_UP, OPTIMIZERS, SCHEDULERS, TrainConfig
from sceneml.data import PreparedData
from sceneml.engine import distributed
from sceneml.engine.batches import iterate_batches, iterate_feature_batches
from sceneml.engine.features import cached_backbone_features
from sceneml.errors import SceneMLError
from sceneml.models import AUX_LOSS_WEIGHT, head_of, split_logits

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The ``--opt`` switch of torchvision's references/classification, for the optimizers we sweep.

    Adam, AdamW and SGD take torch's fused kernel (one pass over all parameters, on the CPU too): the
    same update to float rounding, and on 2 CPU cores an AdamW step of ResNet18 in 10 ms instead of 42
    (benchmarks/optimizer_step.py). RMSprop has no fused kernel: it takes the multi-tensor one."""
    params = [p for p in params if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0, fused=fused)
    if name == "rmsprop":
        # eps/alpha as in torchvision's references (TF-style RMSprop)
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   eps=0.0316, alpha=0.9, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    raise SceneMLError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


WARMUP_START = 0.01  # the first warmup epoch's share of lr (torchvision's --lr-warmup-decay)


PER_STEP_SCHEDULERS = ("onecycle",)  # stepped after every optimizer step; the others once per epoch


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                    steps_per_epoch: int = 1):
    """An LR schedule, or None: ``warmup_epochs`` of linear warmup from ``WARMUP_START`` x lr, then
    ``name`` over the remaining epochs, as torchvision's references do, stepped once per epoch; or
    ``onecycle`` (Smith's 1cycle, torch's OneCycleLR with its defaults: up from lr/25 over the first 30 %
    of the steps, then down to lr/25e4, both along a half cosine), stepped after each of the
    ``epochs * steps_per_epoch`` steps."""
    lr_sched = torch.optim.lr_scheduler
    rest = epochs - warmup_epochs
    if name == "onecycle":
        if warmup_epochs:
            raise SceneMLError(ONECYCLE_WARMS_UP)
        # the momentum stays the optimizer's own (its `momentum` param) rather than cycling
        return lr_sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                   total_steps=epochs * steps_per_epoch, cycle_momentum=False)
    if name == "none":
        main = None
    elif name == "cosine":
        main = lr_sched.CosineAnnealingLR(optimizer, T_max=rest)
    elif name == "step":
        main = lr_sched.StepLR(optimizer, step_size=max(1, rest // 3), gamma=0.1)
    elif name == "linear":  # to zero when the last epoch ends (the budgeted-training schedule)
        main = lr_sched.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    else:
        raise SceneMLError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if warmup_epochs == 0:
        return main
    warmup = lr_sched.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup_epochs)
    if main is None:
        return warmup
    return lr_sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


# How far past its budget a time_budget run may end its last epoch, rather than stop with the lr above 0
# (the whole process may overshoot its budget by a tenth, plus a minute for start-up and the end)
OVERRUN = 1.1


@dataclass
class BudgetPlan:
    """``time_budget``: how many epochs fit, and the lr factor of each optimizer step. ``epochs`` is 0 until
    the first epoch has measured how long an epoch takes (training, validation, checkpoint and logging);
    until then the lr stays at its full value, afterwards it falls linearly to 0 at the end of the last
    epoch, the schedule of Li, Yumer & Ramanan's "Budgeted Training" (ICLR 2020). Each later epoch may
    move that end (more epochs when they run faster than planned, fewer when slower): the line then
    turns where it is, at ``anchor_step`` and ``anchor_factor``, and falls from there to 0 at the new end."""

    budget_s: float
    started: float  # time.monotonic() when the task started
    steps_per_epoch: int
    epochs: int = 0
    anchor_step: int = 0
    anchor_factor: float = 1.0

    def factor(self, step: int) -> float:
        if not self.epochs:
            return 1.0
        end = self.epochs * self.steps_per_epoch
        if end <= self.anchor_step:
            return 0.0
        return self.anchor_factor * max(0.0, (end - step) / (end - self.anchor_step))

    def fit(self, done: int, epoch_seconds: float, now: float | None = None) -> int:
        """The epochs that fit once ``done`` epochs are over, an epoch taking ``epoch_seconds`` from now on
        (at least ``done``; a tenth of an epoch is kept for the run's end). A finished plan stays as it is.
        When not one more epoch fits, one more still runs if it ends within ``OVERRUN`` times the budget: the lr
        has not reached 0 yet (the line ends with the last planned epoch), and stopping would keep weights
        that were never annealed."""
        if self.epochs and done >= self.epochs:
            return self.epochs  # the line has reached 0: more epochs would train at lr 0
        now = time.monotonic() if now is None else now
        left = self.budget_s - (now - self.started) - 0.1 * epoch_seconds
        fits = done + max(0, int(left // epoch_seconds))
        if fits == done and now - self.started + epoch_seconds <= OVERRUN * self.budget_s:
            fits = done + 1
        if fits != self.epochs:
            self.keep(fits, done * self.steps_per_epoch)
        return self.epochs

    def keep(self, epochs: int, step: int, factor: float | None = None) -> None:
        """End the line after ``epochs`` epochs, turning it at ``step`` where its factor is ``factor`` (by
        default the current line's there; a resumed run passes the factor its checkpoint holds)."""
        self.anchor_factor = self.factor(step) if factor is None else factor
        self.anchor_step, self.epochs = step, epochs


def then(first: Callable[[], object], after: Callable[[], None] | None) -> Callable[[], None]:
    """One after-step callback that calls ``first``, then ``after`` (if any)."""
    def step() -> None:
        first()
        if after is not None:
            after()
    return step


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torchvision's --model-ema: a copy of ``model`` whose weights (and BatchNorm buffers) follow
    ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; the first update copies
    the weights."""
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX). There bf16 autocast trains
    ResNet18 about 2.3x as fast as fp32; without it bf16 is emulated and about 3.5x slower."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # public in recent torch releases
    if capabilities is not None:
        return bool(capabilities().get("amx_bf16", False))
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # older releases


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32."""
    if name == "fp32":
        return None
    if device.type != "cuda":
        if name == "fp16":
            raise SceneMLError(FP16_NEEDS_CUDA)
        return torch.bfloat16 if name == "bf16" or cpu_has_bf16_tiles() else None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


class EpochLoss(NamedTuple):
    """An epoch's mean training loss: ``main`` of the classifier's own output (what ``val_loss``
    measures too), ``total`` the optimised one, GoogLeNet's auxiliary losses included (= main elsewhere)."""

    main: float
    total: float


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int,
                    on_losses: Callable[[list[float]], None] | None = None, flush_every: int = 20,
                    progress: bool = True, desc: str = "train",
                    reduce_losses: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    on_step: Callable[[], None] | None = None, amp_dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, label_smoothing: float = 0.0) -> EpochLoss:
    """One pass over ``batches``. Returns the mean training losses (weighted by batch size). The caller
    sets the training mode.

    Batch losses (of the main head) stay on the device and are fetched every ``flush_every`` batches
    (one sync instead of one per batch), then handed to ``on_losses`` for logging; ``reduce_losses``
    (data-parallel runs: the mean over ranks) is applied to them first.
    ``on_step`` is called after every optimizer step.
    A batch of a single image is skipped (BatchNorm cannot train on it).
    ``amp_dtype`` runs the forward pass under autocast; ``scaler`` (fp16) scales the loss.
    ``label_smoothing`` spreads that share of each target over all classes (the losses returned and
    handed on are the smoothed ones, which the optimizer minimises). Labels are class indices, or soft
    targets (B, C) from MixUp/CutMix: the cross-entropy takes either.
    """
    pending: list[torch.Tensor] = []
    sums, seen = None, 0  # (main, total) loss sums, on the device
    start = time.perf_counter()
    bar = tqdm(total=n_images, desc=desc, unit="img", disable=not progress, leave=False)

    def flush() -> None:
        if pending:
            stacked = torch.stack(pending)
            values = (reduce_losses(stacked) if reduce_losses is not None else stacked).tolist()
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
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, aux = split_logits(model(x))
            main = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            loss = main
            for aux_logits in aux:
                loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux_logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        detached = torch.stack([main.detach(), loss.detach()])
        pending.append(detached[0])
        sums = detached * len(y) if sums is None else sums + detached * len(y)
        seen += len(y)
        bar.update(len(y))
        if len(pending) >= flush_every:
            flush()
        if on_step is not None:
            on_step()
    flush()
    bar.close()
    main_mean, total_mean = (sums / max(seen, 1)).tolist() if sums is not None else (float("nan"),) * 2
    if not np.isfinite(total_mean):
        raise SceneMLError(f"training diverged (loss={total_mean}); lower the learning rate")
    return EpochLoss(main_mean, total_mean)


@torch.inference_mode()
def predict_log_probs(model: nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 256,
                      progress: bool = False, desc: str = "eval", tta: bool = False) -> np.ndarray:
    """Log-softmax (n, C) in float64, in the order of ``pixels`` (the model is put in eval mode).

    Taken from the logits in float64: a probability that would underflow to 0 in a softmax still has
    its exact log here, so a loss computed from these never hits a clipping floor. ``tta``: the log of
    the mean of the softmax of each image and of its mirror image (log-sum-exp of the two, less log 2).
    """
    model.eval()
    dummy = np.zeros(len(pixels), dtype=np.int64)
    out = []
    for x, _ in tqdm(iterate_batches(pixels, dummy, batch_size, device), desc=desc, disable=not progress,
                     leave=False, total=(len(pixels) + batch_size - 1) // batch_size):
        logits, _ = split_logits(model(x))
        log_p = torch.log_softmax(logits.double(), dim=1)
        if tta:
            mirrored = torch.log_softmax(split_logits(model(x.flip(-1)))[0].double(), dim=1)
            log_p = torch.logaddexp(log_p, mirrored) - math.log(2)
        out.append(log_p.cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def predict_scores(model: nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 256,
                   progress: bool = False, desc: str = "eval", tta: bool = False) -> np.ndarray:
    """Softmax probabilities (n, C) as float64, in the order of ``pixels`` (``tta``: see predict_log_probs)."""
    return np.exp(predict_log_probs(model, pixels, device, batch_size, progress, desc, tta))


@torch.inference_mode()
def log_probs_from_features(head: nn.Module, features: torch.Tensor, device: torch.device,
                            batch_size: int = 4096) -> np.ndarray:
    """Log-softmax (n, C) in float64 from cached backbone features."""
    was_training = head.training
    head.eval()
    try:
        out = [torch.log_softmax(head(features[i:i + batch_size].to(device)).double(), dim=1).cpu()
               for i in range(0, len(features), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(out).numpy()


@dataclass
class EpochTrainer:
    """What every rank does per epoch: the training pass (on cached features when the backbone is
    frozen), shard and collectives included when launched by torchrun."""

    cfg: TrainConfig
    data: PreparedData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    ctx: distributed.DistContext | None
    cached: dict[str, torch.Tensor] | None = None
    feature_cache_seconds: float = 0.0
    features_from_disk: bool = False

    def __post_init__(self) -> None:
        # A frozen backbone is a fixed function of the image (eval mode, see train_pass): compute
        # its features once and train only the head on them. Augmentation cannot act on cached
        # features, so it is off in this mode (the linear-probe protocol); random_crop=true keeps the
        # per-epoch forward pass with flips and crops instead.
        cfg, model = self.cfg, self.model
        if cfg.freeze_backbone and not cfg.random_crop:
            started = time.perf_counter()
            self.cached, self.features_from_disk = cached_backbone_features(cfg.arch, model, self.data, self.device)
            self.feature_cache_seconds = time.perf_counter() - started
            log.info("freeze_backbone: %d-d features of train and val ready in %.1fs; epochs train the head only",
                     self.cached["train"].shape[1], self.feature_cache_seconds)
        self.head = head_of(cfg.arch, model)
        # ema: validation, the logged checkpoints and so the champion are the averaged weights
        self.ema = make_ema(model, cfg.ema) if cfg.ema > 0 else None
        trained = self.head if self.cached is not None else model
        if self.ctx is not None:
            trained = torch.nn.parallel.DistributedDataParallel(
                trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # compiled for training only: validation and the checkpoint use the plain module
        self.trained = torch.compile(trained) if cfg.compile else trained
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch on this rank (at most: a last batch of one image makes none)."""
        n = len(self.data.splits["train"])
        if self.ctx is not None:
            n = len(distributed.shard_order(n, self.ctx, self.cfg.seed, 1))
        return math.ceil(n / self.cfg.batch_size)

    def train_pass(self, epoch: int, on_losses: Callable[[list[float]], None] | None = None,
                   on_step: Callable[[], None] | None = None, progress: bool = False) -> tuple[EpochLoss, float]:
        """One epoch of training; returns the mean losses over every rank's images and the seconds."""
        cfg, ctx, train = self.cfg, self.ctx, self.data.splits["train"]
        # one generator per epoch (and rank): order and augmentation do not depend on where we resumed
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + (7919 * ctx.rank if ctx else 0))
        order = distributed.shard_order(len(train), ctx, cfg.seed, epoch) if ctx is not None else None
        # A frozen backbone stays in eval mode (BatchNorm keeps its running statistics, dropout is off,
        # GoogLeNet computes no aux heads): a fixed function of the image, whose features can be cached.
        self.model.train(not cfg.freeze_backbone)
        if self.cached is not None:
            batches = iterate_feature_batches(self.cached["train"], train.labels, cfg.batch_size, self.device,
                                              generator, order)
        else:
            batches = iterate_batches(train.pixels, train.labels, cfg.batch_size, self.device, generator,
                                      augment=True, crop=cfg.random_crop, crop_size=cfg.train_crop_size, order=order,
                                      policy=cfg.auto_augment, erase=cfg.random_erase,
                                      mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                                      num_classes=len(self.data.classes))
        n = len(order) if order is not None else len(train)
        if self.ema is not None:
            ema, model = self.ema, self.model
            on_step = then(lambda: ema.update_parameters(model), on_step)
        started = time.perf_counter()
        # DDP all-reduces the gradients inside backward(): a rank that stopped shows up there
        with distributed.waiting_for_ranks(f"epoch {epoch}'s gradient all-reduce") if ctx is not None \
                else contextlib.nullcontext():
            loss = train_one_epoch(self.trained, self.optimizer, batches, n, on_losses=on_losses,
                                   progress=progress, desc=f"epoch {epoch}/{cfg.epochs}", on_step=on_step,
                                   amp_dtype=self.amp_dtype, scaler=self.scaler, label_smoothing=cfg.label_smoothing,
                                   reduce_losses=distributed.mean_over_ranks if ctx is not None else None)
        if ctx is not None:
            loss = EpochLoss(*(distributed.weighted_mean_over_ranks(v, n, self.device) for v in loss))
        return loss, time.perf_counter() - started

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and logged: the EMA weights when ``ema`` is on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def val_log_probs(self) -> np.ndarray:
        """Log-softmax on the whole val split (rank 0 only: no collective inside)."""
        if self.cached is not None:
            head = head_of(self.cfg.arch, self.eval_model) if self.ema is not None else self.head
            return log_probs_from_features(head, self.cached["val"], self.device)
        return predict_log_probs(self.eval_model, self.data.splits["val"].pixels, self.device)
