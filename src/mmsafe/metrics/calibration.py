"""Calibration metrics on predicted class probabilities.

Inputs are ``probs`` of shape ``(N, C)`` (``N >= 1``, ``C >= 2``, entries in ``[0, 1]``, rows
summing to 1 within ``1e-3``; pass softmax outputs, not logits) and ``target`` of shape ``(N,)``
with integer labels in ``[0, C)``. Scalar results are Python floats.

Top-label binning (ECE / MCE / RMSCE) follows torchmetrics' ``MulticlassCalibrationError``
(``_binning_bucketize``): the confidence is the top probability (ties in the argmax go to the
lowest class index, as in numpy and torch), bins are left-closed ``[k/n, (k+1)/n)``, and a
confidence of exactly ``1.0`` falls into an extra degenerate bin of its own (so it is not pooled
with ``[1 - 1/n, 1)``). Like torchmetrics, bin membership is decided in float32: confidences are
cast to float32 and compared with the edges ``k/n`` rounded to float32; a confidence equal to an
edge belongs to the bin on its right. Per-bin means are then taken in float64. On CPU, torch's
float32 ``linspace`` is off by one ulp for some ``n_bins`` (e.g. 15); only confidences within
one float32 ulp of such an edge can then land in a different bin than in torchmetrics.

The :func:`reliability_diagram` has exactly ``n_bins`` bins for plotting: its last bin is
closed, ``[1 - 1/n, 1]``, so confidences of 1.0 are drawn in it.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy
from mmsafe.metrics.classification import _check_labels

__all__ = [
    "ReliabilityDiagram",
    "brier_score",
    "ece_null_quantile",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
    "root_mean_square_calibration_error",
    "uncertainty_calibration_error",
]

_ROW_SUM_ATOL = 1e-3


def _check_probs(probs: Any) -> np.ndarray:
    """Validate a ``(N, C)`` probability matrix and return it as ``float64``."""
    arr = _as_numpy(probs, "probs")
    if arr.ndim != 2:
        raise ValueError(f"`probs` must be a 2-D array of shape (N, C), got shape {arr.shape}.")
    n, c = arr.shape
    if n == 0:
        raise ValueError("`probs` is empty: metrics need at least one sample (N >= 1).")
    if c < 2:
        raise ValueError(f"`probs` must have at least 2 class columns, got {c}.")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"`probs` must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("`probs` contains NaN or infinite values.")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(
            f"`probs` must lie in [0, 1], got values in [{arr.min():.4g}, {arr.max():.4g}]. "
            "These look like logits: apply softmax over the class axis first."
        )
    sums = arr.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > _ROW_SUM_ATOL:
        raise ValueError(
            f"Each row of `probs` must sum to 1 (tolerance {_ROW_SUM_ATOL}); row {worst} sums "
            f"to {sums[worst]:.6g}. Apply softmax (or normalise the rows) first."
        )
    return arr


def _check_inputs(probs: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``probs`` and ``target`` together."""
    p = _check_probs(probs)
    t = _check_labels(target, "target", num_classes=p.shape[1])
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"`probs` has {p.shape[0]} rows but `target` has {t.shape[0]} labels; they must match."
        )
    return p, t


def _check_n_bins(n_bins: Any) -> int:
    """Validate ``n_bins`` (a positive int)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
    return int(n_bins)


def _top_label(probs: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness (float64 0/1) per sample."""
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(probs.shape[0]), pred]
    return conf, (pred == target).astype(np.float64)


def _confidence_bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index in ``[0, n_bins]`` per confidence, torchmetrics convention (see module doc).

    Index ``n_bins`` is the degenerate bin of confidences equal to 1.0 (in float32).
    """
    edges32 = (np.arange(n_bins + 1, dtype=np.float64) / n_bins).astype(np.float32)
    idx = np.searchsorted(edges32, conf.astype(np.float32), side="right") - 1
    return np.clip(idx, 0, n_bins)


def _bin_stats(
    values: np.ndarray, correct: np.ndarray, idx: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin counts, mean value and mean correctness (0 where a bin is empty)."""
    count = np.bincount(idx, minlength=n).astype(np.float64)
    safe = np.maximum(count, 1.0)
    mean_value = np.bincount(idx, weights=values, minlength=n) / safe
    mean_correct = np.bincount(idx, weights=correct, minlength=n) / safe
    return count, mean_value, mean_correct


