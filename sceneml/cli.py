"""Shared plumbing of the entry points: logging set-up and one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable

import click

from sceneml.config import TrainConfig
from sceneml.errors import SceneMLError

_D = TrainConfig()
# The training options `train` and `main` share (names are the MLproject parameters, dashed).
_TRAIN_OPTIONS = [
    click.option("--data", default=_D.data, help="synthetic[:N], a folder, a Kaggle Intel folder or a .zip"),
    click.option("--arch", default=_D.arch),
    click.option("--weights", default=_D.weights, help="auto | imagenet | none | path to a state dict"),
    click.option("--momentum", type=float, default=_D.momentum),
    click.option("--weight-decay", type=float, default=_D.weight_decay),
    click.option("--scheduler", default=_D.scheduler),
    click.option("--epochs", type=int, default=_D.epochs),
    click.option("--batch-size", type=int, default=_D.batch_size),
    click.option("--image-size", type=int, default=_D.image_size),
    click.option("--seed", type=int, default=_D.seed),
    click.option("--val-fraction", type=float, default=_D.val_fraction),
    click.option("--test-fraction", type=float, default=_D.test_fraction),
    click.option("--limit-per-class", type=int, default=_D.limit_per_class),
    click.option("--freeze-backbone", default="false"),
    click.option("--random-crop", default="false"),
    click.option("--device", default=_D.device),
    click.option("--num-workers", default=_D.num_workers, help="decode threads"),
    click.option("--quiet", is_flag=True, help="no progress bars"),
]


def train_options(fn: Callable) -> Callable:
    for option in reversed(_TRAIN_OPTIONS):
        fn = option(fn)
    return fn


def train_config(freeze_backbone: str, random_crop: str, quiet: bool, **params) -> TrainConfig:
    from sceneml.config import parse_bool

    return TrainConfig(**params, freeze_backbone=parse_bool(freeze_backbone), random_crop=parse_bool(random_crop),
                       quiet=quiet)


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # MLflow's own chatter (pickle advice, pip inference) would bury the training output
    for name in ("mlflow.pytorch", "mlflow.models.model", "mlflow.utils.requirements_utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def user_errors_as_one_line(fn: Callable) -> Callable:
    """Print a SceneMLError as ``error: <message>`` and exit 2; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SceneMLError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: the run is marked KILLED; continue it with resume=<run_id>", file=sys.stderr)
            sys.exit(130)

    return wrapper
