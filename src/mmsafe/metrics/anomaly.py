"""Anomaly-detection metrics: image AUROC / AUPR / F1-max, pixel AUROC, PRO curve and AUPRO.

Scores are "higher = more anomalous"; targets are booleans (``True`` = anomalous / defect pixel).

* :func:`auroc` is the Mann-Whitney probability that a random anomalous item outscores a random
  normal one (ties count one half), equal to scikit-learn's ``roc_auc_score``.
* :func:`average_precision` is scikit-learn's step-wise ``sum_n (R_n - R_{n-1}) P_n``.
* :func:`f1_max` is the largest F1 over every threshold ``score >= t``.
* :func:`pro_curve` / :func:`aupro` follow Bergmann et al. (MVTec AD) as anomalib's ``AUPRO``:
  ground-truth masks are split into 8-connected regions; at each threshold ``t`` the per-region
  overlap ``PRO(t)`` is the mean over regions of the fraction of the region scored ``>= t``, paired
  with the false-positive rate over all defect-free pixels. AUPRO is the trapezoidal area under
  PRO-vs-FPR for FPR in ``[0, fpr_limit]``, the curve being linearly interpolated at
  ``fpr_limit``, divided by ``fpr_limit``. The curve here is exact (one point per distinct score),
  where anomalib resamples per-region curves; both interpolate linearly at the limit.

Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2, :2] = True
    >>> aupro(masks.astype(float), masks), round(aupro(np.zeros((1, 4, 4)), masks), 4)
    (1.0, 0.15)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage


def _scores_targets(scores: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat finite scores (float32 stays float32, anything else float64) and boolean targets."""
    s = np.asarray(scores)
    s = (s if s.dtype in (np.float32, np.float64) else s.astype(np.float64)).ravel()
    t = np.asarray(target).ravel()
    if s.shape != t.shape:
        raise ValueError(f"scores and target differ in size: {s.shape} vs {t.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, t.astype(bool)


def _tie_blocks(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct scores, highest first, as float64; how many scores are >= each)``.

    One value sort, no argsort: the counts are the same as those of a stable argsort of
    ``-s`` (the last position of each tie block, plus one), in a fraction of the time on the
    millions of pixels of a map stack.
    """
    d = np.sort(s)[::-1]
    ends = np.empty(len(d), dtype=bool)  # the last position of each tie block
    np.not_equal(d[1:], d[:-1], out=ends[:-1])
    ends[-1:] = True
    last = np.flatnonzero(ends)
    return d[last].astype(np.float64), last + 1


def _at_least(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How many of ``x`` are ``>=`` each of the distinct ``values`` (highest first)."""
    block = len(values) - np.searchsorted(values[::-1], x, side="right")  # the block of each x
    return np.cumsum(np.bincount(block, minlength=len(values)))


def _cumulative_counts(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold ``score >= thr``, highest first."""
    values, n_at_least = _tie_blocks(s)
    tp = _at_least(values, s[t].astype(np.float64))
    return tp, n_at_least - tp, values


def auroc(scores: Any, target: Any) -> float:
    """Area under the ROC curve (NaN when only one class is present).

    Example:
        >>> auroc([0.5, 0.5], [0, 1])
        0.5
    """
    s, t = _scores_targets(scores, target)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp, fp, _ = _cumulative_counts(s, t)
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    return float(np.trapezoid(tpr, fpr))


def average_precision(scores: Any, target: Any) -> float:
    """Average precision (area under the precision-recall curve, step-wise), NaN without positives.

    Example:
        >>> average_precision([0.9, 0.8, 0.1], [1, 0, 1])
        0.8333333333333333
    """
    s, t = _scores_targets(scores, target)
    n_pos = int(t.sum())
    if n_pos == 0:
        return float("nan")
    tp, fp, _ = _cumulative_counts(s, t)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores: Any, target: Any) -> float:
    """The largest F1 score over every threshold ``score >= t`` (NaN without positives).

    Example:
        >>> f1_max([0.9, 0.8, 0.1], [1, 0, 1])  # threshold 0.1: P = 2/3, R = 1
        0.8
    """
    s, t = _scores_targets(scores, target)
    n_pos = int(t.sum())
    if n_pos == 0:
        return float("nan")
    tp, fp, _ = _cumulative_counts(s, t)
    f1 = 2 * tp / (tp + fp + n_pos)
    return float(f1.max())


def pixel_auroc(anomaly_maps: Any, masks: Any) -> float:
    """AUROC over every pixel of every image, flattened."""
    return auroc(anomaly_maps, masks)


@dataclass(frozen=True)
class ProCurve:
    """The PRO curve: ``fpr`` and ``pro`` per threshold (descending), starting at ``(0, 0)``.

    Attributes:
        fpr: false-positive rate on defect-free pixels, non-decreasing.
        pro: mean per-region overlap, non-decreasing.
        thresholds: the score thresholds (``+inf`` first).
        n_regions: how many connected ground-truth regions there are.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray
    n_regions: int


def label_regions(masks: Any) -> tuple[np.ndarray, int]:
    """8-connected components of each ``(H, W)`` mask, numbered ``1..K`` across the whole stack.

    Example:
        >>> m = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 0], [1, 0, 0]]])
        >>> label_regions(m)[1]  # a diagonal is one region; the second image has two
        3
    """
    m = np.asarray(masks).astype(bool)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    out = np.zeros(m.shape, dtype=np.int64)
    total = 0
    structure = np.ones((3, 3), dtype=bool)
    for i in range(len(m)):
        lab, n = ndimage.label(m[i], structure=structure)
        out[i] = np.where(lab > 0, lab + total, 0)
        total += int(n)
    return out, total


def pro_curve(anomaly_maps: Any, masks: Any) -> ProCurve:
    """The exact per-region-overlap curve of anomaly maps ``(N, H, W)`` against boolean masks."""
    maps = np.asarray(anomaly_maps)
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float64)
    regions, k = label_regions(masks)
    if maps.shape != regions.shape:
        maps = maps.reshape(regions.shape)
    s, lab = maps.ravel(), regions.ravel()
    if not np.all(np.isfinite(s)):
        raise ValueError("anomaly maps must be finite")
    inside = np.flatnonzero(lab)  # defect pixels, in index order
    n_bg = len(s) - len(inside)
    if k == 0 or n_bg == 0:
        raise ValueError("pro_curve needs at least one defect region and one defect-free pixel")
    sizes = np.bincount(lab, minlength=k + 1).astype(np.float64)
    weight = 1.0 / (k * sizes[lab[inside]])  # each region sums to 1/K
    score = s[inside].astype(np.float64)
    # defect pixels highest score first, ties in index order (a stable sort of -s): the running
    # sum of their weights is the PRO after each of them, as the sum over all sorted pixels
    # (background pixels weigh 0) would give it
    running = np.cumsum(weight[np.lexsort((inside, -score))])
    thresholds, n_at_least = _tie_blocks(s)
    n_in = _at_least(thresholds, score)
    pro = np.where(n_in > 0, running[np.maximum(n_in - 1, 0)], 0.0)
    fpr = (n_at_least - n_in) / n_bg
    return ProCurve(
        fpr=np.r_[0.0, fpr],
        pro=np.r_[0.0, np.minimum(pro, 1.0)],
        thresholds=np.r_[np.inf, thresholds],
        n_regions=k,
    )


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` (``x`` non-decreasing) on ``[x[0], x_max]``.

    The point at ``x_max`` is linearly interpolated between its neighbours; where ``x`` repeats
    (vertical steps) the last ``y`` before ``x_max`` is used.

    Example:
        >>> area_up_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)
        0.125
    """
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        j = int(np.argmax(~keep))  # first point past the limit
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_lim = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_lim]
    return float(np.trapezoid(ys, xs))


def aupro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit`` (in [0, 1]).

    A perfect map gives 1; a constant map gives ``fpr_limit / 2`` (the diagonal).
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(anomaly_maps, masks)
    return area_up_to(curve.fpr, curve.pro, fpr_limit) / fpr_limit
