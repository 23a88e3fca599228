"""`analyze`: galleries, activation statistics and eigen-spectra of one model, logged to the active run.

The computations live in :mod:`sceneml.analysis` (pure) and :mod:`sceneml.plots`; this module finds
the inputs (model, split, scores, comparison images) and logs the outputs.

Artifacts: ``galleries/gallery_<class>_{top,bottom}.png`` and ``galleries/gallery_index.csv``;
``activations/activation_stats.csv`` and ``activations/nonpos_pct.png``; ``spectra/eigenvalues.csv``
and ``spectra/eigen_<module>.png``. Metrics: ``act_nonpos_pct.<module>``,
``act_nonpos_pct_std.<module>``, ``eig_top1_share.<module>.<dataset>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sceneml import analysis, plots
from sceneml.config import AnalyzeConfig, parse_compare
from sceneml.data import SplitData
from sceneml.data.cifar import is_cifar10_folder, read_cifar10
from sceneml.data.decode import load_rgb
from sceneml.data.sources import image_files, resolve_source
from sceneml.engine.batches import to_float_batch
from sceneml.engine.inference import predict_scores
from sceneml.errors import SceneMLError
from sceneml.models import pick_device
from sceneml.scores import scores_from_csv
from sceneml.tracking.models import ResolvedModel, resolve_model
from sceneml.tracking.runs import MetricBuffer, log_csv, log_figure, log_params_once, rename_run, set_tags, task_run

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ image sets

@dataclass
class ImageSet:
    """``count`` images, read by index as (B, H, W, 3) uint8 at any size (resized on the way in).
    ``skipped`` lists the files that did not decode (they are left out, not counted as images)."""

    name: str
    count: int
    read: Callable[[np.ndarray], np.ndarray]
    skipped: list[str] = field(default_factory=list)


def array_set(name: str, pixels: np.ndarray) -> ImageSet:
    return ImageSet(name, len(pixels), lambda idx: np.asarray(pixels[idx]))


def file_set(name: str, files: list[Path], size: int) -> ImageSet:
    """Decoded per batch, so a folder of any size costs one batch of memory. An unreadable file is
    skipped, counted and warned about."""
    skipped: list[str] = []

    def read(idx: np.ndarray) -> np.ndarray:
        out = []
        for i in idx:
            try:
                out.append(load_rgb(files[int(i)], size))
            except Exception as exc:
                skipped.append(str(files[int(i)]))
                log.warning("compare set %s: skipping unreadable %s (%s)", name, files[int(i)], exc)
        return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)

    return ImageSet(name, len(files), read, skipped)


def compare_set(name: str, path: str, size: int, limit: int) -> ImageSet:
    """A CIFAR-10 python folder, a zip, or a folder of images in any layout (searched recursively)."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if is_cifar10_folder(candidate):
            return array_set(name, read_cifar10(candidate, limit=max(limit, 10_000)))
    if folder.suffix.lower() == ".zip":
        folder = resolve_source(str(folder)).root
    if not folder.exists():
        raise SceneMLError(f"compare {name}={path}: no such file or folder")
    return file_set(name, image_files(folder), size)


