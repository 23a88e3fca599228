"""The study report: its numbers against the runs' metrics, calibration against a recomputation, the
`report` entry point, and the page as a browser renders it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from sceneml.metrics import expected_calibration_error, reliability_bins
from sceneml.report import Image, Section, Table, number, render_html, render_markdown
from sceneml.scores import scores_from_csv

from .conftest import subprocess_env
from .processes import run_sceneml

CLASSES = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


# ---------------------------------------------------------------------------------- pure: fast tier

def test_ece_of_a_hand_worked_example():
    # confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.5 (wrong, the tie goes to class 0): bins
    # (0.867, 0.933], (0.6, 0.667], (0.467, 0.533]: ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.62| + 1/4 |0 - 0.5|
    scores = np.array([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.5, 0.5]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(y, scores) == pytest.approx(0.2 + 0.095 + 0.125, abs=1e-12)
    bins = reliability_bins(y, scores)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    assert [b["count"] for b in bins if b["count"]] == [1, 1, 2]


def test_ece_is_zero_when_confidence_is_accuracy_and_one_at_worst():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 600)
    confident_and_right = np.eye(6)[y]
    assert expected_calibration_error(y, confident_and_right) == 0.0
    confident_and_wrong = np.eye(6)[(y + 1) % 6]
    assert expected_calibration_error(y, confident_and_wrong) == 1.0


def test_numbers_have_three_decimals_and_ints_stay_ints():
    assert [number(v) for v in (0.12345, 2, np.int64(3), float("nan"), None, "adamw")] == \
        ["0.123", "2", "3", "n/a", "", "adamw"]


def test_html_is_self_contained_and_markdown_has_the_same_table():
    frame = pd.DataFrame({"run": ["a", "b"], "acc": [0.91234, 0.5], "epoch": [1, 2]})
    png = b"\x89PNG\r\n\x1a\nnot really"
    sections = [Section("One", ["a <b>paragraph</b>", Table(frame, "scores"), Image(png, "a figure")])]
    page = render_html("T", sections)
    assert "data:image/png;base64," in page and "<caption>scores</caption>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch
    assert "&lt;b&gt;paragraph" in page  # text is escaped
    markdown = render_markdown("T", sections)
    assert "| a     | 0.912 | 1       |" in markdown and "0.912" in page


# -------------------------------------------------------------------------- the study's own report

def _study(exp_id):
    runs = MlflowClient().search_runs([exp_id])
    parent = next(r for r in runs if r.data.tags.get("sceneml.task") == "study")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def _tables(markdown: str) -> dict[str, pd.DataFrame]:
    """Every captioned table of a report.md, as text."""
    out = {}
    for caption, body in re.findall(r"\*\*(.+?)\*\*\n\n((?:\|.*\n)+)", markdown):
        lines = [line for line in body.strip().splitlines() if not set(line) <= set("|:- ")]
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
        out[caption] = pd.DataFrame(rows[1:], columns=rows[0])
    return out


@pytest.mark.slow
def test_test_ece_is_logged_and_equals_a_recomputation_from_the_scores_file(study):
    _, exp_id = study
    _, children = _study(exp_id)
    evaluation = children["evaluate v1 test"]
    ece = evaluation.data.metrics["test_ece"]
    _, y, scores, _, _ = scores_from_csv(mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/scores_test.csv"))
    # independently: 15 equal-width bins (lo, hi] of the top-1 probability
    confidence, correct = scores.max(1), scores.argmax(1) == y
    edges = np.linspace(0, 1, 16)
    expected = sum(abs(correct[m].mean() - confidence[m].mean()) * m.mean()
                   for lo, hi in zip(edges[:-1], edges[1:]) if (m := (confidence > lo) & (confidence <= hi)).any())
    assert 0.0 <= ece <= 1.0
    assert ece == pytest.approx(expected, abs=1e-12)
    assert "figures/test_reliability.png" in {a.path for a in MlflowClient().list_artifacts(
        evaluation.info.run_id, "figures")}


@pytest.mark.slow
def test_report_numbers_are_the_runs_metrics(study):
    _, exp_id = study
    parent, children = _study(exp_id)
    markdown = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/report.md")
    tables = _tables(markdown)
    m = children["evaluate v1 test"].data.metrics
    champion = tables["Per-class scores (test)"].set_index("class")
    for c in CLASSES:
        assert champion.loc[c, "AP"] == f"{m[f'test_ap_{c}']:.3f}"
        assert champion.loc[c, "accuracy"] == f"{m[f'test_acc_{c}']:.3f}"
    assert champion.loc["mean", "AP"] == f"{m['test_mAP']:.3f}"
    assert f"| expected calibration error (15 bins) | {m['test_ece']:.3f}" in markdown

    comparison = tables["Optimizer comparison (validation split)"]
    assert len(comparison) == 2 and comparison["run"].str.startswith("★").sum() == 1
    for _, row in comparison.iterrows():
        run = children[row["run"].removeprefix("★ ")]
        for column in ("val_mean_class_acc", "val_mAP", "val_loss"):
            assert row[f"{column} (best)"] == f"{run.data.metrics[f'{column}_best']:.3f}"
        assert row["best epoch"] == str(int(run.data.metrics["best_epoch"]))
    winner = comparison.loc[comparison["run"].str.startswith("★"), "run"].item().removeprefix("★ ")
    assert children[winner].info.run_id == children["select"].data.tags["sceneml.champion_run_id"]

    # the per-class table of each child's best epoch: the metric logged at that epoch's step
    client = MlflowClient()
    for name in ("adamw-lr0.001", "sgd-lr0.001"):
        run = children[name]
        epoch = int(run.data.metrics["best_epoch"])
        table = tables[f"{name} (epoch {epoch})"].set_index("class")
        for c in CLASSES[::2]:
            logged = [h.value for h in client.get_metric_history(run.info.run_id, f"val_ap_{c}") if h.step == epoch]
            assert table.loc[c, "AP"] == f"{logged[-1]:.3f}"

    # the data audit: duplicates of the champion's training run, label issues of the analysis
    champion_run = next(r for r in children.values() if r.info.run_id == children["select"].data.tags[
        "sceneml.champion_run_id"])
    assert "## 6. Data audit" in markdown
    assert re.search(rf"\| duplicate groups \(exact or near\) +\| {int(champion_run.data.metrics['dup_groups'])} ",
                     markdown)
    assert "**Likely label errors: the 10 out-of-sample images" in markdown

    counts = tables["Images per class and split"].set_index("class")
    assert counts.loc["all", "test"] == str(len(scores_from_csv(mlflow.artifacts.load_text(
        f"runs:/{children['evaluate v1 test'].info.run_id}/scores_test.csv"))[0]))


@pytest.mark.slow
def test_report_entry_point_replaces_the_artifacts_and_refuses_a_run_that_is_not_a_study(study_copy, tmp_path):
    from sceneml.config import ReportConfig
    from sceneml.errors import SceneMLError
    from sceneml.tasks.report import report

    uri, exp_id = study_copy
    parent, children = _study(exp_id)
    client = MlflowClient()
    before = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/report.md")
    proc = run_sceneml(["report", "--study-run-id", parent.info.run_id], subprocess_env(MLFLOW_TRACKING_URI=uri),
                       tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "report")) == \
        ["report/report.html", "report/report.md"]
    again = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/report.md")
    assert again == before  # same runs, same report

    with pytest.raises(SceneMLError, match=r"^run \w+ \(.*\) is not a study run"):
        report(ReportConfig(study_run_id=children["select"].info.run_id))


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS), reason="no Chromium: `apt-get install chromium`")
def test_headless_chromium_renders_the_comparison_table(study, tmp_path):
    _, exp_id = study
    parent, _ = _study(exp_id)
    page = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report/report.html",
                                               dst_path=str(tmp_path))
    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1800"]
    dom = subprocess.run([*flags, "--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=120)
    # the DOM after Chromium parsed the page: the comparison table with its header and one row per child
    table = re.search(r"<caption>Optimizer comparison \(validation split\)</caption>(.*?)</table>", dom.stdout, re.S)
    assert table is not None, dom.stderr[-2000:]
    assert "val_mean_class_acc (best)" in table.group(1) and table.group(1).count("<tr") == 3
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", f"file://{page}"], capture_output=True, timeout=120, check=True)
    from PIL import Image as PILImage

    pixels = np.asarray(PILImage.open(shot).convert("L"))
    assert pixels.shape == (1800, 1280) and pixels.std() > 10  # a page, not a blank screen


@pytest.mark.slow
def test_photo_galleries_are_embedded_as_jpeg_at_the_width_the_page_shows(study, tmp_path):
    """The galleries of photos go into the page as JPEG no wider than the page, the plots as PNG, and the
    page is lighter than the PNG galleries it shows."""
    import io

    from PIL import Image as PILImage

    from sceneml.tasks.report import DISPLAY_WIDTH, build_sections, study_runs

    _, exp_id = study
    parent, children = _study(exp_id)
    _, sections = build_sections(study_runs(parent.info.run_id))
    images = [part for section in sections for part in section.parts if isinstance(part, Image)]
    photos = [i for i in images if i.mime == "image/jpeg"]
    assert len(photos) == 12 + 6 + 2  # top and bottom per class, Grad-CAM per class, the label issues twice
    assert all(i.mime == "image/png" for i in images if i not in photos) and len(images) > len(photos)
    for image in photos:
        decoded = PILImage.open(io.BytesIO(image.data))
        assert decoded.format == "JPEG" and decoded.width <= DISPLAY_WIDTH
    analysis = children["analyze v1"].info.run_id
    local = Path(mlflow.artifacts.download_artifacts(run_id=analysis, dst_path=str(tmp_path)))
    pngs = sum(f.stat().st_size for folder in ("galleries", "audit") for f in (local / folder).glob("*.png"))
    assert sum(len(i.data) for i in photos) < pngs  # on photos (test_real_photos.py) a fraction of it
