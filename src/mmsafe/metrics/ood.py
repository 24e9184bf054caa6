"""Out-of-distribution detection metrics: AUROC, AUPR-In, AUPR-Out, FPR at a TPR, ROC points.

Every function takes the scores of the in-distribution (ID) rows and of the out-of-distribution
(OOD) rows separately, with the convention **higher score = more in-distribution**. ID is the
positive class; a detector "keeps" a row as ID when its score is ``>= t`` for a threshold ``t``.

* ``TPR(t)`` = fraction of ID rows with score ``>= t`` (ID rows kept);
* ``FPR(t)`` = fraction of OOD rows with score ``>= t`` (OOD rows wrongly kept as ID).

The curves are built exactly as scikit-learn builds them (``sklearn.metrics.roc_curve`` and
``precision_recall_curve``): one point per *distinct* score, so tied scores move together and
ties between an ID and an OOD row count as half a correct ordering in the AUROC. The results
match scikit-learn's to floating-point rounding:

* :func:`auroc` = ``roc_auc_score(y, s)`` with ``y = 1`` on ID rows and ``s`` the scores
  (trapezoidal area under the ROC, i.e. the Mann-Whitney probability
  ``P(s_in > s_out) + P(s_in = s_out) / 2``);
* :func:`aupr_in` = ``average_precision_score(y, s)`` (ID positive);
* :func:`aupr_out` = ``average_precision_score(1 - y, -s)`` (OOD positive, scores negated);
* :func:`fpr_at_tpr` = the smallest FPR among the points of the full ROC curve
  (``roc_curve(y, s, drop_intermediate=False)``) whose TPR is at least ``tpr``, i.e.
  ``fpr[np.argmax(tpr_curve >= tpr)]``. This is the FPR at the *largest threshold that keeps at
  least* ``tpr`` *of the ID rows*: a threshold one could actually deploy, with no interpolation
  between ROC points. (Code that uses scikit-learn's default ``drop_intermediate=True`` can
  report a larger value when the 95 % point falls inside a straight stretch of the curve.)

Example:
    >>> s_in, s_out = np.array([0.9, 0.8, 0.7, 0.3]), np.array([0.6, 0.3, 0.1])
    >>> auroc(s_in, s_out)  # of 12 (ID, OOD) pairs, 10 ordered right and one tie: 10.5 / 12
    0.875
    >>> fpr_at_tpr(s_in, s_out, tpr=0.75), fpr_at_tpr(s_in, s_out, tpr=1.0)
    (0.0, 0.6666666666666666)
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy

__all__ = [
    "RocCurve",
    "aupr_in",
    "aupr_out",
    "auroc",
    "auroc_bootstrap",
    "auroc_bootstrap_ci",
    "downsample_curve",
    "fpr_at_tpr",
    "roc_curve",
    "stratified_resamples",
]


@dataclass(frozen=True)
class RocCurve:
    """ROC curve points, as ``sklearn.metrics.roc_curve`` returns them (ID = positive).

    Attributes:
        fpr: ``(P,)`` non-decreasing false positive rates, starting at 0 and ending at 1.
        tpr: ``(P,)`` non-decreasing true positive rates, starting at 0 and ending at 1.
        thresholds: ``(P,)`` decreasing thresholds; point ``i`` keeps the rows with score
            ``>= thresholds[i]``. The first is ``inf`` (nothing kept).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _check_scores(x: Any, name: str) -> np.ndarray:
    """A non-empty, finite, 1-D float64 copy of ``x``."""
    arr = _as_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one score per row), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty; OOD metrics need at least one ID and one OOD row.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"`{name}` must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or infinite scores; drop or fix those rows.")
    return arr


