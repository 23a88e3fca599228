"""What a run is asked to do: the choice lists and plain dataclasses, validated before any work starts.

This module imports neither torch nor torchvision nor mlflow: the click options of every entry point
read their defaults here, so ``python entrypoints/train.py --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from sceneml.errors import SceneMLError

ARCHS = ("resnet18", "resnet34", "resnet50", "googlenet", "mobilenet_v3_small", "efficientnet_b0")
OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
SCHEDULERS = ("none", "cosine", "step")
# The metrics a "best epoch" and the champion can be chosen by; val_loss is the one where lower wins.
SELECT_METRICS = ("val_mean_class_acc", "val_mAP", "val_acc", "val_loss")
LOWER_IS_BETTER = frozenset({"val_loss"})
# Which epoch checkpoints a finished run keeps: its best one, every one that improved, or all.
KEEP_CHECKPOINTS = ("best", "improved", "all")
# Training arithmetic: auto = bf16 autocast on CUDA devices that support it, else fp16 with a
# GradScaler; fp32 on the CPU. Validation and the logged checkpoints stay float32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRUNERS = ("median", "hyperband", "none")
DEDUPE = ("none", "cross_split")  # cross_split: drop val/test copies of training images
FP16_NEEDS_CUDA = "precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32"


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``; checked before any work starts."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise SceneMLError(f"unknown device {name!r}; choose auto, cpu or cuda")


def check_select_metric(metric: str) -> None:
    if metric not in SELECT_METRICS:
        raise SceneMLError(f"unknown select_metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")


def check_model_name(name: str) -> None:
    """A registered model name that every MLflow store and URI accepts."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SceneMLError(f"model_name {name!r} may only use letters, digits, '.', '_' and '-'")


