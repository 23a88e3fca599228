"""The tracking store: created once under a lock, and every write retried while the store is busy."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import mlflow
import numpy as np
from mlflow import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")


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