def _counts_at_thresholds(
    positives: np.ndarray, negatives: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tps, fps, thresholds)``: rows with score ``>= t`` for each distinct score ``t``.

    The same computation as scikit-learn's ``confusion_matrix_at_thresholds``: sort by
    decreasing score, cumulate, keep the last index of every run of equal scores.
    """
    scores = np.concatenate([positives, negatives])
    is_pos = np.concatenate([np.ones(positives.size), np.zeros(negatives.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos, dtype=np.float64)[last]
    fps = 1.0 + last - tps
    return tps, fps, scores[last]


def roc_curve(scores_in: Any, scores_out: Any, drop_intermediate: bool = False) -> RocCurve:
    """ROC curve of "score ``>= t`` means in-distribution", one point per distinct score.

    Args:
        scores_in: ``(N_in,)`` scores of in-distribution rows (the positives).
        scores_out: ``(N_out,)`` scores of OOD rows.
        drop_intermediate: drop points collinear with their neighbours, as scikit-learn's
            default does (the area is unchanged); ``False`` keeps every threshold.

    Returns:
        A :class:`RocCurve` equal to ``sklearn.metrics.roc_curve(y, s, drop_intermediate=...)``.

    Example:
        >>> c = roc_curve([2.0, 1.0], [1.0, 0.0])
        >>> c.fpr.tolist(), c.tpr.tolist(), c.thresholds.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], [inf, 2.0, 1.0, 0.0])
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    tps, fps, thr = _counts_at_thresholds(s_in, s_out)
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return RocCurve(fpr=fps / fps[-1], tpr=tps / tps[-1], thresholds=np.r_[np.inf, thr])


def auroc(scores_in: Any, scores_out: Any) -> float:
    """Area under the ROC curve: the probability that an ID row outscores an OOD row.

    Ties count one half. 1.0 = perfect separation, 0.5 = chance, below 0.5 = the score ranks
    OOD rows *above* ID rows. Equals ``sklearn.metrics.roc_auc_score`` with ID as label 1.

    Example:
        >>> auroc([3.0, 2.0], [1.0, 0.0]), auroc([1.0], [1.0]), auroc([0.0], [1.0])
        (1.0, 0.5, 0.0)
    """
    c = roc_curve(scores_in, scores_out)
    return float(np.trapezoid(c.tpr, c.fpr))


def _average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k``."""
    tps, fps, _ = _counts_at_thresholds(positives, negatives)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(max(0.0, np.sum(np.diff(np.r_[0.0, recall]) * precision)))


def aupr_in(scores_in: Any, scores_out: Any) -> float:
    """Average precision with the in-distribution rows as positives (AUPR-In).

    The chance level is the ID fraction ``N_in / (N_in + N_out)``. Equals
    ``sklearn.metrics.average_precision_score(y, s)`` with ID as label 1.

    Example:
        >>> aupr_in([3.0, 2.0], [1.0, 0.0]), aupr_in([1.0], [2.0])
        (1.0, 0.5)
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    return _average_precision(s_in, s_out)


