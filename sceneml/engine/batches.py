"""Batches from uint8 arrays in memory: indexed, moved to the device as uint8, scaled to ``[0, 1]``
and augmented there, so no worker process ever decodes a JPEG during training."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


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
