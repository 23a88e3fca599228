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

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from sceneml.errors import SceneMLError
from sceneml.tracking import pyfunc
from sceneml.tracking.runs import TAG_DIGEST  # noqa: F401  (re-exported: checkpoints carry it too)
from sceneml.tracking.store import with_retries

log = logging.getLogger(__name__)

TAG_BEST = "sceneml.best"
TAG_EPOCH = "sceneml.epoch"
CHECKPOINT_FORMAT = "pickle"  # an eager module on load; pt2 would be a fixed-shape graph without hooks


# distribution -> import name of every package in pip_requirements()
_REQUIREMENT_MODULES = {"torch": "torch", "torchvision": "torchvision", "mlflow": "mlflow", "numpy": "numpy",
                        "pandas": "pandas", "pillow": "PIL", "tqdm": "tqdm"}


def pip_requirements() -> list[str]:
    """Pinned to what is running. Passing them explicitly also skips MLflow's slow requirement
    inference (about 6 s per logged model)."""
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "mlflow": mlflow.__version__}
    return [f"{name}=={versions[name].split('+')[0]}" if name in versions else name for name in _REQUIREMENT_MODULES]


def _skip_the_scan_of_every_installed_package() -> None:
    """Before it logs a model, MLflow checks the requirements against the environment, and to do so
    first maps the import names of *every* installed distribution (``packages_distributions()``:
    0.6 s of a 10 s tiny run on the 2-core VM, once per process). Ours are pinned to what runs, so
    the map of our seven packages is all the check needs; the versions are still checked. The name is
    MLflow 3.17's private cache: if it goes away, this sets an unused attribute and MLflow scans."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", ()) is None:
        requirements_utils._MODULES_TO_PACKAGES = {module: [dist] for dist, module in _REQUIREMENT_MODULES.items()}


def log_checkpoint(model: torch.nn.Module, name: str, step: int, params: dict[str, object],
                   tags: dict[str, object], metadata: dict) -> str:
    """Log ``model`` (a CPU copy in eval mode) as an MLflow 3 LoggedModel, servable on images.
    Returns its ``model_id``."""
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    _skip_the_scan_of_every_installed_package()
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


def model_metadata(model_uri: str) -> dict:
    """What sceneml wrote into a logged model (classes, image size, arch, data, training run), plus its
    id and, for a registry URI, the version it resolved to (``registered_name``/``version``, else None)."""
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        raise SceneMLError(f"model_uri {model_uri!r} does not resolve: {str(exc).splitlines()[0]}") from None
    meta = (info.metadata or {}).get("sceneml")
    if not meta:
        raise SceneMLError(f"{model_uri} was not logged by sceneml (no sceneml metadata)")
    version = registered_version(model_uri)
    return {**meta, "model_id": info.model_id, "registered_name": version.name if version is not None else None,
            "version": version.version if version is not None else None}


def model_label(meta: dict) -> str:
    """A short name for what a URI resolved to: ``v3`` for a registered version, else the model's id."""
    return f"v{meta['version']}" if meta["version"] is not None else meta["model_id"][:12]


def model_caption(meta: dict) -> str:
    """What a figure's title says of the model: ``sceneml v1: adamw-lr0.001, epoch 2``."""
    head = f"{meta['registered_name']} v{meta['version']}" if meta["version"] is not None else meta["model_id"][:12]
    try:
        run_name = MlflowClient().get_run(meta["training_run_id"]).info.run_name
    except Exception:
        run_name = meta["training_run_id"][:12]
    return f"{head}: {run_name}" + (f", epoch {meta['epoch']}" if "epoch" in meta else "")


def registered_version(model_uri: str):
    """The ModelVersion behind ``models:/name@alias`` or ``models:/name/version``, else None."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
    except MlflowException:
        return None
    return None
