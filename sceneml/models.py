"""torchvision CNNs with their head replaced for the data's classes, and the weights they start from.

Every model is wrapped in :class:`SceneClassifier`, which holds the input normalisation as buffers,
so a logged model takes plain ``float32`` images in ``[0, 1]`` of shape ``(B, 3, H, W)`` and nobody
downstream (evaluate, predict, serve) has to remember the mean and std.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from sceneml.errors import SceneMLError

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50", "googlenet", "mobilenet_v3_small", "efficientnet_b0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet paper: auxiliary losses weighted 0.3


class SceneClassifier(nn.Module):
    """Normalisation + a torchvision backbone. ``forward`` returns logits (and aux logits in training)."""

    def __init__(self, backbone: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor):
        return self.backbone((x - self.mean) / self.std)


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
    # accept keys saved from a SceneClassifier ("backbone.") or from DataParallel/DDP ("module.")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) or k in ("mean", "std") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


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
                aux_logits: bool = True) -> tuple[SceneClassifier, str]:
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
                        "initialisation. Put the file there or pass weights=none to silence this.",
                        hub_checkpoint_path(arch), arch)
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
    return SceneClassifier(net, mean, std), resolved


def rebuild(arch: str, num_classes: int, state_dict: dict, transform_input: bool = False) -> SceneClassifier:
    """A plain ``SceneClassifier`` from a state dict, e.g. that of a pt2-loaded checkpoint (whose graph
    module runs no forward hooks). Eval mode, on the CPU."""
    model, _ = build_model(arch, num_classes, "none")
    if arch == "googlenet":
        model.backbone.transform_input = transform_input
    model.load_state_dict(state_dict)
    return model.eval()


def head_parameters(arch: str, model: SceneClassifier) -> list[nn.Parameter]:
    heads = head_prefixes(arch)
    return [p for name, p in model.backbone.named_parameters() if name.startswith(heads)]


def freeze_backbone(arch: str, model: SceneClassifier) -> None:
    """Train only the head: every other parameter stops receiving gradients."""
    heads = head_prefixes(arch)
    for name, param in model.backbone.named_parameters():
        param.requires_grad = name.startswith(heads)


def head_module_name(arch: str) -> str:
    """The attribute of the torchvision model that maps pooled features to logits."""
    return "fc" if arch.startswith("resnet") or arch == "googlenet" else "classifier"


def set_train_mode(arch: str, model: SceneClassifier, frozen: bool) -> None:
    """Training mode; with a frozen backbone only the head trains: the backbone stays in eval mode
    (BatchNorm keeps its running statistics, dropout is off, GoogLeNet computes no aux heads), so it
    is a fixed function of the image and its features can be cached."""
    model.train()
    if frozen:
        head = head_module_name(arch)
        for name, module in model.backbone.named_modules():
            if name != head and not name.startswith(head + "."):
                module.eval()


@torch.inference_mode()
def backbone_features(arch: str, model: SceneClassifier, batches) -> torch.Tensor:
    """Pooled features (N, D) float32 on the CPU: the model with its head swapped for an identity, in
    eval mode, over ``batches`` of float NCHW images."""
    head_name = head_module_name(arch)
    head = getattr(model.backbone, head_name)
    setattr(model.backbone, head_name, nn.Identity())
    was_training = model.training
    try:
        model.eval()
        return torch.cat([model(x).float().cpu() for x in batches])
    finally:
        setattr(model.backbone, head_name, head)
        model.train(was_training)


def head_of(arch: str, model: SceneClassifier) -> nn.Module:
    return getattr(model.backbone, head_module_name(arch))


def split_logits(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits and auxiliary logits (GoogLeNet in training mode returns a namedtuple)."""
    if isinstance(output, torch.Tensor):
        return output, []
    aux = [a for a in (getattr(output, "aux_logits2", None), getattr(output, "aux_logits1", None)) if a is not None]
    return output.logits, aux


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``; checked before any work starts."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise SceneMLError(f"unknown device {name!r}; choose auto, cpu or cuda")


def pick_device(name: str = "auto") -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SceneMLError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)
