"""sceneml: run, track and compare scene-classification experiments with MLflow."""

from sceneml.errors import SceneMLError

__version__ = "0.1.0"
__all__ = ["SceneMLError", "__version__"]