def _choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SceneMLError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class TrainConfig:
    data: str = "synthetic"
    arch: str = "resnet18"
    weights: str = "auto"
    optimizer: str = "adamw"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0001
    scheduler: str = "none"
    epochs: int = 3
    batch_size: int = 32
    image_size: int = 0  # 0 = the data's native size (64 synthetic, 150 folder data)
    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit_per_class: int = 0
    freeze_backbone: bool = False
    random_crop: bool = False
    device: str = "auto"
    num_workers: str = "auto"  # decode threads; "auto" = number of CPU cores, at most 8
    select_metric: str = "val_mean_class_acc"  # what "best epoch" means; the study passes its own
    keep_checkpoints: str = "best"  # best | improved | all
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the trained module (the checkpoint is the uncompiled one)
    dedupe: str = "none"  # none | cross_split
    dup_distance: int = 6  # near duplicates: pHashes at most this many bits apart (sceneml.data.duplicates)
    resume: str = ""
    quiet: bool = False

    def validate(self) -> TrainConfig:
        """Check every value; one clear line naming the valid choices on the first bad one."""
        _choice("arch", self.arch, ARCHS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        check_select_metric(self.select_metric)
        _choice("keep_checkpoints", self.keep_checkpoints, KEEP_CHECKPOINTS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("dedupe", self.dedupe, DEDUPE)
        if not 0 <= self.dup_distance <= 64:
            raise SceneMLError(f"dup_distance must be in 0..64 (bits of a 64-bit pHash), got {self.dup_distance}")
        if self.precision == "fp16" and self.device == "cpu":
            raise SceneMLError(FP16_NEEDS_CUDA)  # before any work; the engine checks device=auto too
        if not self.lr > 0:
            raise SceneMLError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise SceneMLError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise SceneMLError(f"batch_size must be >= 2 (BatchNorm cannot train on one image), got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise SceneMLError(f"seed must be in 0 .. 2**32 - 1 (4294967295), got {self.seed}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise SceneMLError("momentum and weight_decay must be >= 0")
        if self.image_size < 0 or 0 < self.image_size < 32:
            raise SceneMLError(f"image_size must be 0 (native) or >= 32, got {self.image_size}")
        if self.limit_per_class < 0:
            raise SceneMLError(f"limit_per_class must be >= 0, got {self.limit_per_class}")
        if self.num_workers != "auto" and (not str(self.num_workers).isdigit() or int(self.num_workers) < 1):
            raise SceneMLError(f"num_workers must be 'auto' or a positive integer, got {self.num_workers!r}")
        check_device_name(self.device)
        return self

    def decode_workers(self) -> int:
        return min(os.cpu_count() or 1, 8) if self.num_workers == "auto" else int(self.num_workers)

    def as_params(self) -> dict[str, object]:
        """What a run logs as params: everything that defines the run (not how it was launched)."""
        skip = {"quiet", "resume"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class AnalyzeConfig:
    model_uri: str = "models:/sceneml@champion"
    data: str = ""  # default: the data the model was trained on
    split: str = "test"
    classes: str = ""  # comma list; default all
    k: int = 10
    modules: str = ""  # comma list; default: five modules spread over the depth of the arch
    n_images: int = 200
    compare: str = ""  # comma list of name=path
    top_eigen: int = 15
    device: str = "auto"
    batch_size: int = 64
    seed: int = 0
    quiet: bool = False

    def validate(self) -> AnalyzeConfig:
        if self.k < 1:
            raise SceneMLError(f"k must be >= 1, got {self.k}")
        if self.n_images < 2:
            raise SceneMLError(f"n_images must be >= 2 (a covariance needs two images), got {self.n_images}")
        if self.top_eigen < 1:
            raise SceneMLError(f"top_eigen must be >= 1, got {self.top_eigen}")
        if self.batch_size < 1:
            raise SceneMLError(f"batch_size must be >= 1, got {self.batch_size}")
        check_device_name(self.device)
        parse_compare(self.compare)
        return self


@dataclass
class StudyConfig:
    """`main`: one training run per optimizer x learning rate, then select, evaluate and analyze."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizers: str = "adamw,rmsprop,sgd"
    lrs: str = "0.001"
    model_name: str = "sceneml"
    analyze: AnalyzeConfig = dataclasses.field(default_factory=AnalyzeConfig)
    experiment: str = "sceneml"  # where the study goes unless --experiment-name / MLFLOW_EXPERIMENT_* say

    def children(self) -> list[TrainConfig]:
        """Every child's config, each validated before the first one trains."""
        return [dataclasses.replace(self.train, optimizer=o, lr=lr).validate()
                for o in parse_list(self.optimizers) for lr in parse_list(self.lrs, float)]

    def validate(self) -> StudyConfig:
        self.children()
        check_model_name(self.model_name)
        self.analyze.validate()
        return self


@dataclass
class TuneConfig:
    """`tune`: an Optuna search over `train` parameters, trials shared by any number of workers."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    n_trials: int = 20  # over all workers
    space: str = ""  # a YAML/JSON file; "" = sceneml.space.DEFAULT_SPACE
    pruner: str = "median"
    storage: str = ""  # "" = an Optuna journal file beside the MLflow store; or an SQLAlchemy URL
    study_name: str = ""  # "" = tune-<arch>-<data>
    model_name: str = "sceneml"
    analyze: AnalyzeConfig = dataclasses.field(default_factory=AnalyzeConfig)
    experiment: str = "sceneml"

    def validate(self) -> TuneConfig:
        self.train.validate()
        _choice("pruner", self.pruner, PRUNERS)
        if self.n_trials < 1:
            raise SceneMLError(f"n_trials must be >= 1, got {self.n_trials}")
        check_model_name(self.model_name)
        self.analyze.validate()
        return self

    def name(self) -> str:
        return self.study_name or re.sub(r"[^A-Za-z0-9_.-]+", "_", f"tune-{self.train.arch}-{self.train.data}")


def param_text(value: object) -> str:
    """One spelling per value in logged params: true/false, and "none" for nothing."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == "":
        return "none"
    return str(value)


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SceneMLError(f"expected true or false, got {value!r}")


def parse_list(text: str, kind=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SceneMLError(f"empty list: {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise SceneMLError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def parse_compare(text: str) -> dict[str, str]:
    """``name=path,name2=path2`` -> {name: path}; names become metric keys, so they are kept simple."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SceneMLError(f"compare: expected name=path, got {item!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise SceneMLError(f"compare: name {name!r} may only use letters, digits, _ and -")
        if name in out:
            raise SceneMLError(f"compare: name {name!r} given twice")
        out[name] = path
    return out
