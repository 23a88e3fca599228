"""The team set-up for real: `mlflow server` on a throwaway PostgreSQL with proxied artifacts.

Four trainings at once, `select` and `evaluate` over HTTP, the server killed and restarted while a run
is stopped mid-epoch, and two `tune` workers and two `main` workers each sharing an Optuna study in the
same PostgreSQL.
Skipped (with the reason) where no PostgreSQL server binaries are installed; `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score

from .conftest import SMALL_ANALYSIS, free_port, subprocess_env, url_answers, wait_for
from .helpers import assert_metrics_recompute
from .processes import failures, run_sceneml, sceneml
from .test_reliability import EPOCH_KEYS, TRAIN, _epoch_metrics

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)),
                                           None)
    return Path(found).resolve().parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root (CI), run it as the `postgres` user of the package."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on a free port, trust auth for user `sceneml`, databases `mlflow` and `optuna`."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb): `apt-get install postgresql` to run these tests")
    home = Path(tempfile.mkdtemp(prefix="sceneml-pg-"))
    data = home / "data"
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "sceneml", "--auth=trust",
                                 "-E", "UTF8"]), check=True, capture_output=True)
    port = free_port()
    log = home / "postgres.log"
    with open(log, "w") as out:
        server = subprocess.Popen(_as_postgres([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k",
                                                str(home), "-c", "listen_addresses=127.0.0.1"]),
                                  stdout=out, stderr=out, start_new_session=True)
    try:
        wait_for(lambda: subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                        capture_output=True).returncode == 0, 60, "PostgreSQL", server, log)
        for db in ("mlflow", "optuna"):
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "sceneml", db],
                           check=True, capture_output=True)
        yield f"postgresql://sceneml@127.0.0.1:{port}"
    finally:  # SIGINT: PostgreSQL's fast shutdown (SIGTERM's smart one waits for every client to leave)
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def _start_server(tmp: Path, db: str, port: int, log_name: str) -> subprocess.Popen:
    log = tmp / log_name
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{db}/mlflow",
             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],  # one uvicorn process serves concurrent requests; MLflow's default starts 4
            # as docs/scaling-out.md runs it: without MLflow's job runner (seven Huey consumer processes,
            # each importing MLflow, for GenAI jobs sceneml never submits)
            env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), cwd=tmp, stdout=out, stderr=out,
            start_new_session=True)
    wait_for(lambda: url_answers(f"http://127.0.0.1:{port}/health"), 120, "mlflow server", server, log)
    return server


def _stop(server: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if server.poll() is None:
        os.killpg(server.pid, sig)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pg-server")
    port = free_port()
    proc = _start_server(tmp, postgres, port, "server-1.log")
    state = {"proc": proc, "tmp": tmp, "port": port, "uri": f"http://127.0.0.1:{port}", "db": postgres}
    yield state
    _stop(state["proc"], signal.SIGKILL)  # nothing of its own to save: the store is PostgreSQL's


def _env(uri: str, experiment: str, **extra: str) -> dict[str, str]:
    return subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=experiment, **extra)


@pytest.fixture(scope="module")
def four_runs(server):
    MlflowClient(server["uri"]).create_experiment("postgres-four")  # not raced for by the four
    procs = [sceneml([*TRAIN, "--epochs", "1", "--seed", str(seed), "--image-size", "32"],
                     _env(server["uri"], "postgres-four", OMP_NUM_THREADS="1"), server["tmp"]) for seed in range(4)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    client = MlflowClient(server["uri"])
    return client.search_runs([client.get_experiment_by_name("postgres-four").experiment_id])


def test_four_trainings_at_once_all_finish_with_every_metric(four_runs, server):
    client = MlflowClient(server["uri"])
    assert len(four_runs) == 4 and all(r.info.status == "FINISHED" for r in four_runs)
    for run in four_runs:
        assert set(_epoch_metrics(client, run.info.run_id)) == {(k, 1) for k in EPOCH_KEYS}


def test_select_and_evaluate_over_http(four_runs, server):
    env = _env(server["uri"], "postgres-four")
    for args in (["select", "--experiment", "postgres-four"], ["evaluate", "--model-uri", "models:/sceneml@champion"]):
        proc = run_sceneml(args, env, server["tmp"], timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(server["uri"])
    champion = client.get_model_version_by_alias("sceneml", "champion")
    best = max(four_runs, key=lambda r: r.data.metrics["val_mean_class_acc_best"])
    assert champion.tags["sceneml.val_mean_class_acc"] == str(best.data.metrics["val_mean_class_acc_best"])
    evaluation = client.get_run(champion.tags["sceneml.evaluation_run_id"])
    # scores_test.csv went through the server's artifact proxy and back: every metric recomputes exactly
    assert_metrics_recompute(evaluation.data.metrics, Path(client.download_artifacts(
        evaluation.info.run_id, "scores_test.csv", tempfile.mkdtemp(dir=server["tmp"]))).read_text(), "test")
    # and test_acc is what sklearn makes of that file, fetched through the server (one epoch of four
    # tiny runs is not meant to beat chance here: the select/evaluate path over HTTP is)
    table = pd.read_csv(client.download_artifacts(evaluation.info.run_id, "scores_test.csv",
                                                  tempfile.mkdtemp(dir=server["tmp"])), dtype={"label": str})
    classes = list(table.columns[2:])
    predicted = [classes[i] for i in table[classes].to_numpy().argmax(1)]
    assert len(table) > 0
    assert evaluation.data.metrics["test_acc"] == pytest.approx(accuracy_score(table["label"], predicted), abs=1e-12)


def test_a_server_restart_while_a_run_is_mid_epoch_loses_nothing(server):
    import psutil

    uri = server["uri"]
    # it stops itself inside epoch 2
    # MLflow's client retries a server that does not answer, sleeping 2, 4, 8, ... s by default (factor
    # 2): a factor of 1 sleeps half that, so the run notices the server's return sooner
    proc = sceneml([*TRAIN, "--epochs", "2", "--image-size", "32"],
                   _env(uri, "postgres-restart", SCENEML_FAULT_AT_STEP="10:stop",
                        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"),
                   server["tmp"])
    wait_for(lambda: proc.poll() is None and psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 300,
             "the stop in epoch 2", proc)
    _stop(server["proc"], signal.SIGKILL)  # the server dies mid-epoch ...
    os.kill(proc.pid, signal.SIGCONT)  # ... the run goes on and its next writes fail and retry ...
    server["proc"] = _start_server(server["tmp"], server["db"], server["port"], "server-2.log")  # ... it is back
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("postgres-restart").experiment_id],
                             order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FINISHED"
    assert set(_epoch_metrics(client, run.info.run_id)) == {(k, s) for k in EPOCH_KEYS for s in (1, 2)}
    n_batches = 2 * -(-int(run.data.params["n_train"]) // 16)
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train_batch_loss")}) == \
        list(range(1, n_batches + 1))


def _two_workers(server: dict, tmp_path, cmd: list[str], experiment: str, task: str):
    """Two `python -m sceneml` workers of one shared search, against the server; returns the experiment's
    runs, the one parent (FINISHED, tagged ``task``) in a list, and each worker's (stdout, stderr)."""
    env = subprocess_env(MLFLOW_TRACKING_URI=server["uri"])
    workers = [sceneml(cmd, env, tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], failures(workers, outputs)
    client = MlflowClient(server["uri"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sceneml.task") == task]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return runs, parents, outputs


def test_two_tune_workers_share_one_search_in_postgres(server, tmp_path):
    storage = f"{server['db']}/optuna"
    cmd = ["tune", "--data", "synthetic:30", "--image-size", "32", "--arch", "mobilenet_v3_small",
           "--epochs", "1", "--weights", "none", "--n-images", "30", *SMALL_ANALYSIS, "--quiet",
           "--n-trials", "2", "--pruner", "none",
           "--storage", storage, "--experiment", "pg-tune"]
    runs, parents, outputs = _two_workers(server, tmp_path, cmd, "pg-tune", "tune")
    assert parents[0].data.params["storage"] == storage  # no password here to hide
    trials = sorted(int(r.data.tags["sceneml.trial"]) for r in runs if "sceneml.trial" in r.data.tags
                    and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id)
    assert trials == [0, 1], "\n".join(o[-2500:] for pair in outputs for o in pair)


def test_two_main_workers_share_one_study_in_postgres(server, tmp_path):
    """`main` with an SQLAlchemy storage: two workers train the 2 x 2 grid, each cell once, under one parent."""
    cmd = ["main", "--optimizers", "adamw,sgd", "--repeats", "2", "--data", "synthetic:20", "--image-size", "32",
           "--arch", "mobilenet_v3_small", "--epochs", "1", "--batch-size", "16", "--weights", "none",
           "--n-images", "20", *SMALL_ANALYSIS, "--quiet",
           "--storage", f"{server['db']}/optuna", "--study-name", "pg-grid",
           "--experiment", "pg-main"]
    runs, parents, outputs = _two_workers(server, tmp_path, cmd, "pg-main", "study")
    trained = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
                     and "sceneml.config" in r.data.tags)
    assert trained == ["adamw-lr0.001-r0", "adamw-lr0.001-r1", "sgd-lr0.001-r0", "sgd-lr0.001-r1"], \
        "\n".join(o[-2500:] for pair in outputs for o in pair)
    assert sum("champion:" in out for out, _ in outputs) == 1
    tags = parents[0].data.tags
    assert tags["sceneml.failed_children"] == "none", "\n".join(o[-2500:] for pair in outputs for o in pair)
    assert tags["sceneml.verdict"].startswith("`"), tags["sceneml.verdict"]
