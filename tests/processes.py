"""Processes for the tests where the process is the point (signals, crashes, concurrent writers, limits).

Each is ``python -m sceneml <args>`` (or ``python -c <code>``) as its own OS process: its own pid,
environment, working folder, signals and exit status. It is forked from a server process that imported
sceneml, torch and MLflow once (multiprocessing's forkserver, preloaded), instead of a fresh interpreter
that pays those imports again (about 5 s of CPU each on two cores). `mlflow run` tests still start fresh
interpreters.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from .faults import install as install_faults

# conftest's REPO too: not imported from there, since every forked process imports this module (and
# conftest would bring pytest in)
REPO = Path(__file__).resolve().parents[1]
_PRELOAD = ["tests.forkserver_warm"]
_context: list = []


def _forkserver():
    if not _context:
        import contextlib
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        # the server imports its preload with its own sys.path, whose first entry is its working folder
        # (the parent's sys.path reaches only the forked processes): started from a test's temporary
        # folder, it would not find `tests` and, ImportError being skipped there, would preload nothing
        with contextlib.chdir(REPO):
            forkserver.ensure_running()
        _context.append(ctx)
    return _context[0]


def _child(args: list[str], env: dict[str, str], cwd: str, out: str, err: str, new_session: bool,
           max_file_bytes: int, code: str | None) -> None:
    """What a fresh `python -m sceneml <args>` (or `python -c <code> <args>`) would do, in the forked
    process; exits like it."""
    if new_session:
        os.setsid()
    if max_file_bytes:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):  # what a fresh interpreter's torch reads at start; torch is loaded here
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["-c" if code is not None else "sceneml", *args]
    install_faults(env)  # SCENEML_FAULT_*: tests/faults.py
    status = 0
    try:
        if code is not None:
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
        else:
            from sceneml.cli import main

            main(args)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # an uncaught exception: traceback and status 1, as the interpreter does
        traceback.print_exc()
        status = 1
    finally:
        atexit._run_exitfuncs()  # MLflow's and sceneml's exit hooks, which os._exit would skip
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


class _Text:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str:
        return self.path.read_text() if self.path.exists() else ""


class Process:
    """The subset of ``subprocess.Popen`` the tests use; output goes to files, read as text."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path | str, new_session: bool = False,
                 max_file_bytes: int = 0, code: str | None = None) -> None:
        folder = Path(tempfile.mkdtemp(prefix="sceneml-proc-"))
        self.stdout, self.stderr = _Text(folder / "stdout"), _Text(folder / "stderr")
        self.args = args
        self._proc = _forkserver().Process(target=_child, args=(
            list(args), dict(env), str(cwd), str(self.stdout.path), str(self.stderr.path), new_session,
            max_file_bytes, code))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        if self._proc.exitcode is None:
            self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout.read(), self.stderr.read()


def sceneml(args: list[str], env: dict[str, str], cwd: Path | str, **kwargs) -> Process:
    """Start ``python -m sceneml <args>`` (e.g. ``["train", "--epochs", "2"]``) as its own process."""
    return Process(args, env, cwd, **kwargs)


def python(code: str, args: list[str], env: dict[str, str], cwd: Path | str) -> Process:
    """Start ``python -c <code> <args>`` as its own process (sceneml, torch and MLflow already imported)."""
    return Process(args, env, cwd, code=code)


def run_sceneml(args: list[str], env: dict[str, str], cwd: Path | str, timeout: float = 600,
                **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``python -m sceneml <args>``: waits, returns status and output."""
    proc = Process(args, env, cwd, **kwargs)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def failures(workers: list[Process], outputs: list[tuple[str, str]]) -> str:
    """What a failed assertion on several workers' exit statuses shows: each failed worker's status and
    its stderr from its last traceback on (pytest would cut a long message in its middle), else its end."""
    shown = []
    for worker, (_, err) in zip(workers, outputs):
        if worker.returncode:
            start = err.rfind("Traceback (most recent call last)")
            shown.append(f"worker {worker.pid} exited {worker.returncode}:\n"
                         + (err[start:start + 6000] if start >= 0 else err[-3000:]))
    return "\n\n".join(shown)
