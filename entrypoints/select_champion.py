"""MLflow entry point `select` (not select.py, which would shadow the stdlib module): `python -m sceneml
select --help` lists its parameters."""

from sceneml.cli import entry_point

entry_point("select")
