"""Which autocast dtype ``precision`` means on a device, for a model."""

from __future__ import annotations

import torch
from torch import nn

from sceneml.config import FP16_NEEDS_CUDA
from sceneml.errors import SceneMLError


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX). Without it bf16 is emulated and
    slower than fp32 (benchmarks/README.md has the figures)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # public in recent torch releases
    if capabilities is not None:
        return bool(capabilities().get("amx_bf16", False))
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # older releases


def has_depthwise_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` filters each channel on its own anywhere (MobileNet, EfficientNet, ConvNeXt). On an
    AMX CPU such a network trains at about half its fp32 speed under bf16 autocast, while dense and grouped
    convolutions (ResNet, GoogLeNet, ResNeXt, RegNet) train 1.4-2.4x faster (benchmarks/results/precision.csv)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def resolve_precision(name: str, device: torch.device, model: nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32. ``auto`` on a CPU is
    bf16 where it is the faster: an AMX CPU and a ``model`` without depthwise convolutions."""
    if name == "fp32":
        return None
    if device.type != "cuda":
        if name == "fp16":
            raise SceneMLError(FP16_NEEDS_CUDA)
        if name == "bf16":
            return torch.bfloat16
        fast = cpu_has_bf16_tiles() and not (model is not None and has_depthwise_convolutions(model))
        return torch.bfloat16 if fast else None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16
