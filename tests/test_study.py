"""The study (`main`), `select` and `evaluate`, against independent recomputations."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from sceneml.config import TrainConfig
from sceneml.data import load_split_from_manifest
from sceneml.data.sources import resolve_source
from sceneml.tasks.select import select_champion
from sceneml.tasks.train import local_checkpoint_path, train

from .conftest import free_port, mlflow_run, subprocess_env, url_answers, wait_for
from .helpers import assert_metrics_recompute
from .processes import run_sceneml


def _runs(exp_id):
    runs = MlflowClient().search_runs([exp_id])
    parent = [r for r in runs if "optimizers" in r.data.params]  # not the other top-level runs tests add
    assert len(parent) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    return parent[0], children


@pytest.mark.slow
def test_children_select_and_evaluate_runs_hang_under_the_parent(study):
    _, exp_id = study
    parent, children = _runs(exp_id)
    assert set(children) == {"adamw-lr0.001", "sgd-lr0.001", "select", "evaluate v1 test", "analyze v1"}
    assert all(r.info.status == "FINISHED" for r in (parent, *children.values()))
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"comparison.json", "comparison.csv", "figures"} <= artifacts


@pytest.mark.slow
def test_champion_is_the_best_checkpoint_of_all_epochs(study):
    _, exp_id = study
    _, children = _runs(exp_id)
    client = MlflowClient()
    # keep_checkpoints=best (the default): each finished child holds one checkpoint, its best epoch
    models = {(m.source_run_id, int(m.tags["sceneml.epoch"])): m.model_id
              for m in mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")
              if m.source_run_id in {r.info.run_id for r in children.values()}}
    assert sorted(models) == sorted((r.info.run_id, int(r.data.metrics["best_epoch"]))
                                    for n, r in children.items() if n.endswith("lr0.001"))
    # independent: every child's val_mean_class_acc of every epoch
    scored = []
    for name in ("adamw-lr0.001", "sgd-lr0.001"):
        run_id = children[name].info.run_id
        scored += [(h.value, run_id, h.step) for h in client.get_metric_history(run_id, "val_mean_class_acc")]
        assert "checkpoints" not in {a.path for a in client.list_artifacts(run_id)}  # last.pt went at the end
        assert not local_checkpoint_path(run_id).parent.exists()
    best_value = max(v for v, _, _ in scored)
    champion = client.get_model_version_by_alias("sceneml", "champion")
    # the version's source is the exact checkpoint (this store does not fill ModelVersion.model_id)
    best_models = {models.get((r, e)) for v, r, e in scored if v == best_value}
    assert champion.source.removeprefix("models:/") in best_models
    assert champion.tags["sceneml.model_id"] == champion.source.removeprefix("models:/")
    assert champion.tags["sceneml.select_metric"] == "val_mean_class_acc"
    assert float(champion.tags["sceneml.val_mean_class_acc"]) == best_value


@pytest.mark.slow
def test_evaluation_test_acc_equals_a_recomputation_with_the_loaded_champion(study):
    _, exp_id = study
    _, children = _runs(exp_id)
    evaluation = children["evaluate v1 test"]
    assert_metrics_recompute(evaluation.data.metrics, mlflow.artifacts.load_text(
        f"runs:/{evaluation.info.run_id}/scores_test.csv"), "test")
    champion = MlflowClient().get_model_version_by_alias("sceneml", "champion")
    manifest = mlflow.artifacts.load_text(f"runs:/{champion.run_id}/data/split_manifest.csv")
    classes = json.loads(MlflowClient().get_run(champion.run_id).data.params["classes"])
    test = load_split_from_manifest("synthetic:60", manifest, classes, 48, "test", progress=False)
    model = mlflow.pytorch.load_model("models:/sceneml@champion")
    with torch.no_grad():
        logits = model(torch.from_numpy(test.pixels).permute(0, 3, 1, 2).float() / 255.0)
    accuracy = float(np.mean(logits.argmax(1).numpy() == test.labels))
    assert evaluation.data.metrics["test_acc"] == pytest.approx(accuracy, abs=1e-12)
    assert champion.tags["test_acc"] == f"{accuracy:.6f}"


@pytest.mark.slow
def test_select_is_idempotent_and_a_better_run_moves_the_alias(study_copy, monkeypatch):
    _, exp_id = study_copy
    client = MlflowClient()
    before = client.search_model_versions("name = 'sceneml'")
    version, _ = select_champion([exp_id])
    assert len(client.search_model_versions("name = 'sceneml'")) == len(before)  # no new version
    old = client.get_model_version_by_alias("sceneml", "champion")
    assert version.version == old.version

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)  # scoped to this test, unlike set_experiment
    # the study's data set (select refuses to rank runs of another one) at its size, trained twice as long
    better = train(TrainConfig(data="synthetic:60", epochs=4, image_size=48, weights="none", quiet=True))
    new_version, best = select_champion([exp_id])
    assert best.run_id == better
    assert int(new_version.version) == int(old.version) + 1
    assert client.get_model_version_by_alias("sceneml", "champion").version == new_version.version
    assert client.get_model_version_by_alias("sceneml", "previous").version == old.version
    assert client.get_run(better).data.tags["sceneml.champion"] == "true"
    assert client.get_run(old.run_id).data.tags["sceneml.champion"] == "false"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One synthetic image per class and a text file named like a JPEG."""
    folder = tmp_path_factory.mktemp("to-predict")
    root = resolve_source("synthetic:60").train_dir
    for name in ("buildings", "forest", "glacier", "mountain", "sea", "street"):
        shutil.copy(sorted((root / name).glob("*.png"))[-1], folder / f"{name}.png")
    (folder / "zz_not_an_image.jpg").write_text("hello")
    return folder


