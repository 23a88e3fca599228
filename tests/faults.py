"""Faults the crash tests put into a training process from outside sceneml's code, at a known moment
(never by sleeping until one comes):

- ``SCENEML_FAULT_AT_STEP=N:interrupt``, ``N:pause``, ``N:stop`` or ``N:raise``, optionally ``@<run name>``:
  after the N-th optimizer step of each run (of that run only, with a name), raise KeyboardInterrupt (what
  Ctrl-C does), block forever (a process that hangs), stop the process (SIGSTOP, until a SIGCONT), or raise
  a RuntimeError (a crash). Counted by torch's global optimizer step hook.
- ``SCENEML_FAULT_AFTER_CHECKPOINT=N``: SIGKILL right after the N-th resumable checkpoint (``last.pt``) is
  written, before the epoch it closes is logged.

:func:`install` reads them from an environment: tests/processes.py calls it in each sceneml process it
forks, and tests/fault_hooks/sitecustomize.py in each fresh interpreter whose environment comes from
:func:`armed` (what `mlflow run` starts). :func:`injected` sets one in this process for a ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

AT_STEP = "SCENEML_FAULT_AT_STEP"
AFTER_CHECKPOINT = "SCENEML_FAULT_AFTER_CHECKPOINT"


def _run_key() -> tuple[str, str]:
    """(run id, run name) of the active MLflow run, ("", "") outside one."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return (run.info.run_id, run.info.run_name or "") if run is not None else ("", "")


def _at_step(spec: str) -> Callable:
    spec, _, only = spec.partition("@")
    at, _, action = spec.partition(":")
    counts: dict[str, int] = {}

    def hook(optimizer, args, kwargs) -> None:
        run_id, name = _run_key()
        if only and name != only:
            return
        counts[run_id] = counts.get(run_id, 0) + 1
        if counts[run_id] != int(at):
            return
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "raise":
            raise RuntimeError(f"fault injected after step {at} ({AT_STEP})")
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        print(f"sceneml: paused after step {at} ({AT_STEP})", file=sys.stderr, flush=True)
        threading.Event().wait()  # blocks until the test kills the process

    return hook


def _kill_after_checkpoint(n: int, replace: Callable) -> Callable:
    saved = [0]

    def wrapped(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        # sceneml's atomic write of last.pt (MLflow's artifact stores replace files of that name too)
        if os.path.basename(src).startswith(".last.pt."):
            saved[0] += 1
            if saved[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    return wrapped


def install(env: Mapping[str, str]) -> Callable[[], None]:
    """Arm the faults ``env`` names in this process; returns what disarms them."""
    undo: list[Callable[[], None]] = []
    if env.get(AT_STEP):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(_at_step(env[AT_STEP]))
        undo.append(handle.remove)
    if env.get(AFTER_CHECKPOINT):
        original = os.replace
        os.replace = _kill_after_checkpoint(int(env[AFTER_CHECKPOINT]), original)
        undo.append(lambda: setattr(os, "replace", original))

    def disarm() -> None:
        for step in reversed(undo):
            step()

    return disarm


def armed(**faults: str) -> dict[str, str]:
    """Environment variables that arm ``faults`` in any sceneml process started with them, a fresh
    interpreter included (``armed(SCENEML_FAULT_AT_STEP="10:pause")``)."""
    hooks = str(Path(__file__).parent / "fault_hooks")
    return {**faults, "PYTHONPATH": os.pathsep.join(filter(None, [hooks, os.environ.get("PYTHONPATH", "")]))}


@contextlib.contextmanager
def injected(**faults: str) -> Iterator[None]:
    """``with injected(SCENEML_FAULT_AT_STEP="12:interrupt"): train(...)``: the fault in this process."""
    disarm = install(faults)
    try:
        yield
    finally:
        disarm()
