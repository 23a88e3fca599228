"""Which autocast dtype ``precision`` means on a device."""

from __future__ import annotations

import torch

from sceneml.config import FP16_NEEDS_CUDA
from sceneml.errors import SceneMLError


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX). There bf16 autocast trains
    ResNet18 faster than fp32; without it bf16 is emulated and slower than fp32 (benchmarks/README.md
    has the figures)."""
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
