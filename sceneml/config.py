"""The training configuration: one plain dataclass, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sceneml.errors import SceneMLError
from sceneml.models import ARCHS, check_device_name
from sceneml.training import OPTIMIZERS, SCHEDULERS


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
    resume: str = ""
    quiet: bool = False
    stop_after_epoch: int = 0  # stop (as if interrupted) after this epoch; for testing resume

    def validate(self) -> TrainConfig:
        """Check every value; one clear line naming the valid choices on the first bad one."""
        if self.arch not in ARCHS:
            raise SceneMLError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.optimizer not in OPTIMIZERS:
            raise SceneMLError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise SceneMLError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if not self.lr > 0:
            raise SceneMLError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise SceneMLError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise SceneMLError(f"batch_size must be >= 1, got {self.batch_size}")
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
        import os

        return min(os.cpu_count() or 1, 8) if self.num_workers == "auto" else int(self.num_workers)

    def as_params(self) -> dict[str, object]:
        skip = {"quiet", "stop_after_epoch", "resume"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SceneMLError(f"expected true or false, got {value!r}")
