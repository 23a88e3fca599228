"""The torch side of training: batches from uint8 arrays, ``train_one_epoch``, ``predict_scores``,
:class:`EpochTrainer` (one epoch on every rank, frozen-backbone feature cache included), and the
resumable checkpoint dict. Nothing here talks to MLflow; callers pass a callback for batch losses.

Images live in memory as uint8 (decoded once); a batch is indexed, moved to the device, scaled to
``[0, 1]`` and augmented there, so no worker process ever decodes a JPEG during training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sceneml import distributed
from sceneml.data import PreparedData
from sceneml.data.sources import cache_dir
from sceneml.errors import SceneMLError
from sceneml.models import (
    AUX_LOSS_WEIGHT,
    backbone_features,
    head_module_name,
    head_of,
    set_train_mode,
    split_logits,
)

if TYPE_CHECKING:  # config imports this module's OPTIMIZERS
    from sceneml.config import TrainConfig

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
SCHEDULERS = ("none", "cosine", "step")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The ``--opt`` switch of torchvision's references/classification, for the optimizers we sweep."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    if name == "rmsprop":
        # eps/alpha as in torchvision's references (TF-style RMSprop)
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   eps=0.0316, alpha=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise SceneMLError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int):
    """An epoch-level LR schedule (stepped once per epoch), or None."""
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    raise SceneMLError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def to_float_batch(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1] on ``device`` (converted after the copy:
    uint8 is 4x less to move)."""
    t = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
    non_blocking = device.type == "cuda"
    t = t.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2)
    return t.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.5, 1.0)) -> torch.Tensor:
    """Per-image random crop (area share in ``scale``, aspect 3/4..4/3) resized back, as one grid_sample."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def iterate_batches(pixels: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None, augment: bool = False,
                    crop: bool = False, order: torch.Tensor | None = None,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; shuffled and augmented when a generator is given. ``order``
    (e.g. one rank's shard) replaces the shuffle."""
    n = len(labels)
    if order is None:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    labels_t = torch.as_tensor(labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].numpy()
        x = to_float_batch(pixels[idx], device)
        y = labels_t[idx].to(device, non_blocking=device.type == "cuda")
        if augment and generator is not None:
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(3), x)
            if crop:
                x = random_resized_crop(x, generator)
        yield x, y


