"""Where the model looks: Grad-CAM (Selvaraju et al. 2017, via captum) on the last convolutional stage."""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from sceneml.architectures import arch_of


def last_stage_name(arch: str, model: nn.Module) -> str:
    """The last convolutional stage (sceneml.architectures): its feature maps still know where things are."""
    return arch_of(arch, model).gradcam


def last_conv_stage(arch: str, model: nn.Module) -> nn.Module:
    return model.get_submodule(last_stage_name(arch, model))


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) heat maps in [0, 1] at the input's size, for class ``target`` of each image.

    Grad-CAM keeps the positive evidence (ReLU); a map with none (all zero) falls back to the signed
    map, rescaled, so that every image shows where the decision came from."""
    model.eval()
    cam = LayerGradCam(model, layer)
    maps = cam.attribute(x, target=target, relu_attributions=False)
    maps = LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0].detach()
    positive = maps.clamp(min=0)
    has_positive = positive.flatten(1).amax(1) > 0
    maps = torch.where(has_positive[:, None, None], positive, maps)
    low = maps.flatten(1).amin(1)[:, None, None]
    span = maps.flatten(1).amax(1)[:, None, None] - low
    # a flat map (e.g. a 32 px input: ResNet's layer4 is then 1 x 1) stays flat, at 0, not amplified noise
    flat = span <= 1e-6 * maps.abs().flatten(1).amax(1)[:, None, None].clamp(min=1e-12)
    return torch.where(flat, torch.zeros_like(maps), (maps - low) / span.clamp(min=1e-12))
