"""Imported once by the forkserver of :mod:`tests.processes`, before it forks any test process: what each
forked `python -m sceneml` would otherwise pay again is paid here once. The tasks' modules; the modules a
run imports only when it opens a store or a run (MLflow's SQL store and its migrations, GitPython for the
run's source commit, the pyfunc flavor when a checkpoint is logged); and a first matplotlib figure, which
loads fonts and builds caches (about a second): a train draws its figures when it ends, a crown its
galleries.

As `python -m sceneml` does with its task, the imports are frozen (sceneml.cli.frozen_imports): the forked
processes inherit them frozen, and no collection of theirs walks them.
"""

import io

from sceneml.cli import frozen_imports

with frozen_imports():
    import git  # noqa: F401  (mlflow.utils.git_utils, at every start_run)
    import mlflow.pyfunc  # noqa: F401
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import sceneml.tasks.analyze  # noqa: F401
    import sceneml.tasks.evaluate  # noqa: F401
    import sceneml.tasks.report  # noqa: F401
    import sceneml.tasks.select  # noqa: F401
    import sceneml.tasks.study  # noqa: F401
    import sceneml.tasks.train  # noqa: F401
    import sceneml.tasks.tune  # noqa: F401
    from sceneml import plots

    _fig = plots.metric_curves([{"epoch": 1, "val_acc": 0.5}], ["val_acc"], "warm")
    _fig.savefig(io.BytesIO(), format="png")
    plots.close(_fig)
