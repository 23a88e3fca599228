"""MLflow I/O: batched metric writes with retries, checkpoint LoggedModels, run bookkeeping.

All metrics go through :class:`MetricBuffer` and ``MlflowClient.log_batch`` with an explicit
``model_id`` (or none). Two reasons: one write per N batches instead of one per batch, and
``mlflow.log_metric`` without ``model_id`` silently links metrics to the most recently logged model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import Model, infer_signature

from sceneml import serving
from sceneml.errors import SceneMLError

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_BEST = "sceneml.best"
TAG_EPOCH = "sceneml.epoch"
TAG_DIGEST = "sceneml.data_digest"
TAG_ERROR = "sceneml.error"
CHECKPOINT_FORMAT = "pt2"  # loads with plain mlflow.pytorch.load_model; pickle is refused by default


def with_retries(fn: Callable[..., T], *args, attempts: int = 8, base_delay: float = 0.2, **kwargs) -> T:
    """Call ``fn``, retrying with exponential backoff on transient store errors.

    SQLite answers "database is locked" when several runs write at once; a restarting tracking
    server answers connection errors. Both pass if we wait.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            text = str(exc).lower()
            transient = any(s in text for s in ("database is locked", "connection", "timed out", "503",
                                                "502", "temporarily", "max retries"))
            if not transient or attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt * (1 + 0.25 * np.random.default_rng().random())
            log.warning("tracking store busy (%s); retry %d/%d in %.1fs", text[:80], attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def init_store() -> None:
    """Open the tracking store once, before any run starts.

    A new sqlite store is created by the first client that touches it, by running MLflow's schema
    migrations; several processes doing that at once corrupt each other's migration ("duplicate
    column", "table already exists"). The first sceneml process to get here holds a file lock beside
    the database while it creates the store; the others wait, then find it ready. Other stores
    (a tracking server, PostgreSQL) need no lock and only get the retries.
    """
    uri = mlflow.get_tracking_uri()
    lock = None
    if uri.startswith("sqlite:///") and os.name == "posix":
        import fcntl

        db = uri[len("sqlite:///"):].split("?", 1)[0]
        lock_path = os.path.abspath(db) + ".sceneml-init.lock"
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        lock = open(lock_path, "a")  # noqa: SIM115  (held across the store creation below)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with_retries(MlflowClient().search_experiments, max_results=1)
    finally:
        if lock is not None:
            lock.close()  # releases the flock


class MetricBuffer:
    """Collects metrics and writes them in batches (MLflow accepts up to 1000 per call)."""

    def __init__(self, run_id: str, client: MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.pending: list[Metric] = []

    def add(self, key: str, value: float, step: int, model_id: str | None = None) -> None:
        self.pending.append(Metric(key, float(value), int(time.time() * 1000), int(step), model_id=model_id))

    def add_many(self, values: dict[str, float], step: int, model_id: str | None = None) -> None:
        for key, value in values.items():
            self.add(key, value, step, model_id)

    def flush(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            try:
                with_retries(self.client.log_batch, self.run_id, metrics=chunk)
            except Exception:
                self.pending = chunk + self.pending  # keep them for the next flush
                raise


def log_params_once(run_id: str, params: dict[str, object], client: MlflowClient | None = None) -> None:
    """Log params the run does not have yet. ``mlflow run`` already logged the entry-point params
    (as the strings given); logging the same key again with another spelling would be an error."""
    client = client or MlflowClient()
    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):
        with_retries(client.log_batch, run_id, params=new[start:start + 100])


def set_tags(run_id: str, tags: dict[str, object], client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    with_retries(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def pip_requirements() -> list[str]:
    """Pinned to what is running. Passing them explicitly also skips MLflow's slow requirement
    inference (about 6 s per logged model)."""
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}", "numpy", "pandas", "pillow", "tqdm"]


def log_checkpoint(model: torch.nn.Module, example: np.ndarray, name: str, step: int,
                   params: dict[str, object], tags: dict[str, object], metadata: dict) -> str:
    """Log ``model`` as an MLflow 3 LoggedModel in the pt2 format, servable on images. Returns its ``model_id``.

    The export is traced on a CPU copy in eval mode (GoogLeNet's aux heads are then skipped), with an
    input example of batch size 2 so the batch dimension stays dynamic.
    """
    if example.shape[0] < 2:
        raise ValueError("the input example needs a batch of at least 2 for a dynamic batch dimension")
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.inference_mode():
        output = cpu_model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    # Model.log with sceneml.serving as the flavor: the pytorch flavor plus an image pyfunc (serving.py)
    info = with_retries(
        Model.log, artifact_path=None, flavor=serving, pytorch_model=cpu_model, name=name, step=step,
        input_example=example,
        signature=signature, serialization_format=CHECKPOINT_FORMAT, pip_requirements=pip_requirements(),
        params={k: str(v) for k, v in params.items()}, tags={k: str(v) for k, v in tags.items()},
        metadata=metadata,
    )
    # log_model makes the new model "active": later metrics without model_id would be linked to it
    mlflow.clear_active_model()
    return info.model_id


def log_json(data: object, artifact_file: str) -> None:
    with_retries(mlflow.log_text, json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)


def log_figure(fig, artifact_file: str) -> None:
    from sceneml.plots import close

    try:
        with_retries(mlflow.log_figure, fig, artifact_file)
    finally:
        close(fig)


def end_run_as(run_id: str, status: str, error: str | None = None) -> None:
    """Terminate ``run_id`` with ``status`` (and the error as a tag), popping it if it is active."""
    with contextlib.suppress(Exception):
        if error:
            set_tags(run_id, {TAG_ERROR: error[:5000]})
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            MlflowClient().set_terminated(run_id, status)


@contextlib.contextmanager
def failure_marks_run(run_id: str) -> Iterator[None]:
    """Mark the run FAILED (error as a tag) or KILLED (Ctrl-C, a requested stop) instead of leaving it
    RUNNING. Ends the run here, so MLflow's own ``__exit__`` cannot overwrite KILLED with FAILED."""
    try:
        yield
    except KeyboardInterrupt:
        end_run_as(run_id, "KILLED", "interrupted (KeyboardInterrupt)")
        raise
    except BaseException as exc:
        killed = getattr(exc, "marks_run_killed", False)
        end_run_as(run_id, "KILLED" if killed else "FAILED", f"{type(exc).__name__}: {exc}")
        raise


def launched_by_mlflow_run() -> str | None:
    """The run id ``mlflow run`` created for this process, if any, taken out of the environment.

    MLflow's ``start_run`` re-uses ``MLFLOW_RUN_ID`` even for ``nested=True``, so once adopted it must
    go, or the first child run would silently be the parent again.
    """
    return os.environ.pop("MLFLOW_RUN_ID", None)


def raise_if_missing_run(run_id: str) -> None:
    try:
        MlflowClient().get_run(run_id)
    except Exception:
        raise SceneMLError(f"run {run_id!r} does not exist in the tracking store {mlflow.get_tracking_uri()}") from None
