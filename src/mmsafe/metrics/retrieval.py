"""Cross-modal retrieval metrics: recall@k in both directions.

``similarity`` is a ``(Q, G)`` score matrix (queries x gallery; higher is more similar) and
``positives`` a ``(Q, G)`` boolean matrix marking the relevant gallery items of each query.
Every query needs at least one positive, otherwise :class:`ValueError` is raised.

Ranking convention: the gallery is ranked by decreasing similarity with a *stable* tie-break,
the same order as ``np.argsort(-similarity, kind="stable")``: among equal scores the item with
the lower gallery index ranks first. Ties are therefore neither optimistic nor pessimistic but
deterministic; a constant similarity matrix ranks the gallery in index order.

The computation needs no sort: the rank of a query's best positive is the number of gallery items
ranked before it, counted in chunks of queries so that memory stays ``O(chunk x G)`` (a few tens
of MB) even for ``Q = G = 10 000``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy

__all__ = ["best_positive_rank", "recall_at_k", "retrieval_recalls"]

_CHUNK_ELEMENTS = 1 << 22  # elements per (chunk, G) temporary


def _check_retrieval(similarity: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate the score and relevance matrices; returns (float sim, bool positives)."""
    sim = _as_numpy(similarity, "similarity")
    pos = _as_numpy(positives, "positives")
    if sim.ndim != 2:
        raise ValueError(
            f"`similarity` must be a 2-D (queries, gallery) matrix, got shape {sim.shape}."
        )
    if pos.shape != sim.shape:
        raise ValueError(
            f"`positives` must have the same shape as `similarity` {sim.shape}, got {pos.shape}."
        )
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"`similarity` is empty (shape {sim.shape}): need Q >= 1 and G >= 1.")
    if np.issubdtype(sim.dtype, np.integer):
        sim = sim.astype(np.float64)
    elif not np.issubdtype(sim.dtype, np.floating):
        raise ValueError(f"`similarity` must be numeric, got dtype {sim.dtype}.")
    if not np.all(np.isfinite(sim)):
        raise ValueError("`similarity` contains NaN or infinite values.")
    if pos.dtype != np.bool_:
        if not np.issubdtype(pos.dtype, np.number) or not np.all((pos == 0) | (pos == 1)):
            raise ValueError(
                f"`positives` must be a boolean (or 0/1) matrix, got dtype {pos.dtype}."
            )
        pos = pos.astype(bool)
    n_pos = pos.sum(axis=1)
    if not np.all(n_pos > 0):
        bad = np.flatnonzero(n_pos == 0)
        raise ValueError(
            f"{bad.size} of {pos.shape[0]} queries have no positive gallery item (first: "
            f"{bad[:5].tolist()}); recall is undefined for them. Drop those queries or fix "
            "`positives`."
        )
    return sim, pos


def _check_k(k: Any) -> int:
    """Validate a cut-off ``k`` (positive int)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    return int(k)


def _ranks(sim: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best-ranked positive (validated inputs)."""
    q, g = sim.shape
    order = np.arange(g)
    chunk = max(1, _CHUNK_ELEMENTS // g)
    out = np.empty(q, dtype=np.int64)
    for start in range(0, q, chunk):
        s = np.ascontiguousarray(sim[start : start + chunk])
        p = np.ascontiguousarray(pos[start : start + chunk])
        best = np.where(p, s, -np.inf).max(axis=1)[:, None]
        at_best = s == best
        first = np.argmax(p & at_best, axis=1)[:, None]  # lowest-index positive scoring `best`
        ahead = (s > best).sum(axis=1) + (at_best & (order < first)).sum(axis=1)
        out[start : start + chunk] = ahead
    return out


def best_positive_rank(similarity: Any, positives: Any) -> np.ndarray:
    """0-based rank of the first positive in each query's ranked gallery.

    ``rank < k`` says whether query ``q`` is a hit at ``k``; ``rank + 1`` is the usual
    "rank of the first relevant item". Ties follow the stable convention of the module docstring.

    Args:
        similarity: ``(Q, G)`` scores, higher is better.
        positives: ``(Q, G)`` boolean relevance.

    Returns:
        ``(Q,)`` ``int64`` ranks in ``[0, G)``.

    Raises:
        ValueError: invalid shapes or values, or a query without positives.

    Example:
        >>> sim = np.array([[0.9, 0.1, 0.5], [0.3, 0.3, 0.2]])
        >>> best_positive_rank(sim, np.eye(2, 3, dtype=bool)).tolist()
        [0, 1]
    """
    sim, pos = _check_retrieval(similarity, positives)
    return _ranks(sim, pos)


def recall_at_k(similarity: Any, positives: Any, k: int) -> float:
    """Fraction of queries with at least one positive among their top-``k`` gallery items.

    ``k`` larger than the gallery is allowed and gives 1.0.

    Args:
        similarity: ``(Q, G)`` scores, higher is better.
        positives: ``(Q, G)`` boolean relevance.
        k: cut-off, a positive integer.

    Returns:
        Recall@k in ``[0, 1]``, non-decreasing in ``k``.

    Raises:
        ValueError: invalid shapes, values or ``k``, or a query without positives.

    Example:
        >>> sim = np.array([[0.9, 0.1, 0.5], [0.3, 0.3, 0.2]])
        >>> recall_at_k(sim, np.eye(2, 3, dtype=bool), k=1)
        0.5
    """
    k = _check_k(k)
    return float(np.mean(best_positive_rank(similarity, positives) < k))


def retrieval_recalls(
    similarity: Any, positives: Any, ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions from an image -> text similarity matrix.

    Rows of ``similarity`` are images (queries for image -> text), columns are texts; the
    text -> image direction uses the transposes of ``similarity`` and ``positives``. Every image
    and every text needs at least one positive.

    Args:
        similarity: ``(I, T)`` image-text scores, higher is better.
        positives: ``(I, T)`` boolean relevance.
        ks: cut-offs.

    Returns:
        ``{"i2t_R@1": ..., "i2t_R@5": ..., ..., "t2i_R@1": ..., ...}`` in ``ks`` order.

    Raises:
        ValueError: invalid shapes, values or ``ks``, or an image/text without positives.

    Example:
        >>> sim = np.array([[0.9, 0.5], [0.8, 0.3]])
        >>> retrieval_recalls(sim, np.eye(2, dtype=bool), ks=(1,))
        {'i2t_R@1': 0.5, 't2i_R@1': 0.5}
    """
    ks = [_check_k(k) for k in ks]
    if not ks:
        raise ValueError("`ks` is empty: give at least one cut-off, e.g. ks=(1, 5, 10).")
    sim, pos = _check_retrieval(similarity, positives)
    if not np.all(pos.any(axis=0)):
        bad = np.flatnonzero(~pos.any(axis=0))
        raise ValueError(
            f"{bad.size} of {pos.shape[1]} texts (columns) have no positive image (first: "
            f"{bad[:5].tolist()}); text -> image recall is undefined for them."
        )
    out: dict[str, float] = {}
    for direction, s, p in (("i2t", sim, pos), ("t2i", sim.T, pos.T)):
        ranks = _ranks(s, p)
        for k in ks:
            out[f"{direction}_R@{k}"] = float(np.mean(ranks < k))
    return out
