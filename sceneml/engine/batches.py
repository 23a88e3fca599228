"""Batches from uint8 arrays in memory: indexed, moved to the device as uint8, scaled to ``[0, 1]``
and augmented there, so no worker process ever decodes a JPEG during training."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_float_batch(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1] on ``device`` (converted after the copy:
    uint8 is 4x less to move).

    On CUDA the batch is copied into pinned (page-locked) host memory first, from PyTorch's caching
    host allocator, so that the host-to-device copy is truly asynchronous: the Python loop returns at
    once and gathers batch i+1 while the GPU still computes batch i (from pageable memory
    ``non_blocking=True`` would wait for the copy). Nothing in the training step synchronises the
    device (losses are fetched every 20 batches), so the host stays ahead of the GPU. The copy itself
    is queued on the compute stream, so it runs after batch i's kernels rather than beside them: as
    uint8 it is small (2.2 MB for 32 images at 150 px), not worth a side stream.
    """
    t = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
    return to_device(t, device).permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; on CUDA through pinned memory, without waiting for the copy (a
    blocking copy would also wait for every kernel queued before it)."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.5, 1.0), size: int = 0) -> torch.Tensor:
    """Per-image random crop (area share in ``scale``, aspect 3/4..4/3) resized to ``size`` pixels a side
    (0: the input's), as one grid_sample."""
    b, c, height, width = x.shape
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    out = [b, c, size, size] if size else [b, c, height, width]
    grid = F.affine_grid(to_device(theta, x.device), out, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def auto_augment(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """torchvision's TrivialAugmentWide (``trivial``) or RandAugment (``randaugment``) with their default
    settings, as torchvision's --auto-augment, on each image of the batch (an op and magnitude of its
    own) as uint8, like the PIL images of the references. torchvision draws from the global RNG: it is
    seeded here from the epoch's generator, inside a fork that leaves the global state as it was."""
    from torchvision.transforms import v2

    op = v2.TrivialAugmentWide() if policy == "trivial" else v2.RandAugment()
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = x.mul(255).round_().to(torch.uint8)
        out = torch.stack([op(image) for image in images])
    return out.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def random_erase(x: torch.Tensor, generator: torch.Generator, p: float, scale=(0.02, 0.33),
                 ratio=(0.3, 3.3), value: float = 0.5) -> torch.Tensor:
    """torchvision's RandomErasing per image, on the batch: with probability ``p`` a box of ``scale`` of
    the area and aspect in ``ratio`` (log-uniform), clipped to the image, is filled with mid-grey."""
    b, _, height, width = x.shape
    erase = torch.rand(b, generator=generator) < p
    area = torch.empty(b).uniform_(*scale, generator=generator) * height * width
    aspect = torch.exp(torch.empty(b).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=generator))
    h = torch.sqrt(area * aspect).round().clamp(1, height)
    w = torch.sqrt(area / aspect).round().clamp(1, width)
    top = (torch.rand(b, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(b, generator=generator) * (width - w + 1)).floor()
    rows, cols = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)) & erase.view(-1, 1, 1))
    return x.masked_fill(to_device(box, x.device).unsqueeze(1), value)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """torchvision's references' MixUp or CutMix (one of those switched on, drawn with equal chance) on
    one batch, each image mixed with the next one in the batch (``roll(1)``): lambda ~ Beta(alpha, alpha),
    MixUp blends the pixels, CutMix pastes a box of 1 - lambda of the area (lambda is then the share the
    clipped box leaves). Returns the images, soft targets (lambda on the image's class, 1 - lambda on the
    other's; each row sums to 1) and lambda."""
    alphas = [a for a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a[1] > 0]
    draws = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    kind, alpha = alphas[int(draws[0] * len(alphas))]
    # Beta seeded from the epoch's generator (torch.distributions would draw from the global one)
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator))).beta(alpha, alpha))
    target = F.one_hot(y, num_classes).to(x.dtype)
    if kind == "mixup":
        mixed = x.mul(lam).add_(x.roll(1, 0), alpha=1 - lam)
    else:
        height, width = x.shape[-2:]
        cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
        cy, cx = int(draws[1] * height), int(draws[2] * width)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x.roll(1, 0)[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, target.mul(lam).add_(target.roll(1, 0), alpha=1 - lam), lam


@dataclass(frozen=True)
class Augmentation:
    """What is done to each training batch, in this order: flips (always), random-resized crops
    (``random_crop``, of ``crop_size`` pixels a side, 0: the images'), an auto-augment ``policy``, random
    erasing (``erase``: the probability per image), then MixUp or CutMix (an alpha > 0), whose labels are
    soft targets (B, num_classes)."""

    random_crop: bool = False
    crop_size: int = 0
    policy: str = "none"
    erase: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    num_classes: int = 0


def iterate_batches(pixels: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None, augmentation: Augmentation | None = None,
                    order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; shuffled when a generator is given, and augmented as
    ``augmentation`` says (None: not at all). ``order`` (e.g. one rank's shard) replaces the shuffle."""
    n = len(labels)
    if order is None:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    labels_t = torch.as_tensor(labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].numpy()
        x = to_float_batch(pixels[idx], device)
        y = to_device(labels_t[idx], device)
        if augmentation is not None and generator is not None:
            x, y = augment_batch(x, y, augmentation, generator)
        yield x, y


def augment_batch(x: torch.Tensor, y: torch.Tensor, aug: Augmentation,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch augmented as ``aug`` says (the order of :class:`Augmentation`)."""
    flip = torch.rand(len(y), generator=generator) < 0.5
    x = torch.where(to_device(flip, x.device).view(-1, 1, 1, 1), x.flip(3), x)
    if aug.random_crop:
        x = random_resized_crop(x, generator, size=aug.crop_size)
    if aug.policy != "none":
        x = auto_augment(x, aug.policy, generator)
    if aug.erase > 0:
        x = random_erase(x, generator, aug.erase)
    if (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and len(y) > 1:
        x, y, _ = mix_batch(x, y, aug.num_classes, aug.mixup_alpha, aug.cutmix_alpha, generator)
    return x, y


def iterate_feature_batches(features: torch.Tensor, labels: np.ndarray, batch_size: int, device: torch.device,
                            generator: torch.Generator, order: torch.Tensor | None = None,
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (features, labels) batches from cached backbone features; the same order as
    :func:`iterate_batches` draws from the same generator."""
    if order is None:
        order = torch.randperm(len(labels), generator=generator)
    labels_t = torch.as_tensor(labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield to_device(features[idx], device), to_device(labels_t[idx], device)
