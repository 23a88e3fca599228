"""Where sceneml relies on MLflow's private behaviour: every such place is here, and nowhere else.

Checked against MLflow ``CHECKED_AGAINST`` (pyproject pins the minor version CI runs). Before moving
that pin, read each function's note against the new MLflow source and rerun the tests that name it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

CHECKED_AGAINST = "3.17.2"

# `mlflow run` marks its run FAILED after an interrupted child exits: MLflow 3.17's
# projects._maybe_set_run_terminated asks RunStatus.is_terminated(<a status string>), which is always
# False for a string, so it overwrites the KILLED the child wrote. This detached helper waits for the
# `mlflow run` process to exit, then writes the status back.
# Test: tests/test_reliability.py (Ctrl-C and SIGTERM under `mlflow run` end KILLED).
_RESTORE_STATUS = """
import os, sys, time
from mlflow import MlflowClient
run_id, status, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    time.sleep(0.2)
MlflowClient().set_terminated(run_id, status)
"""


def keep_status_after_mlflow_run(run_id: str, status: str) -> None:
    """Have ``run_id`` end as ``status`` even after the `mlflow run` process that launched this one has
    marked it (see ``_RESTORE_STATUS``)."""
    import psutil

    launcher = next((p for p in psutil.Process().parents()
                     if "run" in (cmd := " ".join(_cmdline(p))) and "mlflow" in cmd), None)
    if launcher is None:
        return
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", _RESTORE_STATUS, run_id, status, str(launcher.pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # out of the process group that Ctrl-C and SIGTERM reach


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # gone, or not ours to read
        return []


def skip_the_scan_of_every_installed_package(modules: dict[str, str]) -> None:
    """Before it logs a model, MLflow checks the requirements against the environment, and to do so
    first maps the import names of *every* installed distribution (``packages_distributions()``:
    0.6 s of a 10 s tiny run on the 2-core VM, once per process). Ours are pinned to what runs, so
    the map of our packages (``modules``: distribution -> import name) is all the check needs; the
    versions are still checked. ``_MODULES_TO_PACKAGES`` is MLflow 3.17's private cache: if it goes
    away, this sets an unused attribute and MLflow scans (slower, still correct)."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", ()) is None:
        requirements_utils._MODULES_TO_PACKAGES = {module: [dist] for dist, module in modules.items()}