@pytest.fixture(scope="module")
def predictions(study_store, images, tmp_path_factory):
    """`python -m sceneml predict` on a copy of the study's store (it logs a run of its own). `mlflow run`
    starts each entry point with these options (tests/test_params.py checks the MLproject commands)."""
    uri, exp_id = study_store
    out = tmp_path_factory.mktemp("predict") / "predictions.csv"
    shutil.copyfile(uri.removeprefix("sqlite:///"), out.parent / "mlflow.db")
    proc = run_sceneml(["predict", "--input", str(images), "--output", str(out)],
                       subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{out.parent / 'mlflow.db'}"), out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_csv(out, keep_default_na=False)


@pytest.mark.slow
def test_predict_writes_one_row_per_file_and_an_error_for_an_unreadable_one(predictions):
    classes = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    assert list(predictions.columns) == ["path", "predicted_class", *(f"prob_{c}" for c in classes), "error"]
    assert len(predictions) == 7
    bad = predictions.iloc[-1]
    assert bad["path"].endswith("zz_not_an_image.jpg") and bad["error"] and bad["predicted_class"] == ""
    good = predictions.iloc[:-1]
    assert (good["error"] == "").all()
    probs = good[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert list(good["predicted_class"]) == [classes[i] for i in probs.argmax(1)]


@pytest.mark.slow
def test_predict_with_tta_gives_the_mean_of_each_image_and_its_mirror_image(study_copy, images, tmp_path):
    """`predict -P tta=true` against two plain predictions, of the files and of mirrored copies (PNG)."""
    from PIL import Image, ImageOps

    from sceneml.config import PredictConfig
    from sceneml.tasks.predict import predict

    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for f in sorted(images.glob("*.png")):
        ImageOps.mirror(Image.open(f).convert("RGB")).save(mirrored / f.name)
    tables = {}
    for name, folder, tta in (("plain", images, False), ("mirror", mirrored, False), ("tta", images, True)):
        predict(PredictConfig(input=str(folder), output=str(tmp_path / f"{name}.csv"), quiet=True, tta=tta))
        table = pd.read_csv(tmp_path / f"{name}.csv", keep_default_na=False)
        tables[name] = table[table["error"] == ""].filter(like="prob_").to_numpy(dtype=float)
    assert len(tables["tta"]) == 6
    np.testing.assert_allclose(tables["tta"], (tables["plain"] + tables["mirror"]) / 2, rtol=1e-5, atol=1e-8)
    assert not np.allclose(tables["plain"], tables["mirror"])


@pytest.mark.slow
def test_served_champion_answers_like_predict(study, images, predictions, tmp_path):
    uri, _ = study
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/sceneml@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=log, start_new_session=True)
    try:
        wait_for(lambda: url_answers(f"http://127.0.0.1:{port}/ping"), 180, "mlflow models serve", server,
                 tmp_path / "serve.log")
        files = sorted(images.iterdir())
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        served = pd.DataFrame(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    prob_cols = [c for c in predictions.columns if c.startswith("prob_")]
    assert list(served["predicted_class"][:-1]) == list(predictions["predicted_class"][:-1])
    # same code path and the same batch; float32 CPU kernels may still differ in the last bits
    np.testing.assert_allclose(served[prob_cols][:-1].to_numpy(float), predictions[prob_cols][:-1].to_numpy(float),
                               rtol=0, atol=1e-6)
    assert served["error"].iloc[-1].startswith("UnidentifiedImageError")


CHAMPION_SNIPPET = """
import json, sys
import mlflow, numpy as np, torch
from sceneml.data.decode import load_rgb
m = mlflow.pytorch.load_model("models:/sceneml@champion")
m.eval()
calls = []
m.layer4.register_forward_hook(lambda module, inputs, output: calls.append(1))
with torch.no_grad():
    shapes = [list(m(torch.rand(1, 3, 100, 100)).shape), list(m(torch.rand(5, 3, 150, 150)).shape)]
    pixels = np.stack([load_rgb(p, 48) for p in sys.argv[1:]])
    argmax = m(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).argmax(1).tolist()
print(json.dumps({"shapes": shapes, "calls": len(calls), "argmax": argmax}))
"""


@pytest.mark.slow
def test_champion_is_an_ordinary_pytorch_model_that_agrees_with_predict(study, images, predictions):
    """docs/serving.md's "Load it anywhere" in a fresh process: eval, a hook on layer4 that fires once per
    forward, any batch and image size, and the class predict reports for the same image."""
    uri, _ = study
    files = [str(images / f"{c}.png") for c in ("buildings", "forest", "glacier", "mountain", "sea", "street")]
    proc = subprocess.run([sys.executable, "-c", CHAMPION_SNIPPET, *files], env=subprocess_env(MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shapes"] == [[1, 6], [5, 6]] and out["calls"] == 3
    classes = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    by_path = dict(zip(predictions["path"], predictions["predicted_class"]))
    assert [classes[i] for i in out["argmax"]] == [by_path[f] for f in files]


@pytest.mark.slow
def test_plain_mlflow_run_puts_the_study_in_its_own_experiment_with_named_runs_and_one_checkpoint_each(
        study, hermetic_env):
    """`mlflow run .` with no experiment (the session's study): the study lands in experiment `sceneml`;
    every run has a name that says what it did; each child keeps one checkpoint and no resumable state,
    here or in the cache."""
    uri, _ = study
    client = MlflowClient()
    study_exp = client.get_experiment_by_name("sceneml")
    runs = client.search_runs([study_exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted([
        "study resnet18 synthetic:60", "adamw-lr0.001", "sgd-lr0.001", "select", "evaluate v1 test", "analyze v1"])
    assert all(r.info.status == "FINISHED" for r in runs)
    (pointer,) = client.search_runs(["0"])  # what `mlflow run` created in Default points to the study
    assert pointer.info.run_name == "main -> experiment sceneml"
    parent = next(r for r in runs if r.info.run_name.startswith("study"))
    assert parent.data.params["freeze_backbone"] == "false" and parent.data.params["compare"] == "none"
    children = [r for r in runs if r.info.run_name.endswith("lr0.001")]
    assert all(r.data.params["freeze_backbone"] == "false" for r in children)
    # repeats=1: the names are the configurations, and the verdict says one run each cannot tell
    assert all(r.data.tags["sceneml.config"] == r.info.run_name for r in children)
    assert parent.data.tags["sceneml.verdict"].startswith("one run per configuration cannot tell `")
    assert "repeats=5" in parent.data.tags["sceneml.verdict"] and "verdict_p_better" not in parent.data.metrics
    models = mlflow.search_logged_models(experiment_ids=[study_exp.experiment_id], output_format="list")
    assert sorted(m.name for m in models) == sorted(
        f"{r.info.run_name.replace('.', '_')}-e{int(r.data.metrics['best_epoch'])}" for r in children)
    folder = Path(study_exp.artifact_location.removeprefix("file://"))
    assert len(list(folder.rglob("model.pth"))) == 2  # the files of the others are deleted
    assert not list(folder.parent.rglob("last.pt"))
    assert not any((hermetic_env / "checkpoints" / r.info.run_id).exists() for r in children)


@pytest.mark.slow
def test_two_studies_with_one_model_name_each_evaluate_their_own_champion(tracking_uri, monkeypatch):
    """Study B crowns its champion while study A is between its select and its evaluate: the alias
    `sceneml@champion` moves to B's version under A. A's evaluate and analyze must still score the
    version A's select registered, trained by A's own child."""
    from sceneml.config import AnalyzeConfig, SelectConfig, StudyConfig
    from sceneml.tasks import search
    from sceneml.tasks import study as study_task
    from sceneml.tasks.select import select

    def tiny(seed: int) -> StudyConfig:
        train_cfg = TrainConfig(data="synthetic:12", epochs=1, batch_size=8, image_size=32, weights="none",
                                seed=seed, quiet=True)
        return StudyConfig("adamw", "0.001", "sceneml", "two-studies", train_cfg,
                           AnalyzeConfig(n_images=10, classes="forest", k=1, modules="conv1"))

    b = study_task.study(tiny(seed=1))
    b_parent = MlflowClient().get_run(b["champion_run_id"]).data.tags["mlflow.parentRunId"]
    real_evaluate = search.evaluate

    def b_crowns_meanwhile(cfg, nested=False):
        select(SelectConfig("two-studies", b_parent), nested=True)  # B's select moves the alias back to B
        return real_evaluate(cfg, nested)

    monkeypatch.setattr(search, "evaluate", b_crowns_meanwhile)
    a = study_task.study(tiny(seed=2))
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("sceneml", "champion").version) == str(b["version"])  # it moved
    a_parent = client.get_run(a["champion_run_id"]).data.tags["mlflow.parentRunId"]
    assert a_parent != b_parent and a["version"] != b["version"]
    a_runs = client.search_runs([client.get_run(a_parent).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{a_parent}'")
    used = {r.data.tags["sceneml.task"]: r for r in a_runs
            if r.data.tags.get("sceneml.task") in ("evaluate", "analyze")}
    assert set(used) == {"evaluate", "analyze"}
    a_version = client.get_model_version("sceneml", str(a["version"]))
    for task, run in used.items():
        trained_by = client.get_run(run.data.tags["sceneml.training_run_id"])
        assert trained_by.data.tags["mlflow.parentRunId"] == a_parent, task
        assert run.data.tags["sceneml.model_id"] == a_version.tags["sceneml.model_id"], task
        assert run.data.tags["sceneml.model_version"] == str(a["version"]), task


@pytest.mark.slow
def test_evaluate_entry_point_prints_the_headline_numbers_of_its_run(study_copy, tmp_path):
    """`evaluate` prints test_acc, test_mAP, test_mean_class_acc, test_ece and test_loss, and they are what
    the study's own evaluation of the same version logged."""
    uri, exp_id = study_copy
    proc = run_sceneml(["evaluate", "--model-uri", "models:/sceneml/1"], subprocess_env(MLFLOW_TRACKING_URI=uri),
                       tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(item.split(" = ") for item in proc.stdout.strip().splitlines()[-1].split("  "))
    assert list(printed) == ["test_acc", "test_mAP", "test_mean_class_acc", "test_ece", "test_loss"]
    _, children = _runs(exp_id)
    logged = children["evaluate v1 test"].data.metrics
    for key, text in printed.items():
        assert float(text) == pytest.approx(logged[key], abs=5e-5), key


def _csv(uri: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(uri)))


@pytest.mark.slow
def test_two_workers_share_a_repeated_study_whose_table_and_verdict_recompute_from_the_children(tracking_uri, tmp_path):
    """adamw at lr 0.001 against lr 1e-07, three paired repeats, the grid shared by two `main` workers on one
    journal: each of the six cells is trained once, one worker crowns. 1e-07 cannot learn in one epoch, so
    the verdict says 0.001 beats it with P = 1; the table and the interval recompute from the children."""
    import optuna
    from scipy import stats

    from .processes import failures, sceneml

    cmd = ["main", "--optimizers", "adamw", "--lrs", "0.001,0.0000001", "--repeats", "3", "--data", "synthetic:30",
           "--epochs", "1", "--batch-size", "16", "--image-size", "32", "--weights", "none", "--n-images", "10",
           "--classes", "forest", "--k", "1", "--modules", "conv1",
           "--quiet", "--study-name", "shared-grid", "--experiment", "repeats"]
    workers = [sceneml(cmd, subprocess_env(MLFLOW_TRACKING_URI=tracking_uri), tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], failures(workers, outputs)
    assert all("== adamw-lr" in out for out, _ in outputs)  # both workers trained
    assert sum("champion:" in out for out, _ in outputs) == 1  # one worker crowned
    client = MlflowClient()
    exp = client.get_experiment_by_name("repeats").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("sceneml.task") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert (parent.data.params["study_name"], parent.data.params["storage"]) == \
        ("shared-grid", str(tmp_path / "optuna.journal"))
    # the champion's analysis as the study was told: one image of forest, one module
    assert (parent.data.params["classes"], parent.data.params["k"], parent.data.params["modules"]) == \
        ("forest", "1", "conv1")
    trained = [r for r in runs if r.data.tags.get("sceneml.config")]
    children = {r.info.run_name: r for r in trained}
    assert len(trained) == 6 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trained)
    assert sorted(children) == sorted(f"adamw-lr{lr}-r{r}" for lr in ("0.001", "1e-07") for r in range(3))
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal")))
    cells = [t for t in optuna.load_study(study_name="shared-grid", storage=journal).trials if t.number < 6]
    assert all(t.state.name == "COMPLETE" for t in cells)
    assert sorted((t.params["config"], t.params["repeat"]) for t in cells) == \
        sorted((c, r) for c in ("adamw-lr0.001", "adamw-lr1e-07") for r in range(3))
    for name, run in children.items():
        assert run.data.tags["sceneml.config"] == name.rsplit("-r", 1)[0]
        assert run.data.params["seed"] == str(42 + int(name.rsplit("-r", 1)[1]))
        assert run.data.params["split_seed"] == "42"
    # the test split is the same in every repeat; the train/val division is not
    manifests = {n: _csv(f"runs:/{r.info.run_id}/data/split_manifest.csv") for n, r in children.items()}
    tests = {n: set(m.loc[m["split"] == "test", "path"]) for n, m in manifests.items()}
    vals = {n: set(m.loc[m["split"] == "val", "path"]) for n, m in manifests.items()}
    assert len({frozenset(t) for t in tests.values()}) == 1
    assert vals["adamw-lr0.001-r0"] != vals["adamw-lr0.001-r1"] and vals["adamw-lr0.001-r0"] == vals["adamw-lr1e-07-r0"]

    value = {n: r.data.metrics["val_mean_class_acc_best"] for n, r in children.items()}
    table = _csv(f"runs:/{parent.info.run_id}/comparison.csv")
    assert list(table["config"]) == ["adamw-lr0.001", "adamw-lr1e-07"]  # best first
    for row in table.itertuples():
        x = np.array([value[f"{row.config}-r{r}"] for r in range(3)])
        low, high = stats.t.interval(0.95, 2, loc=x.mean(), scale=stats.sem(x))
        assert (row.n, row.mean, row.std) == (3, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
        assert (row.ci_low, row.ci_high) == (pytest.approx(low), pytest.approx(high))

    wins = np.array([value[f"adamw-lr0.001-r{r}"] > value[f"adamw-lr1e-07-r{r}"] for r in range(3)], dtype=float)
    assert wins.tolist() == [1.0, 1.0, 1.0]
    metrics = parent.data.metrics
    assert metrics["verdict_p_better"] == 1.0
    boot = stats.bootstrap((wins,), np.mean, n_resamples=10_000, method="percentile",
                           random_state=np.random.default_rng(42)).confidence_interval
    assert (metrics["verdict_p_better_ci_low"], metrics["verdict_p_better_ci_high"]) == (boot.low, boot.high)
    assert parent.data.tags["sceneml.verdict"] == \
        "`adamw-lr0.001` beats `adamw-lr1e-07` in 3 of 3 paired repeats: P = 1.00 [1.00, 1.00]"
    # the champion: the best epoch of the best configuration's repeats
    champion = client.get_run(client.get_model_version_by_alias("sceneml", "champion").tags["sceneml.run_id"])
    assert champion.data.tags["sceneml.config"] == "adamw-lr0.001"
    assert champion.info.run_id in {children[f"adamw-lr0.001-r{r}"].info.run_id for r in range(3)}
    assert "children.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    analysis = next(r for r in runs if r.data.tags.get("sceneml.task") == "analyze")
    index = _csv(f"runs:/{analysis.info.run_id}/galleries/gallery_index.csv")
    assert (set(index["class"]), sorted(index["end"])) == ({"forest"}, ["bottom", "top"])
    # the report opens with the comparison of the configurations: the verdict and the table's numbers
    report = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/report.md")
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0] == "## 1. Which configuration is best"
    first = report.split("## ")[1]
    assert parent.data.tags["sceneml.verdict"] in first
    assert f"{table['mean'][0]:.3f}" in first and f"{table['ci_low'][0]:.3f}" in first



@pytest.mark.slow
def test_a_timm_model_goes_through_the_tiny_study_from_scratch(tracking_uri, tmp_path):
    """arch=timm/resnet18 (timm's zoo, random weights): its child trains, the champion is registered with
    timm in its requirements and loads as an eager module, evaluate scores it, and analyze hooks the
    modules and runs Grad-CAM on the last stage that the model itself names."""

    cmd = ["main", "--arch", "timm/resnet18", "--optimizers", "adamw", "--data", "synthetic:30", "--epochs", "1",
           "--batch-size", "16", "--image-size", "32", "--weights", "none", "--n-images", "10", "--classes", "forest",
           "--k", "1", "--quiet", "--experiment", "timm"]
    proc = run_sceneml(cmd, subprocess_env(MLFLOW_TRACKING_URI=tracking_uri), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("timm").experiment_id])
    by_task = {}
    for run in runs:
        by_task.setdefault(run.data.tags.get("sceneml.task"), []).append(run)
    assert len(by_task["train"]) == 1 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["arch"] for r in by_task["train"]} == {"timm/resnet18"}
    (evaluation,) = by_task["evaluate"]
    assert 0 <= evaluation.data.metrics["test_acc"] <= 1
    (analysis,) = by_task["analyze"]
    modules = analysis.data.params["modules_used"].split(",")
    assert len(modules) == 5 and modules[0] == "conv1"  # five convolutions spread over timm's ResNet
    assert "galleries/gradcam_forest_bottom.png" in {a.path for a in client.list_artifacts(analysis.info.run_id,
                                                                                            "galleries")}
    model = mlflow.pytorch.load_model("models:/sceneml@champion")
    assert type(model).__name__ == "Normalised__ResNet__timm__models__resnet"
    model_id = client.get_model_version_by_alias("sceneml", "champion").source.removeprefix("models:/")
    requirements = mlflow.artifacts.load_text(f"{client.get_logged_model(model_id).artifact_location}/requirements.txt")
    assert any(line.startswith("timm==") for line in requirements.splitlines())


@pytest.mark.slow
def test_select_after_a_default_study_finds_the_studys_runs_without_an_experiment(study_copy, tmp_path):
    """docs/study.md's command, `mlflow run . -e select -P select_metric=val_mAP -P parent_run_id=<id>`,
    launched in the Default experiment while the study's runs are in `sceneml`: it compares the checkpoints
    of the study's children and registers the one with the best val_mAP."""
    uri, exp_id = study_copy
    client = MlflowClient()
    runs = client.search_runs([exp_id])
    parent = next(r for r in runs if r.data.tags.get("sceneml.task") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags.get("sceneml.task") == "train"]
    # the checkpoints the children kept (keep_checkpoints=best: each one's best epoch by its own select metric)
    best = max(m.value for r in children for m in client.get_metric_history(r.info.run_id, "val_mAP")
               if m.step == int(r.data.metrics["best_epoch"]))
    mlflow_run(uri, "0", "select", {"select_metric": "val_mAP", "parent_run_id": parent.info.run_id}, tmp_path)
    (chose,) = client.search_runs(["0"], filter_string="tags.`sceneml.task` = 'select'")
    assert chose.data.params["select_metric"] == "val_mAP" and chose.data.metrics["champion_val_mAP"] == best
    # the alias points at that checkpoint (a version registered before for the same checkpoint is reused)
    champion = client.get_model_version_by_alias("sceneml", "champion")
    assert champion.tags["sceneml.model_id"] == chose.data.tags["sceneml.model_id"]
    assert champion.tags["sceneml.run_id"] in {r.info.run_id for r in children}
