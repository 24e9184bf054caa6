"""DOMINO-style slice discovery: an error-aware Gaussian mixture over cross-modal embeddings.

The method (Eyuboglu et al., ICLR 2022, "Domino"; see ``docs/slices.md``):

1. Reduce the embeddings with PCA (:func:`fit_pca`), to at most 128 dimensions.
2. Fit a mixture of ``K`` components by EM (:func:`fit_error_aware_mixture`). Each component
   ``s`` has a diagonal Gaussian over the embedding ``z``, a categorical over the label ``y`` and a
   categorical over the prediction ``y_hat``; the E-step maximises the *weighted* log-likelihood
   ``sum_i log sum_s P(s) N(z_i; mu_s, diag(var_s)) P(y_i|s)^gamma_y P(y_hat_i|s)^gamma_yhat``, so
   the components are coherent in embedding space *and* homogeneous in error type.
3. Score each component as a slice (:func:`score_slices`): hard assignment by arg-max membership,
   error rate with an exact binomial (Clopper-Pearson) interval, and a one-sided Fisher exact
   test that its error rate exceeds the rest, Benjamini-Hochberg adjusted across components
   (:func:`benjamini_hochberg`).
4. Describe a slice (:func:`rank_phrases`) by ranking text phrases by ``<t_phrase, delta>``, with
   ``delta = mean(z | slice) - mean(z)``, in the shared image-text space.

Everything is numpy, vectorised, and streams over the rows in chunks: each EM iteration is one
pass that accumulates the sufficient statistics of the next M-step, so time and memory grow
linearly in the number of rows (the only ``(N, K)`` array is the returned memberships).

Example:
    >>> rng = np.random.default_rng(0)
    >>> z = np.r_[rng.normal(0, 1, (200, 4)), rng.normal(4, 1, (100, 4))]
    >>> y = np.zeros(300, dtype=int); preds = y.copy(); preds[200:260] = 1
    >>> fit = fit_error_aware_mixture(z, np.eye(2)[y], np.eye(2)[preds], n_slices=2, seed=0)
    >>> table = score_slices(fit.memberships, preds == y)
    >>> int(table.order[0]), round(float(table.error_rate[table.order[0]]), 2)
    (1, 0.6)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special, stats

__all__ = [
    "MixtureResult",
    "PCAResult",
    "SliceTable",
    "benjamini_hochberg",
    "clopper_pearson",
    "default_vocabulary",
    "discover_slices",
    "fisher_greater_pvalues",
    "fit_error_aware_mixture",
    "fit_pca",
    "rank_phrases",
    "score_slices",
]

DEFAULT_CHUNK = 65_536
"""Rows per chunk of every streaming pass (about 35 MiB of float64 temporaries at 64 dims)."""

Init = Literal["kmeans++", "confusion"]
SoftPredictions = Literal["plug_in", "expected_log"]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# --------------------------------------------------------------------------------------- PCA
@dataclass(frozen=True)
class PCAResult:
    """A fitted PCA: ``transform(x) = (x - mean) @ components``.

    Attributes:
        mean: ``(D,)`` column means.
        components: ``(D, d)`` orthonormal principal directions, by decreasing variance.
        explained_variance: ``(d,)`` variance along each direction (``N - 1`` denominator).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    def transform(self, x: np.ndarray, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
        """Project ``(N, D)`` rows to ``(N, d)`` float32, chunk by chunk."""
        out = np.empty((x.shape[0], self.components.shape[1]), dtype=np.float32)
        for sl in _chunks(x.shape[0], chunk_size):
            out[sl] = (np.asarray(x[sl], dtype=np.float64) - self.mean) @ self.components
        return out


def fit_pca(x: np.ndarray, n_components: int = 128, chunk_size: int = DEFAULT_CHUNK) -> PCAResult:
    """PCA by an eigen-decomposition of the covariance, accumulated in chunks (linear in ``N``).

    The number of components is capped at ``min(n_components, D, N - 1)``. Each direction's sign
    is fixed so that its largest-magnitude coordinate is positive (deterministic output).

    Args:
        x: ``(N, D)`` rows, ``N >= 2``.
        n_components: how many directions to keep at most.
        chunk_size: rows per pass.

    Returns:
        The fitted :class:`PCAResult`.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(500, 3)) * [3.0, 1.0, 0.1]
        >>> p = fit_pca(x, 2)
        >>> p.components.shape, np.round(p.explained_variance, 0).tolist()
        ((3, 2), [9.0, 1.0])
    """
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {n}.")
    k = int(max(1, min(n_components, dim, n - 1)))
    total = np.zeros(dim)
    for sl in _chunks(n, chunk_size):
        total += np.asarray(x[sl], dtype=np.float64).sum(axis=0)
    mean = total / n
    scatter = np.zeros((dim, dim))
    for sl in _chunks(n, chunk_size):
        c = np.asarray(x[sl], dtype=np.float64) - mean
        scatter += c.T @ c
    values, vectors = np.linalg.eigh(scatter / (n - 1))
    order = np.argsort(values)[::-1][:k]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    return PCAResult(mean, vectors * np.where(signs == 0, 1.0, signs), values)


# --------------------------------------------------------------------------------------- EM
@dataclass(frozen=True)
class MixtureResult:
    """A fitted error-aware mixture.

    Attributes:
        memberships: ``(N, K)`` posterior slice memberships (rows sum to 1).
        means: ``(K, d)`` component means.
        variances: ``(K, d)`` diagonal variances.
        weights: ``(K,)`` mixing weights ``P(s)``.
        label_probs: ``(K, C)`` ``P(y = j | s)``.
        pred_probs: ``(K, C)`` ``P(y_hat = j | s)``.
        log_likelihood: mean weighted log-likelihood per row after each E-step.
        converged: whether the last improvement fell below ``tol``.
    """

    memberships: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    label_probs: np.ndarray
    pred_probs: np.ndarray
    log_likelihood: tuple[float, ...]
    converged: bool

    @property
    def hard(self) -> np.ndarray:
        """``(N,)`` arg-max slice of each row."""
        return self.memberships.argmax(axis=1)


@dataclass
class _Params:
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    label_probs: np.ndarray
    pred_probs: np.ndarray


_EPS = np.finfo(np.float64).eps


def _log_joint(
    p: _Params,
    z: np.ndarray,
    y: np.ndarray,
    yhat: np.ndarray,
    gamma_y: float,
    gamma_yhat: float,
    soft: SoftPredictions,
) -> np.ndarray:
    """``(n, K)`` weighted log ``P(s) N(z|s) P(y|s)^gy P(yhat|s)^gyh`` for one chunk."""
    prec = 1.0 / p.variances
    log_det = np.log(p.variances).sum(axis=1)
    maha = (z * z) @ prec.T - 2.0 * z @ (p.means * prec).T + (p.means**2 * prec).sum(axis=1)
    out = -0.5 * (z.shape[1] * math.log(2 * math.pi) + log_det + maha) + np.log(p.weights)
    if gamma_y:
        out += gamma_y * np.log(y @ p.label_probs.T + _EPS)
    if gamma_yhat:
        if soft == "plug_in":
            out += gamma_yhat * np.log(yhat @ p.pred_probs.T + _EPS)
        else:
            out += gamma_yhat * (yhat @ np.log(p.pred_probs + _EPS).T)
    return out


class _Stats:
    """Sufficient statistics of the M-step, accumulated chunk by chunk."""

    def __init__(self, k: int, d: int, c: int) -> None:
        self.nk = np.zeros(k)
        self.sz = np.zeros((k, d))
        self.szz = np.zeros((k, d))
        self.sy = np.zeros((k, c))
        self.syhat = np.zeros((k, c))

    def add(self, r: np.ndarray, z: np.ndarray, y: np.ndarray, yhat: np.ndarray) -> None:
        self.nk += r.sum(axis=0)
        self.sz += r.T @ z
        self.szz += r.T @ (z * z)
        self.sy += r.T @ y
        self.syhat += r.T @ yhat

    def params(self, n: int, reg_covar: float) -> _Params:
        nk = self.nk + 10 * _EPS
        means = self.sz / nk[:, None]
        variances = np.maximum(self.szz / nk[:, None] - means**2, 0.0) + reg_covar
        label_probs = self.sy / nk[:, None]
        pred_probs = self.syhat / nk[:, None]
        return _Params(nk / n, means, variances, label_probs, pred_probs)


def _as_float(a: np.ndarray, sl: slice) -> np.ndarray:
    return np.asarray(a[sl], dtype=np.float64)


def _kmeanspp_centres(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) on ``x``; returns ``(k, d)`` centres."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1))
    return np.array(centres)


def _kmeans_init(
    z: np.ndarray, k: int, rng: np.random.Generator, sample: int = 20_000, lloyd_iter: int = 20
) -> np.ndarray:
    """Centres from k-means++ then Lloyd iterations, on a random subsample of at most ``sample``."""
    idx = np.sort(rng.choice(len(z), size=min(sample, len(z)), replace=False))
    x = np.asarray(z[idx], dtype=np.float64)
    centres = _kmeanspp_centres(x, k, rng)
    for _ in range(lloyd_iter):
        assign = _nearest(x, centres)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        if np.allclose(new, centres):
            break
        centres = new
    return centres


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(axis=1)[:, None] - 2 * x @ centres.T + (centres**2).sum(axis=1)
    return d2.argmin(axis=1)


def _confusion_resp(
    y: np.ndarray, yhat: np.ndarray, k: int, cells: list[tuple[int, int]], noise: np.ndarray
) -> np.ndarray:
    """DOMINO's confusion initialisation of the responsibilities of one chunk.

    Component ``j`` is tied to cell ``cells[j % len(cells)]``; rows in that cell get ``1``, others
    ``0``, each row is normalised, noise is added and rows are normalised again.
    """
    r = np.stack([y[:, a] * yhat[:, b] for a, b in (cells[j % len(cells)] for j in range(k))], 1)
    r = r / np.maximum(r.sum(axis=1, keepdims=True), _EPS)
    r = r + noise
    return r / r.sum(axis=1, keepdims=True)


def fit_error_aware_mixture(
    emb: np.ndarray,
    labels_onehot: np.ndarray,
    pred_probs: np.ndarray,
    n_slices: int = 12,
    gamma_y: float = 1.0,
    gamma_yhat: float = 1.0,
    max_iter: int = 100,
    seed: int = 0,
    init: Init = "kmeans++",
    tol: float = 1e-5,
    reg_covar: float = 1e-6,
    soft_predictions: SoftPredictions = "plug_in",
    confusion_noise: float = 1e-3,
    chunk_size: int = DEFAULT_CHUNK,
) -> MixtureResult:
    """Fit DOMINO's error-aware Gaussian mixture by EM (diagonal covariances).

    The E-step term of the soft predictions is, as in DOMINO's code, the categorical PMF with the
    soft prediction plugged in, ``gamma_yhat * log(sum_j yhat_ij P(yhat=j|s))``
    (``soft_predictions="plug_in"``); ``"expected_log"`` uses
    ``gamma_yhat * sum_j yhat_ij log P(yhat=j|s)`` instead. Both agree for one-hot predictions.
    The M-step is the soft update ``P(yhat=j|s) = sum_i r_is yhat_ij / sum_i r_is`` (same for
    ``y``), the responsibility-weighted mean and variance (plus ``reg_covar``), and
    ``P(s) = mean_i r_is``.

    Initialisation (both deterministic given ``seed``):

    * ``"kmeans++"``: k-means++ seeding and up to 20 Lloyd iterations on a random subsample of at
      most 20 000 rows; every row is then hard-assigned to its nearest centre and the first
      M-step runs on these one-hot responsibilities.
    * ``"confusion"`` (DOMINO): component ``j`` is tied to a cell ``(y, y_hat)`` of the confusion
      matrix, round-robin over the non-empty cells sorted by decreasing count, with uniform noise
      in ``(0, confusion_noise]`` added to the responsibilities.

    Each iteration streams over the rows in chunks of ``chunk_size``, so time and memory are
    linear in ``N``.

    Args:
        emb: ``(N, d)`` embeddings (reduce them with :func:`fit_pca` first).
        labels_onehot: ``(N, C)`` one-hot (or soft) labels.
        pred_probs: ``(N, C)`` predicted probabilities (or one-hot predictions).
        n_slices: number of mixture components ``K``.
        gamma_y: weight of the label term.
        gamma_yhat: weight of the prediction term.
        max_iter: EM iterations at most.
        seed: seed of the initialisation.
        init: ``"kmeans++"`` or ``"confusion"``.
        tol: stop when the mean log-likelihood improves by less than this.
        reg_covar: added to every variance.
        soft_predictions: ``"plug_in"`` (DOMINO) or ``"expected_log"``.
        confusion_noise: noise scale of the confusion initialisation.
        chunk_size: rows per streaming pass.

    Returns:
        The fitted :class:`MixtureResult`.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> z = np.r_[rng.normal(-3, 1, (150, 2)), rng.normal(3, 1, (50, 2))]
        >>> y = np.eye(2)[np.zeros(200, dtype=int)]
        >>> fit = fit_error_aware_mixture(z, y, y, n_slices=2, seed=0)
        >>> sorted(np.round(fit.weights, 2).tolist()), fit.memberships.shape
        ([0.25, 0.75], (200, 2))
    """
    n, d = emb.shape
    if labels_onehot.ndim != 2 or pred_probs.shape != labels_onehot.shape:
        raise ValueError("labels_onehot and pred_probs must both be (N, C) with the same shape.")
    if labels_onehot.shape[0] != n:
        raise ValueError(f"{n} embeddings but {labels_onehot.shape[0]} label rows.")
    k = int(n_slices)
    if not 1 <= k <= n:
        raise ValueError(f"n_slices must be in [1, N={n}], got {n_slices}.")
    c = labels_onehot.shape[1]
    rng = np.random.default_rng(seed)

    stats0 = _Stats(k, d, c)
    if init == "kmeans++":
        centres = _kmeans_init(emb, k, rng)
        for sl in _chunks(n, chunk_size):
            z = _as_float(emb, sl)
            r = np.eye(k)[_nearest(z, centres)]
            stats0.add(r, z, _as_float(labels_onehot, sl), _as_float(pred_probs, sl))
    elif init == "confusion":
        counts = np.zeros((c, c))
        for sl in _chunks(n, chunk_size):
            counts += _as_float(labels_onehot, sl).T @ _as_float(pred_probs, sl)
        flat = np.argsort(-counts, axis=None, kind="stable")
        cells = [divmod(int(i), c) for i in flat if counts.flat[i] > 0]
        for sl in _chunks(n, chunk_size):
            y, yhat = _as_float(labels_onehot, sl), _as_float(pred_probs, sl)
            noise = rng.uniform(0.0, 1.0, (sl.stop - sl.start, k)) * confusion_noise
            r = _confusion_resp(y, yhat, k, cells, noise)
            stats0.add(r, _as_float(emb, sl), y, yhat)
    else:
        raise ValueError(f"init must be 'kmeans++' or 'confusion', got {init!r}.")
    params = stats0.params(n, reg_covar)

    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        stats = _Stats(k, d, c)
        total = 0.0
        for sl in _chunks(n, chunk_size):
            z, y, yhat = _as_float(emb, sl), _as_float(labels_onehot, sl), _as_float(pred_probs, sl)
            logp = _log_joint(params, z, y, yhat, gamma_y, gamma_yhat, soft_predictions)
            norm = special.logsumexp(logp, axis=1)
            total += float(norm.sum())
            stats.add(np.exp(logp - norm[:, None]), z, y, yhat)
        history.append(total / n)
        params = stats.params(n, reg_covar)
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
            converged = True
            break

    memberships = np.empty((n, k))
    for sl in _chunks(n, chunk_size):
        z, y, yhat = _as_float(emb, sl), _as_float(labels_onehot, sl), _as_float(pred_probs, sl)
        logp = _log_joint(params, z, y, yhat, gamma_y, gamma_yhat, soft_predictions)
        memberships[sl] = np.exp(logp - special.logsumexp(logp, axis=1)[:, None])
    return MixtureResult(
        memberships=memberships,
        means=params.means,
        variances=params.variances,
        weights=params.weights,
        label_probs=params.label_probs,
        pred_probs=params.pred_probs,
        log_likelihood=tuple(history),
        converged=converged,
    )


# ------------------------------------------------------------------------------- statistics
def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple:
    """Benjamini-Hochberg step-up procedure (false discovery rate control, independent tests).

    Adjusted p-values are ``min_{j >= i} p_(j) * m / j`` over the sorted p-values, capped at 1
    (the same as ``scipy.stats.false_discovery_control(p, method="bh")``); a hypothesis is
    rejected when its adjusted p-value is ``<= alpha``.

    Args:
        pvalues: ``(m,)`` p-values in ``[0, 1]``.
        alpha: the false discovery rate to control.

    Returns:
        ``(rejected, adjusted)``: a boolean ``(m,)`` array and the ``(m,)`` adjusted p-values.

    Example:
        >>> rej, adj = benjamini_hochberg([0.01, 0.04, 0.03, 0.2], alpha=0.05)
        >>> rej.tolist(), np.round(adj, 3).tolist()
        ([True, False, False, False], [0.04, 0.053, 0.053, 0.2])
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D, got shape {p.shape}.")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("pvalues must lie in [0, 1] (no NaN).")
    m = p.size
    if m == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted <= alpha, adjusted


def fisher_greater_pvalues(errors_in: np.ndarray, size_in: np.ndarray, errors: int, n: int):
    """One-sided Fisher exact p-values that a slice's error rate exceeds the rest's.

    For a slice of ``size_in`` rows with ``errors_in`` errors out of ``errors`` errors in ``n``
    rows, the p-value is ``P(X >= errors_in)`` with ``X ~ Hypergeometric(n, errors, size_in)``,
    i.e. ``scipy.stats.fisher_exact([[e_in, s_in - e_in], [e_out, s_out - e_out]],
    alternative="greater")``, vectorised over slices.

    Example:
        >>> float(np.round(fisher_greater_pvalues(np.array([8]), np.array([10]), 20, 100)[0], 6))
        2.4e-05
    """
    e_in, s_in = np.asarray(errors_in), np.asarray(size_in)
    return np.clip(stats.hypergeom.sf(e_in - 1, n, errors, s_in), 0.0, 1.0)


def clopper_pearson(k: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple:
    """Exact (Clopper-Pearson) binomial intervals for ``k`` successes in ``n`` trials.

    Example:
        >>> lo, hi = clopper_pearson(np.array([5]), np.array([10]))
        >>> round(float(lo[0]), 4), round(float(hi[0]), 4)
        (0.1871, 0.8129)
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    a = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(a, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - a, k + 1, n - k), 1.0)
    empty = n == 0
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


