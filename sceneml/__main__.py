"""``python -m sceneml <task>``: see :mod:`sceneml.cli`."""

from sceneml.cli import main

main()
