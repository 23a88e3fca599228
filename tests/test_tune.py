"""`tune`: the search space file, a seeded search with pruning and a crashing trial, two workers on one
storage."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from sceneml.errors import SceneMLError
from sceneml.space import DEFAULT_SPACE, load_space, parse_space

from .conftest import SMALL_ANALYSIS, new_store, subprocess_env
from .processes import Process, sceneml

# 30 synthetic images per class at 32 px, 2 epochs of the smallest listed network: a trial takes a few
# seconds (the search, not the network, is what these tests are about); the champion's analysis is small
TINY = ["--data", "synthetic:30", "--image-size", "32", "--epochs", "2", "--weights", "none", "--n-images", "30",
        "--arch", "mobilenet_v3_small", *SMALL_ANALYSIS, "--quiet"]
STUDY = "tune-mobilenet_v3_small-synthetic_30"  # the default study name: tune-<arch>-<data>


# ------------------------------------------------------------------------------------ the space file

def test_default_space_samples_momentum_only_for_sgd_and_rmsprop():
    dims = {d.name: d for d in load_space("")}
    assert set(dims) == set(DEFAULT_SPACE)
    assert dims["lr"].log and (dims["lr"].low, dims["lr"].high) == (1e-4, 1e-1)
    assert dims["momentum"].active({"optimizer": "sgd"}) and not dims["momentum"].active({"optimizer": "adamw"})


@pytest.mark.parametrize("text, message", [
    ("lrr: {low: 0.1, high: 1}", "key 'lrr' is not a searchable train parameter"),
    ("lr: {low: 0.1, high: 0.01}", "key 'lr': low (0.1) must be < high (0.01)"),
    ("lr: {low: 0, high: 0.1, log: true}", "key 'lr': a log range needs low > 0"),
    ("optimizer: [adamw, lion]", "key 'optimizer': choice 'lion' is invalid"),
    ("lr: {low: 0.1}", "key 'lr': a range is {low, high"),
    ("momentum: {low: 0.8, high: 0.9, when: {optimizer: [sgd]}}", "'when' may only name a list-valued key"),
    ("batch_size: {low: 0, high: 8}", "key 'batch_size': bound 0 is invalid"),
    ("[1, 2]", "expected a mapping"),
    ("lr: {low: 0.1, high: [", "not valid YAML/JSON"),
])
def test_a_bad_space_file_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SceneMLError, match=None) as info:
        load_space(str(path))
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_int_parameters_get_int_ranges_and_json_works(tmp_path):
    path = tmp_path / "space.json"
    path.write_text('{"batch_size": {"low": 8, "high": 64, "log": true}, "scheduler": ["none", "cosine"]}')
    dims = {d.name: d for d in load_space(str(path))}
    assert dims["batch_size"].is_int and dims["batch_size"].low == 8 and dims["scheduler"].choices == ["none", "cosine"]
    with pytest.raises(SceneMLError, match="no such file|cannot read"):
        load_space(str(tmp_path / "missing.yaml"))
    assert parse_space({"lr": {"low": 1e-3, "high": 1e-2}}, "x")[0].is_int is False


# ------------------------------------------------------------------------------------- the search

def test_a_worker_that_loses_the_race_to_create_the_experiment_still_runs_in_it(tracking_uri, monkeypatch):
    """Two workers started together both find no experiment and both create it; MLflow 3.17 then
    returns early in the loser without activating it, and its trials landed in "Default" (seen on
    PostgreSQL). Triggered here exactly: the other worker creates it between this one's lookup and create."""
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from sceneml.tracking.runs import choose_experiment

    lookup = TrackingServiceClient.get_experiment_by_name

    def other_worker_wins(self, name):
        if name == "raced" and lookup(self, name) is None:
            MlflowClient().create_experiment("raced")  # the other worker, in the gap
            return None
        return lookup(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", other_worker_wins)
    choose_experiment("raced", "tune")
    with mlflow.start_run() as run:
        pass
    assert run.info.experiment_id == MlflowClient().get_experiment_by_name("raced").experiment_id != "0"


def _tune(tmp_path: Path, *args: str, env: dict | None = None) -> Process:
    """A `tune` worker: its own process, on the store and journal in ``tmp_path``."""
    if not (tmp_path / "mlflow.db").exists():
        new_store(tmp_path)
    return sceneml(["tune", *TINY, *args],
                   subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", **(env or {})), tmp_path)


def _finish(proc: Process) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _search_runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("sceneml")
    runs = MlflowClient().search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sceneml.task") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = {int(r.data.tags["sceneml.trial"]): r for r in children if "sceneml.trial" in r.data.tags}
    return parent, trials, {r.info.run_name: r for r in children if "sceneml.trial" not in r.data.tags}


@pytest.mark.slow
def test_seeded_search_prunes_survives_a_crashing_trial_and_registers_the_best_epoch(tmp_path):
    # half the lr range cannot learn in 2 epochs: the median pruner must stop some of those trials (ResNet18:
    # the smaller network does not learn in 2 epochs at any lr, so nothing would fall behind)
    (tmp_path / "space.yaml").write_text("optimizer: [adamw, sgd]\nlr: {low: 1.0e-7, high: 1.0e-2, log: true}\n")
    out = _finish(_tune(tmp_path, "--n-trials", "6", "--space", "space.yaml", "--seed", "3", "--arch", "resnet18",
                        "--modules", "conv1",
                        env={"SCENEML_FAULT_AT_STEP": "1:raise@trial-4"}))
    parent, trials, others = _search_runs(tmp_path)
    assert sorted(trials) == list(range(6)) and parent.info.status == "FINISHED"
    sampled = {(r.data.params["optimizer"], r.data.params["lr"]) for r in trials.values()}
    assert len(sampled) == 6  # distinct sampled params
    assert trials[4].info.status == "FAILED" and "fault injected" in trials[4].data.tags["sceneml.error"]
    assert all(r.info.status == "FINISHED" for n, r in trials.items() if n != 4)
    pruned = [n for n, r in trials.items() if r.data.tags.get("sceneml.pruned") == "true"]
    assert pruned, out
    assert all(trials[n].data.metrics["best_epoch"] == 1 for n in pruned)  # stopped after epoch 1, kept it

    study = optuna.load_study(study_name="tune-resnet18-synthetic_30", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    states = {t.number: t.state.name for t in study.trials}
    assert states[4] == "FAIL" and {states[n] for n in pruned} == {"PRUNED"}
    assert sum(s == "COMPLETE" for s in states.values()) == 5 - len(pruned)

    # the champion: the best epoch over every trial's logged history
    client = MlflowClient()
    scored = [(h.value, r.info.run_id, h.step) for r in trials.values() if r.info.status == "FINISHED"
              for h in client.get_metric_history(r.info.run_id, "val_mean_class_acc")]
    best = max(v for v, _, _ in scored)
    champion = client.get_model_version_by_alias("sceneml", "champion")
    assert (champion.tags["sceneml.run_id"], int(champion.tags["sceneml.epoch"])) in \
        {(r, e) for v, r, e in scored if v == best}
    assert {"select", "evaluate v1 test", "analyze v1"} <= set(others)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/trials.csv", "tune/optimization_history.png", "tune/param_importances.png"} <= artifacts
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "lr" not in parent.data.params and parent.data.params["n_trials"] == "6"  # sampled, not fixed


@pytest.mark.slow
def test_two_workers_started_together_share_one_search(tmp_path):
    workers = [_tune(tmp_path, "--n-trials", "6", "--epochs", "1", "--pruner", "none") for _ in range(2)]
    outputs = [_finish(w) for w in workers]
    parent, trials, others = _search_runs(tmp_path)
    assert sorted(trials) == list(range(6))  # 6 trials in all, no number twice, all under one parent
    assert all(r.info.status == "FINISHED" for r in trials.values())
    assert all("== trial-" in out for out in outputs)  # both workers ran trials
    assert sum("champion:" in out for out in outputs) == 1  # one worker finished the search
    assert [n for n in others if n == "select"] == ["select"]
    assert parent.info.status == "FINISHED"
    study = optuna.load_study(study_name=STUDY, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    counted = [t for t in study.trials if t.number < 6]
    assert len(counted) == 6 and all(t.state.name == "COMPLETE" for t in counted)
    # a trial over the budget (a lost race for the last slot) is marked, never run
    assert all("sceneml_skipped" in t.user_attrs for t in study.trials if t.number >= 6)


@pytest.mark.slow
def test_a_worker_interrupted_mid_trial_leaves_it_failed_and_the_next_worker_finishes_the_search(tmp_path):
    first = _tune(tmp_path, "--n-trials", "2", "--epochs", "1", "--pruner", "none",
                  env={"SCENEML_FAULT_AT_STEP": "2:interrupt@trial-1"})  # Ctrl-C inside trial 1
    _, err = first.communicate(timeout=600)
    assert first.returncode == 130, err[-2000:]
    parent, trials, _ = _search_runs(tmp_path)
    assert parent.info.status == "RUNNING" and trials[1].info.status == "KILLED"
    _finish(_tune(tmp_path, "--n-trials", "2", "--epochs", "1", "--pruner", "none"))  # a new worker joins
    parent, trials, others = _search_runs(tmp_path)
    assert sorted(trials) == [0, 1] and parent.info.status == "FINISHED" and "select" in others
    study = optuna.load_study(study_name=STUDY, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert [t.state.name for t in sorted(study.trials, key=lambda t: t.number)] == ["COMPLETE", "FAIL"]


def test_a_trial_whose_run_has_ended_stays_with_its_live_worker_and_goes_back_when_that_worker_is_gone(
        tracking_uri):
    """Between the end of a trial's training run and its worker's `tell`, the trial is RUNNING in Optuna
    and its run FINISHED in MLflow. A worker looking for dead workers' cells leaves it to its worker while
    that process lives (failing it made the worker's tell raise "Cannot tell a FAIL trial"), and puts the
    cell back once the process is gone."""
    import socket
    import subprocess
    import time

    from sceneml.tasks.search import PARENT_ATTR, TAG_TRIAL, WORKER_ATTR, Search, reclaim
    from sceneml.tracking.lease import TAG_HEARTBEAT

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="ended-run", storage=storage, direction="maximize")
    search = Search(name="ended-run", task="tune", run_name="tune ended-run", n_trials=1, metric="val_mean_class_acc",
                    storage="", shared=True, sampler_for=lambda n: optuna.samplers.RandomSampler(seed=n),
                    pruner=optuna.pruners.NopPruner(), params={}, note="")
    with mlflow.start_run(run_name="parent") as parent:
        study.set_user_attr(PARENT_ATTR, parent.info.run_id)
    worker = subprocess.Popen(["sleep", "60"])  # the trial's worker: a live process of this host
    try:
        beat = f"{socket.gethostname()} {worker.pid} {time.time():.0f}"
        trial = study.ask()
        trial.set_user_attr(WORKER_ATTR, beat)
        with mlflow.start_run(run_name="trial-0", tags={"mlflow.parentRunId": parent.info.run_id, TAG_TRIAL: "0",
                                                        TAG_HEARTBEAT: beat}):
            pass  # the training run ends FINISHED; the worker has yet to tell
        assert reclaim(study, search, grace=0) is False
        assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    finally:
        worker.kill()
        worker.wait()
    assert reclaim(study, search, grace=0) is True  # its worker is gone: the cell goes back
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert [t.state for t in study.trials[1:]] == [optuna.trial.TrialState.WAITING]
