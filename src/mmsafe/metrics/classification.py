"""Classification metrics on hard predictions: accuracy, macro-F1, per-class recall, confusions.

All functions take class indices as numpy arrays or array-likes (CPU torch tensors work too),
validate them, and return Python floats or numpy arrays. Conventions:

* ``preds`` and ``target`` are 1-D integer arrays of equal length ``N >= 1``; ``N = 0`` raises
  :class:`ValueError` (a metric of nothing is undefined, not 0).
* Labels must lie in ``[0, num_classes)``. Negative labels are rejected: mmsafe datasets mark
  unlabelled rows with ``-1``, and those rows must be dropped before scoring.
* A class with no samples in ``target`` gets ``NaN`` per-class recall, and it is left out of the
  macro-F1 average when it is also never predicted (see :func:`macro_f1`).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy
from mmsafe.metrics.bootstrap import check_options as _check_options
from mmsafe.metrics.bootstrap import percentile_interval as _percentile_interval
from mmsafe.metrics.bootstrap import resample_counts

__all__ = ["accuracy", "confusion_matrix", "macro_f1", "per_class_accuracy"]


def _check_num_classes(num_classes: Any) -> int:
    """Validate ``num_classes`` (a positive int) and return it as ``int``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(
            f"`num_classes` must be a positive integer, got {num_classes!r} "
            f"({type(num_classes).__name__})."
        )
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer, got {num_classes}.")
    return int(num_classes)


def _check_labels(x: Any, name: str, num_classes: int | None = None) -> np.ndarray:
    """Validate a 1-D array of class indices and return it as ``int64``.

    Args:
        x: array-like of class indices.
        name: argument name for error messages.
        num_classes: if given, every label must be ``< num_classes``.

    Raises:
        ValueError: wrong shape, empty, non-integer dtype, or labels out of range.
    """
    arr = _as_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of class indices, got shape {arr.shape}. "
            "For probabilities use argmax over the class axis first."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: metrics need at least one sample (N >= 1).")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"`{name}` must hold integer class indices, got dtype {arr.dtype}. "
            "Cast with `.astype(int)` (or take the argmax of probabilities) first."
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ValueError(
            f"`{name}` contains negative label {lo}; labels must be in [0, num_classes). "
            "Rows marked -1 are unlabelled: drop them before computing metrics."
        )
    if num_classes is not None and hi >= num_classes:
        raise ValueError(
            f"`{name}` contains label {hi} but num_classes={num_classes}; "
            f"labels must be in [0, {num_classes})."
        )
    return arr.astype(np.int64, copy=False)


