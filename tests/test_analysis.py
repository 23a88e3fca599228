"""`analyze`: streaming statistics against numpy, constant memory, galleries, CIFAR, the entry point."""

from __future__ import annotations

import csv
import io
import pickle
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from sceneml.analysis import (
    RunningCovariance,
    default_modules,
    eigen_spectrum,
    gallery_indices,
    module_statistics,
    resolve_modules,
)
from sceneml.config import parse_compare
from sceneml.data.cifar import read_cifar10
from sceneml.errors import SceneMLError
from sceneml.models import build_model
from sceneml.scores import scores_from_csv

from .conftest import REPO, subprocess_env
from .processes import run_sceneml


def _tiny_network() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.BatchNorm2d(5))
    with torch.no_grad():  # non-trivial BN statistics, so module "3" is not just a rescaled conv
        net[3].running_mean.copy_(torch.linspace(-0.5, 0.5, 5))
        net[3].running_var.copy_(torch.linspace(0.5, 2.0, 5))
    return net.eval()


def test_streaming_statistics_equal_numpy_on_stacked_feature_maps():
    net = _tiny_network()
    images = torch.rand(37, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [images[i:i + 8] for i in range(0, 37, 8)]  # the last batch is short
    stats = module_statistics(net, resolve_modules(net, ["0", "3"]), batches)

    captured = {"0": [], "3": []}
    hooks = [net[int(n)].register_forward_hook(lambda m, i, o, n=n: captured[n].append(o.detach().numpy().copy()))
             for n in captured]
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in hooks:
        h.remove()
    for name, maps in captured.items():
        fmap = np.concatenate(maps).astype(np.float64)  # (37, C, H, W)
        per_image = (fmap <= 0).reshape(len(fmap), -1).mean(axis=1) * 100
        assert stats[name].nonpos_pct.n == 37
        assert stats[name].nonpos_pct.mean == pytest.approx(per_image.mean(), rel=1e-12)
        assert stats[name].nonpos_pct.std == pytest.approx(per_image.std(ddof=1), rel=1e-9)
        expected = np.linalg.eigvalsh(np.cov(fmap.mean(axis=(2, 3)), rowvar=False))[::-1]
        got = eigen_spectrum(stats[name].features.covariance())
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
        assert np.all(np.diff(got) <= 0)


def test_known_weights_give_known_answers():
    # channel 0 copies the red channel (> 0), channel 1 negates it (< 0): exactly half the values are <= 0;
    # channel 1 = -channel 0, so the covariance has rank one: eigenvalues (2 var(mean R), 0)
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).view(2, 3, 1, 1))
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(2)) + 0.01
    stats = module_statistics(conv, {"conv": conv}, [images[:7], images[7:]])["conv"]
    assert stats.nonpos_pct.mean == 50.0 and stats.nonpos_pct.std == 0.0
    red_means = images[:, 0].double().mean(dim=(1, 2)).numpy()
    eig = eigen_spectrum(stats.features.covariance())
    assert eig[0] == pytest.approx(2 * red_means.var(ddof=1), rel=1e-9)
    assert abs(eig[1]) < 1e-15


def test_running_covariance_merges_batches_like_numpy_cov():
    rng = np.random.default_rng(3)
    data = rng.normal(5.0, 2.0, size=(101, 7)) @ rng.normal(size=(7, 7))  # correlated, far from zero mean
    cov = RunningCovariance()
    for chunk in np.array_split(data, [1, 2, 40, 41, 90]):
        cov.add(chunk)
    np.testing.assert_allclose(cov.covariance(), np.cov(data, rowvar=False), rtol=1e-10)


MEMORY_SCRIPT = """
import resource, torch
from torch import nn
from sceneml.analysis import module_statistics
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
modules = {"0": net[0], "2": net[2]}   # each: 1 MiB of float32 feature map per 64x64 image

def batches(n):
    g = torch.Generator().manual_seed(1)
    for start in range(0, n, 25):
        yield torch.rand(min(25, n - start), 3, 64, 64, generator=g)

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

module_statistics(net, modules, batches(50))
after_50 = peak_kib()
module_statistics(net, modules, batches(200))
print(after_50, peak_kib())
"""


