"""Uncertainty metrics: predictive entropy, AvU, BALD and the CML confidence-violation rate.

Pure functions on probabilities (numpy, lists or CPU torch tensors in; numpy arrays or Python
floats out). Probabilities follow the conventions of :mod:`mmsafe.metrics.calibration`: ``(N, C)``
with ``C >= 2``, entries in ``[0, 1]``, rows summing to 1 within ``1e-3``. Entropies are in
nats with ``0 log 0 = 0``.

* :func:`predictive_entropy` -- ``H(p) = -sum_k p_k log p_k`` per row.
* :func:`avu` / :func:`avu_counts` -- accuracy versus uncertainty (Krishnan & Tickoo, 2020).
* :func:`bald` -- mutual information between the prediction and the stochastic passes
  (Houlsby et al., 2011; Gal et al., 2017): ``H(mean_t p_t) - mean_t H(p_t)``.
* :func:`confidence_violations` / :func:`confidence_violation_rate` -- how often removing
  modalities *raises* the top-class confidence, which CML (Ma et al., ICML 2023) says should
  never happen.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy
from mmsafe.metrics.calibration import _check_inputs, _check_probs

__all__ = [
    "AvUCounts",
    "avu",
    "avu_counts",
    "avu_indicator",
    "bald",
    "confidence_violation_rate",
    "confidence_violations",
    "predictive_entropy",
]


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy over the last axis in nats, ``0 log 0 = 0`` (no validation)."""
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(p * np.log(safe), axis=-1)


def predictive_entropy(probs: Any) -> np.ndarray:
    """Entropy of each row's predictive distribution, ``-sum_k p_k log p_k``, in nats.

    It is ``0`` for a one-hot row and ``log C`` for a uniform one. Divide by ``log C`` for the
    normalised uncertainty the UCE uses.

    Args:
        probs: ``(N, C)`` predicted probabilities.

    Returns:
        ``(N,)`` float64 entropies in ``[0, log C]``.

    Raises:
        ValueError: invalid shape or probabilities.

    Example:
        >>> predictive_entropy([[1.0, 0.0], [0.5, 0.5]]).round(4).tolist()
        [0.0, 0.6931]
    """
    return np.clip(_entropy(_check_probs(probs)), 0.0, None)


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"`threshold` must be a real number, got {threshold!r}.")
    if not np.isfinite(float(threshold)):
        raise ValueError(f"`threshold` must be finite, got {threshold!r}.")
    return float(threshold)


@dataclass(frozen=True)
class AvUCounts:
    """The four cells of accuracy versus uncertainty.

    Attributes:
        n_ac: accurate and certain.
        n_au: accurate and uncertain.
        n_ic: inaccurate and certain.
        n_iu: inaccurate and uncertain.
    """

    n_ac: int
    n_au: int
    n_ic: int
    n_iu: int

    @property
    def avu(self) -> float:
        """``(n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu)``."""
        return (self.n_ac + self.n_iu) / (self.n_ac + self.n_au + self.n_ic + self.n_iu)