def _check_pair(
    preds: Any, target: Any, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``preds`` and ``target`` together (same length, valid labels)."""
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    p = _check_labels(preds, "preds", num_classes)
    t = _check_labels(target, "target", num_classes)
    if p.shape != t.shape:
        raise ValueError(
            f"`preds` and `target` must have the same length, got {p.shape[0]} and {t.shape[0]}."
        )
    return p, t


def accuracy(preds: Any, target: Any) -> float:
    """Fraction of samples whose prediction equals the target (micro accuracy).

    Args:
        preds: ``(N,)`` predicted class indices.
        target: ``(N,)`` true class indices (non-negative).

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: empty input, mismatched lengths, non-integer or negative labels.

    Example:
        >>> accuracy([0, 1, 2, 2], [0, 1, 1, 2])
        0.75
    """
    p, t = _check_pair(preds, target)
    return float(np.mean(p == t))


def confusion_matrix(preds: Any, target: Any, num_classes: int) -> np.ndarray:
    """Count matrix ``M[true, pred]`` (rows: target, columns: prediction), like scikit-learn.

    Args:
        preds: ``(N,)`` predicted class indices in ``[0, num_classes)``.
        target: ``(N,)`` true class indices in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        ``(C, C)`` ``int64`` array; ``M.sum() == N``.

    Raises:
        ValueError: invalid labels or ``num_classes``.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 0, 1], num_classes=2).tolist()
        [[1, 1], [0, 1]]
    """
    c = _check_num_classes(num_classes)
    p, t = _check_pair(preds, target, c)
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64, copy=False)


def per_class_accuracy(preds: Any, target: Any, num_classes: int) -> np.ndarray:
    """Per-class accuracy, i.e. recall ``M[c, c] / M[c, :].sum()`` for every class ``c``.

    Args:
        preds: ``(N,)`` predicted class indices in ``[0, num_classes)``.
        target: ``(N,)`` true class indices in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        ``(C,)`` ``float64`` array; ``NaN`` for classes with no samples in ``target``.

    Raises:
        ValueError: invalid labels or ``num_classes``.

    Example:
        >>> per_class_accuracy([0, 1, 1], [0, 0, 1], num_classes=3).tolist()
        [0.5, 1.0, nan]
    """
    m = confusion_matrix(preds, target, num_classes)
    support = m.sum(axis=1)
    out = np.full(m.shape[0], np.nan)
    has = support > 0
    out[has] = np.diag(m)[has] / support[has]
    return out


def macro_f1(preds: Any, target: Any, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``target`` or ``preds``.

    Per class, ``F1 = 2 TP / (2 TP + FP + FN)``. A class that is predicted but never occurs in
    ``target`` has F1 = 0 and counts in the average; a class absent from both ``target`` and
    ``preds`` (``TP + FP + FN = 0``, F1 undefined) is left out of the average.

    This equals torchmetrics' ``MulticlassF1Score(num_classes=C, average="macro")`` and
    scikit-learn's ``f1_score(target, preds, average="macro", zero_division=0)`` with the
    default ``labels`` (the classes seen in either array). It deliberately differs from
    ``f1_score(..., labels=range(C), zero_division=0)``, which scores every class absent from
    both arrays as F1 = 0 and so drags the average down for classes never tested.

    Args:
        preds: ``(N,)`` predicted class indices in ``[0, num_classes)``.
        target: ``(N,)`` true class indices in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        Macro F1 in ``[0, 1]``.

    Raises:
        ValueError: invalid labels or ``num_classes``.

    Example:
        >>> round(macro_f1([0, 1, 1], [0, 0, 1], num_classes=5), 4)
        0.6667
    """
    m = confusion_matrix(preds, target, num_classes)
    tp = np.diag(m).astype(np.float64)
    fp = m.sum(axis=0) - tp
    fn = m.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    present = denom > 0  # always non-empty because N >= 1
    return float(np.mean(2 * tp[present] / denom[present]))


def macro_f1_bootstrap(
    preds: Any,
    target: Any,
    num_classes: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI of :func:`macro_f1`, vectorised over resamples.

    Same resamples and same interval as ``bootstrap_ci(lambda p, t: macro_f1(p, t, C), preds,
    target, ...)``, with per-class counts taken by one ``bincount`` per chunk of resamples.

    Example:
        >>> from mmsafe.metrics.bootstrap import bootstrap_ci
        >>> rng = np.random.default_rng(0)
        >>> p, t = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
        >>> ref = bootstrap_ci(lambda a, b: macro_f1(a, b, 3), p, t, n_boot=50)
        >>> np.allclose(macro_f1_bootstrap(p, t, 3, n_boot=50), ref)
        True
    """
    _check_options(n_boot, level, seed)
    macro_f1(preds, target, num_classes)  # validates the inputs
    p, t = np.asarray(preds, dtype=np.int64), np.asarray(target, dtype=np.int64)
    c = int(num_classes)
    eye = np.eye(c)
    # per row: [true-positive one-hot | true-class one-hot | predicted-class one-hot]
    design = np.column_stack([eye[t] * (p == t)[:, None], eye[t], eye[p]])
    stats = []
    for counts in resample_counts(len(t), int(n_boot), seed):
        sums = counts @ design
        tp, denom = sums[:, :c], sums[:, c : 2 * c] + sums[:, 2 * c :]  # 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
        stats.append(np.nanmean(f1, axis=1))
    return _percentile_interval(np.concatenate(stats), level)
