"""One benchmark at a time on this machine: two at once on a few cores would each time the other.

Every script of this folder calls :func:`one_at_a_time` first. It holds an exclusive lock on a file in
the temp folder for the life of the process; a second benchmark started meanwhile says so and waits
for the first to end (so that several can be queued with ``;`` or ``&``), and the lock goes with the
process however it ends."""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "sceneml-benchmarks.lock"
_held: list = []


def one_at_a_time() -> None:
    if _held:
        return
    handle = LOCK.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another benchmark is running (lock {LOCK}): waiting for it to end", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    _held.append(handle)
