"""Images in, class and probabilities out: the pyfunc behind `predict` and `mlflow models serve`.

Every checkpoint sceneml logs is one MLflow model with two faces:

- the ``pytorch`` flavor: ``mlflow.pytorch.load_model(uri)`` gives the torchvision network itself,
  input float NCHW in [0, 1] (see :mod:`sceneml.tracking.models`);
- the ``python_function`` flavor, whose loader is this module: ``mlflow.pyfunc.load_model(uri)``
  takes a DataFrame with a column ``image`` of base64-encoded image files (JPEG, PNG, ...; raw bytes
  also work in Python) and returns ``predicted_class``, ``prob_<class>`` per class and ``error``.

This module is also the "flavor" handed to ``mlflow.models.Model.log``: :func:`save_model` writes the
plain pytorch model, then points the pyfunc flavor here. The sceneml package is copied into the
model (``code_paths``), so the model serves anywhere mlflow, torch and Pillow are installed.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
from PIL import UnidentifiedImageError

import sceneml

IMAGE_COLUMN = "image"
PRED_COLUMN = "predicted_class"
ERROR_COLUMN = "error"
PROB_PREFIX = "prob_"


def output_columns(classes: list[str]) -> list[str]:
    return [PRED_COLUMN, *(PROB_PREFIX + c for c in classes), ERROR_COLUMN]


def _image_bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64: send the image file's bytes base64-encoded") from None
    raise ValueError(f"expected base64 text or bytes, got {type(value).__name__}")


# ----------------------------------------------------------------------------- the flavor (save)

def save_model(path: str, mlflow_model, pytorch_model: torch.nn.Module, **kwargs) -> None:
    """Save ``pytorch_model`` with the pytorch flavor, then make this module its pyfunc loader.

    Called by ``mlflow.models.Model.log(flavor=sceneml.tracking.pyfunc, ...)``. The signature
    describes the image interface the pyfunc serves.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    classes = mlflow_model.metadata["sceneml"]["classes"]
    kwargs.pop("validate_serving_input", None)
    kwargs["code_paths"] = [str(Path(sceneml.__file__).parent)]
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    # the keys a load may set (MLflow ignores, with a warning, a model_config key not logged here)
    mlflow_model.flavors["python_function"][mlflow.pyfunc.MODEL_CONFIG] = {"device": None, "tta": False}
    mlflow_model.signature = ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", PRED_COLUMN), *(ColSpec("double", PROB_PREFIX + c) for c in classes),
                        ColSpec("string", ERROR_COLUMN)]))
    mlflow_model.save(os.path.join(path, "MLmodel"))


# ----------------------------------------------------------------------------- the pyfunc (load)

class ImageClassifier:
    """What ``mlflow.pyfunc.load_model`` wraps for a sceneml checkpoint."""

    def __init__(self, network: torch.nn.Module, classes: list[str], image_size: int, device: torch.device,
                 tta: bool = False):
        self.network, self.classes, self.image_size, self.device = network, classes, image_size, device
        self.tta = tta  # model_config {"tta": true}: the mean of each image's and its mirror image's softmax

    def get_raw_model(self) -> torch.nn.Module:
        return self.network

    def predict(self, data: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(data, pd.DataFrame) or IMAGE_COLUMN not in data.columns:
            raise ValueError(f"expected a DataFrame with a column {IMAGE_COLUMN!r} of base64-encoded images")
        values = list(data[IMAGE_COLUMN])
        return self.predict_bytes([_safe(_image_bytes, v) for v in values], index=data.index)

    def predict_bytes(self, items: list[bytes | Exception], index=None) -> pd.DataFrame:
        """Score encoded images; an item that is an exception, or does not decode, gets an error row."""
        from sceneml.data.decode import load_rgb
        from sceneml.engine.inference import predict_scores

        pixels = np.zeros((len(items), self.image_size, self.image_size, 3), dtype=np.uint8)
        errors: dict[int, str] = {}
        for i, item in enumerate(items):
            try:
                if isinstance(item, Exception):
                    raise item
                if not item:
                    raise ValueError("empty image (0 bytes)")
                pixels[i] = load_rgb(io.BytesIO(item), self.image_size)
            except UnidentifiedImageError:
                errors[i] = f"UnidentifiedImageError: not an image Pillow can read ({len(item)} bytes)"
            except Exception as exc:  # one bad image must not fail the request
                errors[i] = f"{type(exc).__name__}: {exc}"
        good = np.array([i for i in range(len(items)) if i not in errors], dtype=np.int64)
        probs = np.full((len(items), len(self.classes)), np.nan)
        if len(good):
            probs[good] = predict_scores(self.network, pixels[good], self.device, tta=self.tta)
        out = pd.DataFrame(probs, columns=[PROB_PREFIX + c for c in self.classes], index=index)
        predicted = ["" if i in errors else self.classes[int(np.argmax(probs[i]))] for i in range(len(items))]
        out.insert(0, PRED_COLUMN, predicted)
        out[ERROR_COLUMN] = [errors.get(i, "") for i in range(len(items))]
        return out


def _safe(fn, value):
    try:
        return fn(value)
    except Exception as exc:
        return exc


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ImageClassifier:
    """Loader named in the MLmodel's python_function flavor; ``data_path`` is the model's data/ folder."""
    from mlflow.models import Model

    from sceneml.models import pick_device

    root = Path(data_path).parent
    meta = Model.load(root / "MLmodel").metadata["sceneml"]
    device = pick_device((model_config or {}).get("device") or os.environ.get("SCENEML_DEVICE", "auto"))
    network = mlflow.pytorch.load_model(str(root)).to(device)
    tta = str((model_config or {}).get("tta", False)).lower() == "true"  # a served model_config may say "true"
    return ImageClassifier(network, list(meta["classes"]), int(meta["image_size"]), device, tta)

