"""Reliability: real crashes (SIGKILL, Ctrl-C, SIGTERM), resume checks, concurrent writers on one sqlite
store and concurrent selects, a full disk, and errors that must not leave a run RUNNING. (The tracking
server restarted under a running training is in test_postgres.py.)"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow import MlflowClient

from sceneml.config import TrainConfig
from sceneml.errors import SceneMLError
from sceneml.tasks.train import local_checkpoint_path, train

from . import faults
from .conftest import REPO, new_store, subprocess_env, using_store, wait_for
from .processes import Process, python, run_sceneml, sceneml

# 32 px: these tests are about crashes and stores, not accuracy (a later --image-size wins). A process
# where the test is about processes (signals, concurrency, limits); in-process otherwise.
# The process-level cases (signals, crashes, concurrent writers, resume) do not depend on the network:
# the smallest listed one trains and checkpoints in a third of ResNet18's time.
TRAIN = ["train", "--data", "synthetic:30", "--weights", "none", "--arch", "mobilenet_v3_small",
         "--batch-size", "16", "--quiet", "--device", "cpu", "--image-size", "32"]
SMALL = TrainConfig(data="synthetic:30", weights="none", arch="mobilenet_v3_small", batch_size=16, quiet=True,
                    device="cpu", image_size=32, epochs=3)
EPOCH_KEYS = ("train_loss", "val_loss", "val_acc", "val_mAP", "val_mean_class_acc")


def _env(uri: str, **extra: str) -> dict[str, str]:
    return subprocess_env(MLFLOW_TRACKING_URI=uri, **extra)


def _epoch_metrics(client: MlflowClient, run_id: str) -> dict[tuple[str, int], float]:
    return {(k, m.step): m.value for k in EPOCH_KEYS for m in client.get_metric_history(run_id, k)}


def _only_run(client: MlflowClient) -> str:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return runs[0].info.run_id if len(runs) == 1 else ""


# synthetic:30 gives 126 training images: 8 batches of 16 per epoch, so step 10 lies inside epoch 2
PAUSE_IN_EPOCH_2 = faults.armed(SCENEML_FAULT_AT_STEP="10:pause")


def _interrupt_in_epoch_2(tmp: Path, uri: str, sig: int) -> tuple[str, Process, str]:
    """Start a 3-epoch training that pauses after its 10th batch (inside epoch 2, deterministically,
    whatever the machine's speed), send ``sig`` once it says so; returns the run id, the ended
    process and its stderr."""
    proc = sceneml([*TRAIN, "--epochs", "3"], _env(uri, **PAUSE_IN_EPOCH_2), tmp)
    wait_for(lambda: "paused after step 10" in proc.stderr.read(), 300, "the pause in epoch 2", proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return _only_run(MlflowClient(uri)), proc, proc.stderr.read()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, hermetic_env) -> str:
    """The tracking URI of a store holding one uninterrupted 3-epoch run of ``SMALL`` (read-only)."""
    tmp = tmp_path_factory.mktemp("straight")
    with using_store(new_store(tmp), tmp) as uri:
        train(SMALL)
    return uri


def _resume(uri: str, cwd: Path, run_id: str) -> str:
    """Resume ``run_id`` in this process (the resume is about the task; the crash was a process)."""
    with using_store(uri, cwd):
        return train(dataclasses.replace(SMALL, resume=run_id))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_the_same_run_and_equals_a_straight_run(tmp_path, straight):
    straight_uri, crash_dir = straight, tmp_path
    crash_uri = new_store(crash_dir)
    run_id, proc, _ = _interrupt_in_epoch_2(crash_dir, crash_uri, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    client = MlflowClient(crash_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could mark it: that is what resume is for
    assert _resume(crash_uri, crash_dir, run_id) == run_id
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # the same run
    assert client.get_run(run_id).info.status == "FINISHED"
    straight = MlflowClient(straight_uri)
    straight_id = _only_run(straight)
    resumed = _epoch_metrics(client, run_id)
    assert len(resumed) == 3 * len(EPOCH_KEYS)
    assert resumed == _epoch_metrics(straight, straight_id)  # bit-identical on CPU with the same seed
    # the crashed epoch's batches were logged before the kill: each step is in the history once
    steps = [m.step for m in client.get_metric_history(run_id, "train_batch_loss")]
    assert len(steps) == len(set(steps)) and sorted(steps) == list(range(1, max(steps) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("sig, rc, said, error", [
    # docker stop, Slurm, Kubernetes; Ctrl-C (SIGINT) is the test after this one, under `mlflow run`
    (signal.SIGTERM, 143, "terminated (SIGTERM)", "Terminated: SIGTERM"),
])
def test_sigterm_ends_the_run_killed_after_saving_the_checkpoint_and_resume_finishes_it(tmp_path, sig, rc, said,
                                                                                        error):
    uri = new_store(tmp_path)
    run_id, proc, stderr = _interrupt_in_epoch_2(tmp_path, uri, sig)
    assert proc.returncode == rc
    assert f"{said}: the run is marked KILLED; continue it with resume=<run_id>" in stderr
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert error in run.data.tags["sceneml.error"]
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    local_checkpoint_path(run_id).unlink()  # as on another machine: resume downloads the logged one
    _resume(uri, tmp_path, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3]


@pytest.mark.slow
def test_ctrl_c_under_mlflow_run_ends_the_run_killed_not_failed(tmp_path):
    """A terminal's Ctrl-C reaches the whole group: `mlflow run` then SIGTERMs its child and marks the run
    FAILED unless the child marked it first; the child must outlive that SIGTERM and say KILLED."""
    uri = new_store(tmp_path)
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
           "--experiment-name", "signals", "-P", "data=synthetic:30", "-P", "weights=none", "-P", "batch_size=16",
           "-P", "epochs=3", "-P", "device=cpu", "-P", "arch=mobilenet_v3_small", "-P", "image_size=32"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=_env(uri, **PAUSE_IN_EPOCH_2), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)  # its own group, as in a terminal
    wait_for(lambda: "paused after step 10" in log.read_text(), 300, "the pause in epoch 2", proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("signals").experiment_id])
    assert len(runs) == 1
    # MLflow's `mlflow run` writes FAILED as it exits (see tracking.runs._RESTORE_STATUS); sceneml's
    # helper writes KILLED back once that process is gone
    status = lambda: client.get_run(runs[0].info.run_id).info.status  # noqa: E731
    wait_for(lambda: status() == "KILLED", 60, f"KILLED (status {status()})")
    assert "KeyboardInterrupt" in client.get_run(runs[0].info.run_id).data.tags["sceneml.error"]
    assert "interrupted: the run is marked KILLED; continue it with resume=<run_id>" in log.read_text()
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoints")}


def test_a_refused_resume_changes_nothing_about_the_old_run(tracking_uri):

    cfg = dataclasses.replace(SMALL, epochs=1)
    finished = train(cfg)
    client = MlflowClient()
    with mlflow.start_run(run_name="select") as run:
        mlflow.set_tag("sceneml.task", "select")
    # an interrupted training run: resumable, but only with the same data and model
    killed = client.create_run(client.get_run(finished).info.experiment_id, tags={"sceneml.task": "train"})
    for key, value in {"data": "synthetic:30", "batch_size": "16", "lr": "1e-3", "arch": SMALL.arch}.items():
        client.log_param(killed.info.run_id, key, value)
    client.set_terminated(killed.info.run_id, "KILLED")

    cases = [(finished, {}, "has FINISHED; there is nothing to resume"),
             (run.info.run_id, {}, "is a select run, not a training run"),
             (killed.info.run_id, {"batch_size": 8, "data": "synthetic:40"},
              "data was synthetic:30, now synthetic:40; batch_size was 16, now 8"),
             ("0" * 32, {}, "no such run")]
    for run_id, changes, message in cases:
        before = client.get_run(run_id).info if run_id != "0" * 32 else None
        with pytest.raises(SceneMLError, match=None) as info:
            train(dataclasses.replace(cfg, resume=run_id, **changes))
        assert message in str(info.value) and "lr was" not in str(info.value)  # 1e-3 logged == 0.001
        if before is not None:
            after = client.get_run(run_id).info
            assert (after.status, after.end_time) == (before.status, before.end_time)


@pytest.mark.slow
def test_four_runs_at_once_on_one_new_sqlite_store_all_finish_with_every_metric(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # does not exist yet: all four race to create it
    procs = [sceneml([*TRAIN, "--epochs", "1", "--seed", str(seed)], _env(uri, OMP_NUM_THREADS="1"), tmp_path)
             for seed in range(4)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert set(_epoch_metrics(client, run.info.run_id)) == {(k, 1) for k in EPOCH_KEYS}
        n_batches = -(-int(run.data.params["n_train"]) // 16)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_batch_loss")] == \
            list(range(1, n_batches + 1))


def test_a_model_uri_that_does_not_resolve_fails_in_one_line_and_marks_the_run_failed(tracking_uri):
    from sceneml.config import EvaluateConfig
    from sceneml.tasks.evaluate import evaluate

    with pytest.raises(SceneMLError, match=r"^model_uri 'models:/nope@champion' does not resolve") as info:
        evaluate(EvaluateConfig(model_uri="models:/nope@champion"))
    assert "\n" not in str(info.value)
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED"
    assert "does not resolve" in run.data.tags["sceneml.error"]


@pytest.mark.slow
def test_four_selects_at_once_register_the_checkpoint_once(tracking_uri):
    from sceneml.config import TrainConfig
    from sceneml.tasks.train import train

    train(TrainConfig(data="synthetic:30", weights="none", epochs=1, batch_size=16, image_size=32, quiet=True))
    procs = [sceneml(["select", "--experiment", "Default"], _env(tracking_uri), REPO) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    versions = MlflowClient().search_model_versions("name = 'sceneml'")
    assert len(versions) == 1
    assert MlflowClient().get_model_version_by_alias("sceneml", "champion").version == versions[0].version


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path):
    """The write limit of the process (RLIMIT_FSIZE) fails a write mid-file exactly as a full disk does."""
    cache = tmp_path / "cache"
    env = _env(new_store(tmp_path), SCENEML_CACHE=str(cache))
    # 180 images at 96 px decode to a 5 MB array: over the 4 MB limit
    proc = run_sceneml([*TRAIN, "--epochs", "1", "--image-size", "96"], env, tmp_path, timeout=300,
                       max_file_bytes=4 * 2**20)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write the decode cache in") and str(cache) in last
    assert "free space there or point SCENEML_CACHE at another disk" in last
    assert "Traceback" not in proc.stderr
    assert [p.name for p in cache.rglob(".*.npy")] == []  # the half-written decode cache is gone


@pytest.mark.slow
def test_an_error_before_the_work_is_tagged_on_mlflow_runs_run(tmp_path):
    """Under `mlflow run` MLflow exits with 1 for a failed run (sceneml's own status 2 is the entry point's),
    the one `error:` line reaches the terminal, and the run MLflow created ends FAILED with the message in
    `sceneml.error`, also for an error found before the task took that run over (a resume of no run)."""
    from .conftest import REPO, new_store, subprocess_env

    uri = new_store(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
                           "-P", f"resume={'0' * 32}", "-P", "data=synthetic:30"],
                          env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "no such run" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FAILED" and run.data.tags["sceneml.error"] == errors[0].removeprefix("error: ")


def test_predict_refuses_an_unwritable_output_before_predicting(tmp_path):
    from sceneml.config import PredictConfig
    from sceneml.errors import SceneMLError
    from sceneml.tasks.predict import predict

    (tmp_path / "photo.png").write_bytes(b"not used")
    (tmp_path / "a-file").write_text("x")
    for output, message in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "out.csv", "cannot be written")):
        with pytest.raises(SceneMLError, match=message):
            predict(PredictConfig("models:/does-not-matter/1", str(tmp_path / "photo.png"), str(output), "cpu"))


@pytest.mark.slow
def test_select_refuses_runs_of_two_data_sets_in_one_line_and_registers_nothing(tracking_uri, tmp_path):
    """Six synthetic classes and three folder classes in one experiment: no champion, one line naming both;
    another seed of the same data set is the same data set (its split differs, its images do not)."""
    from sceneml.tasks.select import select_champion

    from .helpers import write_class_folders

    three = write_class_folders(tmp_path / "three", {"a": 10, "b": 10, "c": 10})
    small = dict(weights="none", epochs=1, batch_size=16, image_size=32, quiet=True)
    train(TrainConfig(data="synthetic:30", seed=1, **small))
    train(TrainConfig(data="synthetic:30", seed=2, **small))
    select_champion(["0"])
    train(TrainConfig(data=str(three), val_fraction=0.3, test_fraction=0.3, **small))
    with pytest.raises(SceneMLError) as info:
        select_champion(["0"])
    (line,) = str(info.value).splitlines()
    assert line.startswith("the runs to rank were trained on 2 different data sets")
    assert "data=synthetic:30 (6 classes" in line and f"data={three} (3 classes" in line
    assert len(MlflowClient().search_model_versions("name = 'sceneml'")) == 1  # the first select's only


@pytest.mark.slow
def test_dedupe_that_empties_a_class_from_val_is_one_line_before_training(tracking_uri, tmp_path):
    """Class `a` is ten copies of one picture: every val/test copy is a duplicate of a training image."""
    import shutil

    from .helpers import write_class_folders

    root = write_class_folders(tmp_path / "data", {"a": 1, "b": 10, "c": 10})
    for i in range(1, 10):
        shutil.copy(root / "a" / "img_000.jpg", root / "a" / f"copy_{i}.jpg")
    with pytest.raises(SceneMLError) as info:
        train(dataclasses.replace(SMALL, data=str(root), dedupe="cross_split", epochs=1, val_fraction=0.3,
                                  test_fraction=0.3))
    (line,) = str(info.value).splitlines()
    assert line.startswith("dedupe=cross_split dropped ") and "class 'a'" in line
    dropped = int(line.split("dropped ")[1].split()[0])
    assert dropped >= 6  # at least the val and test shares of ten images
    assert _only_run(MlflowClient(tracking_uri)) == ""  # no training run was opened


@pytest.mark.slow
def test_a_kill_between_the_checkpoint_and_the_epoch_log_leaves_one_value_per_metric_and_epoch(tmp_path, straight):
    """SIGKILL right after epoch 2's checkpoint, before epoch 2 is logged: the resume logs epoch 2 from
    the checkpoint (metrics, scores file) and goes on; no metric of the run holds two values at a step,
    and every epoch equals a straight run's."""
    straight_uri, crash_dir = straight, tmp_path
    crash_uri = new_store(crash_dir)
    crashed = run_sceneml([*TRAIN, "--epochs", "3"], _env(crash_uri, **{faults.AFTER_CHECKPOINT: "2"}), crash_dir)
    assert crashed.returncode == -signal.SIGKILL
    client = MlflowClient(crash_uri)
    run_id = _only_run(client)
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1]  # epoch 2 saved, not logged
    _resume(crash_uri, crash_dir, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has two values at one step: {steps}"
    assert _epoch_metrics(client, run_id) == _epoch_metrics(MlflowClient(straight_uri), _only_run(MlflowClient(
        straight_uri)))
    assert {a.path for a in client.list_artifacts(run_id, "val_scores")} == {
        f"val_scores/epoch_00{e}.csv" for e in (1, 2, 3)}


def test_a_heartbeat_from_another_host_holds_the_run_until_it_is_stale():
    import socket

    from sceneml.tracking.lease import STALE_AFTER_S, holder_of

    other = f"not-{socket.gethostname()} 4242 1000"
    assert holder_of("RUNNING", other, now=1000 + STALE_AFTER_S - 1) == \
        f"process 4242 on not-{socket.gethostname()}, heartbeat {STALE_AFTER_S - 1} s ago"
    assert holder_of("RUNNING", other, now=1000 + STALE_AFTER_S) is None
    assert holder_of("KILLED", other, now=1001) is None  # it ended: nobody holds it
    assert holder_of("RUNNING", None) is None  # a run without heartbeat (not sceneml's, or older)


def test_a_heartbeat_of_a_process_that_exited_holds_nothing_even_before_its_status_is_collected():
    import socket

    from sceneml.tracking.lease import holder_of

    child = subprocess.Popen(["sleep", "600"])
    beat = f"{socket.gethostname()} {child.pid} 1000"
    assert holder_of("RUNNING", beat, now=1001) == f"process {child.pid} on {socket.gethostname()}, heartbeat 1 s ago"
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it has exited; its status is not collected
    try:
        assert psutil.pid_exists(child.pid)  # a zombie
        assert holder_of("RUNNING", beat, now=1001) is None
    finally:
        child.wait()


@pytest.mark.slow
def test_resume_of_a_run_still_training_in_another_process_is_refused_until_that_process_is_gone(tmp_path):
    uri = new_store(tmp_path)
    first = sceneml([*TRAIN, "--epochs", "3"], _env(uri, **PAUSE_IN_EPOCH_2), tmp_path)
    try:
        wait_for(lambda: "paused after step 10" in first.stderr.read(), 300, "the pause in epoch 2", first)
        run_id = _only_run(MlflowClient(uri))
        with pytest.raises(SceneMLError) as info:
            _resume(uri, tmp_path, run_id)
        (line,) = str(info.value).splitlines()
        assert line.startswith(f"resume={run_id}: run ") and f"still being trained (process {first.pid} on " in line
    finally:
        first.kill()
        first.wait()
    # the holder is gone (same host: at once, no waiting for the heartbeat to age)
    _resume(uri, tmp_path, run_id)
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_is_one_line_naming_it_before_any_work(tmp_path, monkeypatch):
    import time

    from .conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("SCENEML_STORE_WAIT_S", "5")
    started = time.monotonic()
    with using_store(uri, tmp_path), pytest.raises(SceneMLError) as info:
        train(dataclasses.replace(SMALL, data=str(tmp_path / "never-read")))  # fails before the data are read
    assert time.monotonic() - started < 60
    assert str(info.value) == (
        f"the tracking server {uri} did not answer within 5 s (ConnectionError); start it, or set "
        "MLFLOW_TRACKING_URI to one that runs")
    assert not (tmp_path / "mlruns").exists()


def test_batch_losses_are_queued_while_the_store_is_locked_and_all_written_after(tracking_uri, tmp_path):
    """Another connection holds the sqlite store's write lock: queuing returns at once (the training
    step goes on), the writer waits on the store; once the lock goes, every value is there."""
    import sqlite3
    import time

    from sceneml.tracking.runs import MetricBuffer

    run_id = MlflowClient().create_run("0").info.run_id
    buffer = MetricBuffer(run_id)
    blocker = sqlite3.connect(tmp_path / "mlflow.db", timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for step in range(1, 41):
            buffer.add("train_batch_loss", 1.0 / step, step)
            if step % 20 == 0:
                buffer.add_tags({"sceneml.heartbeat": f"host 1 {step}"})  # what a long run adds every 30 s
                started = time.perf_counter()
                buffer.flush_in_background()
                assert time.perf_counter() - started < 0.5
        assert not all(f.done() for f in buffer._queued)  # held up by the lock, not written
    finally:
        blocker.rollback()
        blocker.close()
    buffer.drain()
    history = MlflowClient().get_metric_history(run_id, "train_batch_loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 41)]
    assert MlflowClient().get_run(run_id).data.tags["sceneml.heartbeat"] == "host 1 40"  # the later beat


@contextlib.contextmanager
def _tracking_server_in_this_process(store_uri: str, monkeypatch):
    """MLflow's own tracking server app over ``store_uri``, on a free port in a thread of this process
    (so a test can steer its SQL store), as this process's tracking URI until the block ends; yields its URL."""
    import threading

    from mlflow.server import app, handlers
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from werkzeug.serving import make_server

    monkeypatch.setattr(handlers, "_tracking_store", SqlAlchemyStore(store_uri, os.getcwd()))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        yield url
    finally:
        server.shutdown()
        thread.join()
        mlflow.set_tracking_uri(store_uri)


@pytest.mark.parametrize("through", ["sql-store", "tracking-server"])
def test_a_data_set_two_runs_log_at_once_is_linked_to_both_after_one_retry(tracking_uri, monkeypatch, through):
    """MLflow's SQL store looks a data set up, then inserts it if missing: two workers logging one new
    data set together both miss it, and the second insert fails on the unique key (seen with two `tune`
    workers, and with two `main` workers on a tracking server, where the failure comes back as the
    server's BAD_REQUEST). Triggered exactly: run B's lookup answers as if run A's insert were not there yet."""
    import pandas as pd
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.store.tracking.dbmodels.models import SqlDataset
    from sqlalchemy.orm import Query

    from sceneml.tracking.store import insert_race, with_retries

    with contextlib.ExitStack() as stack:
        if through == "tracking-server":
            stack.enter_context(_tracking_server_in_this_process(tracking_uri, monkeypatch))
        dataset = mlflow.data.from_pandas(pd.DataFrame({"x": [1, 2]}), name="scenes")
        with mlflow.start_run() as a:
            mlflow.log_input(dataset, context="training")
        real_all, stale = Query.all, [True]

        def lookup_before_a_inserted(query):
            if stale[0] and query.column_descriptions[0]["entity"] is SqlDataset:
                stale[0] = False
                return []
            return real_all(query)

        monkeypatch.setattr(Query, "all", lookup_before_a_inserted)
        with mlflow.start_run() as b:
            with pytest.raises(MlflowException, match="UNIQUE constraint failed: datasets") as raced:
                mlflow.log_input(dataset, context="training")  # the race, without a retry
            assert isinstance(raced.value, RestException) == (through == "tracking-server")
            stale[0] = True
            with_retries(mlflow.log_input, dataset, context="training", transient=insert_race)
        assert not stale[0]  # the retried call met the race again, and its second try found A's row
        digests = {r: [i.dataset.digest for i in MlflowClient().get_run(r).inputs.dataset_inputs]
                   for r in (a.info.run_id, b.info.run_id)}
    assert digests[a.info.run_id] == digests[b.info.run_id] == [dataset.digest]


@pytest.mark.slow
def test_a_shared_study_outlives_a_killed_worker_and_refuses_a_worker_with_another_grid(tmp_path):
    """The only worker of a shared study (2 optimizers x 2 repeats), launched by `mlflow run`, is SIGKILLed with
    its whole process group while its first cell trains; a new worker (`python -m sceneml main`, the command
    that `mlflow run` starts) trains the other cells, finds the killed cell's worker gone (its process no
    longer exists), retrains that cell and crowns: every cell ends FINISHED once, nothing stays RUNNING (the
    dead worker's launch run neither: a worker that `mlflow run` did not start ends it too), the verdict
    counts both repeats. A worker started afterwards with another grid is refused in one line before it
    opens a run."""
    uri = new_store(tmp_path)
    params = {"optimizers": "adamw,sgd", "repeats": "2", "data": "synthetic:30", "epochs": "1", "batch_size": "16",
              "image_size": "32", "weights": "none", "arch": "mobilenet_v3_small", "n_images": "10",
              "classes": "forest", "k": "1", "modules": "features.0", "quiet": "true", "study_name": "dead-worker"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "dead",
           *(x for k, v in params.items() for x in ("-P", f"{k}={v}"))]
    log = tmp_path / "first.log"
    with log.open("w") as err:
        first = subprocess.Popen(cmd, env=_env(uri, **faults.armed(SCENEML_FAULT_AT_STEP="3:pause")), cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    wait_for(lambda: "paused after step 3" in log.read_text(), 300, "the pause in the first cell", first, log)
    os.killpg(first.pid, signal.SIGKILL)  # what an OOM kill or a preempted machine does to the whole group
    first.wait(timeout=60)
    cli = [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", v) if k != "quiet"]
    second = run_sceneml(["main", *cli, "--quiet", "--experiment", "dead"], _env(uri), tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "lost its worker" in second.stdout and "champion:" in second.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dead").experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    launches = [r for r in runs if r.info.run_name == "study worker -> dead-worker"]
    assert [r.info.status for r in launches] == ["KILLED"]  # the dead worker's; the second one has none
    cells = [r for r in runs if "sceneml.config" in r.data.tags]
    finished = sorted(r.info.run_name for r in cells if r.info.status == "FINISHED")
    assert finished == sorted(f"{o}-lr0.001-r{r}" for o in ("adamw", "sgd") for r in (0, 1))
    (killed,) = [r for r in cells if r.info.status != "FINISHED"]
    assert killed.info.status == "FAILED" and "the worker stopped answering" in killed.data.tags["sceneml.error"]
    (parent,) = [r for r in runs if r.data.tags.get("sceneml.task") == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["sceneml.failed_children"] == "none"
    assert " of 2 paired repeats" in parent.data.tags["sceneml.verdict"]
    assert client.get_model_version_by_alias("sceneml", "champion").tags["sceneml.run_id"] in \
        {r.info.run_id for r in cells if r.info.status == "FINISHED"}

    other = run_sceneml(["main", *cli, "--optimizers", "sgd", "--quiet", "--experiment", "dead"], _env(uri),
                        tmp_path)
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert other.returncode == 2 and len(errors) == 1 and "(optimizers: sgd != adamw,sgd)" in errors[0], other.stderr
    assert len(client.search_runs([client.get_experiment_by_name("dead").experiment_id])) == len(runs)


@pytest.mark.slow  # starts the forkserver: about 5 s of imports
def test_a_forked_test_process_starts_with_the_forkservers_imports_whatever_the_folder(tmp_path, monkeypatch):
    """The tests' processes fork from a server that imported torch, MLflow and the tasks once
    (tests/processes.py); a server started from a test's temporary folder once imported nothing, and
    every process paid those imports again (about 4 s of CPU each)."""
    monkeypatch.chdir(tmp_path)
    proc = python("import sys; print(sorted(m for m in ('tests.forkserver_warm', 'torch', 'sceneml.tasks.train') "
                  "if m in sys.modules))", [], _env("sqlite:///unused.db"), tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "['sceneml.tasks.train', 'tests.forkserver_warm', 'torch']"