def float_batches(images: ImageSet, n_images: int, size: int, batch_size: int, device: torch.device,
                  seed: int) -> Iterator[torch.Tensor]:
    """A seeded random subset of ``n_images`` images (all when there are fewer), in batches of float
    NCHW at ``size`` on ``device``."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(images.count, size=min(n_images, images.count), replace=False))
    for start in range(0, len(chosen), batch_size):
        pixels = images.read(chosen[start:start + batch_size])
        if not len(pixels):
            continue
        x = to_float_batch(pixels, device)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        yield x


# --------------------------------------------------------------------------------------- the model

def _scores_from_evaluation(model_id: str, split: str, paths: list[str]) -> np.ndarray | None:
    """The scores file `evaluate` logged for this model and split, in ``paths`` order, if any."""
    query = (f"tags.`sceneml.model_id` = '{model_id}' and params.split = '{split}' "
             "and attributes.status = 'FINISHED'")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=query,
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        try:
            text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/scores_{split}.csv")
        except Exception:
            continue
        file_paths, _, scores, _, _ = scores_from_csv(text)
        row = {p: i for i, p in enumerate(file_paths)}
        if set(row) == set(paths):
            log.info("galleries from the scores of evaluation run %s", run.info.run_id)
            return scores[[row[p] for p in paths]]
    return None


# ---------------------------------------------------------------------------------------- analyze

def analyze(cfg: AnalyzeConfig, nested: bool = False) -> dict[str, float]:
    """The `analyze` task: one run; returns the logged metrics."""
    with task_run("analyze", nested=nested, task="analyze"):
        return _analyze(cfg)


@dataclass
class _Subject:
    """The model under analysis and the split it is analysed on."""

    model: ResolvedModel
    network: torch.nn.Module  # the logged checkpoint: the eager module, whose named modules take hooks
    device: torch.device
    data: str
    manifest: str
    split: SplitData
    scores: np.ndarray  # softmax of each image of ``split``
    root: Path  # where the split's image files are

    @property
    def classes(self) -> list[str]:
        return list(self.model.meta["classes"])


def _subject(cfg: AnalyzeConfig, run_id: str) -> _Subject:
    model = resolve_model(cfg.model_uri)
    classes = list(model.meta["classes"])
    unknown = [c for c in _chosen_classes(cfg, classes) if c not in classes]
    if unknown:
        raise SceneMLError(f"unknown class(es) {unknown}; the model knows {', '.join(classes)}")
    parse_compare(cfg.compare)
    data = cfg.data or model.meta["data"]
    device = pick_device(cfg.device)
    network = model.load_network(device)
    rename_run(run_id, f"analyze {model.label}")
    set_tags(run_id, {**model.tags(), "sceneml.analysis": "true"})
    manifest = model.manifest()
    split = model.load_split(data, cfg.split, progress=not cfg.quiet, manifest=manifest)
    scores = _scores_from_evaluation(model.model_id, cfg.split, split.paths)
    if scores is None:
        log.info("no evaluation scores for this model and split: scoring the %d images now", len(split))
        scores = predict_scores(network, split.pixels, device, progress=not cfg.quiet, desc=f"score {cfg.split}")
    return _Subject(model, network, device, data, manifest, split, scores, resolve_source(data).root)


def _chosen_classes(cfg: AnalyzeConfig, classes: list[str]) -> list[str]:
    return [c.strip() for c in cfg.classes.split(",") if c.strip()] or classes


def _analyze(cfg: AnalyzeConfig) -> dict[str, float]:
    run_id = mlflow.active_run().info.run_id
    subject = _subject(cfg, run_id)
    model, network = subject.model, subject.network
    modules = [m.strip() for m in cfg.modules.split(",") if m.strip()] or \
        analysis.default_modules(model.meta["arch"], network)
    log_params_once(run_id, {"model_uri": cfg.model_uri, "model_id": model.model_id, "split": cfg.split,
                             "data_used": subject.data, "modules_used": ",".join(modules),
                             "training_run_id": model.training_run_id})
    caption = model.caption()
    chosen = _chosen_classes(cfg, subject.classes)
    _log_galleries(subject.root, subject.split, subject.scores, subject.classes, chosen, cfg.k, cfg.split, caption)
    metrics: dict[str, float] = dict(_log_audit(subject, chosen, cfg, caption))
    activation_rows, spectra = _statistics(subject, modules, cfg, metrics)
    log_csv(activation_rows, "activations/activation_stats.csv")
    log_figure(plots.activation_bars(activation_rows, f"Non-positive activations per module: {caption}"),
               "activations/nonpos_pct.png")
    eigen_rows = [{"module": m, "dataset": d, "rank": r + 1, "eigenvalue": repr(float(v))}
                  for m, by_set in spectra.items() for d, values in by_set.items() for r, v in enumerate(values)]
    log_csv(eigen_rows, "spectra/eigenvalues.csv")
    for module, by_set in spectra.items():
        log_figure(plots.eigen_spectra(by_set, module, cfg.top_eigen, f"Eigen-spectrum, {module}: {caption}"),
                   f"spectra/eigen_{module}.png")
    buffer = MetricBuffer(run_id)
    buffer.add_many(metrics, 0)
    buffer.flush()
    return metrics


def _image_sets(subject: _Subject, cfg: AnalyzeConfig) -> list:
    """The split, the embedded scenes and each ``compare`` data set, at the model's image size."""
    image_size = int(subject.model.meta["image_size"])
    sets = [array_set(cfg.split, subject.split.pixels),
            file_set("synthetic", _synthetic_files(synthetic_per_class(cfg.n_images, len(subject.split))),
                     image_size)]
    compare = parse_compare(cfg.compare)
    return sets + [compare_set(name, path, image_size, cfg.n_images) for name, path in compare.items()]


