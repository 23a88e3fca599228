"""The study on real photos: the Intel JPEGs of ../shared/data (Kaggle layout, a few non-square), with
CIFAR-10 and ImageNet photos as compare sets for the spectra. Skips when ../shared/data is absent."""

from __future__ import annotations

import csv
import io
import shutil

import mlflow
import pytest
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score

from sceneml.config import AnalyzeConfig, StudyConfig, TrainConfig
from sceneml.scores import scores_from_csv
from sceneml.tasks.study import study

from .conftest import SHARED_DATA, new_store, using_store
from .helpers import assert_metrics_recompute

INTEL, CIFAR, IMAGENET = (SHARED_DATA / n for n in ("intel-mini", "cifar-10-batches-py", "imagenet-sample"))
CLASSES = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
EPOCHS = 4  # 240 photos at 64 px from scratch: a few seconds an epoch
MODULES = ["conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (INTEL.is_dir() and CIFAR.is_dir() and IMAGENET.is_dir()),
                                 reason="../shared/data (real Intel, CIFAR-10 and ImageNet photos) is not present")]


@pytest.fixture(scope="module")
def real_study(tmp_path_factory, hermetic_env):
    tmp = tmp_path_factory.mktemp("real")
    # a compare folder with 5 real photos and 2 files that do not decode
    odd = tmp / "odd"
    odd.mkdir()
    for path in sorted(IMAGENET.iterdir())[:5]:
        shutil.copy(path, odd / path.name)
    (odd / "truncated.jpg").write_bytes(next(IMAGENET.iterdir()).read_bytes()[:200])
    (odd / "text.png").write_text("not an image")
    with using_store(new_store(tmp), tmp):
        exp_id = mlflow.create_experiment("real", artifact_location=(tmp / "artifacts").as_uri())
        study(StudyConfig(optimizers="adamw", experiment="real",
                          train=TrainConfig(data=str(INTEL), epochs=EPOCHS, image_size=64, weights="none", quiet=True),
                          analyze=AnalyzeConfig(n_images=60, compare=f"cifar={CIFAR},imagenet={IMAGENET},odd={odd}",
                                                quiet=True)))
        runs = {r.info.run_name: r for r in MlflowClient().search_runs([exp_id])}
        yield runs


def _csv(run_id: str, path: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))))


def test_real_photos_train_select_evaluate(real_study):
    assert all(r.info.status == "FINISHED" for r in real_study.values()), {n: r.info.status for n, r in
                                                                         real_study.items()}
    child = real_study["adamw-lr0.001"]
    assert child.data.params["n_test"] == "120"  # seg_test: 20 photos per class, the data's own test split
    assert int(child.data.params["n_train"]) + int(child.data.params["n_val"]) == 240
    evaluation = real_study["evaluate v1 test"]
    assert_metrics_recompute(evaluation.data.metrics, mlflow.artifacts.load_text(
        f"runs:/{evaluation.info.run_id}/scores_test.csv"), "test")
    # test_acc is sklearn's accuracy over the scores file, and well above chance (1/6) on photos it never saw
    _, y, scores, _, _ = scores_from_csv(mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/scores_test.csv"))
    assert len(y) == 120
    assert evaluation.data.metrics["test_acc"] == pytest.approx(accuracy_score(y, scores.argmax(1)), abs=1e-12)
    assert evaluation.data.metrics["test_acc"] >= 0.3, evaluation.data.metrics["test_acc"]


def test_real_photos_analyze_compare_sets_and_galleries(real_study):
    run = real_study["analyze v1"]
    metrics = run.data.metrics
    assert metrics["compare_skipped.cifar"] == 0 and metrics["compare_skipped.imagenet"] == 0
    assert metrics["compare_skipped.odd"] == 2  # skipped and counted, not black images
    for module in MODULES:
        for dataset in ("test", "synthetic", "cifar", "imagenet", "odd"):
            assert 0 < metrics[f"eig_top1_share.{module}.{dataset}"] <= 1
    stats = _csv(run.info.run_id, "activations/activation_stats.csv")
    assert {(r["dataset"], int(r["n_images"])) for r in stats} == {
        ("test", 60), ("synthetic", 60), ("cifar", 60), ("imagenet", 60), ("odd", 5)}
    eig = _csv(run.info.run_id, "spectra/eigenvalues.csv")
    # 5 images span at most 4 directions: the spectrum stops there instead of falling to a floor
    assert sum(1 for r in eig if r["module"] == "conv1" and r["dataset"] == "odd") == 4
    assert all(float(r["eigenvalue"]) > 1e-10 for r in eig if r["dataset"] == "odd")
    index = _csv(run.info.run_id, "galleries/gallery_index.csv")
    assert {r["class"] for r in index} == set(CLASSES)
    assert all(r["path"].startswith("seg_test/") for r in index)
    artifacts = {a.path for folder in ("galleries", "activations", "spectra")
                 for a in MlflowClient().list_artifacts(run.info.run_id, folder)}
    assert {f"galleries/gallery_{c}_{end}.png" for c in CLASSES for end in ("top", "bottom")} <= artifacts
    assert {"activations/nonpos_pct.png", *(f"spectra/eigen_{m}.png" for m in MODULES)} <= artifacts


def test_real_photos_study_figures(real_study):
    parent = next(r for n, r in real_study.items() if n.startswith("study"))
    figures = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/compare_val_mean_class_acc.png", "figures/compare_loss.png"} <= figures


def test_real_photos_report_embeds_the_galleries_as_jpeg_a_fraction_of_their_png(real_study, tmp_path):
    """Photo galleries dominate a report's weight: as JPEG at the page's width they take a fraction of
    the PNG artifacts they show, and the page stays light."""
    from pathlib import Path

    from sceneml.report import Image
    from sceneml.tasks.report import build_sections, study_runs

    parent = next(r for n, r in real_study.items() if n.startswith("study"))
    _, sections = build_sections(study_runs(parent.info.run_id))
    photos = [p for s in sections for p in s.parts if isinstance(p, Image) and p.mime == "image/jpeg"]
    local = Path(mlflow.artifacts.download_artifacts(run_id=real_study["analyze v1"].info.run_id,
                                                     dst_path=str(tmp_path)))
    pngs = sum(f.stat().st_size for folder in ("galleries", "audit") for f in (local / folder).glob("*.png"))
    jpegs = sum(len(p.data) for p in photos)
    assert jpegs < pngs / 3, (jpegs, pngs)
    html = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/report.html")
    assert html.count("data:image/jpeg;base64,") == len(photos) == 20
