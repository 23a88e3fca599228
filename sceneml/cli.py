"""Shared plumbing of the entry points: logging set-up and one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable

from sceneml.errors import SceneMLError


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
