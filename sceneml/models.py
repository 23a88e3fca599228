"""torchvision CNNs with their head replaced for the data's classes, and the weights they start from.

A sceneml model *is* the torchvision model (``isinstance(m, torchvision.models.ResNet)`` holds; its
modules keep torchvision's names, e.g. ``layer4.1.conv1``), with one addition: the input
normalisation lives inside it, as buffers, so the model takes plain ``float32`` images in ``[0, 1]``
of shape ``(B, 3, H, W)`` and nobody downstream (evaluate, predict, serve, a user's notebook) has to
remember the mean and std. That is done by swapping the instance's class for a subclass whose only
change is to normalise before torchvision's own ``forward`` (see :func:`with_normalisation`).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from sceneml.config import ARCHS, check_device_name
from sceneml.errors import SceneMLError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet paper: auxiliary losses weighted 0.3
AUX_ARCHS = ("googlenet",)  # architectures whose training output carries auxiliary logits


class _NormalisedInput:
    """Mixin: ``(x - input_mean) / input_std``, then the torchvision forward, unchanged."""

    def forward(self, x: torch.Tensor):
        return super().forward((x - self.input_mean) / self.input_std)


class ResNet(_NormalisedInput, torchvision.models.ResNet):
    """torchvision's ResNet taking [0, 1] images."""


class GoogLeNet(_NormalisedInput, torchvision.models.GoogLeNet):
    """torchvision's GoogLeNet taking [0, 1] images."""


class MobileNetV3(_NormalisedInput, torchvision.models.MobileNetV3):
    """torchvision's MobileNetV3 taking [0, 1] images."""


class EfficientNet(_NormalisedInput, torchvision.models.EfficientNet):
    """torchvision's EfficientNet taking [0, 1] images."""


_NORMALISED = {cls.__mro__[2]: cls for cls in (ResNet, GoogLeNet, MobileNetV3, EfficientNet)}


