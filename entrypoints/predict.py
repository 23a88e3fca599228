"""MLflow entry point `predict`: `python -m sceneml predict --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("predict")
