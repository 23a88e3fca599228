"""Imported once by the forkserver of :mod:`tests.processes`, before it forks any test process: what each
forked `python -m sceneml` would otherwise pay again is paid here once. A first matplotlib figure loads
fonts and builds caches (about a second); a train draws its figures when it ends, a crown its galleries."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sceneml.tasks.analyze  # noqa: E402, F401
import sceneml.tasks.report  # noqa: E402, F401

_fig, _ax = plt.subplots()
_ax.plot([0, 1], [0, 1], label="warm")
_ax.set(title="warm", xlabel="x", ylabel="y")
_ax.legend()
_fig.tight_layout()
_fig.savefig(io.BytesIO(), format="png")
plt.close(_fig)
