"""Checkpoints as MLflow models: logging one (a LoggedModel with the pytorch and image-pyfunc flavors),
and reading back what sceneml wrote into it (metadata, the registered version behind a URI).

The pytorch flavor is saved in MLflow's ``pickle`` format together with the sceneml package
(``code_paths``): ``mlflow.pytorch.load_model`` then returns the eager torchvision module itself,
which runs ``.eval()``, forward hooks on its named modules and any image size. The ``pt2`` format
would give a graph traced at one input shape, with neither. MLflow 3.17 unpickles by default
(``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` defaults to true); only load models from a store you trust.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from sceneml.errors import SceneMLError
from sceneml.tracking import compat, pyfunc
from sceneml.tracking.runs import TAG_DIGEST  # noqa: F401  (re-exported: checkpoints carry it too)
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)

TAG_BEST = "sceneml.best"
TAG_EPOCH = "sceneml.epoch"
CHECKPOINT_FORMAT = "pickle"  # an eager module on load; pt2 would be a fixed-shape graph without hooks


# distribution -> import name of every package in pip_requirements()
_REQUIREMENT_MODULES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "mlflow": "mlflow",
                        "numpy": "numpy", "pandas": "pandas", "pillow": "PIL", "tqdm": "tqdm"}


def pip_requirements() -> list[str]:
    """Pinned to what is installed. Passing them explicitly also skips MLflow's slow requirement
    inference (seconds per logged model); the versions come from the installed packages' metadata, so
    a model of torchvision's does not import timm to log it."""
    from importlib.metadata import version

    pinned = ("torch", "torchvision", "timm", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" if name in pinned else name for name in _REQUIREMENT_MODULES]


def log_checkpoint(model: torch.nn.Module, name: str, step: int, params: dict[str, object],
                   tags: dict[str, object], metadata: dict) -> str:
    """Log ``model`` (a CPU copy in eval mode) as an MLflow 3 LoggedModel, servable on images.
    Returns its ``model_id``."""
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    compat.skip_the_scan_of_every_installed_package(_REQUIREMENT_MODULES)
    # Model.log with tracking.pyfunc as the flavor: the pytorch flavor plus an image pyfunc
    info = with_retries(
        Model.log, artifact_path=None, flavor=pyfunc, pytorch_model=cpu_model, name=name, step=step,
        serialization_format=CHECKPOINT_FORMAT, pip_requirements=pip_requirements(),
        params={k: str(v) for k, v in params.items()}, tags={k: str(v) for k, v in tags.items()},
        metadata=metadata,
    )
    # log_model makes the new model "active": later metrics without model_id would be linked to it
    mlflow.clear_active_model()
    return info.model_id


def delete_checkpoint(model_id: str) -> None:
    """Delete a LoggedModel *and its files* (deleting the entity alone frees no disk)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient()
    try:
        location = client.get_logged_model(model_id).artifact_location
        get_artifact_repository(location).delete_artifacts()
    except Exception as exc:
        log.warning("could not delete the files of checkpoint %s (%s)", model_id, exc)
    with_retries(client.delete_logged_model, model_id)


def epoch_checkpoints(experiment_ids: list[str], run_id: str | None = None) -> dict[tuple[str, int], str]:
    """(run id, epoch) -> model id of the epoch checkpoints still there (deleted ones are not listed),
    of every run in the experiments or of ``run_id`` alone."""
    found = mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list",
                                        filter_string=f"source_run_id = '{run_id}'" if run_id else None)
    return {(m.source_run_id, int(m.tags[TAG_EPOCH])): m.model_id for m in found if TAG_EPOCH in m.tags}


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI resolved once, to one LoggedModel: every read after this one (metadata, manifest,
    split, weights) goes through ``pinned_uri`` = ``models:/<model_id>``, so an alias that moves
    meanwhile (another study crowning its champion) cannot pair one version's metadata with
    another's weights."""

    uri: str  # what was asked for
    model_id: str
    meta: dict  # what sceneml wrote into the model: classes, image_size, arch, data, training_run_id, epoch
    registered_name: str | None = None  # the registered model and version a models:/name@alias or /N named
    version: str | None = None

    @property
    def pinned_uri(self) -> str:
        return f"models:/{self.model_id}"

    @property
    def training_run_id(self) -> str:
        return self.meta["training_run_id"]

    @property
    def label(self) -> str:
        """A short name: ``v3`` for a registered version, else the model's id."""
        return f"v{self.version}" if self.version is not None else self.model_id[:12]

    def caption(self) -> str:
        """What a figure's title says of the model: ``sceneml v1: adamw-lr0.001, epoch 2``."""
        head = f"{self.registered_name} v{self.version}" if self.version is not None else self.model_id[:12]
        try:
            run_name = MlflowClient().get_run(self.training_run_id).info.run_name
        except MlflowException:
            run_name = self.training_run_id[:12]
        return f"{head}: {run_name}" + (f", epoch {self.meta['epoch']}" if "epoch" in self.meta else "")

    def tags(self) -> dict[str, str]:
        """What a run that used this model says of it, even after the alias moves on."""
        return {"sceneml.model_id": self.model_id, "sceneml.training_run_id": self.training_run_id,
                "sceneml.model_version": self.version or "none"}

    def manifest(self) -> str:
        """The training run's split manifest (path, label, split)."""
        return with_retries(mlflow.artifacts.load_text, f"runs:/{self.training_run_id}/data/split_manifest.csv")

    def load_split(self, data: str, split: str, progress: bool = True, manifest: str | None = None):
        """The images of ``split`` exactly as the training run divided them (never a re-split), read
        from ``data`` (default: where the model was trained)."""
        from sceneml.data import load_split_from_manifest

        return load_split_from_manifest(data or self.meta["data"], manifest or self.manifest(), self.meta["classes"],
                                        int(self.meta["image_size"]), split, progress=progress)

    def load_network(self, device: torch.device) -> torch.nn.Module:
        return mlflow.pytorch.load_model(self.pinned_uri).to(device)

    def load_pyfunc(self, device: str, tta: bool = False):
        # a model logged without the tta option refuses the key: it is asked for only when wanted
        config = {"device": device, **({"tta": True} if tta else {})}
        model = mlflow.pyfunc.load_model(self.pinned_uri, model_config=config)
        if tta and "tta" not in model.metadata.flavors["python_function"].get(mlflow.pyfunc.MODEL_CONFIG, {}):
            raise SceneMLError(f"model {self.model_id} was logged without the tta option of its pyfunc; score it "
                               "with evaluate -P tta=true, or retrain it to predict with tta")
        return model


def resolve_model(model_uri: str) -> ResolvedModel:
    """Resolve ``model_uri`` once (an alias is read here and never again), or a one-line error."""
    version = None
    try:
        version = registered_version(model_uri)
        # the alias is read once, above: from here on the version (its model id, else its number, which
        # never moves) is what is resolved; a URI without a version (runs:/, models:/<id>) is fixed already
        target = model_uri if version is None else \
            f"models:/{version.model_id}" if version.model_id else f"models:/{version.name}/{version.version}"
        info = with_retries(mlflow.models.get_model_info, target)
    except SceneMLError:
        raise
    except Exception as exc:
        raise SceneMLError(f"model_uri {model_uri!r} does not resolve: {str(exc).splitlines()[0]}") from None
    meta = (info.metadata or {}).get("sceneml")
    if not meta:
        raise SceneMLError(f"{model_uri} was not logged by sceneml (no sceneml metadata)")
    return ResolvedModel(model_uri, info.model_id, meta, version.name if version is not None else None,
                         version.version if version is not None else None)


def registered_version(model_uri: str):
    """The ModelVersion behind ``models:/name@alias`` or ``models:/name/version``, else None."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return with_retries(client.get_model_version_by_alias, name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return with_retries(client.get_model_version, name, version)
    except MlflowException as exc:
        raise SceneMLError(f"model_uri {model_uri!r} does not resolve: {str(exc).splitlines()[0]}") from None
    return None