def iterate_feature_batches(features: torch.Tensor, labels: np.ndarray, batch_size: int, device: torch.device,
                            generator: torch.Generator, order: torch.Tensor | None = None,
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (features, labels) batches from cached backbone features; the same order as
    :func:`iterate_batches` draws from the same generator."""
    if order is None:
        order = torch.randperm(len(labels), generator=generator)
    labels_t = torch.as_tensor(labels)
    non_blocking = device.type == "cuda"
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield features[idx].to(device, non_blocking=non_blocking), labels_t[idx].to(device, non_blocking=non_blocking)


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int,
                    on_losses: Callable[[list[float]], None] | None = None, flush_every: int = 20,
                    progress: bool = True, desc: str = "train",
                    reduce_losses: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """One pass over ``batches``. Returns the mean training loss (weighted by batch size). The caller
    sets the training mode (``model.train()`` or :func:`sceneml.models.set_train_mode`).

    Batch losses stay on the device and are fetched every ``flush_every`` batches (one sync instead of
    one per batch), then handed to ``on_losses`` for logging; ``reduce_losses`` (data-parallel runs:
    the mean over ranks) is applied to them first.
    """
    pending: list[torch.Tensor] = []
    total, seen = None, 0
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
        logits, aux = split_logits(model(x))
        loss = F.cross_entropy(logits, y)
        for aux_logits in aux:
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux_logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        detached = loss.detach()
        pending.append(detached)
        total = detached * len(y) if total is None else total + detached * len(y)
        seen += len(y)
        bar.update(len(y))
        if len(pending) >= flush_every:
            flush()
    flush()
    bar.close()
    mean_loss = float(total) / max(seen, 1) if total is not None else float("nan")
    if not np.isfinite(mean_loss):
        raise SceneMLError(f"training diverged (loss={mean_loss}); lower the learning rate")
    return mean_loss


@torch.inference_mode()
def predict_scores(model: nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 256,
                   progress: bool = False, desc: str = "eval") -> np.ndarray:
    """Softmax probabilities (n, C) as float64, in the order of ``pixels``."""
    try:
        model.eval()
    except NotImplementedError:  # a module loaded from pt2 is exported in eval mode and refuses .eval()
        pass
    dummy = np.zeros(len(pixels), dtype=np.int64)
    out = []
    for x, _ in tqdm(iterate_batches(pixels, dummy, batch_size, device), desc=desc, disable=not progress,
                     leave=False, total=(len(pixels) + batch_size - 1) // batch_size):
        logits, _ = split_logits(model(x))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


@torch.inference_mode()
def predict_scores_from_features(head: nn.Module, features: torch.Tensor, device: torch.device,
                                 batch_size: int = 4096) -> np.ndarray:
    """Softmax probabilities (n, C) as float64 from cached backbone features."""
    was_training = head.training
    head.eval()
    try:
        out = [torch.softmax(head(features[i:i + batch_size].to(device)).float(), dim=1).cpu()
               for i in range(0, len(features), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(out).double().numpy()


# ---------------------------------------------------------------- one epoch, on every rank

def cached_backbone_features(arch: str, model: torch.nn.Module, data: PreparedData, device: torch.device,
                             ) -> tuple[dict[str, torch.Tensor], bool]:
    """Backbone features of the train and val images, from the on-disk cache when the same backbone
    (every non-head tensor) has already seen the same pixels: the children of a frozen-backbone
    sweep share one backbone, so only the first computes them. Returns the features and whether they
    came from the disk."""
    head = head_module_name(arch) + "."
    sha = hashlib.sha256(f"features-v1|{arch}|{getattr(model.backbone, 'transform_input', False)}".encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith("backbone." + head):
            sha.update(name.encode())
            sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for split in ("train", "val"):
        sha.update(np.ascontiguousarray(data.splits[split].pixels).data)
    path = cache_dir() / "features" / f"{sha.hexdigest()[:24]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True), True
    features = {split: backbone_features(arch, model, (x for x, _ in iterate_batches(
        data.splits[split].pixels, data.splits[split].labels, 64, device))) for split in ("train", "val")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(features, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run reads a whole file or none
    return features, False


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
        # A frozen backbone is a fixed function of the image (eval mode, see set_train_mode): compute
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
        trained = self.head if self.cached is not None else model
        if self.ctx is not None:
            trained = torch.nn.parallel.DistributedDataParallel(
                trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.trained = trained

    def train_pass(self, epoch: int, on_losses, progress: bool) -> tuple[float, float]:
        """One epoch of training; returns the mean loss over every rank's images and the seconds."""
        cfg, ctx, train = self.cfg, self.ctx, self.data.splits["train"]
        # one generator per epoch (and rank): order and augmentation do not depend on where we resumed
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + (7919 * ctx.rank if ctx else 0))
        order = distributed.shard_order(len(train), ctx, cfg.seed, epoch) if ctx is not None else None
        set_train_mode(cfg.arch, self.model, frozen=cfg.freeze_backbone)
        if self.cached is not None:
            batches = iterate_feature_batches(self.cached["train"], train.labels, cfg.batch_size, self.device,
                                              generator, order)
        else:
            batches = iterate_batches(train.pixels, train.labels, cfg.batch_size, self.device, generator,
                                      augment=True, crop=cfg.random_crop, order=order)
        n = len(order) if order is not None else len(train)
        started = time.perf_counter()
        loss = train_one_epoch(self.trained, self.optimizer, batches, n, on_losses=on_losses, progress=progress,
                               desc=f"epoch {epoch}/{cfg.epochs}",
                               reduce_losses=distributed.mean_over_ranks if ctx is not None else None)
        if ctx is not None:
            loss = distributed.weighted_mean_over_ranks(loss, n, self.device)
        return loss, time.perf_counter() - started

    def val_scores(self) -> np.ndarray:
        """Softmax scores on the whole val split (rank 0 only: no collective inside)."""
        if self.cached is not None:
            return predict_scores_from_features(self.head, self.cached["val"], self.device)
        return predict_scores(self.model, self.data.splits["val"].pixels, self.device)


# ---------------------------------------------------------------- resumable checkpoint dict

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state as plain lists/ints so torch.load(weights_only=True) can read it back
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int, extra: dict) -> None:
    """Write the resumable state atomically: a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "rng": rng_state(),
        **extra,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