def with_normalisation(net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> nn.Module:
    """Give a torchvision model its input normalisation, in place: the instance becomes the subclass
    above (same modules, same state-dict keys plus ``input_mean``/``input_std``)."""
    net.__class__ = _NORMALISED[type(net)]
    net.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    net.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return net


def head_prefixes(arch: str) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier head(s), which are re-initialised for new classes."""
    if arch.startswith("resnet"):
        return ("fc.",)
    if arch == "googlenet":
        return ("fc.", "aux1.fc2.", "aux2.fc2.")
    return ("classifier.",)


def _replace_head(arch: str, net: nn.Module, num_classes: int) -> None:
    if arch.startswith("resnet") or arch == "googlenet":
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        if arch == "googlenet" and net.aux1 is not None:
            net.aux1.fc2 = nn.Linear(net.aux1.fc2.in_features, num_classes)
            net.aux2.fc2 = nn.Linear(net.aux2.fc2.in_features, num_classes)
    else:
        last = net.classifier[-1]
        net.classifier[-1] = nn.Linear(last.in_features, num_classes)


def _bare_backbone(arch: str, aux_logits: bool = True) -> nn.Module:
    if arch == "googlenet":
        # init_weights=True: torchvision's truncated-normal init, as for training from scratch
        return torchvision.models.googlenet(weights=None, aux_logits=aux_logits, init_weights=True)
    return torchvision.models.get_model(arch, weights=None)


def imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).DEFAULT


def hub_checkpoint_path(arch: str) -> Path:
    """Where torchvision looks for the ImageNet weight file of ``arch`` ($TORCH_HOME/hub/checkpoints)."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _download_imagenet(arch: str, timeout: float = 10.0) -> dict:
    """Load the ImageNet state dict from the hub cache, downloading it if allowed and possible."""
    target = hub_checkpoint_path(arch)
    if not target.exists() and os.environ.get("SCENEML_OFFLINE"):
        raise FileNotFoundError(target)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # a blocked network must fail fast, not hang
    try:
        return imagenet_weights(arch).get_state_dict(progress=False, check_hash=False)
    finally:
        socket.setdefaulttimeout(previous)


def _missing_weights_error(arch: str) -> SceneMLError:
    target = hub_checkpoint_path(arch)
    return SceneMLError(
        f"ImageNet weights for {arch} are not available offline: put {target.name} into "
        f"{target.parent} (that is $TORCH_HOME/hub/checkpoints), or pass weights=none to train from "
        f"scratch, or weights=<path to a state dict>"
    )


def _load_state_dict_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SceneMLError(f"weights file {path} could not be read as a state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a sceneml/torchvision-references checkpoint dict
    if not isinstance(state, dict):
        raise SceneMLError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    # accept keys saved from DataParallel/DDP ("module."), and leave out the normalisation buffers (the
    # weights choose their own normalisation)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in ("input_mean", "input_std")}


def _load_backbone_keys(arch: str, net: nn.Module, state: dict, source: str) -> None:
    """Load every non-head key; name the first shape mismatch if the file belongs to another arch."""
    own = net.state_dict()
    heads = head_prefixes(arch)
    body = {k: v for k, v in state.items() if not k.startswith(heads)}
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in body.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if not k.startswith(heads) and k not in body]
    if mismatched or len(missing) > len(own) // 2:
        detail = (f"shape mismatch at {mismatched[0][0]}: file {mismatched[0][1]} vs model {mismatched[0][2]}"
                  if mismatched else f"{len(missing)} of {len(own)} keys missing, e.g. {missing[0]!r}")
        raise SceneMLError(f"weights {source} do not fit arch {arch} ({detail}); is it another architecture?")
    net.load_state_dict(body, strict=False)


def build_model(arch: str, num_classes: int, weights: str = "auto",
                aux_logits: bool = True) -> tuple[nn.Module, str]:
    """Build ``arch`` for ``num_classes`` classes. Returns the model and the weights actually used.

    ``weights``: ``imagenet`` | ``none`` | ``auto`` (ImageNet when available, else random init with a
    loud warning) | a path to a state dict.
    """
    if arch not in ARCHS:
        raise SceneMLError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = _bare_backbone(arch, aux_logits)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights in ("imagenet", "auto"):
        try:
            state = _download_imagenet(arch)
        except Exception:  # URLError, socket timeout, missing file: all mean "not available here"
            if weights == "imagenet":
                raise _missing_weights_error(arch) from None
            log.warning("!! weights=auto: %s not found and not downloadable; training %s from RANDOM "
                        "initialisation (weights_resolved=none). Put the file there, or pass weights=none to "
                        "silence this.", hub_checkpoint_path(arch), arch)
            resolved = "none"
        else:
            _load_backbone_keys(arch, net, state, f"imagenet ({hub_checkpoint_path(arch).name})")
            transforms = imagenet_weights(arch).transforms()
            mean, std = tuple(transforms.mean), tuple(transforms.std)
            if arch == "googlenet":
                net.transform_input = True  # the ImageNet GoogLeNet expects its own input scaling
            resolved = "imagenet"
    elif weights == "none":
        resolved = "none"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SceneMLError(f"weights={weights!r}: choose imagenet, none, auto or a path to a state dict "
                               "file (no such file)")
        _load_backbone_keys(arch, net, _load_state_dict_file(path), str(path))
        resolved = f"file:{path}"
    _replace_head(arch, net, num_classes)
    return with_normalisation(net, mean, std), resolved


def freeze_backbone(arch: str, model: nn.Module) -> None:
    """Train only the head: every other parameter stops receiving gradients."""
    heads = head_prefixes(arch)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(heads)


def head_module_name(arch: str) -> str:
    """The attribute of the torchvision model that maps pooled features to logits."""
    return "fc" if arch.startswith("resnet") or arch == "googlenet" else "classifier"


@torch.inference_mode()
def backbone_features(arch: str, model: nn.Module, batches) -> torch.Tensor:
    """Pooled features (N, D) float32 on the CPU: the model with its head swapped for an identity, in
    eval mode, over ``batches`` of float NCHW images."""
    head_name = head_module_name(arch)
    head = getattr(model, head_name)
    setattr(model, head_name, nn.Identity())
    was_training = model.training
    try:
        model.eval()
        return torch.cat([model(x).float().cpu() for x in batches])
    finally:
        setattr(model, head_name, head)
        model.train(was_training)


def head_of(arch: str, model: nn.Module) -> nn.Module:
    return getattr(model, head_module_name(arch))


def split_logits(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits and auxiliary logits (GoogLeNet in training mode returns a namedtuple)."""
    if isinstance(output, torch.Tensor):
        return output, []
    aux = [a for a in (getattr(output, "aux_logits2", None), getattr(output, "aux_logits1", None)) if a is not None]
    return output.logits, aux


def pick_device(name: str = "auto") -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SceneMLError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """What the run trained on, for the record: ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 cores)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({os.cpu_count()} cores)"