@dataclass(frozen=True)
class SliceTable:
    """Per-slice statistics under hard (arg-max) assignment.

    Attributes:
        size: ``(K,)`` rows assigned to each slice.
        errors: ``(K,)`` misclassified rows in each slice.
        error_rate: ``(K,)`` ``errors / size`` (NaN for an empty slice).
        accuracy_ci: ``(K, 2)`` exact 95% interval of each slice's accuracy.
        p_value: ``(K,)`` one-sided Fisher p-value (slice error rate > rest).
        p_adjusted: ``(K,)`` Benjamini-Hochberg adjusted p-values.
        significant: ``(K,)`` ``p_adjusted <= alpha``.
        score: ``(K,)`` the ranking score (see :func:`score_slices`).
        order: ``(K,)`` slice indices, best (most error-prone) first.
        overall_error: the error rate of all rows.
    """

    size: np.ndarray
    errors: np.ndarray
    error_rate: np.ndarray
    accuracy_ci: np.ndarray
    p_value: np.ndarray
    p_adjusted: np.ndarray
    significant: np.ndarray
    score: np.ndarray
    order: np.ndarray
    overall_error: float


def score_slices(
    memberships: np.ndarray,
    correct: np.ndarray,
    alpha: float = 0.05,
    min_size: int = 5,
) -> SliceTable:
    """Error rate, exact CI and BH-adjusted one-sided Fisher test of each slice; a ranking.

    Rows are hard-assigned to their arg-max slice (as DOMINO's ``predict``). Slices are ranked by
    the *lower* end of the 95% Clopper-Pearson interval of their error rate: this orders by error
    rate while discounting small slices whose high rate could be chance (a 2-row slice with 2
    errors has a lower bound of 0.16, a 40-row slice with 30 errors 0.59). Slices smaller than
    ``min_size`` rank last.

    Args:
        memberships: ``(N, K)`` slice memberships.
        correct: ``(N,)`` whether each row was classified correctly.
        alpha: the false discovery rate of the Benjamini-Hochberg correction.
        min_size: slices with fewer rows rank last.

    Returns:
        A :class:`SliceTable`.
    """
    n, k = memberships.shape
    correct = np.asarray(correct, dtype=bool)
    hard = memberships.argmax(axis=1)
    size = np.bincount(hard, minlength=k)
    errors = np.bincount(hard, weights=(~correct).astype(np.float64), minlength=k).astype(int)
    total_errors = int((~correct).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(size > 0, errors / np.maximum(size, 1), np.nan)
    acc_lo, acc_hi = clopper_pearson(size - errors, size)
    err_lo = 1.0 - acc_hi
    pvals = np.where(size > 0, fisher_greater_pvalues(errors, size, total_errors, n), 1.0)
    rejected, adjusted = benjamini_hochberg(pvals, alpha)
    score = np.where(size >= min_size, np.nan_to_num(err_lo, nan=-1.0), -1.0 - 1.0 / (1 + size))
    order = np.lexsort((np.arange(k), -errors, -score))
    return SliceTable(
        size=size,
        errors=errors,
        error_rate=rate,
        accuracy_ci=np.stack([acc_lo, acc_hi], axis=1),
        p_value=pvals,
        p_adjusted=adjusted,
        significant=rejected & (size > 0),
        score=score,
        order=order,
        overall_error=total_errors / max(n, 1),
    )


# ------------------------------------------------------------------------------ descriptions
_STOPWORDS = frozenset(
    ("a", "an", "the", "of", "on", "in", "at", "to", "with", "and", "or", "for", "from", "by")
    + ("is", "are", "this", "that", "it", "its", "as", "into", "onto")
)
_ARTICLES = frozenset(("a", "an", "the"))
_WORD = re.compile(r"[a-z][a-z'-]*")


def default_vocabulary(
    classes: Sequence[str],
    captions: Sequence[str] = (),
    max_ngrams: int = 40,
    max_ngram_len: int = 4,
    class_templates: Sequence[str] = ("a photo of a {}.", "a {}."),
    combined_ngrams: int = 10,
) -> list[str]:
    """Candidate slice descriptions built from the class names and the captions (generic).

    * every class in every template of ``class_templates``;
    * caption n-grams (1 to ``max_ngram_len`` words, counted once per caption) that do not end
      with a stop word, are not only stop words, do not name a class, and are *closed* (no
      longer n-gram containing them occurs in as many captions: "on a light" is dropped when
      every caption with it says "on a light background"); the ``max_ngrams`` most frequent;
    * for each class, ``"a photo of a {class} {ngram}"`` with each of the ``combined_ngrams``
      most frequent of those n-grams that start with a connecting word (a stop word other than
      an article, e.g. "on a dark background", "at the top").

    Ties in frequency break alphabetically; the result has no duplicates, in that order.

    Example:
        >>> default_vocabulary(["cat"], ["a cat on the grass", "a dog on the grass"],
        ...                    class_templates=("a {}",))
        ['a cat', 'a photo of a cat on the grass', 'on the grass', 'dog on the grass']
    """
    class_words = {w for c in classes for w in _WORD.findall(c.lower())}
    counts: Counter[tuple[str, ...]] = Counter()
    for text in captions:
        words = tuple(_WORD.findall(str(text).lower()))
        counts.update(  # document frequency: each caption counts an n-gram once
            {
                words[i : i + n]
                for n in range(1, max_ngram_len + 1)
                for i in range(len(words) - n + 1)
            }
        )
    not_closed = {
        sub for h, c in counts.items() if len(h) > 1 for sub in (h[:-1], h[1:]) if counts[sub] == c
    }
    closed = [
        " ".join(g)
        for g in counts
        if g not in not_closed and g[-1] not in _STOPWORDS and not class_words.intersection(g)
    ]
    doc_freq = {g: counts[tuple(g.split())] for g in closed}
    ranked = sorted(closed, key=lambda g: (-doc_freq[g], g))[:max_ngrams]
    connected = [g for g in ranked if " " in g and g.split()[0] in _STOPWORDS - _ARTICLES]
    phrases = [t.format(c) for c in classes for t in class_templates]
    phrases += [f"a photo of a {c} {g}" for c in classes for g in connected[:combined_ngrams]]
    phrases += ranked
    return list(dict.fromkeys(phrases))


def rank_phrases(
    embeddings: np.ndarray, in_slice: np.ndarray, phrase_embeddings: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rank phrases by ``<t_phrase, mean(z | slice) - mean(z)>`` (DOMINO's mean describer).

    Args:
        embeddings: ``(N, D)`` embeddings in the shared image-text space.
        in_slice: ``(N,)`` boolean slice membership.
        phrase_embeddings: ``(P, D)`` text embeddings of the candidate phrases.

    Returns:
        ``(order, scores)``: phrase indices best first, and the ``(P,)`` scores.

    Example:
        >>> z = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> order, s = rank_phrases(z, np.array([True, False, False]), np.eye(2))
        >>> order.tolist(), np.round(s, 3).tolist()
        ([0, 1], [0.667, -0.667])
    """
    z = np.asarray(embeddings, dtype=np.float64)
    mask = np.asarray(in_slice, dtype=bool)
    if not mask.any():
        scores = np.zeros(len(phrase_embeddings))
    else:
        delta = z[mask].mean(axis=0) - z.mean(axis=0)
        scores = np.asarray(phrase_embeddings, dtype=np.float64) @ delta
    return np.argsort(-scores, kind="stable"), scores


# ------------------------------------------------------------------------------ pipeline
def discover_slices(
    emb: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    n_slices: int = 12,
    gamma: float = 1.0,
    n_pca: int = 128,
    alpha: float = 0.05,
    seed: int = 0,
    init: Init = "kmeans++",
    max_iter: int = 100,
    tol: float = 1e-5,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[MixtureResult, SliceTable]:
    """PCA, error-aware mixture (``gamma_y = gamma_yhat = gamma``) and slice scoring in one call.

    Args:
        emb: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        probs: ``(N, C)`` predicted probabilities.
        n_slices: mixture components.
        gamma: weight of the label and prediction terms.
        n_pca: PCA dimensions at most (capped at ``min(D, N - 1)``).
        alpha: false discovery rate.
        seed: seed of the mixture initialisation.
        init: mixture initialisation.
        max_iter: EM iterations at most.
        tol: EM stopping tolerance (``0`` runs exactly ``max_iter`` iterations).
        chunk_size: rows per streaming pass.

    Returns:
        ``(mixture, table)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    c = probs.shape[1]
    onehot = np.zeros((len(labels), c), dtype=np.float32)
    onehot[np.arange(len(labels)), labels] = 1.0
    z = fit_pca(emb, n_pca, chunk_size).transform(emb, chunk_size)
    fit = fit_error_aware_mixture(
        z,
        onehot,
        np.asarray(probs, dtype=np.float32),
        n_slices=n_slices,
        gamma_y=gamma,
        gamma_yhat=gamma,
        max_iter=max_iter,
        seed=seed,
        init=init,
        tol=tol,
        chunk_size=chunk_size,
    )
    correct = np.asarray(probs).argmax(axis=1) == labels
    return fit, score_slices(fit.memberships, correct, alpha)