def _statistics(subject: _Subject, modules: list[str], cfg: AnalyzeConfig,
                metrics: dict[str, float]) -> tuple[list[dict], dict[str, dict]]:
    """Activation statistics and eigen-spectra of ``modules`` on each image set; adds their metrics to
    ``metrics`` and returns the activation rows and the spectra (module -> set -> eigenvalues)."""
    hooked = analysis.resolve_modules(subject.network, modules)
    image_size = int(subject.model.meta["image_size"])
    activation_rows, spectra = [], {m: {} for m in modules}
    for images in _image_sets(subject, cfg):
        batches = float_batches(images, cfg.n_images, image_size, cfg.batch_size, subject.device, cfg.seed)
        total = math.ceil(min(cfg.n_images, images.count) / cfg.batch_size)
        stats = analysis.module_statistics(subject.network, hooked, tqdm(
            batches, total=total, desc=f"hooks {images.name}", disable=cfg.quiet, leave=False))
        if images.name not in (cfg.split, "synthetic"):
            metrics[f"compare_skipped.{images.name}"] = float(len(images.skipped))
            if images.skipped:
                log.warning("compare set %s: %d unreadable file(s) skipped, e.g. %s", images.name,
                            len(images.skipped), images.skipped[0])
        for module, s in stats.items():
            activation_rows.append({"dataset": images.name, "module": module, "n_images": s.nonpos_pct.n,
                                    "nonpos_pct_mean": s.nonpos_pct.mean, "nonpos_pct_std": s.nonpos_pct.std})
            # n images span at most n - 1 directions: the rest of the spectrum is rounding noise
            eig = analysis.eigen_spectrum(s.features.covariance())[:max(1, s.features.n - 1)]
            if len(eig) < cfg.top_eigen:
                log.warning("%s: %d images give only %d eigenvalues (top_eigen=%d)", images.name, s.features.n,
                            len(eig), cfg.top_eigen)
            spectra[module][images.name] = eig
            metrics[f"eig_top1_share.{module}.{images.name}"] = analysis.top1_share(eig)
            if images.name == cfg.split:
                metrics[f"act_nonpos_pct.{module}"] = s.nonpos_pct.mean
                metrics[f"act_nonpos_pct_std.{module}"] = s.nonpos_pct.std
    return activation_rows, spectra


@dataclass(frozen=True)
class _Scored:
    """Out-of-sample images with their scores, over one or more splits."""

    paths: list[str]
    split_of: list[str]
    labels: np.ndarray
    scores: np.ndarray
    pixels: np.ndarray


def _scored_images(subject: _Subject, cfg: AnalyzeConfig) -> _Scored:
    """This split's images and scores, and the training run's val scores of this checkpoint's epoch."""
    meta, split = subject.model.meta, subject.split
    sets = {cfg.split: (split.paths, split.labels, subject.scores, split.pixels)}
    epoch = meta.get("epoch")
    if epoch is not None and cfg.split != "val":
        try:
            text = mlflow.artifacts.load_text(f"runs:/{meta['training_run_id']}/val_scores/epoch_{int(epoch):03d}.csv")
            paths, labels, val_scores, _, _ = scores_from_csv(text)
            val = subject.model.load_split(subject.data, "val", progress=not cfg.quiet, manifest=subject.manifest)
            order = {p: i for i, p in enumerate(val.paths)}
            sets["val"] = (paths, np.asarray(labels), np.asarray(val_scores), val.pixels[[order[p] for p in paths]])
        except Exception as exc:  # an older run without per-epoch val scores: this split alone
            log.warning("label issues from the %s split only (no val scores of epoch %s: %s)", cfg.split, epoch, exc)
    return _Scored([p for s in sets.values() for p in s[0]], [name for name, s in sets.items() for _ in s[0]],
                   *(np.concatenate([s[k] for s in sets.values()]) for k in (1, 2, 3)))


