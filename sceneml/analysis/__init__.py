"""Pure computation on what a model does (no MLflow, no files): galleries, activation statistics
through forward hooks, streaming moments and covariances, eigen-spectra."""

from sceneml.analysis.activations import ModuleStatistics, default_modules, module_statistics, resolve_modules
from sceneml.analysis.galleries import gallery_indices
from sceneml.analysis.statistics import RunningCovariance, RunningMoments, eigen_spectrum, top1_share

__all__ = ["ModuleStatistics", "RunningCovariance", "RunningMoments", "default_modules", "eigen_spectrum",
           "gallery_indices", "module_statistics", "resolve_modules", "top1_share"]
