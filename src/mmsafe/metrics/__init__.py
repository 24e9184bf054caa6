"""Pure metric functions: numpy (or array-like / CPU torch tensor) in, Python floats out."""

from mmsafe.metrics.bootstrap import bootstrap_ci, grouped_mean_ci, mean_ci, resample_counts
from mmsafe.metrics.calibration import (
    ReliabilityDiagram,
    brier_score,
    calibration_bootstrap,
    ece_null_quantile,
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
from mmsafe.metrics.ranking import (
    hit_rate,
    ndcg,
    popularity_scores,
    ranking_metrics,
    reciprocal_rank,
    sampled_target_ranks,
    target_ranks,
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
    "ece_null_quantile",
    "expected_calibration_error",
    "grouped_mean_ci",
    "hit_rate",
    "macro_f1",
    "macro_f1_bootstrap",
    "maximum_calibration_error",
    "mean_ci",
    "ndcg",
    "negative_log_likelihood",
    "per_class_accuracy",
    "popularity_scores",
    "ranking_metrics",
    "recall_at_k",
    "reciprocal_rank",
    "reliability_diagram",
    "resample_counts",
    "retrieval_recalls",
    "root_mean_square_calibration_error",
    "sampled_target_ranks",
    "target_ranks",
    "uncertainty_calibration_error",
]
