"""Shared fixtures: a hermetic cache, no network, and a fresh sqlite tracking store per test."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Under pytest-xdist (`make test`: two workers on a 2-core machine) each worker and the processes it
# starts use one torch thread: two workers of two threads each oversubscribe the cores, which made the
# suite slower than one worker. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# offline: MLflow's usage telemetry would try to reach its endpoint from every process the tests start
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# how the tests of shared searches (`tune`, `main` workers on mobilenet_v3_small) analyse their champion:
# galleries of one image of one class, one module's statistics and spectrum (five would double the analysis)
SMALL_ANALYSIS = ["--classes", "forest", "--k", "1", "--modules", "features.0"]


@pytest.fixture(scope="session", autouse=True)
def hermetic_env(tmp_path_factory):
    """One cache per `pytest` command, shared by its xdist workers (each synthetic set renders once; the
    cache is safe for concurrent writers: tests/test_data.py), offline, an empty TORCH_HOME."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sceneml-cache"
    cache.mkdir(exist_ok=True)
    torch_home = tmp_path_factory.mktemp("torch-home")
    saved = {k: os.environ.get(k) for k in ("SCENEML_CACHE", "SCENEML_OFFLINE", "TORCH_HOME")}
    os.environ.update(SCENEML_CACHE=str(cache), SCENEML_OFFLINE="1", TORCH_HOME=str(torch_home))
    yield cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `mlflow run` subprocesses: this interpreter's bin first on PATH, since the
    MLproject commands call plain `python`."""
    import sys

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_answers(url: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str, proc=None, log: Path | None = None) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` on timeout, or with the end of the log
    (a file, else the process's piped stderr) if ``proc`` ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text() if log is not None else (proc.stderr.read() if proc.stderr else "")
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {tail[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def mlflow_run(uri: str, exp_id: str, entry_point: str, params: dict[str, str], cwd: Path):
    """`mlflow run <repo> -e <entry_point> --env-manager local` against the store ``uri``; asserts rc 0."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local",
           "--experiment-id", exp_id]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    proc = subprocess.run(cmd, env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def mlflow_run_in_tmp(tmp: Path, experiment: str, entry_point: str, params: dict[str, str]):
    """Run `mlflow run <repo> -e <entry_point>` against a fresh sqlite store in ``tmp``.

    Returns (tracking uri, experiment id, the finished process). The process-wide tracking URI is left
    pointing at it.
    """
    uri = new_store(tmp)
    mlflow.set_tracking_uri(uri)
    exp_id = mlflow.create_experiment(experiment, artifact_location=(tmp / "artifacts").as_uri())
    proc = mlflow_run(uri, exp_id, entry_point, params, tmp)
    return uri, exp_id, proc


@pytest.fixture(scope="session")
def study_store(tmp_path_factory, hermetic_env):
    """`mlflow run .` once per session, as a user types it (no experiment named, so the study goes to
    `sceneml`): 2 optimizers x 2 epochs on 60 synthetic images per class at 48 px (ResNet18's layer4 is
    2 x 2 there, as at 64 px, so Grad-CAM has a map to show), then select, evaluate, analyze (galleries of
    4 of each class's 9 test images: a top and a bottom that differ) and the report. Returns (tracking
    uri, experiment id). Read-only: a test that adds runs or moves the alias takes ``study_copy``."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("study")
    uri = new_store(tmp)
    # created beforehand only to keep its artifacts in tmp; the study finds it by name
    exp_id = mlflow.MlflowClient(uri).create_experiment("sceneml", artifact_location=(tmp / "artifacts").as_uri())
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
                           "-P", "data=synthetic:60", "-P", "epochs=2", "-P", "optimizers=adamw,sgd",
                           "-P", "weights=none", "-P", "n_images=60", "-P", "image_size=48", "-P", "k=4"],
                          env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri, exp_id


@pytest.fixture
def study(study_store, tmp_path):
    """The session's study store, as this process's (and its subprocesses') tracking store."""
    uri, exp_id = study_store
    with using_store(uri, tmp_path):
        yield uri, exp_id


_TEMPLATE: list[Path] = []


def new_store(folder: Path) -> str:
    """A sqlite tracking store in ``folder``, copied from one created once per process: MLflow's
    migrations take about a second a store, a copy a few milliseconds. Its Default experiment keeps
    artifacts in ``folder/mlruns/0``, as a store created there would."""
    import atexit
    import shutil
    import tempfile

    if not _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="sceneml-store-template-")) / "mlflow.db"
        owner = os.getpid()  # the process's own copy goes with it (not with a fork's exit)
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(template.parent, ignore_errors=True))
        mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
        _TEMPLATE.append(template)
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    shutil.copyfile(_TEMPLATE[0], db)
    _relocate_artifacts(db, lambda experiment: str(folder / "mlruns" / str(experiment)))
    return f"sqlite:///{db}"