def _avu_cells(probs: Any, target: Any, threshold: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(accurate, certain)`` boolean rows; certain means entropy ``<=`` threshold."""
    th = _check_threshold(threshold)
    p, t = _check_inputs(probs, target)
    accurate = p.argmax(axis=1) == t
    certain = np.clip(_entropy(p), 0.0, None) <= th
    return accurate, certain


def avu_counts(probs: Any, target: Any, threshold: float) -> AvUCounts:
    """Count accurate/inaccurate x certain/uncertain rows at an entropy threshold.

    A row is *certain* when its predictive entropy is ``<= threshold`` and *uncertain* when it
    is ``> threshold`` (a row exactly at the threshold counts as certain). *Accurate* means the
    arg-max class (ties to the lowest index) is the target.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        threshold: entropy threshold in nats.

    Returns:
        An :class:`AvUCounts`.

    Example:
        >>> avu_counts([[0.9, 0.1], [0.5, 0.5]], [0, 0], threshold=0.5)
        AvUCounts(n_ac=1, n_au=1, n_ic=0, n_iu=0)
    """
    accurate, certain = _avu_cells(probs, target, threshold)
    return AvUCounts(
        n_ac=int(np.sum(accurate & certain)),
        n_au=int(np.sum(accurate & ~certain)),
        n_ic=int(np.sum(~accurate & certain)),
        n_iu=int(np.sum(~accurate & ~certain)),
    )


def avu_indicator(probs: Any, target: Any, threshold: float) -> np.ndarray:
    """Per row, 1.0 when it is accurate-and-certain or inaccurate-and-uncertain, else 0.0.

    Its mean is :func:`avu`, so a bootstrap of the mean (``mean_ci``) gives AvU's CI.

    Example:
        >>> avu_indicator([[0.9, 0.1], [0.5, 0.5], [0.05, 0.95]], [0, 0, 0], 0.5).tolist()
        [1.0, 0.0, 0.0]
    """
    accurate, certain = _avu_cells(probs, target, threshold)
    return (accurate == certain).astype(np.float64)


def avu(probs: Any, target: Any, threshold: float) -> float:
    """Accuracy versus uncertainty, ``(n_AC + n_IU) / N`` (Krishnan & Tickoo, NeurIPS 2020).

    The fraction of rows where the model is right and sure, or wrong and unsure, at the given
    entropy threshold (see :func:`avu_counts` for the tie convention). Higher is better;
    ``1`` means the threshold separates every error from every correct prediction.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class indices.
        threshold: entropy threshold in nats (choose it on held-out data).

    Returns:
        AvU in ``[0, 1]``.

    Raises:
        ValueError: invalid shapes, probabilities, labels or threshold.

    Example:
        Right and sure; right but unsure; wrong and unsure; wrong but sure:

        >>> p = [[0.95, 0.05], [0.55, 0.45], [0.6, 0.4], [0.99, 0.01]]
        >>> avu(p, [0, 0, 1, 1], threshold=0.5)
        0.5
    """
    return float(np.mean(avu_indicator(probs, target, threshold)))


def bald(prob_samples: Any) -> np.ndarray:
    """BALD per row from ``T`` stochastic passes: ``H(mean_t p_t) - mean_t H(p_t)``, in nats.

    The mutual information between the prediction and the pass (dropout mask, augmentation or
    ensemble member): total predictive entropy minus the expected entropy of one pass. It is
    ``>= 0`` (entropy is concave; float rounding below 0 is clipped), ``0`` when every pass
    gives the same distribution, and at most ``log min(T, C)``.

    Args:
        prob_samples: ``(T, N, C)`` probabilities, one ``(N, C)`` matrix per pass (``T >= 1``).

    Returns:
        ``(N,)`` float64 BALD scores.

    Raises:
        ValueError: not 3-D, or any pass is not a valid probability matrix.

    Example:
        Two passes that agree, and two confident passes that disagree (``log 2``):

        >>> s = [[[0.7, 0.3], [1.0, 0.0]], [[0.7, 0.3], [0.0, 1.0]]]
        >>> bald(s).round(4).tolist()
        [0.0, 0.6931]
    """
    arr = _as_numpy(prob_samples, "prob_samples")
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(
            f"`prob_samples` must be (T, N, C) with T >= 1 passes, got shape {arr.shape}."
        )
    arr = np.stack([_check_probs(a) for a in arr])
    total = _entropy(arr.mean(axis=0))
    expected = _entropy(arr).mean(axis=0)
    return np.clip(total - expected, 0.0, None)


def confidence_violations(full_conf: Any, subset_conf: Any, tolerance: float = 0.0) -> np.ndarray:
    """Rows whose confidence rises when modalities are removed (CML's monotonicity principle).

    Row ``i`` violates when some reduced input is *strictly* more confident than the full one,
    ``subset_conf[i, k] > full_conf[i] + tolerance`` for some ``k``. Ties (equal confidence, e.g.
    a head that ignores the removed modality) are **not** violations: removing a modality may
    leave the confidence unchanged.

    Args:
        full_conf: ``(N,)`` top-class confidence on the full input.
        subset_conf: ``(N,)`` confidence with modalities removed, or ``(N, K)`` for ``K``
            reduced inputs (e.g. one per removed modality).
        tolerance: margin ``>= 0`` a rise must exceed to count (CML's ``epsilon``).

    Returns:
        ``(N,)`` boolean array.

    Raises:
        ValueError: mismatched shapes, NaN, or a negative tolerance.

    Example:
        >>> confidence_violations([0.9, 0.6, 0.7], [0.8, 0.7, 0.7]).tolist()
        [False, True, False]
    """
    full = _as_numpy(full_conf, "full_conf").astype(np.float64)
    sub = _as_numpy(subset_conf, "subset_conf").astype(np.float64)
    if full.ndim != 1:
        raise ValueError(f"`full_conf` must be 1-D (N,), got shape {full.shape}.")
    if sub.ndim == 1:
        sub = sub[:, None]
    if sub.ndim != 2 or sub.shape[0] != full.shape[0]:
        raise ValueError(
            f"`subset_conf` must be (N,) or (N, K) with N = {full.shape[0]}, got {sub.shape}."
        )
    if np.isnan(full).any() or np.isnan(sub).any():
        raise ValueError("Confidences contain NaN.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a number >= 0, got {tolerance!r}.")
    return np.any(sub > full[:, None] + float(tolerance), axis=1)


def confidence_violation_rate(full_conf: Any, subset_conf: Any, tolerance: float = 0.0) -> float:
    """Fraction of rows where removing modalities *raises* the confidence.

    See :func:`confidence_violations` for the definition and the tie convention (ties are not
    violations). CML regularisation (:func:`mmsafe.harden.calibration.cml_finetune`) lowers it.

    Args:
        full_conf: ``(N,)`` top-class confidence on the full input (``N >= 1``).
        subset_conf: ``(N,)`` or ``(N, K)`` confidences on reduced inputs.
        tolerance: margin ``>= 0`` a rise must exceed to count.

    Returns:
        The violation rate in ``[0, 1]``.

    Example:
        >>> confidence_violation_rate([0.9, 0.6, 0.7, 0.5], [[0.8, 0.2], [0.7, 0.5],
        ...                                                  [0.7, 0.1], [0.4, 0.9]])
        0.5
    """
    v = confidence_violations(full_conf, subset_conf, tolerance)
    if v.size == 0:
        raise ValueError("Cannot compute a violation rate on zero rows.")
    return float(v.mean())
