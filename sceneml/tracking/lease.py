"""Who is training a run right now: a heartbeat tag, so that ``resume`` never puts a second process
on a run that is still being trained.

The training process writes tag ``sceneml.heartbeat`` = ``<host> <pid> <unix seconds>`` when the
run opens and then at most every ``BEAT_EVERY_S`` seconds while batches are logged. A RUNNING run's
heartbeat is *live* when

- it was written on this host and that process still exists (a stopped one too: SIGSTOP, Ctrl-Z; not a
  zombie, which has exited and only waits for its parent to collect its status), or
- it was written on another host less than ``STALE_AFTER_S`` seconds ago.

On this host a dead process frees the run at once; from another host the run is free once its
heartbeat is ``STALE_AFTER_S`` old (a process that died there, or lost the store, for that long).
A run that is no longer RUNNING (KILLED, FAILED) has no live holder whatever its heartbeat says.
"""

from __future__ import annotations

import os
import socket
import time

import psutil
from mlflow.entities import Run

TAG_HEARTBEAT = "sceneml.heartbeat"
BEAT_EVERY_S = 30
STALE_AFTER_S = 180

def heartbeat() -> dict[str, str]:
    """This process's heartbeat, as the tag to set on the run it trains (now, then every BEAT_EVERY_S)."""
    return {TAG_HEARTBEAT: f"{socket.gethostname()} {os.getpid()} {time.time():.0f}"}


def live_holder(run: Run, now: float | None = None) -> str | None:
    """Who holds ``run`` (e.g. "process 123 on host a, heartbeat 12 s ago"), or None when nobody does."""
    return holder_of(run.info.status, run.data.tags.get(TAG_HEARTBEAT), now)


def holder_of(status: str, text: str | None, now: float | None = None) -> str | None:
    """:func:`live_holder` from a run's status and heartbeat tag."""
    return beat_holder(text, now) if status == "RUNNING" else None


def beat_holder(text: str | None, now: float | None = None) -> str | None:
    """The process that wrote heartbeat ``text``, while it is live (whatever became of the run it beat on:
    a search's worker holds its trial from before its run opens until after it ends), else None."""
    if not text:
        return None
    host, pid, written = text.rsplit(" ", 2)
    age = (now if now is not None else time.time()) - float(written)
    who = f"process {pid} on {host}, heartbeat {age:.0f} s ago"
    if host == socket.gethostname():
        return who if int(pid) != os.getpid() and _alive(int(pid)) else None
    return who if age < STALE_AFTER_S else None


def _alive(pid: int) -> bool:
    # a worker killed with its process group leaves its children orphaned: until init reaps them, they
    # are zombies, and psutil.pid_exists still finds them
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
