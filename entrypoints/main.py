"""MLflow entry point `main`: `python -m sceneml main --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("main")
