"""What happens inside a model: forward hooks on named modules over a stream of image batches, giving
per module (a) the share of non-positive activations per image (mean and std over images) and (b)
the covariance of the spatially averaged feature maps, from running sums only."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sceneml.analysis.statistics import RunningCovariance, RunningMoments
from sceneml.architectures import arch_of
from sceneml.errors import SceneMLError


def default_modules(arch: str, network: nn.Module, count: int = 5) -> list[str]:
    """The architecture's declared modules (sceneml.architectures), else ``count`` convolutions evenly
    spaced from the first to the last."""
    declared = arch_of(arch, network).modules
    if declared:
        return list(declared)
    convs = [name for name, m in network.named_modules() if isinstance(m, nn.Conv2d)]
    picks = np.unique(np.linspace(0, len(convs) - 1, count).round().astype(int))
    return [convs[i] for i in picks]


def resolve_modules(network: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """``name -> module``; an unknown name fails with close matches and a short sample of valid names."""
    available = dict(network.named_modules())
    out = {}
    for name in names:
        if name not in available:
            valid = [n for n in available if n]
            close = difflib.get_close_matches(name, valid, n=3)
            sample = valid[:4] + ["..."] + valid[len(valid) // 2:len(valid) // 2 + 3] + ["..."] + valid[-2:]
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise SceneMLError(f"unknown module {name!r}; {hint}valid names ({len(valid)} in all) include: "
                               f"{', '.join(sample)}")
        out[name] = available[name]
    return out


@dataclass
class ModuleStatistics:
    nonpos_pct: RunningMoments = field(default_factory=RunningMoments)
    features: RunningCovariance = field(default_factory=RunningCovariance)


def _feature_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SceneMLError(f"module output of type {type(output).__name__} is not a tensor")


@torch.inference_mode()
def module_statistics(network: nn.Module, modules: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                      ) -> dict[str, ModuleStatistics]:
    """Run ``network`` over ``batches`` (float NCHW, already on the network's device) with a forward
    hook on each module. Per image and module: % of values <= 0 over channels and positions, and the
    channel vector averaged over positions. Only these reductions leave the hook."""
    stats = {name: ModuleStatistics() for name in modules}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            out = _feature_tensor(output).detach().float()
            flat = out.reshape(out.shape[0], out.shape[1], -1)  # (B, C, positions); (B, C) -> one position
            stats[name].nonpos_pct.add((flat <= 0).double().mean(dim=(1, 2)).mul(100).cpu().numpy())
            stats[name].features.add(flat.double().mean(dim=2).cpu().numpy())
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    try:
        network.eval()
        for x in batches:
            network(x)
    finally:
        for h in handles:
            h.remove()
    return stats
