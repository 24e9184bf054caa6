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


@dataclass(frozen=True)
class PixelTruth:
    """Ground-truth masks prepared once for the pixel metrics of many maps of the same images.

    Attributes:
        size: pixels in the mask stack (every map scored against it has as many).
        inside: flat indices of the defect pixels, ascending.
        weight: per defect pixel, ``1 / (K * size of its region)``: each region sums to ``1/K``.
        n_regions: ``K``, the 8-connected defect regions (:func:`label_regions`).

    Example:
        >>> m = np.zeros((1, 3, 3), bool); m[0, 0, :2] = True; m[0, 2, 2] = True
        >>> t = PixelTruth.of(m)
        >>> t.inside.tolist(), t.weight.tolist(), t.n_regions
        ([0, 1, 8], [0.25, 0.25, 0.5], 2)
    """

    size: int
    inside: np.ndarray
    weight: np.ndarray
    n_regions: int

    @classmethod
    def of(cls, masks: Any) -> PixelTruth:
        """Label the regions of ``(N, H, W)`` (or one ``(H, W)``) boolean masks, image by image.

        Only the defect pixels are kept, so memory follows the defects, not the pixel count.
        """
        m = np.asarray(masks).astype(bool)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
        per_image = m.shape[1] * m.shape[2]
        structure = np.ones((3, 3), dtype=bool)
        inside, region, total = [], [], 0
        for i in range(len(m)):
            if not m[i].any():
                continue
            lab, n = ndimage.label(m[i], structure=structure)
            flat = lab.ravel()
            idx = np.flatnonzero(flat)
            inside.append(idx + i * per_image)
            region.append(flat[idx].astype(np.int64) + total)
            total += int(n)
        at = np.concatenate(inside) if inside else np.zeros(0, np.int64)
        lab_in = np.concatenate(region) if region else np.zeros(0, np.int64)
        sizes = np.bincount(lab_in, minlength=total + 1).astype(np.float64)
        weight = 1.0 / (total * sizes[lab_in]) if total else np.zeros(0)
        return cls(int(m.size), at.astype(np.int64), weight, total)


def _pro(
    s: np.ndarray,
    truth: PixelTruth,
    blocks: tuple[np.ndarray, np.ndarray],
    n_in: np.ndarray | None = None,
) -> ProCurve:
    """The PRO curve of flat scores ``s`` given their tie blocks (:func:`_tie_blocks`).

    ``n_in``: how many defect pixels score ``>=`` each block's value, when already counted.
    """
    k, n_bg = truth.n_regions, truth.size - len(truth.inside)
    if k == 0 or n_bg == 0:
        raise ValueError("pro_curve needs at least one defect region and one defect-free pixel")
    score = s[truth.inside].astype(np.float64)
    # defect pixels highest score first, ties in index order (a stable sort of -s): the running
    # sum of their weights is the PRO after each of them, as the sum over all sorted pixels
    # (background pixels weigh 0) would give it
    running = np.cumsum(truth.weight[np.lexsort((truth.inside, -score))])
    thresholds, n_at_least = blocks
    if n_in is None:
        n_in = _at_least(thresholds, score)
    pro = np.where(n_in > 0, running[np.maximum(n_in - 1, 0)], 0.0)
    fpr = (n_at_least - n_in) / n_bg
    return ProCurve(
        fpr=np.r_[0.0, fpr],
        pro=np.r_[0.0, np.minimum(pro, 1.0)],
        thresholds=np.r_[np.inf, thresholds],
        n_regions=k,
    )


def _flat_maps(anomaly_maps: Any, size: int) -> np.ndarray:
    maps = np.asarray(anomaly_maps)
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float64)
    s = maps.ravel()
    if s.size != size:
        raise ValueError(f"anomaly maps have {s.size} pixels, the masks {size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("anomaly maps must be finite")
    return s


def pro_curve(anomaly_maps: Any, masks: Any) -> ProCurve:
    """The exact per-region-overlap curve of anomaly maps ``(N, H, W)`` against boolean masks.

    ``masks`` may be a :class:`PixelTruth` already made from them.
    """
    truth = masks if isinstance(masks, PixelTruth) else PixelTruth.of(masks)
    s = _flat_maps(anomaly_maps, truth.size)
    return _pro(s, truth, _tie_blocks(s))


def pixel_metrics(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> tuple[float, float]:
    """``(pixel AUROC, AUPRO)`` of one map stack, sorting its pixels once.

    The same numbers as :func:`pixel_auroc` and :func:`aupro`, to the last bit; give a
    :class:`PixelTruth` to score several methods' maps against the same masks.

    Example:
        >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2, :2] = True
        >>> pixel_metrics(masks.astype(np.float32), masks)
        (1.0, 1.0)
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    truth = masks if isinstance(masks, PixelTruth) else PixelTruth.of(masks)
    s = _flat_maps(anomaly_maps, truth.size)
    blocks = _tie_blocks(s)
    n_pos, n_neg = len(truth.inside), truth.size - len(truth.inside)
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    tp = _at_least(blocks[0], s[truth.inside].astype(np.float64))
    curve = _pro(s, truth, blocks, tp)
    fp = blocks[1] - tp
    roc = float(np.trapezoid(np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]))
    return roc, area_up_to(curve.fpr, curve.pro, fpr_limit) / fpr_limit


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
