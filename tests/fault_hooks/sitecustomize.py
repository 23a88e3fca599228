"""Arms tests/faults.py in a fresh interpreter (one that `mlflow run` starts): on the PYTHONPATH of the
tests that inject a fault through `mlflow run` (``tests.faults.armed``), inert without a SCENEML_FAULT_*
variable."""

import os
import sys
from pathlib import Path

if any(key.startswith("SCENEML_FAULT_") for key in os.environ):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for the tests package
    from tests.faults import install

    install(os.environ)
