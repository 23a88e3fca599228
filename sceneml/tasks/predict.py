"""`predict`: a CSV of class and probabilities for an image file or a folder of images.

It loads the model as the same pyfunc that `mlflow models serve` runs (:mod:`sceneml.tracking.pyfunc`),
so a served request and a `predict` row for the same image give the same numbers. Like every task it
is one run: the CSV, the counts and the model version it resolved are kept with it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import pandas as pd
from tqdm.auto import tqdm

from sceneml.config import PredictConfig
from sceneml.data.sources import image_files
from sceneml.errors import SceneMLError
from sceneml.models import pick_device
from sceneml.tracking.models import ResolvedModel, resolve_model
from sceneml.tracking.pyfunc import ERROR_COLUMN, IMAGE_COLUMN, PRED_COLUMN, output_columns
from sceneml.tracking.runs import log_params_once, set_tags, task_run
from sceneml.tracking.store import with_retries


def predict(cfg: PredictConfig) -> dict[str, float]:
    """The `predict` task: writes ``cfg.output``; returns the image and unreadable-image counts."""
    pick_device(cfg.device)
    files = image_files(cfg.input)
    out = Path(cfg.output).expanduser().resolve()
    if out.is_dir():
        raise SceneMLError(f"output {cfg.output!r} is a folder; give a CSV file path")
    try:  # before the work, not after every prediction is made
        out.parent.mkdir(parents=True, exist_ok=True)
        existed = out.exists()
        with open(out, "a"):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        raise SceneMLError(f"output {cfg.output!r} cannot be written ({exc.strerror or exc}); give a writable "
                           "CSV path") from None
    with task_run(f"predict {Path(cfg.input).name}", task="predict") as run:
        model = resolve_model(cfg.model_uri)
        table = predict_files(model, files, cfg.device, progress=not cfg.quiet, tta=cfg.tta)
        table.to_csv(out, index=False, float_format="%.17g")
        counts = {"predicted_images": len(table), "unreadable_images": int((table["error"] != "").sum())}
        log_params_once(run.info.run_id, {"model_uri": cfg.model_uri, "input": cfg.input, "tta": cfg.tta})
        set_tags(run.info.run_id, {**model.tags(), **{f"sceneml.{k}": v for k, v in counts.items()}})
        with_retries(mlflow.log_artifact, str(out))
    n_bad = counts["unreadable_images"]
    print(f"{len(table)} images -> {out}" + (f" ({n_bad} unreadable: see the error column)" if n_bad else ""))
    return counts


def predict_files(resolved: ResolvedModel, files: list[Path], device: str = "auto", batch_size: int = 64,
                  progress: bool = True, tta: bool = False) -> pd.DataFrame:
    """One row per file: path, predicted class, ``prob_<class>`` columns, and an error (empty when fine)."""
    classes = resolved.meta["classes"]
    model = resolved.load_pyfunc(device, tta)
    frames = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", disable=not progress, leave=False):
        chunk = files[start:start + batch_size]
        encoded, unreadable = [], {}
        for i, f in enumerate(chunk):
            try:
                encoded.append(base64.b64encode(f.read_bytes()).decode("ascii"))
            except OSError as exc:
                unreadable[i] = f"{type(exc).__name__}: {exc}"
                encoded.append("")
        out = model.predict(pd.DataFrame({IMAGE_COLUMN: encoded}))
        for i, why in unreadable.items():
            out.loc[i, :] = None
            out.loc[i, [PRED_COLUMN, ERROR_COLUMN]] = ["", why]
        frames.append(out)
    table = pd.concat(frames, ignore_index=True)[output_columns(classes)]
    table.insert(0, "path", [str(f) for f in files])
    return table
