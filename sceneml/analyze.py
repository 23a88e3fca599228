"""`analyze`: galleries, activation statistics and eigen-spectra of one model, logged to the active run.

The computations live in :mod:`sceneml.analysis` (pure) and :mod:`sceneml.plots`; this module finds
the inputs (model, split, scores, comparison images) and logs the outputs.

Artifacts: ``galleries/gallery_<class>_{top,bottom}.png`` and ``galleries/gallery_index.csv``;
``activations/activation_stats.csv`` and ``activations/nonpos_pct.png``; ``spectra/eigenvalues.csv``
and ``spectra/eigen_<module>.png``. Metrics: ``act_nonpos_pct.<module>``,
``act_nonpos_pct_std.<module>``, ``eig_top1_share.<module>.<dataset>``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sceneml import analysis, plots, tracking
from sceneml.data import load_split_from_manifest
from sceneml.data.cifar import is_cifar10_folder, read_cifar10
from sceneml.data.decode import load_rgb
from sceneml.data.sources import resolve_source
from sceneml.errors import SceneMLError
from sceneml.evaluation import model_metadata
from sceneml.models import pick_device, rebuild
from sceneml.scores import scores_from_csv
from sceneml.training import predict_scores, to_float_batch

log = logging.getLogger(__name__)


@dataclass
class AnalyzeConfig:
    model_uri: str = "models:/sceneml@champion"
    data: str = ""  # default: the data the model was trained on
    split: str = "test"
    classes: str = ""  # comma list; default all
    k: int = 10
    modules: str = ""  # comma list; default: five modules spread over the depth of the arch
    n_images: int = 200
    compare: str = ""  # comma list of name=path
    top_eigen: int = 15
    device: str = "auto"
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> AnalyzeConfig:
        if self.k < 1:
            raise SceneMLError(f"k must be >= 1, got {self.k}")
        if self.n_images < 2:
            raise SceneMLError(f"n_images must be >= 2 (a covariance needs two images), got {self.n_images}")
        if self.top_eigen < 1:
            raise SceneMLError(f"top_eigen must be >= 1, got {self.top_eigen}")
        if self.batch_size < 1:
            raise SceneMLError(f"batch_size must be >= 1, got {self.batch_size}")
        parse_compare(self.compare)
        return self


def parse_compare(text: str) -> dict[str, str]:
    """``name=path,name2=path2`` -> {name: path}; names become metric keys, so they are kept simple."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SceneMLError(f"compare: expected name=path, got {item!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise SceneMLError(f"compare: name {name!r} may only use letters, digits, _ and -")
        if name in out:
            raise SceneMLError(f"compare: name {name!r} given twice")
        out[name] = path
    return out


# ------------------------------------------------------------------------------------ image sets

@dataclass
class ImageSet:
    """``count`` images, read by index as (B, H, W, 3) uint8 at any size (resized on the way in)."""

    name: str
    count: int
    read: Callable[[np.ndarray], np.ndarray]


def array_set(name: str, pixels: np.ndarray) -> ImageSet:
    return ImageSet(name, len(pixels), lambda idx: np.asarray(pixels[idx]))


def file_set(name: str, files: list[Path], size: int) -> ImageSet:
    """Decoded per batch, so a folder of any size costs one batch of memory. An unreadable file is
    logged and left black (it is one image among ``n_images``)."""

    def read(idx: np.ndarray) -> np.ndarray:
        out = np.zeros((len(idx), size, size, 3), dtype=np.uint8)
        for row, i in enumerate(idx):
            try:
                out[row] = load_rgb(files[int(i)], size)
            except Exception as exc:
                log.warning("compare set %s: skipping unreadable %s (%s)", name, files[int(i)], exc)
        return out

    return ImageSet(name, len(files), read)


def compare_set(name: str, path: str, size: int, limit: int) -> ImageSet:
    """A CIFAR-10 python folder, a zip, or a folder of images in any layout (searched recursively)."""
    from sceneml.predict import image_files

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
        x = to_float_batch(images.read(chosen[start:start + batch_size]), device)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        yield x


# --------------------------------------------------------------------------------------- the model

def hookable_network(model_uri: str, meta: dict, device: torch.device) -> torch.nn.Module:
    """The logged checkpoint as a plain module that runs forward hooks, checked against the original."""
    exported = mlflow.pytorch.load_model(model_uri)
    network = rebuild(meta["arch"], len(meta["classes"]), exported.state_dict(),
                      bool(meta.get("transform_input", False)))
    size = int(meta["image_size"])
    probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gap = (network(probe) - exported(probe)).abs().max().item()
    if gap > 1e-3:
        raise SceneMLError(f"the rebuilt {meta['arch']} differs from the logged checkpoint (max |diff| {gap:.2g})")
    return network.to(device)


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
        file_paths, _, scores, _ = scores_from_csv(text)
        row = {p: i for i, p in enumerate(file_paths)}
        if set(row) == set(paths):
            log.info("galleries from the scores of evaluation run %s", run.info.run_id)
            return scores[[row[p] for p in paths]]
    return None


# ---------------------------------------------------------------------------------------- analyze

def analyze_model(cfg: AnalyzeConfig, progress: bool = True) -> dict[str, float]:
    """Run the whole analysis inside the active MLflow run; returns the logged metrics."""
    cfg.validate()
    meta = model_metadata(cfg.model_uri)
    classes, image_size = list(meta["classes"]), int(meta["image_size"])
    chosen_classes = [c.strip() for c in cfg.classes.split(",") if c.strip()] or classes
    unknown = [c for c in chosen_classes if c not in classes]
    if unknown:
        raise SceneMLError(f"unknown class(es) {unknown}; the model knows {', '.join(classes)}")
    compare = parse_compare(cfg.compare)
    data = cfg.data or meta["data"]
    device = pick_device(cfg.device)
    network = hookable_network(cfg.model_uri, meta, device)
    modules = [m.strip() for m in cfg.modules.split(",") if m.strip()] or \
        analysis.default_modules(meta["arch"], network.backbone)
    hooked = analysis.resolve_modules(network.backbone, modules)

    run_id = mlflow.active_run().info.run_id
    tracking.log_params_once(run_id, {"model_uri": cfg.model_uri, "model_id": meta["model_id"], "split": cfg.split,
                                      "data_used": data, "modules_used": ",".join(modules),
                                      "training_run_id": meta["training_run_id"]})
    tracking.set_tags(run_id, {"sceneml.model_id": meta["model_id"], "sceneml.analysis": "true"})

    manifest = mlflow.artifacts.load_text(f"runs:/{meta['training_run_id']}/data/split_manifest.csv")
    split = load_split_from_manifest(data, manifest, classes, image_size, cfg.split, progress=progress)
    scores = _scores_from_evaluation(meta["model_id"], cfg.split, split.paths)
    if scores is None:
        log.info("no evaluation scores for this model and split: scoring the %d images now", len(split))
        scores = predict_scores(network, split.pixels, device, progress=progress, desc=f"score {cfg.split}")
    _log_galleries(split, scores, classes, chosen_classes, cfg.k, cfg.split)

    image_sets = [array_set(cfg.split, split.pixels)]
    synthetic_per_class = max(2, math.ceil(cfg.n_images / 6))
    image_sets.append(file_set("synthetic", _synthetic_files(synthetic_per_class), image_size))
    image_sets += [compare_set(name, path, image_size, cfg.n_images) for name, path in compare.items()]

    metrics: dict[str, float] = {}
    activation_rows, spectra = [], {m: {} for m in modules}
    for images in image_sets:
        batches = float_batches(images, cfg.n_images, image_size, cfg.batch_size, device, cfg.seed)
        total = math.ceil(min(cfg.n_images, images.count) / cfg.batch_size)
        stats = analysis.module_statistics(network, hooked, tqdm(batches, total=total, desc=f"hooks {images.name}",
                                                                 disable=not progress, leave=False))
        for module, s in stats.items():
            activation_rows.append({"dataset": images.name, "module": module, "n_images": s.nonpos_pct.n,
                                    "nonpos_pct_mean": s.nonpos_pct.mean, "nonpos_pct_std": s.nonpos_pct.std})
            eig = analysis.eigen_spectrum(s.features.covariance())
            spectra[module][images.name] = eig
            metrics[f"eig_top1_share.{module}.{images.name}"] = analysis.top1_share(eig)
            if images.name == cfg.split:
                metrics[f"act_nonpos_pct.{module}"] = s.nonpos_pct.mean
                metrics[f"act_nonpos_pct_std.{module}"] = s.nonpos_pct.std

    tracking.with_retries(mlflow.log_text, _csv(activation_rows), "activations/activation_stats.csv")
    tracking.log_figure(plots.activation_bars([r for r in activation_rows if r["dataset"] == cfg.split]),
                        "activations/nonpos_pct.png")
    eigen_rows = [{"module": m, "dataset": d, "rank": r + 1, "eigenvalue": repr(float(v))}
                  for m, by_set in spectra.items() for d, values in by_set.items() for r, v in enumerate(values)]
    tracking.with_retries(mlflow.log_text, _csv(eigen_rows), "spectra/eigenvalues.csv")
    for module, by_set in spectra.items():
        tracking.log_figure(plots.eigen_spectra(by_set, module, cfg.top_eigen), f"spectra/eigen_{module}.png")
    buffer = tracking.MetricBuffer(run_id)
    buffer.add_many(metrics, 0)
    buffer.flush()
    return metrics


def _synthetic_files(per_class: int) -> list[Path]:
    from sceneml.predict import image_files

    return image_files(resolve_source(f"synthetic:{per_class}").train_dir)


def _log_galleries(split, scores: np.ndarray, classes: list[str], chosen: list[str], k: int, split_name: str) -> None:
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
            fig = plots.gallery(np.asarray(split.pixels[idx]), [name] * len(idx),
                                [classes[p] for p in predicted[idx]], scores[idx, c],
                                f"{name}: the {len(idx)} {split_name} images of class {name} with the {which} "
                                f"score for {name}")
            tracking.log_figure(fig, f"galleries/gallery_{name}_{end}.png")
    tracking.with_retries(mlflow.log_text, _csv(index_rows), "galleries/gallery_index.csv")


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
