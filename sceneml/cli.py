"""What the entry-point scripts share: click options read from the config dataclasses, logging that
reaches the console, and one-line errors instead of tracebacks.

Torch-free, like :mod:`sceneml.config`: the scripts import the task they run only once the options
are parsed, so ``--help`` and a bad value answer at once.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable

import click

from sceneml.config import AnalyzeConfig, TrainConfig, parse_bool
from sceneml.errors import SceneMLError


def none_is_empty(_ctx, _param, value: str) -> str:
    """MLproject writes "nothing" as ``none`` (an empty default would be logged as the literal '')."""
    return "" if value is None or value.strip().lower() == "none" else value


_D = TrainConfig()
# The training options of `train` and `main` (names are the MLproject parameters, dashed).
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
    click.option("--select-metric", default=_D.select_metric,
                 help="what 'best epoch' means: val_mean_class_acc, val_mAP, val_acc or val_loss"),
    click.option("--keep-checkpoints", default=_D.keep_checkpoints,
                 help="checkpoints a finished run keeps: best, improved or all"),
    click.option("--precision", default=_D.precision, help="auto, fp32, bf16 or fp16 (CUDA only)"),
    click.option("--compile", "compile_", default="false", help="torch.compile the model for training"),
    click.option("--dedupe", default=_D.dedupe, help="none, or cross_split: drop val/test copies of train images"),
    click.option("--dup-distance", type=int, default=_D.dup_distance,
                 help="near duplicates: perceptual hashes at most this many bits apart"),
    click.option("--quiet", is_flag=True, help="no progress bars"),
]

_A = AnalyzeConfig()
# The analysis options of `analyze`; `main` takes n_images and compare of them.
ANALYZE_OPTIONS = {
    "model_uri": click.option("--model-uri", default=_A.model_uri),
    "data": click.option("--data", default=_A.data, callback=none_is_empty,
                         help="default: the data the model was trained on"),
    "split": click.option("--split", default=_A.split),
    "classes": click.option("--classes", default=_A.classes, callback=none_is_empty, help="comma list; default all"),
    "k": click.option("--k", type=int, default=_A.k),
    "modules": click.option("--modules", default=_A.modules, callback=none_is_empty,
                            help="comma list of module names"),
    "n_images": click.option("--n-images", type=int, default=_A.n_images, help="images per data set"),
    "compare": click.option("--compare", default=_A.compare, callback=none_is_empty,
                            help="comma list of name=path data sets"),
    "top_eigen": click.option("--top-eigen", type=int, default=_A.top_eigen),
    "device": click.option("--device", default=_A.device),
}


def options(decorators: list[Callable]) -> Callable[[Callable], Callable]:
    def apply(fn: Callable) -> Callable:
        for option in reversed(decorators):
            fn = option(fn)
        return fn
    return apply


train_options = options(_TRAIN_OPTIONS)


def train_config(freeze_backbone: str, random_crop: str, compile_: str, **params) -> TrainConfig:
    return TrainConfig(**params, freeze_backbone=parse_bool(freeze_backbone), random_crop=parse_bool(random_crop),
                       compile=parse_bool(compile_)).validate()


def setup_logging(quiet: bool = False) -> None:
    """sceneml's records go to stderr through a handler of its own, whatever the root logger says:
    importing ``mlflow.pytorch`` calls ``logging.basicConfig(level=ERROR)``, which would otherwise
    swallow every warning (e.g. "training from RANDOM initialisation")."""
    logger = logging.getLogger("sceneml")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    # MLflow's own chatter (pickle advice, pip inference) would bury the training output
    for name in ("mlflow.pytorch", "mlflow.models.model", "mlflow.utils.requirements_utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Slurm, Kubernetes, ``mlflow run`` cancelling): handled as Ctrl-C is."""


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise (Terminated / KeyboardInterrupt) in the main thread, so the task's run
    ends KILLED with its last finished epoch's checkpoint kept. Once stopping, further signals are
    ignored: ``mlflow run`` answers the Ctrl-C it got too by sending SIGTERM here, and dying of that
    before the run is marked would leave MLflow to mark it FAILED."""
    stopping = []
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:  # a forked worker (e.g. a multiprocessing pool) dies as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping:
            return
        stopping.append(signum)
        if signum == signal.SIGTERM:
            raise Terminated("SIGTERM")
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def user_errors_as_one_line(fn: Callable) -> Callable:
    """Print a SceneMLError as ``error: <message>`` and exit 2 (the error also tagged on the run
    ``mlflow run`` created, when the task had not taken it over yet); Ctrl-C and SIGTERM say how to
    resume and exit 130 and 143; anything else keeps its traceback (a bug, not a user error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stop_on_signals()
        try:
            return fn(*args, **kwargs)
        except SceneMLError as exc:
            print(f"error: {exc}", file=sys.stderr)
            _tag_launch(str(exc))
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            # a full disk or quota, a file too large, a read-only place: the user's to fix, in one line
            message = f"{exc.filename or 'a file'}: {exc.strerror}; free space there or point SCENEML_CACHE " \
                      "(and the MLflow store) at another disk"
            print(f"error: {message}", file=sys.stderr)
            _tag_launch(message)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"{what}: the run is marked KILLED; continue it with resume=<run_id>", file=sys.stderr)
            sys.exit(143 if isinstance(exc, Terminated) else 130)

    return wrapper


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _tag_launch(error: str) -> None:
    """An error before the task adopted ``mlflow run``'s run: say why on that run (MLflow marks it FAILED)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from sceneml.tracking.runs import TAG_ERROR, set_tags

        set_tags(run_id, {TAG_ERROR: error[:5000]})
    except Exception:  # the store itself may be what failed
        pass
