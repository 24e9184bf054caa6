"""Pure metric functions: numpy (or array-like / CPU torch tensor) in, Python floats out."""

from mmsafe.metrics.bootstrap import bootstrap_ci, grouped_mean_ci, mean_ci, resample_counts
from mmsafe.metrics.calibration import (
    ReliabilityDiagram,
    brier_score,
    calibration_bootstrap,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
    root_mean_square_calibration_error,
    uncertainty_calibration_error,
)
from mmsafe.metrics.classification import (
    accuracy,
    confusion_matrix,
    macro_f1,
    macro_f1_bootstrap,
    per_class_accuracy,
)
from mmsafe.metrics.retrieval import best_positive_rank, recall_at_k, retrieval_recalls

__all__ = [
    "ReliabilityDiagram",
    "accuracy",
    "best_positive_rank",
    "bootstrap_ci",
    "brier_score",
    "calibration_bootstrap",
    "confusion_matrix",
    "expected_calibration_error",
    "grouped_mean_ci",
    "macro_f1",
    "macro_f1_bootstrap",
    "maximum_calibration_error",
    "mean_ci",
    "negative_log_likelihood",
    "per_class_accuracy",
    "recall_at_k",
    "reliability_diagram",
    "resample_counts",
    "retrieval_recalls",
    "root_mean_square_calibration_error",
    "uncertainty_calibration_error",
]