def aupr_out(scores_in: Any, scores_out: Any) -> float:
    """Average precision with the OOD rows as positives and the scores negated (AUPR-Out).

    The chance level is the OOD fraction ``N_out / (N_in + N_out)``; with few OOD rows this is
    the harder, more informative of the two AUPRs. Equals
    ``sklearn.metrics.average_precision_score(1 - y, -s)``.

    Example:
        >>> aupr_out([3.0, 2.0], [1.0, 0.0]), aupr_out([2.0], [1.0, 3.0])
        (1.0, 0.8333333333333333)
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    return _average_precision(-s_out, -s_in)


def fpr_at_tpr(scores_in: Any, scores_out: Any, tpr: float = 0.95) -> float:
    """The fraction of OOD rows still kept when the threshold keeps ``tpr`` of the ID rows.

    Formally: ``min { FPR(t) : TPR(t) >= tpr }`` over the thresholds ``t`` of the full ROC
    curve, which is the FPR at the largest threshold keeping at least ``tpr`` of the ID rows
    (no interpolation). ``tpr = 0.95`` gives the usual FPR@95TPR; lower is better.

    Args:
        scores_in: ``(N_in,)`` ID scores.
        scores_out: ``(N_out,)`` OOD scores.
        tpr: the required fraction of ID rows kept, in ``(0, 1]``.

    Example:
        >>> fpr_at_tpr([5.0, 4.0, 3.0, 2.0], [4.5, 1.0], tpr=0.5)
        0.5
    """
    if not isinstance(tpr, numbers.Real) or not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"`tpr` must be in (0, 1], e.g. 0.95, got {tpr!r}.")
    c = roc_curve(scores_in, scores_out)
    return float(c.fpr[int(np.argmax(c.tpr >= float(tpr)))])


def stratified_resamples(
    n_in: int, n_out: int, n_boot: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Bootstrap index pairs ``(idx_in, idx_out)``: ID and OOD rows resampled separately.

    Resampling each population on its own keeps the ID/OOD mix fixed, so every resample has both
    (a joint resample could draw no OOD row when they are rare). Deterministic given ``seed``.

    Example:
        >>> [(a.shape, b.shape) for a, b in stratified_resamples(5, 2, n_boot=2)]
        [((5,), (2,)), ((5,), (2,))]
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"`n_boot` must be a positive integer, got {n_boot!r}.")
    rng = np.random.default_rng(int(seed))
    for _ in range(int(n_boot)):
        yield rng.integers(0, n_in, n_in), rng.integers(0, n_out, n_out)


def auroc_bootstrap(
    scores_in: Any, scores_out: Any, n_boot: int = 200, seed: int = 0
) -> np.ndarray:
    """The AUROC of each resample of :func:`stratified_resamples`, ``(n_boot,)``.

    Fast: scores are ranked once; each resample is then one ``bincount`` and one cumulative sum
    (``O(N)``, no sorting), through the Mann-Whitney form of the AUROC.

    Example:
        >>> auroc_bootstrap([3.0, 2.0], [1.0, 0.0], n_boot=3).tolist()
        [1.0, 1.0, 1.0]
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    _, rank = np.unique(np.concatenate([s_in, s_out]), return_inverse=True)
    r_in, r_out = rank[: s_in.size], rank[s_in.size :]
    n_levels = int(rank.max()) + 1
    denom = float(s_in.size) * float(s_out.size)
    stats = []
    for idx_in, idx_out in stratified_resamples(s_in.size, s_out.size, n_boot, seed):
        w_out = np.bincount(r_out[idx_out], minlength=n_levels).astype(np.float64)
        below = np.cumsum(w_out) - w_out  # OOD rows strictly below each score level
        r = r_in[idx_in]
        stats.append(float(np.sum(below[r] + 0.5 * w_out[r]) / denom))
    return np.asarray(stats)


def auroc_bootstrap_ci(
    scores_in: Any, scores_out: Any, n_boot: int = 200, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC, resampling ID and OOD rows separately.

    The same percentile rule as :func:`mmsafe.metrics.bootstrap_ci` (numpy's linear
    interpolation of the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> lo, hi = auroc_bootstrap_ci(rng.normal(1, 1, 300), rng.normal(0, 1, 300))
        >>> bool(lo < 0.76 < hi)  # the true AUROC is Phi(1 / sqrt(2)) = 0.760
        True
    """
    if not isinstance(level, numbers.Real) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1), e.g. 0.95, got {level!r}.")
    stats = auroc_bootstrap(scores_in, scores_out, n_boot=n_boot, seed=seed)
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(lo), float(hi))


def downsample_curve(x: Any, y: Any, max_points: int = 200) -> tuple[list[float], list[float]]:
    """At most ``max_points`` points of a curve, evenly spaced by index, ends always kept.

    For plotting only (a ROC over 10 000 rows has up to 10 001 points).

    Example:
        >>> downsample_curve(np.linspace(0, 1, 11), np.linspace(0, 1, 11), max_points=3)
        ([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    """
    xs, ys = _as_numpy(x, "x").astype(np.float64), _as_numpy(y, "y").astype(np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xs.shape} and {ys.shape}.")
    if max_points < 2:
        raise ValueError(f"`max_points` must be at least 2, got {max_points}.")
    if xs.size > max_points:
        pick = np.unique(np.round(np.linspace(0, xs.size - 1, max_points)).astype(np.int64))
        xs, ys = xs[pick], ys[pick]
    return [float(v) for v in xs], [float(v) for v in ys]