def _relocate_artifacts(db: Path, location) -> None:
    """Point every experiment of the sqlite store ``db`` at ``location(experiment_id)``: where its new
    runs and models write their files (the runs it already holds keep theirs)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        for (experiment,) in con.execute("SELECT experiment_id FROM experiments").fetchall():
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                        (location(experiment), experiment))
    con.close()


@contextlib.contextmanager
def using_store(uri: str, cwd: Path):
    """``uri`` as this process's tracking store (and its subprocesses'), run from ``cwd``, with no
    experiment or run left active by whatever ran before; everything put back afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(cwd)  # artifacts (./mlruns) land there
        # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID for subprocesses: an id of another store must
        # not leak in or out (setenv first, so that the exit puts back whatever was there before)
        for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.setenv(var, "")
            mp.delenv(var)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking_uri(tmp_path):
    """A fresh sqlite store in tmp_path, for this process and for subprocesses."""
    with using_store(new_store(tmp_path), tmp_path) as uri:
        yield uri


@pytest.fixture
def study_copy(study_store, tmp_path):
    """A copy of the session's study store, for a test that changes it (a new champion, new runs): the
    session's store stays as every other test expects it, whatever the order. The copy's runs and models
    keep their artifacts where the study wrote them; new ones go into tmp_path."""
    import shutil

    uri, exp_id = study_store
    db = tmp_path / "mlflow.db"
    shutil.copyfile(uri.removeprefix("sqlite:///"), db)
    _relocate_artifacts(db, lambda experiment: (tmp_path / "artifacts" / str(experiment)).as_uri())
    with using_store(f"sqlite:///{db}", tmp_path) as copied:
        yield copied, exp_id


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    """Collecting imports torch, MLflow and the rest for the session: frozen, as `python -m sceneml` does
    with a task's imports (sceneml.cli.frozen_imports), so that the collections during the tests walk
    only what the tests make."""
    from sceneml.cli import frozen_imports

    with frozen_imports():
        yield


# Costly fixtures that several tests share. `make test` runs two pytest-xdist workers with
# `--dist loadgroup`: the tests of one fixture go to the same worker, so each is built once (ungrouped,
# each worker would build its own copy: correct, only slower).
SHARED_FIXTURES = {"study_store": "study", "real_study": "real-photos", "cli_run": "cli-run", "postgres": "postgres",
                   "straight": "straight-run"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((g for name, g in SHARED_FIXTURES.items() if name in item.fixturenames), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    # xdist hands out the groups first (largest first), then the other tests in this order: the slow
    # ones before the quick ones, so that the quick ones fill whichever worker is done first instead of
    # one long test keeping a worker busy after the other has run dry. A stable sort: the order within
    # each kind stays pytest-randomly's shuffle (this hook runs after it).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``SCENEML_FAIL_ON_SKIP=1``, set by .ci/run) a skipped test fails: CI must not pass by
    skipping. On a user's clone the real-data, browser and PostgreSQL tests skip with their reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SCENEML_FAIL_ON_SKIP") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, which must run every test: {reason}"