def _calibration_gaps(probs: Any, target: Any, n_bins: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin ``|accuracy - confidence|`` and bin weight ``count / N`` (torchmetrics bins)."""
    n_bins = _check_n_bins(n_bins)
    p, t = _check_inputs(probs, target)
    conf, correct = _top_label(p, t)
    idx = _confidence_bin_index(conf, n_bins)
    count, mean_conf, acc = _bin_stats(conf, correct, idx, n_bins + 1)
    return np.abs(acc - mean_conf), count / count.sum()


def expected_calibration_error(probs: Any, target: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error, ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|``.

    Equal-width bins over ``[0, 1]`` with torchmetrics' edge convention (module docstring);
    matches ``MulticlassCalibrationError(num_classes=C, n_bins=n_bins, norm="l1")``.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        n_bins: number of equal-width confidence bins.

    Returns:
        ECE in ``[0, 1]``.

    Raises:
        ValueError: invalid shapes, probabilities, labels or ``n_bins``.

    Example:
        >>> probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]
        >>> round(expected_calibration_error(probs, [0, 1, 1], n_bins=10), 4)
        0.3333
    """
    gap, weight = _calibration_gaps(probs, target, n_bins)
    return float(np.sum(gap * weight))


def ece_null_quantile(
    probs: Any, n_bins: int = 15, q: float = 0.95, n_sim: int = 500, seed: int = 0
) -> float:
    """The ``q`` quantile of the ECE a perfectly calibrated model shows on these confidences.

    ECE is biased upwards on few rows: with ~12 rows a bin, a calibrated model scores about
    0.1. Consistency resampling (Bröcker & Smith, 2007) draws each row's correctness from its
    own top-label confidence, ``n_sim`` times, and bins as :func:`expected_calibration_error`
    does; an observed ECE above this quantile is evidence of miscalibration at level
    ``1 - q``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = rng.dirichlet(np.ones(5), 200)
        >>> 0.03 < ece_null_quantile(p) < 0.2 and ece_null_quantile(np.tile(p, (50, 1))) < 0.03
        True
    """
    p = _check_probs(probs)
    n_bins = _check_n_bins(n_bins)
    conf = p.max(axis=1)
    idx = _confidence_bin_index(conf, n_bins)
    onehot = np.zeros((len(conf), n_bins + 1))
    onehot[np.arange(len(conf)), idx] = 1.0
    correct = np.random.default_rng(seed).random((n_sim, len(conf))) < conf[None, :]
    gaps = np.abs(correct @ onehot - conf @ onehot).sum(axis=1) / max(len(conf), 1)
    return float(np.quantile(gaps, q))


def maximum_calibration_error(probs: Any, target: Any, n_bins: int = 15) -> float:
    """Top-label maximum calibration error, ``max_m |acc(B_m) - conf(B_m)|`` over non-empty bins.

    Matches ``MulticlassCalibrationError(..., norm="max")``.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        n_bins: number of equal-width confidence bins.

    Returns:
        MCE in ``[0, 1]``; always ``>=`` the ECE.

    Raises:
        ValueError: invalid shapes, probabilities, labels or ``n_bins``.

    Example:
        >>> probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]
        >>> round(maximum_calibration_error(probs, [0, 1, 1], n_bins=10), 4)
        0.6
    """
    gap, weight = _calibration_gaps(probs, target, n_bins)
    return float(np.max(gap[weight > 0]))


def root_mean_square_calibration_error(probs: Any, target: Any, n_bins: int = 15) -> float:
    """Top-label RMS calibration error, ``sqrt(sum_m |B_m|/N * (acc(B_m) - conf(B_m))^2)``.

    Matches ``MulticlassCalibrationError(..., norm="l2")`` (no debiasing).

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        n_bins: number of equal-width confidence bins.

    Returns:
        RMSCE in ``[0, 1]``; between the ECE and the MCE.

    Raises:
        ValueError: invalid shapes, probabilities, labels or ``n_bins``.

    Example:
        >>> probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]
        >>> round(root_mean_square_calibration_error(probs, [0, 1, 1], n_bins=10), 4)
        0.3916
    """
    gap, weight = _calibration_gaps(probs, target, n_bins)
    return float(np.sqrt(np.sum(gap**2 * weight)))


def _normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy divided by ``log C`` (``0 log 0 = 0``), clipped to ``[0, 1]``."""
    safe = np.where(probs > 0, probs, 1.0)
    h = -np.sum(probs * np.log(safe), axis=1) / np.log(probs.shape[1])
    return np.clip(h, 0.0, 1.0)


def uncertainty_calibration_error(probs: Any, target: Any, n_bins: int = 15) -> float:
    """Uncertainty calibration error (Laves et al., 2019), ``sum_m |B_m|/N |err(B_m) - u(B_m)|``.

    The uncertainty of a sample is its normalised predictive entropy
    ``u = H(p) / log C`` in ``[0, 1]`` (``0 log 0 = 0``); ``err`` is the top-1 error rate.
    ``u`` is binned into ``n_bins`` equal-width bins ``[k/n, (k+1)/n)`` computed in float64, the
    last bin closed at 1 (``u = 1`` only for uniform predictions). A perfectly calibrated
    uncertainty has error rate equal to mean uncertainty in every bin.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        n_bins: number of equal-width uncertainty bins.

    Returns:
        UCE in ``[0, 1]``.

    Raises:
        ValueError: invalid shapes, probabilities, labels or ``n_bins``.

    Example:
        A certain, correct prediction (u = 0, error 0) and a uniform, correct one (u = 1 but
        error 0: under-confident):

        >>> uncertainty_calibration_error([[1.0, 0.0], [0.5, 0.5]], [0, 0], n_bins=2)
        0.5
    """
    n_bins = _check_n_bins(n_bins)
    p, t = _check_inputs(probs, target)
    _, correct = _top_label(p, t)
    u = _normalised_entropy(p)
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    idx = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, n_bins - 1)
    count, mean_u, acc = _bin_stats(u, correct, idx, n_bins)
    err = 1.0 - acc
    gap = np.where(count > 0, np.abs(err - mean_u), 0.0)
    return float(np.sum(gap * count) / count.sum())


def brier_score(probs: Any, target: Any) -> float:
    """Multiclass Brier score, ``mean_i sum_k (p_ik - 1[y_i = k])^2``, in ``[0, 2]``.

    Equals scikit-learn's ``brier_score_loss(target, probs, labels=range(C),
    scale_by_half=False)`` (sklearn >= 1.7). For ``C = 2`` it is twice the customary binary
    Brier score ``mean_i (p_i1 - y_i)^2`` that sklearn returns by default
    (``scale_by_half="auto"``).

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.

    Returns:
        The Brier score (0 is perfect).

    Raises:
        ValueError: invalid shapes, probabilities or labels.

    Example:
        >>> round(brier_score([[0.8, 0.2], [0.5, 0.5]], [0, 1]), 4)
        0.29
    """
    p, t = _check_inputs(probs, target)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), t] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def negative_log_likelihood(probs: Any, target: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class, ``-mean_i log max(p_{i, y_i}, eps)``.

    The true-class probability is clipped below at ``eps`` so that a probability of exactly 0
    gives the finite penalty ``-log(eps)`` (27.63 for the default) instead of infinity. For
    probabilities ``>= eps`` this equals scikit-learn's ``log_loss(target, probs,
    labels=range(C))``; sklearn instead clips at the dtype's machine epsilon (2.2e-16 for
    float64), so the two differ when some true-class probability is below ``eps``.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        eps: lower clip for the true-class probability, in ``(0, 1)``.

    Returns:
        Mean NLL in nats (0 is perfect).

    Raises:
        ValueError: invalid shapes, probabilities, labels or ``eps``.

    Example:
        >>> round(negative_log_likelihood([[0.5, 0.5], [1.0, 0.0]], [0, 1]), 4)
        14.1621
    """
    if not isinstance(eps, numbers.Real) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"`eps` must be a float in (0, 1), got {eps!r}.")
    p, t = _check_inputs(probs, target)
    p_true = np.clip(p[np.arange(p.shape[0]), t], float(eps), 1.0)
    return float(-np.mean(np.log(p_true)))


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin statistics of a top-label reliability diagram (JSON-able, NaN-free).

    Attributes:
        bin_edges: ``n_bins + 1`` edges ``k / n_bins``.
        bin_confidence: mean top-label confidence per bin, ``None`` for an empty bin.
        bin_accuracy: top-1 accuracy per bin, ``None`` for an empty bin.
        bin_count: number of samples per bin (``0`` for an empty bin).
    """

    bin_edges: tuple[float, ...]
    bin_confidence: tuple[float | None, ...]
    bin_accuracy: tuple[float | None, ...]
    bin_count: tuple[int, ...]

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return len(self.bin_count)

    def to_dict(self) -> dict[str, list[Any]]:
        """Plain-JSON form: ``{field: list}``."""
        return {k: list(v) for k, v in asdict(self).items()}


def reliability_diagram(probs: Any, target: Any, n_bins: int = 15) -> ReliabilityDiagram:
    """Bin samples by top-label confidence for plotting accuracy against confidence.

    Uses the same bin membership as :func:`expected_calibration_error`, except that the last
    bin is closed (``[1 - 1/n, 1]``): the diagram has exactly ``n_bins`` bars and confidences of
    exactly 1.0 are drawn in the last one. When no confidence is exactly 1.0,
    ``sum(count / N * |accuracy - confidence|)`` over the bins equals the ECE.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        n_bins: number of equal-width confidence bins.

    Returns:
        A :class:`ReliabilityDiagram`; empty bins have ``None`` confidence/accuracy and count 0.

    Raises:
        ValueError: invalid shapes, probabilities, labels or ``n_bins``.

    Example:
        >>> d = reliability_diagram([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], [0, 1, 1], n_bins=2)
        >>> d.bin_edges, d.bin_count, d.bin_accuracy
        ((0.0, 0.5, 1.0), (0, 3), (None, 0.6666666666666666))
    """
    n_bins = _check_n_bins(n_bins)
    p, t = _check_inputs(probs, target)
    conf, correct = _top_label(p, t)
    idx = np.minimum(_confidence_bin_index(conf, n_bins), n_bins - 1)
    count, mean_conf, acc = _bin_stats(conf, correct, idx, n_bins)
    filled = count > 0
    return ReliabilityDiagram(
        bin_edges=tuple(float(k) / n_bins for k in range(n_bins + 1)),
        bin_confidence=tuple(
            float(c) if f else None for c, f in zip(mean_conf, filled, strict=True)
        ),
        bin_accuracy=tuple(float(a) if f else None for a, f in zip(acc, filled, strict=True)),
        bin_count=tuple(int(c) for c in count),
    )


def calibration_bootstrap(
    probs: Any,
    target: Any,
    n_bins: int = 15,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Bootstrap CIs of ECE, MCE, UCE, Brier and NLL at once, vectorised over resamples.

    Draws the same resamples as :func:`mmsafe.metrics.bootstrap_ci` with the same ``seed`` and
    gives the same intervals as calling it once per metric, but bins every resample with one
    ``bincount`` instead of a Python loop (about 50x faster for N = 1000, 200 resamples).

    Returns:
        ``{"ece", "mce", "uce", "brier", "nll": (low, high)}``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = rng.dirichlet(np.ones(3), 200); y = rng.integers(0, 3, 200)
        >>> from mmsafe.metrics.bootstrap import bootstrap_ci
        >>> ref = bootstrap_ci(expected_calibration_error, p, y, n_boot=50)
        >>> np.allclose(calibration_bootstrap(p, y, n_boot=50)["ece"], ref)
        True
    """
    from mmsafe.metrics.bootstrap import check_options as _check_options
    from mmsafe.metrics.bootstrap import percentile_interval as _percentile_interval
    from mmsafe.metrics.bootstrap import resample_counts

    n_bins = _check_n_bins(n_bins)
    _check_options(n_boot, level, seed)
    p, t = _check_inputs(probs, target)
    conf, correct = _top_label(p, t)
    conf_hot = np.eye(n_bins + 1)[_confidence_bin_index(conf, n_bins)]
    u = _normalised_entropy(p)
    u_edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    u_hot = np.eye(n_bins)[np.clip(np.searchsorted(u_edges, u, side="right") - 1, 0, n_bins - 1)]
    brier = np.sum((p - np.eye(p.shape[1])[t]) ** 2, axis=1)
    nll = -np.log(np.clip(p[np.arange(len(t)), t], 1e-12, None))
    blocks = [
        conf_hot,
        conf_hot * conf[:, None],
        conf_hot * correct[:, None],
        u_hot,
        u_hot * u[:, None],
        u_hot * (1.0 - correct)[:, None],
        brier[:, None],
        nll[:, None],
    ]
    design = np.column_stack(blocks)
    cuts = np.cumsum([b.shape[1] for b in blocks])[:-1]
    n = len(t)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("ece", "mce", "uce", "brier", "nll")}
    for counts in resample_counts(n, int(n_boot), seed):
        c_n, c_conf, c_acc, u_n, u_val, u_err, b_sum, l_sum = np.split(counts @ design, cuts, 1)
        gap = np.abs(c_acc - c_conf) / np.maximum(c_n, 1)  # |count*acc - count*conf| / count
        out["ece"].append((gap * c_n).sum(axis=1) / n)
        out["mce"].append(np.where(c_n > 0, gap, -np.inf).max(axis=1))
        out["uce"].append(np.abs(u_err - u_val).sum(axis=1) / n)
        out["brier"].append(b_sum[:, 0] / n)
        out["nll"].append(l_sum[:, 0] / n)
    return {k: _percentile_interval(np.concatenate(v), level) for k, v in out.items()}
