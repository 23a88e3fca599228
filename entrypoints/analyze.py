"""MLflow entry point `analyze`: `python -m sceneml analyze --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("analyze")
