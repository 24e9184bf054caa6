"""MAPIE 1.6 as a reference for split conformal sets on precomputed probabilities.

Shared by ``tests/test_conformal.py`` and ``bench/conformal.py`` so both compare mmsafe with the
same MAPIE configuration. MAPIE wants an estimator and features; here the "features" are row
indices into a fixed probability matrix, served by a prefit :class:`Lookup` classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mapie.classification import SplitConformalClassifier
from mapie.conformity_scores import APSConformityScore, RAPSConformityScore
from mapie.conformity_scores.sets.utils import get_true_label_position
from sklearn.base import BaseEstimator, ClassifierMixin


class Lookup(ClassifierMixin, BaseEstimator):
    """A prefit classifier whose input is a row index into precomputed probabilities."""

    def __init__(self, probs: np.ndarray | None = None) -> None:
        self.probs = probs

    def fit(self, X, y=None):  # noqa: N803
        self.classes_ = np.arange(self.probs.shape[1])
        return self

    def predict_proba(self, X):  # noqa: N803
        return self.probs[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):  # noqa: N803
        return self.predict_proba(X).argmax(1)


class DeterministicAPS(APSConformityScore):
    """MAPIE's APS always randomizes calibration scores; this is its ``u = 1`` version."""

    def get_conformity_scores(self, y, y_pred, y_enc=None, **kwargs):
        scores, self.cutoff = self.get_true_label_cumsum_proba(y, y_pred, self.classes)
        return scores


class DeterministicRAPS(RAPSConformityScore):
    """MAPIE's RAPS with ``u = 1`` calibration scores (its k/lambda search unchanged)."""

    def get_conformity_scores(self, y, y_pred, y_enc=None, **kwargs):
        params = kwargs.pop("predict_params", {})
        est = self.predictor.single_estimator_
        self.y_pred_proba_raps = est.predict_proba(self.X_raps, **params)
        self.position_raps = get_true_label_position(self.y_pred_proba_raps, self.y_raps)
        scores, self.cutoff = self.get_true_label_cumsum_proba(y, y_pred, self.classes)
        return scores


SCORES = {"lac": lambda: "lac", "aps": lambda: "aps", "raps": lambda: "raps"}
DETERMINISTIC = {"lac": lambda: "lac", "aps": DeterministicAPS, "raps": DeterministicRAPS}


@dataclass
class MapieRun:
    """MAPIE's sets for the test rows and what mmsafe needs to reproduce its fit."""

    sets: np.ndarray
    """``(N_test, C)`` bool prediction sets."""
    qhat: float
    """MAPIE's fitted conformity-score quantile."""
    rows: np.ndarray
    """The calibration rows MAPIE's quantile used (RAPS holds some out to tune k and lambda)."""
    kw: dict[str, Any] = field(default_factory=dict)
    """``k_reg`` / ``lam`` as MAPIE tuned them (RAPS), for :class:`ConformalPredictor`."""


def mapie_sets(
    score: str,
    probs: np.ndarray,
    labels: np.ndarray,
    cal: np.ndarray,
    test: np.ndarray,
    level: float,
    *,
    randomized: bool,
) -> MapieRun:
    """Fit MAPIE on the ``cal`` rows and predict sets for the ``test`` rows.

    Args:
        score: ``lac``, ``aps`` or ``raps``.
        probs: ``(N, C)`` probabilities of every row.
        labels: ``(N,)`` labels.
        cal: calibration row indices.
        test: test row indices.
        level: the confidence level.
        randomized: APS/RAPS: MAPIE's defaults (randomized calibration scores,
            ``include_last_label="randomized"``); else ``u = 1`` calibration scores and
            ``include_last_label=False``, which is mmsafe's non-randomized mode exactly.

    Returns:
        The sets, MAPIE's quantile, the calibration rows it used and its RAPS parameters.
    """
    x = np.arange(len(probs))[:, None]
    est = Lookup(probs).fit(x[:1], labels[:1])
    conformity = (SCORES if randomized else DETERMINISTIC)[score]()
    m = SplitConformalClassifier(
        est, confidence_level=level, conformity_score=conformity, prefit=True, random_state=0
    ).conformalize(x[cal], labels[cal])
    include = True if score == "lac" else ("randomized" if randomized else False)
    _, sets = m.predict_set(x[test], conformity_score_params={"include_last_label": include})
    fn = m._mapie_classifier.conformity_score_function_
    rows, kw = np.asarray(cal), {}
    if score == "raps":  # MAPIE tunes k and lambda on a held-out part of the calibration rows
        kw = {"k_reg": int(np.ravel(fn.k_star)[0]), "lam": float(np.ravel(fn.lambda_star)[0])}
        rows = np.setdiff1d(cal, fn.X_raps[:, 0])
    return MapieRun(sets[:, :, 0], float(np.ravel(fn.quantiles_)[0]), rows, kw)