def _log_audit(subject: _Subject, chosen: list[str], cfg: AnalyzeConfig, caption: str) -> dict[str, float]:
    """Likely label errors among the out-of-sample images (the training run's val scores of this
    checkpoint's epoch, and this split's scores), and Grad-CAM on the bottom-k of each class and on the
    label-issue gallery. Logs ``audit/label_issues.{csv,png}``, ``audit/label_issues_gradcam.png``,
    ``galleries/gradcam_<class>_bottom.png`` and ``galleries/gradcam_stats.csv``."""
    classes, scored = subject.classes, _scored_images(subject, cfg)
    labels, all_scores, paths = scored.labels, scored.scores, scored.paths
    ranked = analysis.rank_label_issues(labels, all_scores)
    rows = [{"path": paths[i], "split": scored.split_of[i], "given": classes[labels[i]], "suggested": classes[s],
             "quality": repr(float(q)), "flagged": bool(f)}
            for i, q, s, f in zip(ranked["index"], ranked["quality"], ranked["suggested"], ranked["flagged"])]
    log_csv(rows, "audit/label_issues.csv")
    top = ranked["index"].to_numpy()[:cfg.k]
    title = f"Likely label errors: {_the(len(top), 'image')} whose given label the model trusts least\n{caption}"
    log_figure(plots.gallery([load_rgb(subject.root / paths[i]) for i in top], [classes[labels[i]] for i in top],
                             [classes[s] for s in all_scores[top].argmax(1)], all_scores[top, labels[top]], title),
               "audit/label_issues.png")
    stats: list[dict] = []
    in_split = np.flatnonzero(np.array(scored.split_of) == cfg.split)
    for name in chosen:
        _, bottom = analysis.gallery_indices(labels[in_split], all_scores[in_split], classes.index(name), cfg.k)
        if len(bottom):
            title = f"{_the(len(bottom), cfg.split + ' image')} of {name} with the lowest score\n{caption}"
            stats += _log_gradcam(subject, scored, in_split[bottom], title, f"galleries/gradcam_{name}_bottom.png")
    if len(top):
        stats += _log_gradcam(subject, scored, top, f"the likely label errors\n{caption}",
                              "audit/label_issues_gradcam.png")
    log_csv(stats, "galleries/gradcam_stats.csv")
    return {"audit_label_issues": float(ranked["flagged"].sum())}


def _log_gradcam(subject: _Subject, scored: _Scored, idx: np.ndarray, what: str, artifact: str) -> list[dict]:
    """A Grad-CAM gallery of images ``idx`` of ``scored``, for their predicted classes; returns its rows."""
    arch, classes, network, device = subject.model.meta["arch"], subject.classes, subject.network, subject.device
    predicted = scored.scores[idx].argmax(1)
    x = to_float_batch(scored.pixels[idx], device)
    maps = analysis.grad_cam(network, analysis.last_conv_stage(arch, network), x,
                             torch.as_tensor(predicted, device=device)).cpu().numpy()
    rows = [{"figure": artifact, "path": scored.paths[i], "true": classes[scored.labels[i]],
             "predicted": classes[p], "cam_mean": float(m.mean()), "cam_std": float(m.std())}
            for i, p, m in zip(idx, predicted, maps)]
    log_figure(plots.gallery([load_rgb(subject.root / scored.paths[i]) for i in idx],
                             [classes[scored.labels[i]] for i in idx], [classes[p] for p in predicted],
                             scored.scores[idx, predicted],
                             f"Grad-CAM ({arch} {analysis.last_stage_name(arch, network)}, for the predicted "
                             f"class): {what}",
                             heatmaps=list(maps)), artifact)
    return rows


def synthetic_per_class(n_images: int, split_size: int) -> int:
    """The embedded scenes are compared with as many images as the split gives (``n_images`` larger
    than the data is all the data): render no more than that, and at least the 3 per class that
    ``synthetic:N`` needs, whatever ``n_images`` says."""
    return max(3, math.ceil(min(n_images, split_size) / 6))


def _synthetic_files(per_class: int) -> list[Path]:
    return image_files(resolve_source(f"synthetic:{per_class}").train_dir)


def _log_galleries(root: Path, split, scores: np.ndarray, classes: list[str], chosen: list[str], k: int,
                   split_name: str, caption: str) -> None:
    """Per class, the k best and worst scored images, shown as the original photos (their own size)."""
    predicted = scores.argmax(1)
    index_rows = []
    for name in chosen:
        c = classes.index(name)
        top, bottom = analysis.gallery_indices(split.labels, scores, c, k)
        for end, idx in (("top", top), ("bottom", bottom)):
            for rank, i in enumerate(idx, 1):
                index_rows.append({"class": name, "end": end, "rank": rank, "path": split.paths[i],
                                   "score": repr(float(scores[i, c])), "predicted": classes[predicted[i]]})
            if not len(idx):
                log.warning("no %s image of class %s: no gallery", split_name, name)
                continue
            which = "highest" if end == "top" else "lowest"
            fig = plots.gallery([load_rgb(root / split.paths[i]) for i in idx], [name] * len(idx),
                                [classes[p] for p in predicted[idx]], scores[idx, c],
                                f"true class {name}: {_the(len(idx), split_name + ' image')} with the {which} score "
                                f"for {name}\n{caption}")
            log_figure(fig, f"galleries/gallery_{name}_{end}.png")
    log_csv(index_rows, "galleries/gallery_index.csv")


def _the(n: int, noun: str) -> str:
    """"the 4 test images", "the test image": a figure title's count."""
    return f"the {noun}" if n == 1 else f"the {n} {noun}s"
