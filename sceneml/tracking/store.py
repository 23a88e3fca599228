"""The tracking store: created once under a lock, and one retry policy for every write to it.

The policy retries what a store answers while it is busy and that MLflow does not retry itself: a
SQL store's ``OperationalError`` (sqlite's "database is locked" while several runs write, a
PostgreSQL server restarting), which MLflow wraps in an ``MlflowException``. A tracking server that
does not answer is *not* retried here: MLflow's HTTP client already retried the request
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), and retrying on top of that would multiply the wait.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import TypeVar

import mlflow
import requests
import sqlalchemy.exc
import tenacity
from mlflow import MlflowClient
from mlflow.exceptions import RestException

from sceneml.errors import StoreUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")
ATTEMPTS = 8  # 0.2 s doubling: about 50 s of waiting in all before the error goes to the caller


def reach_within_s() -> int:
    """How long a tracking server may take to answer its first request (``SCENEML_STORE_WAIT_S``, 60)."""
    return int(os.environ.get("SCENEML_STORE_WAIT_S", "60"))


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def store_busy(exc: BaseException) -> bool:
    """A SQL store's OperationalError, raw or wrapped by MLflow (its ``__cause__``)."""
    return any(isinstance(e, sqlalchemy.exc.OperationalError) for e in _causes(exc))


# how a tracking server words a unique-key failure of its SQL store in the message of its HTTP 400
# answer: SQLAlchemy's "(<driver's exception class>) ...", IntegrityError (sqlite, MySQL) or
# UniqueViolation (psycopg and psycopg2 on PostgreSQL)
_SERVED_UNIQUE_KEY = re.compile(r"\([\w.]+\.(IntegrityError|UniqueViolation)\)")


def insert_race(exc: BaseException) -> bool:
    """Busy, or two runs logged the same new data set at once (tune's or main's workers): MLflow's SQL
    store looks for the data set, finds none in both, and the slower insert fails on the unique key
    (IntegrityError); on the next try it finds the row the other one wrote and links to it. Through a
    tracking server the IntegrityError stays on the server, which answers BAD_REQUEST naming it, and
    MLflow's client does not retry a 400."""
    return store_busy(exc) or any(
        isinstance(e, sqlalchemy.exc.IntegrityError)
        or (isinstance(e, RestException) and e.error_code == "BAD_REQUEST"
            and _SERVED_UNIQUE_KEY.search(e.message) is not None)
        for e in _causes(exc))


def schema_race(exc: BaseException) -> bool:
    """Workers started together race to create a database's tables (PostgreSQL: "duplicate type
    studydirection"); the loser finds them made on its next try."""
    return any(isinstance(e, sqlalchemy.exc.DBAPIError) for e in _causes(exc))


def with_retries(fn: Callable[..., T], *args, transient: Callable[[BaseException], bool] = store_busy,
                 attempts: int = ATTEMPTS, **kwargs) -> T:
    """Call ``fn(*args, **kwargs)``, retrying with jittered exponential backoff while ``transient``
    says the error passes if we wait; any other error, or the last attempt's, goes to the caller."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient), stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential_jitter(initial=0.2, exp_base=2, jitter=0.05), reraise=True,
        before_sleep=lambda state: log.warning("tracking store busy (%s); retry %d/%d", str(
            state.outcome.exception()).splitlines()[0][:80], state.attempt_number, attempts))
    return retrying(fn, *args, **kwargs)


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
        if uri.startswith(("http://", "https://")):
            _wait_for_server(uri)
        try:
            with_retries(MlflowClient().search_experiments, max_results=1)
        except mlflow.exceptions.MlflowException as exc:
            if not store_busy(exc) and not uri.startswith(("http://", "https://")):
                raise
            raise StoreUnreachable(f"the tracking store {without_password(uri)} failed its first request "
                                   f"({str(exc).splitlines()[0][:160]})") from None
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def without_password(uri: str) -> str:
    """``uri`` with its password as ``***`` (postgresql://user:secret@host/db), for messages, logs and
    params; SQLAlchemy's URL parser reads every ``scheme://`` URI, and a name that is not one is kept."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return uri


def _wait_for_server(uri: str) -> None:
    """Any HTTP answer from a tracking server within :func:`reach_within_s`, else one line naming it.

    MLflow's own client retries a server that does not answer for about four minutes per request
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``), which is right for
    a server restarting under a long run, not for a task that has not started: this check fails
    first, and nothing is written anywhere."""
    within_s = reach_within_s()

    def warn_once(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            log.warning("tracking server %s does not answer; trying for up to %d s", without_password(uri), within_s)

    try:
        tenacity.Retrying(retry=tenacity.retry_if_exception_type(requests.RequestException),
                          stop=tenacity.stop_before_delay(within_s),
                          wait=tenacity.wait_exponential(multiplier=0.5, max=10), before_sleep=warn_once,
                          reraise=True)(requests.get, uri.rstrip("/") + "/health", timeout=10)
    except requests.RequestException as exc:
        raise StoreUnreachable(f"the tracking server {without_password(uri)} did not answer within {within_s} s "
                               f"({type(exc).__name__}); start it, or set MLFLOW_TRACKING_URI to one that runs") \
            from None
