"""Imported once by the forkserver of :mod:`tests.processes`, before it forks any test process: what each
forked `python -m sceneml` would otherwise pay again is paid here once. A first matplotlib figure loads
fonts and builds caches (about a second); a train draws its figures when it ends, a crown its galleries."""

import io

import sceneml.tasks.analyze  # noqa: F401
import sceneml.tasks.report  # noqa: F401
from sceneml import plots

_fig = plots.metric_curves([{"epoch": 1, "val_acc": 0.5}], ["val_acc"], "warm")
_fig.savefig(io.BytesIO(), format="png")
plots.close(_fig)
