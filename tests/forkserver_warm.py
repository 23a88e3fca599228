"""Imported once by the forkserver of :mod:`tests.processes`, before it forks any test process: what each
forked `python -m sceneml` would otherwise pay again is paid here once. The tasks' modules; the modules a
run imports only when it opens a store or a run (MLflow's SQL store and its migrations, GitPython for the
run's source commit, the pyfunc flavor when a checkpoint is logged); and a first matplotlib figure, which
loads fonts and builds caches (about a second): a train draws its figures when it ends, a crown its
galleries.

As `python -m sceneml` does with its task (sceneml.cli.import_for_good), the imports run with the cyclic
garbage collector off and what they made is then frozen: the forked processes inherit it frozen, and no
collection of theirs walks it.
"""

import gc
import io

gc.disable()

import git  # noqa: E402, F401  (mlflow.utils.git_utils, at every start_run)
import mlflow.pyfunc  # noqa: E402, F401
import mlflow.store.model_registry.sqlalchemy_store  # noqa: E402, F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: E402, F401

import sceneml.cli  # noqa: E402, F401
import sceneml.tasks.analyze  # noqa: E402, F401
import sceneml.tasks.evaluate  # noqa: E402, F401
import sceneml.tasks.report  # noqa: E402, F401
import sceneml.tasks.select  # noqa: E402, F401
import sceneml.tasks.study  # noqa: E402, F401
import sceneml.tasks.train  # noqa: E402, F401
import sceneml.tasks.tune  # noqa: E402, F401
from sceneml import plots  # noqa: E402

_fig = plots.metric_curves([{"epoch": 1, "val_acc": 0.5}], ["val_acc"], "warm")
_fig.savefig(io.BytesIO(), format="png")
plots.close(_fig)

gc.enable()
gc.collect()
gc.freeze()
