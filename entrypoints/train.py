"""MLflow entry point `train`: `python -m sceneml train --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("train")
