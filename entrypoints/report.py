"""MLflow entry point `report`: `python -m sceneml report --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("report")