def test_statistics_memory_does_not_grow_with_the_number_of_images():
    # in a fresh process: peak RSS after 50 images, then after 200 more. Keeping the feature maps
    # would add 2 x 150 MiB; running sums add nothing.
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=subprocess_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    after_50, after_200 = map(int, out.stdout.split())
    assert (after_200 - after_50) / 1024 < 4.0, f"peak RSS grew by {(after_200 - after_50) / 1024:.1f} MiB"


def test_gallery_indices_rank_within_the_true_class():
    labels = np.array([0, 1, 0, 0, 1, 0])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    top, bottom = gallery_indices(labels, scores, 0, 2)
    assert list(top) == [0, 3] and list(bottom) == [2, 5]  # ties keep file order
    top, bottom = gallery_indices(labels, scores, 1, 5)
    assert list(top) == [1, 4] and list(bottom) == [4, 1]


def test_unknown_module_names_list_valid_ones():
    model, _ = build_model("resnet18", 6, "none")
    assert default_modules("resnet18", model) == ["conv1", "layer1.1.conv1", "layer2.1.conv1",
                                                           "layer3.1.conv1", "layer4.1.conv1"]
    with pytest.raises(SceneMLError, match=r"unknown module 'layer2.1.conv9'; did you mean .*layer2.1.conv1.*"
                                           r"valid names \(\d+ in all\) include: conv1"):
        resolve_modules(model, ["layer2.1.conv9"])
    googlenet, _ = build_model("googlenet", 6, "none")
    assert set(resolve_modules(googlenet, default_modules("googlenet", googlenet)))


def test_compare_parameter_is_checked():
    assert parse_compare("cifar=/x, other-set=/y") == {"cifar": "/x", "other-set": "/y"}
    for bad in ("cifar", "a b=/x", "x=/a,x=/b", "=/x"):
        with pytest.raises(SceneMLError, match="compare"):
            parse_compare(bad)


def _write_cifar(folder, n: int, seed: int = 0) -> np.ndarray:
    """A cifar-10-batches-py folder with one test batch, pickled as the real one (CHW rows of 3072)."""
    folder.mkdir(parents=True)
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [i % 10 for i in range(n)],
             b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072), b"filenames": [b"x.png"] * n}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    return images


def test_cifar_batches_are_read_and_doctored_pickles_refused(tmp_path):
    images = _write_cifar(tmp_path / "cifar-10-batches-py", 12)
    np.testing.assert_array_equal(read_cifar10(tmp_path / "cifar-10-batches-py", limit=5), images[:5])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(SceneMLError, match="refusing builtins.print"):
        read_cifar10(tmp_path / "evil")


def _artifact_csv(run_id: str, path: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))))


def _check_galleries(run_id: str, scores_text: str, k: int) -> None:
    paths, labels, scores, classes, _ = scores_from_csv(scores_text)
    rows = _artifact_csv(run_id, "galleries/gallery_index.csv")
    for c, name in enumerate(classes):
        members = [i for i in range(len(paths)) if labels[i] == c]
        ranked = sorted(members, key=lambda i: (-scores[i, c], i))  # recomputed here, independently
        for end, expected in (("top", ranked[:k]), ("bottom", ranked[::-1][:k])):
            logged = [r for r in rows if r["class"] == name and r["end"] == end]
            assert [r["path"] for r in logged] == [paths[i] for i in expected]
            assert [float(r["score"]) for r in logged] == [scores[i, c] for i in expected]


@pytest.mark.slow
def test_study_analyze_run_uses_the_evaluation_scores(study):
    _, exp_id = study
    by_name = {r.info.run_name: r for r in MlflowClient().search_runs([exp_id], "tags.mlflow.parentRunId != ''")}
    evaluation, analyze = by_name["evaluate v1 test"], by_name["analyze v1"]
    assert analyze.data.tags["sceneml.model_id"] == evaluation.data.tags["sceneml.model_id"]
    scores_text = mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/scores_test.csv")
    _check_galleries(analyze.info.run_id, scores_text, 4)


