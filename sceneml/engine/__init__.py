"""The torch-only engine: batches, the epoch loop, inference, checkpoints, the feature cache and
the few collectives of data-parallel training. Nothing here imports mlflow."""
