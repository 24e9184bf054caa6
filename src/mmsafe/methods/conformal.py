"""Split conformal prediction sets for classifiers: LAC, APS and RAPS, marginal or Mondrian.

Split conformal prediction turns any classifier's probabilities into *prediction sets* with a
distribution-free guarantee. Given ``n`` labelled calibration rows and a conformity score
``s(x, y)`` (large = the label fits badly), take

    qhat = the ceil((n + 1) * (1 - alpha))-th smallest calibration score

and return ``C(x) = {y : s(x, y) <= qhat}``. If the calibration and test rows are
**exchangeable** (e.g. i.i.d. from one distribution), ``P(Y in C(X)) >= 1 - alpha`` over the
draw of both, and ``<= 1 - alpha + 1 / (n + 1)`` when the scores have no ties (randomized
scores). Nothing is assumed about the model. See Angelopoulos & Bates, "A Gentle Introduction
to Conformal Prediction" (2021).

Scores (``probs`` rows sum to one; labels ranked by decreasing probability, ties by class index):

* ``lac`` (Sadinle et al. 2019): ``1 - p_y``. Smallest sets on average; coverage may be uneven
  across classes.
* ``aps`` (Romano, Sesia & Candes 2020): total probability of the labels ranked above ``y``
  plus ``u * p_y``; ``u = 1`` (non-randomized) or ``u ~ U(0, 1)`` (randomized).
* ``raps`` (Angelopoulos et al. 2021): APS plus ``lam * max(0, rank(y) - k_reg)`` (``rank``
  is 1-based), which penalises long tails of unlikely labels.

Non-randomized APS/RAPS sets always contain the top-ranked label (as MAPIE's
``include_last_label=False`` and the RAPS reference code's ``disallow_zero_sets``); this only
adds coverage. Randomized sets and LAC sets may be empty. Randomized scores draw one ``u`` per
row, the same ``u`` for every candidate label of that row, which is distributionally the same
as Romano et al.'s randomized inclusion of the last label.

Mondrian (stratified) variants fit one ``qhat`` per class (class-conditional: ``P(Y in C(X) |
Y = c) >= 1 - alpha`` for each class) or per group (group-conditional: the same per group).
Strata with too few calibration rows for a finite quantile fall back to the marginal ``qhat``
and are recorded: they keep the marginal guarantee only.

Everything is vectorised numpy; 10^6 rows x 10 classes take about a second.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Score = Literal["lac", "aps", "raps"]
SCORES: tuple[str, ...] = ("lac", "aps", "raps")
MONDRIAN: tuple[str | None, ...] = (None, "class", "group")
FORMAT = "mmsafe.methods.conformal"
FORMAT_VERSION = 1

__all__ = [
    "SCORES",
    "ConformalPredictor",
    "NotFittedError",
    "StratifiedQuantiles",
    "aps_scores",
    "conformal_quantile",
    "conformity_scores",
    "coverage_under_shift",
    "fit_conformal_from_outputs",
    "label_scores",
    "lac_scores",
    "min_calibration_size",
    "prediction_sets",
    "raps_scores",
    "set_coverage",
    "set_sizes",
    "stratified_quantiles",
]


class NotFittedError(RuntimeError):
    """A :class:`ConformalPredictor` was used before ``fit`` (or ``load``)."""


# --------------------------------------------------------------------------- validation
def _probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"`probs` must be (N, C) class probabilities, got shape {p.shape}.")
    if not np.isfinite(p).all():
        raise ValueError("`probs` contains NaN or infinite values.")
    return p


def _labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"`labels` must be 1-D with {n} entries, got shape {y.shape}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"`labels` must be integer class indices, got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"`labels` must lie in [0, {n_classes}); drop unlabelled rows (label -1) first."
        )
    return y


def _level(confidence_level: Any) -> float:
    if not isinstance(confidence_level, numbers.Real) or not 0.0 < confidence_level < 1.0:
        raise ValueError(
            f"`confidence_level` must be in (0, 1), e.g. 0.9, got {confidence_level!r}."
        )
    return float(confidence_level)


def _score_name(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"Unknown conformity score {score!r}; choose one of {', '.join(SCORES)}.")
    return score


def _uniforms(n: int, randomized: bool, rng: Any) -> np.ndarray | None:
    if not randomized:
        return None
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return gen.uniform(size=n)


# --------------------------------------------------------------------------- scores
def conformity_scores(
    probs: Any,
    score: str = "aps",
    *,
    randomized: bool = False,
    rng: Any = None,
    u: np.ndarray | None = None,
    k_reg: int = 1,
    lam: float = 0.01,
) -> np.ndarray:
    """The conformity score of **every** candidate label of every row, ``(N, C)``.

    Args:
        probs: ``(N, C)`` class probabilities.
        score: ``lac``, ``aps`` or ``raps``.
        randomized: APS/RAPS: draw ``u ~ U(0, 1)`` per row (else ``u = 1``). Ignored for LAC.
        rng: seed or ``np.random.Generator`` for ``u``.
        u: ``(N,)`` uniforms to use instead of drawing them (overrides ``randomized``/``rng``).
        k_reg: RAPS: ranks up to ``k_reg`` are not penalised.
        lam: RAPS: penalty per rank beyond ``k_reg``.

    Returns:
        ``(N, C)`` float64 scores; label ``y`` of row ``i`` is in the set iff
        ``scores[i, y] <= qhat``.

    Example:
        >>> p = np.array([[0.5, 0.3, 0.2]])
        >>> conformity_scores(p, "aps").round(2).tolist()
        [[0.5, 0.8, 1.0]]
        >>> conformity_scores(p, "raps", k_reg=1, lam=0.1).round(2).tolist()
        [[0.5, 0.9, 1.2]]
    """
    p = _probs(probs)
    score = _score_name(score)
    if score == "lac":
        return 1.0 - p
    n, c = p.shape
    order = np.argsort(-p, axis=1, kind="stable")  # decreasing, ties by class index
    sorted_p = np.take_along_axis(p, order, axis=1)
    cum = np.cumsum(sorted_p, axis=1)
    if u is None:
        u = _uniforms(n, randomized, rng)
    if u is not None:
        u = np.asarray(u, dtype=np.float64).reshape(n, 1)
        cum -= (1.0 - u) * sorted_p  # labels above y, plus u * p_y
    if score == "raps":
        cum += lam * np.maximum(0.0, np.arange(1, c + 1, dtype=np.float64) - k_reg)
    out = np.empty_like(cum)
    np.put_along_axis(out, order, cum, axis=1)
    return out


def label_scores(
    probs: Any,
    labels: Any,
    score: str = "aps",
    *,
    randomized: bool = False,
    rng: Any = None,
    k_reg: int = 1,
    lam: float = 0.01,
) -> np.ndarray:
    """The conformity score of each row's label, ``(N,)`` (the calibration scores).

    Computed with :func:`conformity_scores` and read off at the label, so calibration and
    prediction use bit-identical arithmetic.

    Example:
        >>> label_scores(np.array([[0.5, 0.3, 0.2]]), [1], "aps").round(2).tolist()
        [0.8]
    """
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    if score == "lac":  # no sort needed
        return 1.0 - p[np.arange(p.shape[0]), y]
    all_scores = conformity_scores(p, score, randomized=randomized, rng=rng, k_reg=k_reg, lam=lam)
    return np.take_along_axis(all_scores, y[:, None], axis=1)[:, 0]


def lac_scores(probs: Any, labels: Any) -> np.ndarray:
    """LAC scores ``1 - p_y``.

    Example:
        >>> lac_scores(np.array([[0.7, 0.3], [0.4, 0.6]]), [0, 0]).round(2).tolist()
        [0.3, 0.6]
    """
    return label_scores(probs, labels, "lac")


def aps_scores(probs: Any, labels: Any, *, randomized: bool = False, rng: Any = None) -> np.ndarray:
    """APS scores: probability of the labels ranked above ``y`` plus ``u * p_y``.

    Example:
        >>> aps_scores(np.array([[0.5, 0.3, 0.2]]), [2]).round(2).tolist()
        [1.0]
        >>> s = aps_scores(np.array([[0.5, 0.3, 0.2]]), [2], randomized=True, rng=0)
        >>> bool(0.8 <= s[0] <= 1.0)
        True
    """
    return label_scores(probs, labels, "aps", randomized=randomized, rng=rng)


def raps_scores(
    probs: Any,
    labels: Any,
    *,
    randomized: bool = False,
    rng: Any = None,
    k_reg: int = 1,
    lam: float = 0.01,
) -> np.ndarray:
    """RAPS scores: APS plus ``lam * max(0, rank(y) - k_reg)``.

    Example:
        >>> raps_scores(np.array([[0.5, 0.3, 0.2]]), [2], k_reg=1, lam=0.1).round(2).tolist()
        [1.2]
    """
    return label_scores(probs, labels, "raps", randomized=randomized, rng=rng, k_reg=k_reg, lam=lam)


# --------------------------------------------------------------------------- quantiles
def _rank(n: int, level: float) -> int:
    """``ceil((n + 1) * level)``, robust to float error at exact integers."""
    x = (n + 1) * level
    return int(math.ceil(x - 1e-9 * max(1.0, x)))


def min_calibration_size(confidence_level: float) -> int:
    """The fewest calibration rows for which :func:`conformal_quantile` is finite.

    Example:
        >>> min_calibration_size(0.9), min_calibration_size(0.95)
        (9, 19)
    """
    level = _level(confidence_level)
    n = max(1, int(math.floor(level / (1.0 - level))) - 1)
    while _rank(n, level) > n:
        n += 1
    return n


def conformal_quantile(scores: Any, confidence_level: float = 0.9) -> float:
    """The split-conformal threshold: the ``ceil((n + 1) * level)``-th smallest score.

    This is the empirical quantile at level ``ceil((n + 1) * level) / n`` (numpy's
    ``method="lower"``), as MAPIE computes it. When ``n < min_calibration_size(level)`` that
    rank exceeds ``n`` and the threshold is ``+inf``: every label enters every set, which is
    the only way to keep the guarantee with so few rows.

    Args:
        scores: ``(n,)`` calibration scores (finite).
        confidence_level: ``1 - alpha`` in ``(0, 1)``.

    Returns:
        ``qhat`` (``+inf`` when ``n`` is too small, including ``n = 0``).

    Example:
        >>> conformal_quantile(np.arange(1.0, 11.0), 0.9)  # ceil(11 * 0.9) = 10th smallest
        10.0
        >>> conformal_quantile(np.arange(1.0, 11.0), 0.8)  # ceil(8.8) = 9th
        9.0
        >>> conformal_quantile(np.arange(5.0), 0.9)
        inf
    """
    level = _level(confidence_level)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if np.isnan(s).any():
        raise ValueError("`scores` contains NaN.")
    n = s.size
    k = _rank(n, level)
    if n == 0 or k > n:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


@dataclass(frozen=True)
class StratifiedQuantiles:
    """One threshold per stratum (class or group), with the marginal one as fallback.

    Attributes:
        marginal: ``qhat`` over all calibration rows.
        per_stratum: ``{stratum: qhat}`` for every stratum seen in calibration; strata that
            fell back hold the marginal value.
        counts: ``{stratum: calibration rows}``.
        fallback: strata with fewer than ``min_count`` rows, given the marginal ``qhat``.
        min_count: the size below which a stratum falls back.
    """

    marginal: float
    per_stratum: Mapping[Any, float]
    counts: Mapping[Any, int]
    fallback: tuple[Any, ...]
    min_count: int


def stratified_quantiles(
    scores: Any,
    strata: Any,
    confidence_level: float = 0.9,
    *,
    min_count: int | None = None,
) -> StratifiedQuantiles:
    """Mondrian conformal: :func:`conformal_quantile` within each stratum.

    Args:
        scores: ``(n,)`` calibration scores.
        strata: ``(n,)`` stratum of each row: its label (class-conditional) or its group.
        confidence_level: ``1 - alpha``.
        min_count: strata with fewer calibration rows fall back to the marginal ``qhat``;
            default :func:`min_calibration_size` (the fewest rows giving a finite quantile).

    Example:
        >>> s = np.r_[np.linspace(0, 1, 50), np.linspace(0, 0.5, 50), [0.9, 0.8]]
        >>> g = ["a"] * 50 + ["b"] * 50 + ["c"] * 2
        >>> q = stratified_quantiles(s, g, 0.9)
        >>> round(q.per_stratum["a"], 3), round(q.per_stratum["b"], 3), q.fallback  # 46th of 50
        (0.918, 0.459, ('c',))
    """
    level = _level(confidence_level)
    s = np.asarray(scores, dtype=np.float64).ravel()
    keys = np.asarray(strata)
    if keys.shape != s.shape:
        raise ValueError(f"`strata` must have one entry per score, got {keys.shape} vs {s.shape}.")
    min_count = min_calibration_size(level) if min_count is None else int(min_count)
    marginal = conformal_quantile(s, level)
    uniq, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    per, counts, fallback = {}, {}, []
    for j, key in enumerate(uniq.tolist()):
        rows = s[order[bounds[j] : bounds[j + 1]]]
        counts[key] = int(rows.size)
        if rows.size < min_count:
            per[key] = marginal
            fallback.append(key)
        else:
            per[key] = conformal_quantile(rows, level)
    return StratifiedQuantiles(marginal, per, counts, tuple(fallback), min_count)


# --------------------------------------------------------------------------- sets
def prediction_sets(
    probs: Any,
    qhat: float | np.ndarray,
    score: str = "lac",
    *,
    randomized: bool = False,
    rng: Any = None,
    k_reg: int = 1,
    lam: float = 0.01,
) -> np.ndarray:
    """Boolean ``(N, C)`` prediction sets ``{y : s(x, y) <= qhat}``.

    Args:
        probs: ``(N, C)`` class probabilities.
        qhat: a float (marginal), a ``(C,)`` array (one threshold per candidate label:
            class-conditional) or an ``(N, 1)`` array (one per row: group-conditional).
        score: ``lac``, ``aps`` or ``raps`` (the score ``qhat`` was fitted with).
        randomized: APS/RAPS: randomized sets (may be empty); else the top label is always in.
        rng: seed or generator of the per-row uniforms.
        k_reg: RAPS rank allowance.
        lam: RAPS penalty.

    Returns:
        ``(N, C)`` bool; ``sets[i, y]`` says whether label ``y`` is in row ``i``'s set.

    Example:
        >>> p = np.array([[0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])
        >>> prediction_sets(p, 0.68, "lac").astype(int).tolist()
        [[1, 0, 0], [1, 1, 1]]
        >>> prediction_sets(p, 0.85, "aps").astype(int).tolist()
        [[1, 0, 0], [1, 1, 0]]
        >>> prediction_sets(p, 0.5, "aps").astype(int).tolist()  # the top label is always in
        [[1, 0, 0], [1, 0, 0]]
    """
    score = _score_name(score)
    s = conformity_scores(probs, score, randomized=randomized, rng=rng, k_reg=k_reg, lam=lam)
    q = np.asarray(qhat, dtype=np.float64)
    if q.ndim == 1 and q.shape[0] != s.shape[1]:
        raise ValueError(f"A 1-D `qhat` needs one threshold per class ({s.shape[1]}).")
    sets = s <= q
    if score != "lac" and not randomized:
        top = np.argmax(np.asarray(probs), axis=1)  # first maximum = rank 1 (stable order)
        sets[np.arange(sets.shape[0]), top] = True
    return sets


def set_sizes(sets: np.ndarray) -> np.ndarray:
    """Number of labels in each set, ``(N,)`` int.

    Example:
        >>> set_sizes(np.array([[True, False], [True, True]])).tolist()
        [1, 2]
    """
    return np.asarray(sets, dtype=bool).sum(axis=1)


def set_coverage(sets: np.ndarray, labels: Any) -> np.ndarray:
    """Whether each set contains its row's label, ``(N,)`` bool.

    Example:
        >>> set_coverage(np.array([[True, False], [True, False]]), [0, 1]).tolist()
        [True, False]
    """
    sets = np.asarray(sets, dtype=bool)
    y = _labels(labels, sets.shape[0], sets.shape[1])
    return sets[np.arange(sets.shape[0]), y]


# --------------------------------------------------------------------------- the hardener
def _qhat_to_json(q: float) -> float | None:
    return float(q) if math.isfinite(q) else None


def _qhat_from_json(q: float | None) -> float:
    return math.inf if q is None else float(q)


class ConformalPredictor:
    """A split-conformal set predictor over precomputed class probabilities (MAPIE-style).

    ``__init__`` stores configuration only; ``fit`` learns the thresholds (attributes ending
    in ``_``); ``predict_set`` returns boolean sets; ``save``/``load`` use JSON.

    Args:
        confidence_level: target coverage ``1 - alpha``.
        score: ``lac``, ``aps`` or ``raps``.
        mondrian: ``None`` (marginal), ``"class"`` (one threshold per class) or ``"group"``
            (one per group; ``fit`` and ``predict_set`` then need ``groups``).
        randomized: APS/RAPS randomized scores and sets (near-exact coverage, sets may be
            empty); else sets are conservative and never empty.
        k_reg: RAPS rank allowance.
        lam: RAPS penalty per rank beyond ``k_reg``.
        seed: seeds the uniforms of randomized scores (calibration) and sets (prediction).
        min_stratum_size: Mondrian strata with fewer calibration rows use the marginal
            threshold; default :func:`min_calibration_size`.

    Attributes:
        qhat_: the marginal threshold.
        class_qhat_: ``(C,)`` thresholds (``mondrian="class"``).
        group_qhat_: ``{group: threshold}`` (``mondrian="group"``).
        fallback_: strata that fell back to ``qhat_``.
        n_calibration_: calibration rows used.
        n_classes_: number of classes.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> probs = rng.dirichlet(np.ones(4), size=2000)
        >>> labels = (probs.cumsum(1) < rng.uniform(size=(2000, 1))).sum(1)
        >>> cp = ConformalPredictor(0.9, score="lac").fit(probs[:1000], labels[:1000])
        >>> sets = cp.predict_set(probs[1000:])
        >>> bool(abs(set_coverage(sets, labels[1000:]).mean() - 0.9) < 0.04)
        True
    """

    def __init__(
        self,
        confidence_level: float = 0.9,
        score: str = "aps",
        mondrian: str | None = None,
        randomized: bool = False,
        k_reg: int = 1,
        lam: float = 0.01,
        seed: int = 0,
        min_stratum_size: int | None = None,
    ) -> None:
        self.confidence_level = confidence_level
        self.score = score
        self.mondrian = mondrian
        self.randomized = randomized
        self.k_reg = k_reg
        self.lam = lam
        self.seed = seed
        self.min_stratum_size = min_stratum_size

    def get_params(self) -> dict[str, Any]:
        """The configuration, JSON-able."""
        return {
            "confidence_level": self.confidence_level,
            "score": self.score,
            "mondrian": self.mondrian,
            "randomized": self.randomized,
            "k_reg": self.k_reg,
            "lam": self.lam,
            "seed": self.seed,
            "min_stratum_size": self.min_stratum_size,
        }

    def _validate_config(self) -> None:
        _level(self.confidence_level)
        _score_name(self.score)
        if self.mondrian not in MONDRIAN:
            raise ValueError(f"`mondrian` must be None, 'class' or 'group', got {self.mondrian!r}.")
        if not (isinstance(self.k_reg, numbers.Integral) and self.k_reg >= 0):
            raise ValueError(f"`k_reg` must be a non-negative integer, got {self.k_reg!r}.")
        if not (isinstance(self.lam, numbers.Real) and self.lam >= 0):
            raise ValueError(f"`lam` must be non-negative, got {self.lam!r}.")

    def _kw(self) -> dict[str, Any]:
        return {"randomized": self.randomized, "k_reg": self.k_reg, "lam": self.lam}

    def fit(
        self, probs: Any, labels: Any, groups: Sequence[Any] | None = None
    ) -> ConformalPredictor:
        """Fit the thresholds on labelled calibration rows.

        Args:
            probs: ``(n, C)`` calibration probabilities.
            labels: ``(n,)`` labels in ``[0, C)`` (drop unlabelled rows first).
            groups: ``(n,)`` group of each row; required when ``mondrian="group"``.

        Returns:
            ``self``.
        """
        self._validate_config()
        p = _probs(probs)
        y = _labels(labels, p.shape[0], p.shape[1])
        if p.shape[0] == 0:
            raise ValueError("Cannot fit a conformal predictor on zero calibration rows.")
        s = label_scores(p, y, self.score, rng=np.random.default_rng(self.seed), **self._kw())
        level = float(self.confidence_level)
        self.n_calibration_ = int(p.shape[0])
        self.n_classes_ = int(p.shape[1])
        self.fallback_: list[Any] = []
        self.class_qhat_: np.ndarray | None = None
        self.group_qhat_: dict[str, float] | None = None
        self.stratum_counts_: dict[str, int] = {}
        self.qhat_ = conformal_quantile(s, level)
        if self.mondrian == "class":
            q = stratified_quantiles(s, y, level, min_count=self.min_stratum_size)
            per = np.full(self.n_classes_, self.qhat_)
            missing = [c for c in range(self.n_classes_) if c not in q.per_stratum]
            for c, v in q.per_stratum.items():
                per[int(c)] = v
            self.class_qhat_ = per
            self.fallback_ = sorted([int(c) for c in q.fallback] + missing)
            self.stratum_counts_ = {str(c): q.counts.get(c, 0) for c in range(self.n_classes_)}
        elif self.mondrian == "group":
            if groups is None:
                raise ValueError("mondrian='group' needs `groups` (one group per row) in fit().")
            g = np.asarray([str(v) for v in groups])
            if g.shape[0] != p.shape[0]:
                raise ValueError(f"`groups` must have {p.shape[0]} entries, got {g.shape[0]}.")
            q = stratified_quantiles(s, g, level, min_count=self.min_stratum_size)
            self.group_qhat_ = {str(k): float(v) for k, v in q.per_stratum.items()}
            self.fallback_ = [str(k) for k in q.fallback]
            self.stratum_counts_ = {str(k): int(v) for k, v in q.counts.items()}
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "qhat_"):
            raise NotFittedError(
                "This ConformalPredictor is not fitted yet: call fit(probs, labels) on labelled "
                "calibration rows (or ConformalPredictor.load(path)) before predict_set()."
            )

    def thresholds(self, n_rows: int, groups: Sequence[Any] | None = None) -> float | np.ndarray:
        """The threshold argument for :func:`prediction_sets`: float, ``(C,)`` or ``(N, 1)``.

        Groups not seen in calibration get the marginal ``qhat_``.
        """
        self._check_fitted()
        if self.mondrian == "class":
            return np.asarray(self.class_qhat_, dtype=np.float64)
        if self.mondrian == "group":
            if groups is None:
                raise ValueError("mondrian='group' needs `groups` in predict_set().")
            if len(groups) != n_rows:
                raise ValueError(f"`groups` must have {n_rows} entries, got {len(groups)}.")
            table = self.group_qhat_ or {}
            return np.array([table.get(str(v), self.qhat_) for v in groups])[:, None]
        return self.qhat_

    def predict_set(self, probs: Any, groups: Sequence[Any] | None = None) -> np.ndarray:
        """Prediction sets as an ``(N, C)`` bool array.

        Randomized sets draw their uniforms from ``seed`` (a stream apart from the
        calibration one), so the same call gives the same sets.
        """
        self._check_fitted()
        p = _probs(probs)
        if p.shape[1] != self.n_classes_:
            raise ValueError(f"Fitted on {self.n_classes_} classes, got {p.shape[1]}.")
        q = self.thresholds(p.shape[0], groups)
        rng = np.random.default_rng([int(self.seed), 1])
        return prediction_sets(p, q, self.score, rng=rng, **self._kw())

    def to_dict(self) -> dict[str, Any]:
        """The configuration and fitted state, JSON-able (``+inf`` thresholds as ``null``)."""
        self._check_fitted()
        fitted = {
            "qhat": _qhat_to_json(self.qhat_),
            "n_calibration": self.n_calibration_,
            "n_classes": self.n_classes_,
            "class_qhat": None
            if self.class_qhat_ is None
            else [_qhat_to_json(v) for v in self.class_qhat_],
            "group_qhat": None
            if self.group_qhat_ is None
            else {k: _qhat_to_json(v) for k, v in self.group_qhat_.items()},
            "fallback": list(self.fallback_),
            "stratum_counts": dict(self.stratum_counts_),
        }
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "params": self.get_params(),
            "fitted": fitted,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConformalPredictor:
        """Rebuild a fitted predictor from :meth:`to_dict` output."""
        if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"Not a {FORMAT} v{FORMAT_VERSION} file (format={d.get('format')!r}, "
                f"version={d.get('version')!r})."
            )
        obj = cls(**d["params"])
        obj._validate_config()
        f = d["fitted"]
        obj.qhat_ = _qhat_from_json(f["qhat"])
        obj.n_calibration_ = int(f["n_calibration"])
        obj.n_classes_ = int(f["n_classes"])
        cq = f.get("class_qhat")
        obj.class_qhat_ = None if cq is None else np.array([_qhat_from_json(v) for v in cq])
        gq = f.get("group_qhat")
        obj.group_qhat_ = None if gq is None else {k: _qhat_from_json(v) for k, v in gq.items()}
        obj.fallback_ = list(f.get("fallback", []))
        obj.stratum_counts_ = dict(f.get("stratum_counts", {}))
        return obj

    def save(self, path: str | Path) -> Path:
        """Write the fitted predictor as JSON; returns the path."""
        from mmsafe.engine.cache import atomic_write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConformalPredictor:
        """Read a predictor written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ConformalPredictor({args})"


def fit_conformal_from_outputs(
    probs: Any, labels: Any, groups: Sequence[Any] | None = None, **options: Any
) -> ConformalPredictor:
    """Fit a :class:`ConformalPredictor` on task outputs, dropping unlabelled rows (label -1).

    Args:
        probs: ``(N, C)`` probabilities (``Outputs.probs``).
        labels: ``(N,)`` labels, ``-1`` where unlabelled.
        groups: optional ``(N,)`` groups.
        **options: :class:`ConformalPredictor` arguments.

    Example:
        >>> p = np.tile([[0.8, 0.2]], (20, 1)); y = np.r_[np.zeros(19, int), -1]
        >>> fit_conformal_from_outputs(p, y, score="lac").n_calibration_
        19
    """
    y = np.asarray(labels).astype(np.int64)
    keep = y >= 0
    g = None if groups is None else [v for v, k in zip(groups, keep, strict=True) if k]
    return ConformalPredictor(**options).fit(np.asarray(probs)[keep], y[keep], groups=g)


def coverage_under_shift(
    predictor: ConformalPredictor,
    shifted: Mapping[str, tuple[Any, Any]],
    groups: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """Coverage and mean set size of a fitted predictor on shifted inputs (the robustness hook).

    Args:
        predictor: fitted on clean calibration rows.
        shifted: ``{shift name: (probs, labels)}`` outputs under each shift (labelled rows).
        groups: ``{shift name: groups}`` when the predictor is group-conditional.

    Returns:
        ``{shift name: {"coverage": ..., "mean_set_size": ...}}``.

    Example:
        >>> cp = ConformalPredictor(0.9, score="lac").fit(np.tile([[0.8, 0.2]], (20, 1)),
        ...                                              np.zeros(20, int))
        >>> coverage_under_shift(cp, {"flip": (np.tile([[0.2, 0.8]], (5, 1)), np.zeros(5, int))})
        {'flip': {'coverage': 0.0, 'mean_set_size': 1.0}}
    """
    out = {}
    for name, (probs, labels) in shifted.items():
        sets = predictor.predict_set(probs, None if groups is None else groups.get(name))
        out[name] = {
            "coverage": float(set_coverage(sets, labels).mean()),
            "mean_set_size": float(set_sizes(sets).mean()),
        }
    return out
