"""`predict`: a CSV of class and probabilities for an image file or a folder of images.

It loads the model as the same pyfunc that `mlflow models serve` runs (:mod:`sceneml.serving`), so a
served request and a `predict` row for the same image give the same numbers.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import pandas as pd
from tqdm.auto import tqdm

from sceneml.data.sources import IMAGE_EXTENSIONS
from sceneml.errors import SceneMLError
from sceneml.evaluation import model_metadata
from sceneml.serving import ERROR_COLUMN, IMAGE_COLUMN, PRED_COLUMN, output_columns


def image_files(input_path: str | Path) -> list[Path]:
    """The file itself, or every image file under the folder (recursively, sorted)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if not files:
            raise SceneMLError(f"input {str(input_path)!r}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return files
    raise SceneMLError(f"input {str(input_path)!r} does not exist")


def predict_files(model_uri: str, files: list[Path], device: str = "auto", batch_size: int = 64,
                  progress: bool = True) -> pd.DataFrame:
    """One row per file: path, predicted class, ``prob_<class>`` columns, and an error (empty when fine)."""
    classes = model_metadata(model_uri)["classes"]  # a clear error for a URI that does not resolve
    model = mlflow.pyfunc.load_model(model_uri, model_config={"device": device})
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
