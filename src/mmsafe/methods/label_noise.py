"""Label issues by confident learning over out-of-sample multimodal probabilities.

Confident learning (Northcutt, Jiang & Chuang, JAIR 2021) finds rows whose given label
disagrees with what a classifier, which never saw that row, is confident of:

1. :func:`crossval_probs`: out-of-sample class probabilities for every row, from a
   multinomial logistic regression (scikit-learn) on the row's frozen embeddings of every
   modality, fitted ``k``-fold (each row is predicted by the folds it is not in). The caption
   is evidence too: a caption that names another class than the label weighs against it.
2. :func:`confident_joint`: per-class thresholds ``t_j`` (the mean probability of class ``j``
   over the rows labelled ``j``); a row counts towards ``(given, j*)`` where ``j*`` is its most
   probable class among those whose probability reaches their threshold. Off-diagonal rows
   are the label issues (cleanlab's ``filter_by="confident_learning"``), and the joint's
   off-diagonal share estimates the noise rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelIssues:
    """What :func:`confident_joint` finds.

    Attributes:
        issues: ``(N,)`` rows whose confident class is not their given label.
        suggested: ``(N,)`` the confident class ``j*`` (``-1`` where no class reaches its
            threshold).
        self_confidence: ``(N,)`` the probability of the given label (low: suspicious).
        thresholds: ``(C,)`` the per-class thresholds ``t_j``.
        joint: ``(C, C)`` the confident joint (given label x confident class), counts.
    """

    issues: np.ndarray
    suggested: np.ndarray
    self_confidence: np.ndarray
    thresholds: np.ndarray
    joint: np.ndarray

    @property
    def noise_rate(self) -> float:
        """The confident joint's off-diagonal share: the estimated share of wrong labels."""
        total = self.joint.sum()
        return float((total - np.trace(self.joint)) / total) if total else 0.0


def confident_joint(probs: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Confident learning's joint and label issues from out-of-sample ``probs``.

    Args:
        probs: ``(N, C)`` out-of-sample class probabilities.
        labels: ``(N,)`` the given labels in ``[0, C)``.

    Example:
        >>> p = np.array([[.9, .1], [.8, .2], [.3, .7], [.2, .8], [.1, .9]])
        >>> r = confident_joint(p, np.array([0, 0, 1, 1, 0]))
        >>> r.thresholds.round(3).tolist(), r.issues.tolist(), r.suggested.tolist()
        ([0.6, 0.75], [False, False, False, False, True], [0, 0, -1, 1, 1])
        >>> r.joint.tolist(), round(r.noise_rate, 2)
        ([[2, 1], [0, 1]], 0.25)
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = probs.shape
    thresholds = np.full(c, np.inf)
    for j in range(c):
        rows = labels == j
        if rows.any():
            thresholds[j] = probs[rows, j].mean()
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -np.inf)
    suggested = np.where(above.any(axis=1), masked.argmax(axis=1), -1)
    joint = np.zeros((c, c), dtype=np.int64)
    counted = suggested >= 0
    np.add.at(joint, (labels[counted], suggested[counted]), 1)
    issues = counted & (suggested != labels)
    return LabelIssues(issues, suggested, probs[np.arange(n), labels], thresholds, joint)


def crossval_probs(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    folds: int = 5,
    c: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """``(N, n_classes)`` out-of-sample probabilities: ``folds``-fold logistic regression.

    Features are standardised inside each fold; ``c`` is the inverse L2 strength (0.1 measured
    best on the default shapes world, seeds 0 and 1: precision 0.99 / 0.98, recall 0.76 /
    0.76 against the flipped labels, against 0.96 / 0.78 at ``c = 1``). Classes absent from a
    fold's training rows get probability 0 there. ``folds`` is capped by the rarest class's
    count (at least 2).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 20)
        >>> x = rng.normal(size=(40, 2)) + 3 * y[:, None]
        >>> p = crossval_probs(x, y, 2, folds=4)
        >>> p.shape, bool((p.argmax(1) == y).mean() > 0.9)
        ((40, 2), True)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    out = np.zeros((len(labels), n_classes))
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fit_rows, held in split.split(features, labels):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        clf.fit(features[fit_rows], labels[fit_rows])
        cls = clf.classes_
        out[np.ix_(held, cls)] = clf.predict_proba(features[held])
    return out
