"""MLflow entry point `tune`: `python -m sceneml tune --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("tune")
