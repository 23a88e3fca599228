"""`report`: the write-up of one study, built from what its runs logged, logged back to the study run.

``report/report.html`` (self-contained) and ``report/report.md`` (the same tables, for a paper) hold:
1. the study (data, model, grid, machine, time, commit), 2. the optimizer comparison, 3. per-class
validation scores of every child's best epoch, 4. the champion on the test split with calibration,
5. galleries, activation statistics and eigen-spectra, 6. the run ids and the registered model.
Every number is read from a run's metrics, params or logged files, never computed another way;
only the per-split class counts and the confusion matrix are tallied, from the logged split manifest
and scores file. `main` calls :func:`log_report` last; ``mlflow run . -e report -P study_run_id=...``
rebuilds it for any study (the two artifacts are replaced).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from sceneml import plots
from sceneml.class_keys import class_keys
from sceneml.config import ReportConfig
from sceneml.errors import SceneMLError
from sceneml.metrics import confusion_matrix
from sceneml.report import Image, Section, Table, key_values, render_html, render_markdown
from sceneml.scores import scores_from_csv
from sceneml.tracking.models import TAG_DIGEST
from sceneml.tracking.runs import TAG_CONFIG, TAG_ERROR, TAG_VERDICT, existing_run, set_tags, task_of, task_run
from sceneml.tracking.store import init_store, with_retries

log = logging.getLogger(__name__)

HTML_ARTIFACT = "report/report.html"
MARKDOWN_ARTIFACT = "report/report.md"
VAL_COLUMNS = ("val_mean_class_acc", "val_mAP", "val_acc", "val_loss")


@dataclass
class StudyRuns:
    """A study run and its children, by task."""

    study: Run
    training: list[Run] = field(default_factory=list)
    select: Run | None = None
    evaluate: Run | None = None
    analyze: Run | None = None


def report(cfg: ReportConfig) -> dict[str, str]:
    """The `report` task: (re)build the report of study ``cfg.study_run_id`` and log it to that study;
    returns the artifact URIs. Its own run (nested under the study, or the one `mlflow run` made)
    only records that the report was rebuilt."""
    study_run_id = cfg.study_run_id.strip()
    init_store()
    runs = study_runs(study_run_id)
    with task_run(f"report {runs.study.info.run_name}", task="report", parent_run_id=study_run_id) as run:
        uris = log_report(runs)
        set_tags(run.info.run_id, {"sceneml.study_run_id": study_run_id,
                                   "mlflow.note.content": f"Rebuilt the report of study run {study_run_id}."})
    return uris


def log_report(runs: StudyRuns | str) -> dict[str, str]:
    """Build the report of a study and log (replace) ``report/report.html`` and ``report/report.md``."""
    runs = study_runs(runs) if isinstance(runs, str) else runs
    title, sections = build_sections(runs)
    client, run_id = MlflowClient(), runs.study.info.run_id
    with_retries(client.log_text, run_id, render_html(title, sections), HTML_ARTIFACT)
    with_retries(client.log_text, run_id, render_markdown(title, sections), MARKDOWN_ARTIFACT)
    base = runs.study.info.artifact_uri.rstrip("/")
    return {"html": f"{base}/{HTML_ARTIFACT}", "markdown": f"{base}/{MARKDOWN_ARTIFACT}"}


# ------------------------------------------------------------------------------------ finding runs

def study_runs(study_run_id: str) -> StudyRuns:
    """The study run and its children; a run that is not a study is a :class:`SceneMLError`."""
    study = existing_run(study_run_id)
    task = task_of(study)
    if task not in ("study", "tune"):
        what = task or "not a study"
        raise SceneMLError(f"run {study_run_id} ({study.info.run_name}, {what}) is not a study run: pass the id of "
                           "the parent run that `main` or `tune` created")
    children = mlflow.search_runs([study.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{study_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    runs = StudyRuns(study)
    for run in children:
        task = task_of(run)
        if task == "train":
            runs.training.append(run)
        elif task in ("select", "evaluate", "analyze"):
            setattr(runs, task, run)  # the latest of each wins (start-time order)
    if not runs.training:
        raise SceneMLError(f"study run {study_run_id} has no training child runs")
    return runs


# --------------------------------------------------------------------------------------- sections

def build_sections(runs: StudyRuns) -> tuple[str, list[Section]]:
    champion = _champion(runs)
    title = f"Study report: {runs.study.info.run_name}"
    best = _configurations_section(runs)
    sections = [*([best] if best else []), _study_section(runs, champion), _comparison_section(runs, champion),
                _per_class_section(runs),
                _test_section(runs), _analysis_section(runs), _audit_section(runs, champion),
                _links_section(runs, champion)]
    return title, sections


def _champion(runs: StudyRuns) -> Run | None:
    champion_id = runs.select.data.tags.get("sceneml.champion_run_id") if runs.select else None
    return next((r for r in runs.training if r.info.run_id == champion_id), None)


def _study_section(runs: StudyRuns, champion: Run | None) -> Section:
    study = runs.study
    p, m, tags = study.data.params, study.data.metrics, study.data.tags
    child = champion or runs.training[0]
    cp = child.data.params
    started = datetime.datetime.fromtimestamp(study.info.start_time / 1000, datetime.timezone.utc)
    facts = {
        "study run": f"{study.info.run_name} ({study.info.run_id})",
        "started (UTC)": started.strftime("%Y-%m-%d %H:%M:%S"),
        "data": cp.get("data", p.get("data")),
        "data digest": cp.get("data_digest", tags.get(TAG_DIGEST, "not recorded")),
        "classes": ", ".join(_classes_of(child)),
        "architecture": cp.get("arch"),
        "weights (asked, resolved)": f"{cp.get('weights')}, {cp.get('weights_resolved', 'not recorded')}",
        "image size (px)": cp.get("image_size_resolved", cp.get("image_size")),
        "epochs, batch size": f"{cp.get('epochs')}, {cp.get('batch_size')}",
        **({"search": f"Optuna TPE, {p.get('n_trials')} trials ({len(runs.training)} runs), space "
                      f"{p.get('space')}, pruner {p.get('pruner')}, study {p.get('study_name')}"}
           if "n_trials" in p else {"sweep grid": f"optimizers {p.get('optimizers')} x learning rates "
                                                  f"{p.get('lrs')}"
                                                  + (f" x {p['repeats']} repeats" if p.get("repeats", "1") != "1"
                                                     else "") + f" ({len(runs.training)} child runs)"}),
        "select metric": cp.get("select_metric", "val_mean_class_acc"),
        "device": cp.get("device_resolved", f"{cp.get('device')} (not recorded)"),
        "precision": cp.get("precision_resolved", "float32"),
        "machine": tags.get("sceneml.machine", "not recorded"),
        "wall time (s)": m.get("study_seconds", float("nan")),
        "git commit": tags.get("mlflow.source.git.commit", "not recorded (not run from a git checkout)"),
    }
    parts: list = [key_values(facts)]
    manifest = _text(child.info.run_id, "data/split_manifest.csv")
    if manifest is not None:
        frame = pd.read_csv(io.StringIO(manifest))
        classes = _classes_of(child) or sorted(frame["label"].unique())
        counts = pd.crosstab(frame["label"], frame["split"]).reindex(index=classes, columns=["train", "val", "test"],
                                                                     fill_value=0)
        counts.loc["all"] = counts.sum()
        parts.append(Table(counts.rename_axis("class").reset_index(), "Images per class and split"))
    return Section("The study", parts)


def _configurations_section(runs: StudyRuns) -> Section | None:
    """For a study with repeats: each configuration over its repeats (mean, Student-t interval), the
    verdict between the best two, and their repeats drawn; None when every configuration ran once."""
    metric = runs.training[0].data.params.get("select_metric", "val_mean_class_acc")
    finished = [r for r in runs.training if r.info.status == "FINISHED" and TAG_CONFIG in r.data.tags
                and f"{metric}_best" in r.data.metrics]
    by_config: dict[str, list[Run]] = {}
    for run in sorted(finished, key=lambda r: int(r.data.params.get("seed", 0))):
        by_config.setdefault(run.data.tags[TAG_CONFIG], []).append(run)
    # the comparison the study computed and logged (comparison.csv, best mean first), not a second one
    logged = _bytes(runs.study.info.run_id, "comparison.csv")
    if not by_config or max(len(v) for v in by_config.values()) < 2 or logged is None:
        return None
    rows = pd.read_csv(io.BytesIO(logged), dtype={"config": str})
    table = rows.rename(columns={"config": "configuration", "n": "repeats", "ci_low": "95 % CI low",
                                 "ci_high": "95 % CI high"})
    client = MlflowClient()
    values = {c: [run.data.metrics[f"{metric}_best"] for run in by_config[c]] for c in rows["config"] if c in by_config}
    curves = {c: [_history(client, run.info.run_id, metric) for run in rs] for c, rs in by_config.items()}
    intervals = {r.config: (r.ci_low, r.ci_high) for r in rows.itertuples()}
    figure = plots.repeated_configurations(values, intervals, curves, metric,
                                           f"The configurations over their repeats: {runs.study.info.run_name}")
    verdict = runs.study.data.tags.get(TAG_VERDICT, "no verdict was logged")
    return Section("Which configuration is best", [
        f"Each configuration (optimizer x learning rate) was trained with paired seeds (repeat r of every "
        f"configuration used seed + r; one test split). The value of a run is its {metric} at its best epoch; "
        "the interval is the 95 % Student-t interval of the mean. The verdict compares the best configuration "
        "with the runner-up over the paired repeats: P is the share of pairs the best one won (ties count "
        "one half), with a 95 % bootstrap interval; the difference is meaningful when P > 0.75 and the "
        "interval lies above 0.5.",
        f"Verdict: {verdict}",
        Table(table, f"{metric} over the repeats, best mean first"),
        Image(_png(figure), f"{metric} of every repeat, and the val curves of each configuration")])


def _comparison_section(runs: StudyRuns, champion: Run | None) -> Section:
    client = MlflowClient()
    metric = runs.training[0].data.params.get("select_metric", "val_mean_class_acc")
    rows, curves, losses = [], {}, {}
    for run in runs.training:
        m, p, name = run.data.metrics, run.data.params, run.info.run_name
        winner = champion is not None and run.info.run_id == champion.info.run_id
        ended = run.info.end_time or run.info.start_time
        status = run.info.status + (" (pruned)" if run.data.tags.get("sceneml.pruned") == "true" else "")
        rows.append({"run": f"★ {name}" if winner else name, "optimizer": p.get("optimizer"),
                     "lr": p.get("lr"), "status": status,
                     "best epoch": int(m["best_epoch"]) if "best_epoch" in m else None,
                     **{f"{k} (best)": m.get(f"{k}_best", float("nan")) for k in VAL_COLUMNS},
                     "wall time (s)": (ended - run.info.start_time) / 1000})
        if run.info.status != "FINISHED" and TAG_ERROR in run.data.tags:
            rows[-1]["status"] += f": {run.data.tags[TAG_ERROR][:80]}"
        curves[name] = _history(client, run.info.run_id, metric)
        train_loss = dict(_history(client, run.info.run_id, "train_loss"))
        losses[name] = [(step, train_loss.get(step, float("nan")), v)
                        for step, v in _history(client, run.info.run_id, "val_loss")]
    figure = plots.study_curves(curves, metric, losses, f"The optimizers, epoch by epoch: {runs.study.info.run_name}")
    search = [Image(png, f"Optuna: {caption}") for path, caption in
              (("tune/optimization_history.png", "the select metric of each trial and the best so far"),
               ("tune/param_importances.png", "which sampled parameter mattered most (fANOVA)"))
              if (png := _bytes(runs.study.info.run_id, path)) is not None]
    parts: list = [f"One row per child run; ★ marks the champion (best epoch by {metric} over all runs). "
                   "'(best)' columns are the values at each run's best epoch.",
                   Table(pd.DataFrame(rows, dtype=object), "Optimizer comparison (validation split)"),
                   Image(_png(figure), f"{metric} and train/val loss per epoch of every child run"), *search]
    return Section("Optimizer comparison", parts)


def _per_class_section(runs: StudyRuns) -> Section:
    client = MlflowClient()
    parts: list = ["Validation AP and accuracy (recall) per class at each child's best epoch; the last row holds "
                   "the run's val_mAP and val_mean_class_acc."]
    for run in runs.training:
        m = run.data.metrics
        if "best_epoch" not in m:
            continue
        epoch, classes = int(m["best_epoch"]), _classes_of(run)
        ck = class_keys(classes)
        keys = ["val_mAP", "val_mean_class_acc"] + [f"val_{k}_{c}" for c in ck for k in ("ap", "acc")]
        at_best = {key: _at_step(client, run.info.run_id, key, epoch) for key in keys}
        frame = pd.DataFrame({"class": classes + ["mean"],
                              "AP": [at_best[f"val_ap_{c}"] for c in ck] + [at_best["val_mAP"]],
                              "accuracy": [at_best[f"val_acc_{c}"] for c in ck] + [at_best["val_mean_class_acc"]]})
        parts.append(Table(frame, f"{run.info.run_name} (epoch {epoch})"))
    return Section("Per-class validation scores of each child's best epoch", parts)


def _test_section(runs: StudyRuns) -> Section:
    run = runs.evaluate
    if run is None:
        return Section("The champion on the test split", ["No evaluation run in this study."])
    m, run_id = run.data.metrics, run.info.run_id
    split = run.data.params.get("split", "test")
    scores_text = _text(run_id, f"scores_{split}.csv")
    classes = [k.removeprefix(f"{split}_ap_") for k in m if k.startswith(f"{split}_ap_")]  # keys, at worst
    if scores_text is not None:
        paths, y_true, scores, classes, _ = scores_from_csv(scores_text)
    ck = class_keys(classes) if scores_text is not None else classes
    summary = {"images": len(paths) if scores_text is not None else "n/a",
               "accuracy": m.get(f"{split}_acc"), "mAP": m.get(f"{split}_mAP"),
               "mean class accuracy": m.get(f"{split}_mean_class_acc"), "loss": m.get(f"{split}_loss"),
               "expected calibration error (15 bins)": m.get(f"{split}_ece", float("nan"))}
    per_class = pd.DataFrame({"class": classes + ["mean"],
                              "AP": [m[f"{split}_ap_{c}"] for c in ck] + [m[f"{split}_mAP"]],
                              "accuracy": [m[f"{split}_acc_{c}"] for c in ck] + [m[f"{split}_mean_class_acc"]]})
    parts: list = [f"Evaluation run {run.info.run_name} ({run_id}), model version "
                   f"{run.data.tags.get('sceneml.model_version', 'n/a')}.",
                   key_values(summary), Table(per_class, f"Per-class scores ({split})")]
    if scores_text is not None:
        cm = confusion_matrix(np.asarray(y_true), np.asarray(scores).argmax(1), len(classes))
        frame = pd.DataFrame(cm, columns=classes)
        frame.insert(0, "true \\ predicted", classes)
        parts.append(Table(frame, f"Confusion matrix ({split}; rows: true class)"))
    for name, caption in ((f"figures/{split}_confusion_matrix.png", "Confusion matrix"),
                          (f"figures/{split}_reliability.png", "Reliability diagram: accuracy against confidence")):
        png = _bytes(run_id, name)
        if png is not None:
            parts.append(Image(png, caption))
    return Section(f"The champion on the {split} split", parts)


def _analysis_section(runs: StudyRuns) -> Section:
    run = runs.analyze
    if run is None:
        return Section("Galleries, activations and eigen-spectra", ["No analysis run in this study."])
    run_id, m = run.info.run_id, run.data.metrics
    parts: list = [f"Analysis run {run.info.run_name} ({run_id})."]
    index = _text(run_id, "galleries/gallery_index.csv")
    if index is not None:
        for cls in dict.fromkeys(pd.read_csv(io.StringIO(index))["class"]):
            for end, which in (("top", "highest"), ("bottom", "lowest")):
                png = _bytes(run_id, f"galleries/gallery_{cls}_{end}.png")
                if png is not None:
                    parts.append(photos(png, f"{cls}: the images with the {which} score for {cls}"))
    stats = _text(run_id, "activations/activation_stats.csv")
    if stats is not None:
        frame = pd.read_csv(io.StringIO(stats))
        frame["cell"] = [f"{a:.3f} ± {s:.3f}" for a, s in zip(frame["nonpos_pct_mean"], frame["nonpos_pct_std"])]
        table = frame.pivot(index="module", columns="dataset", values="cell")
        table = table.reindex(index=list(dict.fromkeys(frame["module"])), columns=list(dict.fromkeys(frame["dataset"])))
        parts.append(Table(table.reset_index(), "Non-positive activations per module, % of values (mean ± std over "
                                                "images)"))
    shares = [(k.split(".", 1)[1].rsplit(".", 1), v) for k, v in m.items() if k.startswith("eig_top1_share.")]
    if shares:
        frame = pd.DataFrame([{"module": mod, "dataset": ds, "share": v} for (mod, ds), v in shares])
        table = frame.pivot(index="module", columns="dataset", values="share").reset_index()
        parts.append(Table(table, "Top-1 eigenvalue's share of the feature covariance's trace"))
        for module in table["module"]:
            png = _bytes(run_id, f"spectra/eigen_{module}.png")
            if png is not None:
                parts.append(Image(png, f"Eigen-spectrum of {module}"))
    return Section("Galleries, activations and eigen-spectra", parts)


def _audit_section(runs: StudyRuns, champion: Run | None, top: int = 10) -> Section:
    """Duplicates and leakage (the champion's training run), likely label errors and Grad-CAM (analyze)."""
    parts: list = []
    child = champion or runs.training[0]
    m = child.data.metrics
    if "dup_groups" in m:
        parts.append(key_values({"duplicate groups (exact or near)": int(m["dup_groups"]),
                                 "groups spanning train and val/test (leakage)": int(m["dup_cross_split"]),
                                 "groups filed under two classes": int(m["dup_cross_class"]),
                                 "val/test copies dropped (dedupe)": int(m.get("dup_dropped", 0))}))
        table = _text(child.info.run_id, "data/duplicates.csv")
        if table is not None and len(frame := pd.read_csv(io.StringIO(table))):
            parts.append(Table(frame.head(30), "Duplicate groups (first 30 rows of data/duplicates.csv)"))
    if runs.analyze is not None:
        run_id = runs.analyze.info.run_id
        issues = _text(run_id, "audit/label_issues.csv")
        if issues is not None:
            frame = pd.read_csv(io.StringIO(issues)).head(top)
            parts.append(Table(frame, f"Likely label errors: the {len(frame)} out-of-sample images whose given label "
                                      "the champion trusts least (quality = its probability of the given label)"))
        for path, caption in (("audit/label_issues.png", "The likely label errors"),
                              ("audit/label_issues_gradcam.png", "Grad-CAM on the likely label errors")):
            if (png := _bytes(run_id, path)) is not None:
                parts.append(photos(png, caption))
        index = _text(run_id, "galleries/gallery_index.csv")
        for cls in dict.fromkeys(pd.read_csv(io.StringIO(index))["class"]) if index is not None else []:
            if (png := _bytes(run_id, f"galleries/gradcam_{cls}_bottom.png")) is not None:
                parts.append(photos(png, f"Grad-CAM: where the champion looks in the {cls} images it scores lowest"))
    return Section("Data audit", parts or ["No audit was logged by these runs."])


def _links_section(runs: StudyRuns, champion: Run | None) -> Section:
    rows = [{"role": "study", "run": runs.study.info.run_name, "run id": runs.study.info.run_id}]
    rows += [{"role": "training" + (" (champion)" if champion is not None and r.info.run_id == champion.info.run_id
                                    else ""), "run": r.info.run_name, "run id": r.info.run_id} for r in runs.training]
    rows += [{"role": role, "run": r.info.run_name, "run id": r.info.run_id}
             for role, r in (("select", runs.select), ("evaluate", runs.evaluate), ("analyze", runs.analyze)) if r]
    parts: list = [Table(pd.DataFrame(rows), f"Runs (experiment id {runs.study.info.experiment_id})")]
    if runs.select is not None:
        p, m = runs.select.data.params, runs.select.data.metrics
        name, alias = p.get("model_name", "sceneml"), p.get("alias", "champion")
        version = int(m["champion_version"]) if "champion_version" in m else "n/a"
        parts.append(key_values({"registered model": name, "version": version, "alias": alias,
                                 "load it with": f'mlflow.pytorch.load_model("models:/{name}/{version}")',
                                 "champion epoch": int(m["champion_epoch"]) if "champion_epoch" in m else "n/a"}))
    return Section("Links", parts)


# ----------------------------------------------------------------------------------------- reading

def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) per step, the last value of a step that was logged twice."""
    return sorted({h.step: h.value for h in sorted(client.get_metric_history(run_id, key),
                                                    key=lambda h: h.timestamp)}.items())


def _at_step(client: MlflowClient, run_id: str, key: str, step: int) -> float:
    return dict(_history(client, run_id, key)).get(step, float("nan"))


def _classes_of(training_run: Run) -> list[str]:
    """A training run's class names in index order, from its ``data/class_to_idx.json`` (never by
    splitting a joined string: a class name may hold a comma)."""
    text = _text(training_run.info.run_id, "data/class_to_idx.json")
    if text is None:
        return []
    index = json.loads(text)
    return sorted(index, key=index.get)


def _text(run_id: str, path: str) -> str | None:
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:
        return None


def _bytes(run_id: str, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except Exception:
            return None
        return Path(local).read_bytes()


DISPLAY_WIDTH = 1200  # px: the page's width (sceneml.report's CSS), so no image carries more pixels than shown


def photos(png: bytes, caption: str, quality: int = 85) -> Image:
    """A gallery of photos as JPEG at the width the page shows it: PNG keeps every pixel of a photo
    losslessly, several MB a gallery, which made a full study's page tens of MB."""
    from PIL import Image as PILImage

    picture = PILImage.open(io.BytesIO(png)).convert("RGB")
    if picture.width > DISPLAY_WIDTH:
        picture = picture.resize((DISPLAY_WIDTH, round(picture.height * DISPLAY_WIDTH / picture.width)),
                                 PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality, optimize=True)
    return Image(buffer.getvalue(), caption, "image/jpeg")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, **plots.PNG_OPTIONS)
    plots.close(figure)
    return buffer.getvalue()

