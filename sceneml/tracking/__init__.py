"""The MLflow I/O layer: the only package besides the tasks that imports mlflow.

- :mod:`~sceneml.tracking.store`: store creation under a lock, retries on a busy store;
- :mod:`~sceneml.tracking.runs`: the run lifecycle of every task, metrics, params, tags, artifacts;
- :mod:`~sceneml.tracking.models`: checkpoints as LoggedModels, their metadata, registered versions;
- :mod:`~sceneml.tracking.pyfunc`: the image pyfunc behind ``predict`` and ``mlflow models serve``.
"""