@pytest.mark.slow
def test_analyze_entry_point_logs_every_artifact_and_metric(study_copy, tmp_path):
    uri, exp_id = study_copy
    _write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", 50)
    # the MLproject command of `analyze` is checked by tests/test_params.py; this runs what it runs
    proc = run_sceneml(["analyze", "--model-uri", "models:/sceneml/1", "--k", "3", "--n-images", "40",
                        "--compare", f"cifar={tmp_path / 'cifar'}"],
                       subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=exp_id), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = MlflowClient().search_runs([exp_id], "tags.`sceneml.analysis` = 'true'", order_by=["start_time DESC"])[0]
    modules = ["conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]
    classes = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    for m in modules:
        assert 0 < run.data.metrics[f"act_nonpos_pct.{m}"] < 100
        for dataset in ("test", "synthetic", "cifar"):
            assert 0 < run.data.metrics[f"eig_top1_share.{m}.{dataset}"] <= 1
    artifacts = {a.path for folder in ("galleries", "activations", "spectra")
                 for a in MlflowClient().list_artifacts(run.info.run_id, folder)}
    expected = {f"galleries/gallery_{c}_{end}.png" for c in classes for end in ("top", "bottom")}
    expected |= {"galleries/gallery_index.csv", "activations/activation_stats.csv", "activations/nonpos_pct.png",
                 "spectra/eigenvalues.csv", *(f"spectra/eigen_{m}.png" for m in modules)}
    assert expected <= artifacts
    stats = _artifact_csv(run.info.run_id, "activations/activation_stats.csv")
    assert {(r["dataset"], int(r["n_images"])) for r in stats} == {("test", 40), ("synthetic", 40), ("cifar", 40)}
    eig = _artifact_csv(run.info.run_id, "spectra/eigenvalues.csv")
    # every eigenvalue the data can carry: one per channel, at most n - 1 for n images (40 images here,
    # so 39 of layer4.1.conv1's 512; 39 of conv1's 64)
    assert sum(1 for r in eig if r["module"] == "layer4.1.conv1" and r["dataset"] == "cifar") == 39
    assert sum(1 for r in eig if r["module"] == "conv1" and r["dataset"] == "cifar") == 39
    version = MlflowClient().get_model_version("sceneml", "1")
    evaluation_run = version.tags["sceneml.evaluation_run_id"]
    _check_galleries(run.info.run_id, mlflow.artifacts.load_text(f"runs:/{evaluation_run}/scores_test.csv"), 3)


def test_the_embedded_comparison_set_is_capped_by_the_data_and_never_below_what_it_needs():
    from sceneml.tasks.analyze import synthetic_per_class

    assert synthetic_per_class(10**6, 54) == 9  # a million asked, 54 images in the split: 54 rendered
    assert synthetic_per_class(200, 3000) == 34
    assert synthetic_per_class(6, 54) == synthetic_per_class(1, 54) == 3  # synthetic:N needs N >= 3


@pytest.mark.slow
def test_n_images_beyond_the_data_is_all_the_data(study_copy):
    from sceneml.config import AnalyzeConfig
    from sceneml.tasks.analyze import analyze

    analyze(AnalyzeConfig(model_uri="models:/sceneml/1", n_images=10**6, modules="conv1", k=1, quiet=True))
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id],
                                     "tags.`sceneml.analysis` = 'true'", order_by=["start_time DESC"])[0]
    assert run.info.status == "FINISHED"
    stats = _artifact_csv(run.info.run_id, "activations/activation_stats.csv")
    # the test split has 54 images: a million means all 54, and the embedded set is rendered to match
    assert {r["dataset"]: int(r["n_images"]) for r in stats} == {"test": 54, "synthetic": 54}


def test_a_figure_title_counts_one_image_in_the_singular():
    from sceneml.tasks.analyze import _the

    assert [_the(n, "test image") for n in (1, 4)] == ["the test image", "the 4 test images"]
