"""Pure computation on what a model does (no MLflow, no files): galleries, activation statistics
through forward hooks, streaming moments and covariances, eigen-spectra, likely label errors
(cleanlab) and Grad-CAM (captum)."""

from sceneml.analysis.activations import ModuleStatistics, default_modules, module_statistics, resolve_modules
from sceneml.analysis.galleries import gallery_indices
from sceneml.analysis.gradcam import grad_cam, last_conv_stage, last_stage_name
from sceneml.analysis.label_issues import rank_label_issues
from sceneml.analysis.statistics import RunningCovariance, RunningMoments, eigen_spectrum, top1_share

__all__ = ["ModuleStatistics", "RunningCovariance", "RunningMoments", "default_modules",
           "eigen_spectrum", "gallery_indices", "grad_cam", "last_conv_stage", "last_stage_name", "module_statistics",
           "rank_label_issues", "resolve_modules", "top1_share"]
