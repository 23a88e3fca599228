"""The frozen-backbone feature cache: pooled features of the train and val images, kept on disk."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from sceneml.data import PreparedData
from sceneml.data.sources import cache_dir
from sceneml.engine.batches import iterate_batches
from sceneml.models import backbone_features, head_module_name


def cached_backbone_features(arch: str, model: torch.nn.Module, data: PreparedData, device: torch.device,
                             ) -> tuple[dict[str, torch.Tensor], bool]:
    """Backbone features of the train and val images, from the on-disk cache when the same backbone
    (every non-head tensor) has already seen the same pixels: the children of a frozen-backbone
    sweep share one backbone, so only the first computes them. Returns the features and whether they
    came from the disk."""
    head = head_module_name(arch, model) + "."
    sha = hashlib.sha256(f"features-v2|{arch}|{getattr(model, 'transform_input', False)}".encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith(head):
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
