"""MLflow entry point `evaluate`: `python -m sceneml evaluate --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("evaluate")
