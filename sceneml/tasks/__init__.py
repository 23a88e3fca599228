"""One module per MLflow entry point, named like it (`main` is the study): each opens its run with
:func:`sceneml.tracking.runs.task_run`, calls the engine, logs, and returns its metrics."""
