"""Top-k ranking metrics for next-item recommendation: ranks, HR@k, NDCG@k, MRR.

Protocol: every user ``u`` has one held-out target item ``targets[u]`` and a row ``scores[u]``
over all ``I`` items (higher is better). The target is ranked against every item except the
user's ``exclude[u]`` (typically the items already in the user's history), the *full-ranking*
protocol of RecBole / SASRec evaluation. The target itself is never excluded, even when it also
occurs in the history. :func:`sampled_target_ranks` implements the older sampled-candidate
protocol for comparison with papers that report it.

Tie rule: among the non-excluded items, let ``g`` be the number scoring strictly higher than the
target and ``t`` the number (other than the target) scoring exactly the same. Breaking ties
uniformly at random puts the target at each position ``g + 1, ..., g + t + 1`` with probability
``1 / (t + 1)``. :func:`target_ranks` returns the *expected* rank ``1 + g + t / 2`` (``float64``,
a half-integer when ``t`` is odd); it is deterministic and neither optimistic (``g + 1``) nor
pessimistic (``g + t + 1``). With ``return_ties=True`` it also returns ``t``.

The metric functions (:func:`hit_rate`, :func:`ndcg`, :func:`reciprocal_rank`,
:func:`ranking_metrics`) give per-user values, with one relevant item (so IDCG = 1):
``HR@k = [rank <= k]``, ``NDCG@k = [rank <= k] / log2(rank + 1)``, ``RR = 1 / rank``. Given the
tie counts (``ties=``) they return the exact *expectation* over the random tie-break, i.e. the
mean of the metric over positions ``g + 1 .. g + t + 1``. This cannot be computed from the
expected rank alone (rank 3 may be ``g = 2, t = 0`` or ``g = 0, t = 4``), so:

* without ``ties`` each rank is scored as if it were an exact position (the *mid-rank rule*:
  ``HR@k = [r <= k]``, ``NDCG@k = [r <= k] / log2(r + 1)``, ``RR = 1 / r`` at the expected rank
  ``r``, fractional or not). It is exact and deterministic but is not the expectation when
  ``t > 0``; fractional ranks without ``ties`` trigger a :class:`UserWarning` saying so (an
  integer-valued expected rank with an even ``t`` cannot be detected and does not warn);
* so pass ``ties`` whenever the scores can tie (e.g. :func:`popularity_scores`, quantised or
  saturated scores): ``ranks, ties = target_ranks(..., return_ties=True)``, then
  ``ranking_metrics(ranks, ties=ties)``. With ``t = 0`` both rules give the usual values.

Memory: :func:`target_ranks` never copies the ``(N, I)`` matrix. It reads ``chunk_rows`` rows at
a time (a view for numpy input, so a ``np.broadcast_to`` matrix stays free) and keeps two
``(chunk_rows, I)`` boolean temporaries, about 80 MB for the default 4096 rows and ``I = 10^4``.
Torch tensors (CPU or GPU) are moved to numpy one chunk at a time.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal, overload

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy

__all__ = [
    "hit_rate",
    "ndcg",
    "popularity_scores",
    "ranking_metrics",
    "reciprocal_rank",
    "sampled_target_ranks",
    "target_ranks",
]

_HARMONIC_TABLE = 1024  # H(n) from a table below this, from its asymptotic series at or above


def _check_positive_int(x: Any, name: str) -> int:
    """Validate a positive integer option (``k``, ``chunk_rows``, ``n_items``...)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {x!r}.")
    return int(x)


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")


def _block(scores: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``scores`` as numpy, without touching the other rows."""
    if _is_tensor(scores):
        rows = scores[start:stop].detach().cpu()
        try:
            return rows.numpy()
        except TypeError:  # bfloat16 and friends have no numpy dtype
            return rows.float().numpy()
    return scores[start:stop]


def _check_scores(scores: Any) -> tuple[Any, int, int, bool]:
    """Validate the score matrix; returns (matrix, N, I, floating) without copying it."""
    if not _is_tensor(scores):
        scores = _as_numpy(scores, "scores")
    shape = tuple(scores.shape)
    if len(shape) != 2:
        raise ValueError(f"`scores` must be a 2-D (users, items) matrix, got shape {shape}.")
    n, i = shape
    if n == 0 or i == 0:
        raise ValueError(f"`scores` is empty (shape {shape}): need N >= 1 users and I >= 1 items.")
    dtype = _block(scores, 0, 0).dtype
    floating = bool(np.issubdtype(dtype, np.floating))
    if not (floating or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"`scores` must be a real (float or integer) matrix, got dtype {dtype}.")
    return scores, n, i, floating


def _check_targets(targets: Any, n: int, n_items: int) -> np.ndarray:
    """Validate ``(N,)`` target item positions in ``[0, I)``."""
    t = _as_numpy(targets, "targets")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"`targets` must be a 1-D array with one item per user ({n}), got shape {t.shape}."
        )
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"`targets` must hold integer item positions, got dtype {t.dtype}.")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n_items:
        bad = lo if lo < 0 else hi
        raise ValueError(f"`targets` contains item {bad}, outside [0, {n_items}) (I = {n_items}).")
    return t.astype(np.int64, copy=False)


def _check_exclude(exclude: Any, n: int) -> Any:
    """Check that ``exclude`` is ``None`` or has one entry per user."""
    if exclude is None:
        return None
    if isinstance(exclude, (str, bytes)) or not hasattr(exclude, "__len__"):
        raise ValueError(
            "`exclude` must be None or a sequence with one array of item positions per user, "
            f"got {type(exclude).__name__}."
        )
    if len(exclude) != n:
        raise ValueError(
            f"`exclude` must have one entry per user ({n}), got {len(exclude)} entries."
        )
    return exclude


def _excluded_pairs(
    exclude: Any, start: int, stop: int, targets: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(chunk row, item) of every distinct excluded non-target item of users ``start:stop``."""
    items, lengths = [], []
    for u in range(start, stop):
        h = _as_numpy(exclude[u], f"exclude[{u}]").ravel()
        if h.size and not np.issubdtype(h.dtype, np.integer):
            raise ValueError(f"`exclude[{u}]` must hold integer item positions, got {h.dtype}.")
        items.append(h.astype(np.int64, copy=False))
        lengths.append(h.size)
    flat = np.concatenate(items) if items else np.empty(0, np.int64)
    if flat.size == 0:
        return flat, flat
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= n_items:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"`exclude` contains item {bad}, outside [0, {n_items}); drop padding ids first."
        )
    rows = np.repeat(np.arange(stop - start, dtype=np.int64), lengths)
    codes = np.unique(rows * n_items + flat)  # de-duplicates repeated history items
    rows, items_ = np.divmod(codes, n_items)
    keep = items_ != targets[start:stop][rows]  # the target is never excluded
    return rows[keep], items_[keep]


def _counts(
    scores: Any, targets: Any, exclude: Any, chunk_rows: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: items scoring higher, tied items, and candidate (non-excluded, non-target) items.

    Raises:
        ValueError: invalid inputs, or NaN scores (after all rows were scanned, with the count).
    """
    chunk_rows = _check_positive_int(chunk_rows, "chunk_rows")
    scores, n, n_items, floating = _check_scores(scores)
    tgt = _check_targets(targets, n, n_items)
    exclude = _check_exclude(exclude, n)
    higher = np.empty(n, dtype=np.int64)
    ties = np.empty(n, dtype=np.int64)
    candidates = np.full(n, n_items - 1, dtype=np.int64)
    nan_rows: list[np.ndarray] = []
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        s = _block(scores, start, stop)
        rows = np.arange(stop - start)
        t_score = s[rows, tgt[start:stop]]
        if floating:
            nan_rows.append(start + np.flatnonzero(np.isnan(s.max(axis=1))))
        col = t_score[:, None]
        higher[start:stop] = np.count_nonzero(s > col, axis=1)
        ties[start:stop] = np.count_nonzero(s == col, axis=1) - 1  # minus the target itself
        if exclude is not None:
            ex_rows, ex_items = _excluded_pairs(exclude, start, stop, tgt, n_items)
            v, tv = s[ex_rows, ex_items], t_score[ex_rows]
            size = stop - start
            higher[start:stop] -= np.bincount(ex_rows[v > tv], minlength=size)
            ties[start:stop] -= np.bincount(ex_rows[v == tv], minlength=size)
            candidates[start:stop] -= np.bincount(ex_rows, minlength=size)
    bad = np.concatenate(nan_rows) if nan_rows else np.empty(0, np.int64)
    if bad.size:
        raise ValueError(
            f"`scores` contains NaN in {bad.size} of {n} rows (first: {bad[:5].tolist()}); "
            "ranks are undefined there. Fix the model output or drop those users."
        )
    return higher, ties, candidates


@overload
def target_ranks(
    scores: Any,
    targets: Any,
    exclude: Sequence[Any] | None = ...,
    *,
    chunk_rows: int = ...,
    return_ties: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def target_ranks(
    scores: Any,
    targets: Any,
    exclude: Sequence[Any] | None = ...,
    *,
    chunk_rows: int = ...,
    return_ties: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...


def target_ranks(
    scores: Any,
    targets: Any,
    exclude: Sequence[Any] | None = None,
    *,
    chunk_rows: int = 4096,
    return_ties: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Expected 1-based rank of each user's target among all non-excluded items (full ranking).

    ``rank = 1 + g + t / 2`` with ``g`` non-excluded items scoring strictly higher than the target
    and ``t`` non-excluded items (other than the target) scoring the same: the expected rank under
    a uniformly random tie-break (see the module docstring). ``-inf`` / ``+inf`` scores are
    allowed (``-inf`` ties with ``-inf``); NaN is not.

    Args:
        scores: ``(N, I)`` real scores, higher is better (numpy array, array-like or torch
            tensor; read ``chunk_rows`` rows at a time, never copied whole).
        targets: ``(N,)`` integer target item positions in ``[0, I)``.
        exclude: ``None`` or ``N`` integer arrays (lists, tensors) of item positions to leave
            out of each user's ranking, e.g. the training history. Repeats are fine; the target
            is never excluded even if listed.
        chunk_rows: users per chunk; temporaries are ``O(chunk_rows * I)`` booleans.
        return_ties: also return ``t`` per user, needed by the metrics for exact tie handling.

    Returns:
        ``(N,)`` ``float64`` ranks in ``[1, I]``; with ``return_ties`` a tuple
        ``(ranks, ties)`` with ``(N,)`` ``int64`` tie counts.

    Raises:
        ValueError: bad shapes or dtypes, items out of range, or NaN scores (the message says in
            how many rows).

    Example:
        >>> scores = np.array([[0.1, 0.9, 0.3, 0.7], [0.5, 0.5, 0.5, 0.2]])
        >>> target_ranks(scores, [3, 0]).tolist()
        [2.0, 2.0]
        >>> target_ranks(scores, [3, 0], exclude=[[1], [1, 0]], return_ties=True)
        (array([1. , 1.5]), array([0, 1]))
    """
    higher, ties, _ = _counts(scores, targets, exclude, chunk_rows)
    ranks = 1.0 + higher + 0.5 * ties
    return (ranks, ties) if return_ties else ranks


@overload
def sampled_target_ranks(
    scores: Any,
    targets: Any,
    exclude: Sequence[Any] | None,
    n_negatives: int,
    rng: np.random.Generator | int,
    *,
    chunk_rows: int = ...,
    return_ties: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def sampled_target_ranks(
    scores: Any,
    targets: Any,
    exclude: Sequence[Any] | None,
    n_negatives: int,
    rng: np.random.Generator | int,
    *,
    chunk_rows: int = ...,
    return_ties: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...


def sampled_target_ranks(
    scores: Any,
    targets: Any,
    exclude: Sequence[Any] | None,
    n_negatives: int,
    rng: np.random.Generator | int,
    *,
    chunk_rows: int = 4096,
    return_ties: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Expected rank of the target among itself and ``n_negatives`` sampled negatives.

    The sampled-candidate protocol (e.g. "rank the target among 100 sampled items"): for each
    user, ``n_negatives`` negatives are drawn uniformly *without replacement* from the items that
    are neither excluded nor the target (all of them if fewer are available), and the target is
    ranked among these ``1 + n_negatives`` candidates with the tie rule of :func:`target_ranks`.

    **Sampled metrics are inconsistent with full ranking** (Krichene & Rendle, "On Sampled
    Metrics for Item Recommendation", KDD 2020): they can reorder models relative to their
    full-ranking metrics, and HR@k / NDCG@k on ~100 candidates are far higher than on the full
    catalogue. Use :func:`target_ranks` for evaluation; use this only to compare with papers
    that report sampled metrics.

    Only the counts matter for the rank, so instead of materialising the sampled item ids the
    function draws, per user, how many sampled negatives score higher than the target and how
    many tie with it, from their exact joint (multivariate hypergeometric) distribution given
    the full-ranking counts. This has the same distribution as sampling the items explicitly,
    costs ``O(N)`` on top of :func:`target_ranks`, and the result is deterministic given ``rng``.
    It implies ``sampled rank <= full rank``, with equality when ``n_negatives`` covers every
    candidate.

    Args:
        scores: ``(N, I)`` real scores, higher is better.
        targets: ``(N,)`` integer target item positions in ``[0, I)``.
        exclude: ``None`` or ``N`` integer arrays of item positions never sampled (histories).
        n_negatives: negatives per user, a positive integer (e.g. 100).
        rng: a ``np.random.Generator`` or an integer seed for ``np.random.default_rng``.
        chunk_rows: users per chunk, as in :func:`target_ranks`.
        return_ties: also return the number of sampled negatives tied with the target.

    Returns:
        ``(N,)`` ``float64`` ranks in ``[1, n_negatives + 1]``; with ``return_ties`` a tuple
        ``(ranks, ties)``.

    Raises:
        ValueError: invalid inputs (as :func:`target_ranks`) or ``n_negatives``, or NaN scores.

    Example:
        >>> scores = np.tile(np.arange(10.0), (3, 1))  # item 9 scores highest
        >>> sampled_target_ranks(scores, [0, 0, 0], None, n_negatives=9, rng=0).tolist()
        [10.0, 10.0, 10.0]
        >>> r = sampled_target_ranks(scores, [0, 0, 0], None, n_negatives=3, rng=0)
        >>> r.tolist()  # the lowest-scoring item is last among any 4 candidates
        [4.0, 4.0, 4.0]
    """
    n_neg = _check_positive_int(n_negatives, "n_negatives")
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        rng = np.random.default_rng(int(rng))
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"`rng` must be a numpy Generator or an integer seed, got {type(rng).__name__}."
        )
    higher, ties, candidates = _counts(scores, targets, exclude, chunk_rows)
    m = np.minimum(n_neg, candidates)
    s_higher = rng.hypergeometric(higher, candidates - higher, m)
    lower = candidates - higher - ties
    s_ties = rng.hypergeometric(ties, lower, m - s_higher)
    ranks = 1.0 + s_higher + 0.5 * s_ties
    return (ranks, s_ties.astype(np.int64)) if return_ties else ranks


def _check_ranks(ranks: Any, ties: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate ranks (and tie counts); returns (float64 ranks, int64 ties or ``None``).

    Warns when ``ties`` is missing but some ranks are tie-averaged (fractional).
    """
    r = _as_numpy(ranks, "ranks")
    if r.ndim != 1:
        raise ValueError(f"`ranks` must be 1-D (one rank per user), got shape {r.shape}.")
    if r.shape[0] == 0:
        raise ValueError("`ranks` is empty: metrics need at least one user (N >= 1).")
    if not (np.issubdtype(r.dtype, np.integer) or np.issubdtype(r.dtype, np.floating)):
        raise ValueError(f"`ranks` must be numeric, got dtype {r.dtype}.")
    r = r.astype(np.float64)
    if not np.all(np.isfinite(r)) or r.min() < 1:
        raise ValueError("`ranks` must be finite and >= 1 (ranks are 1-based).")
    if ties is None:
        n_frac = int(np.count_nonzero(r != np.round(r)))
        if n_frac:
            warnings.warn(
                f"{n_frac} of {r.size} ranks are tie-averaged (fractional) but `ties` was not "
                "given: they are scored at their mean rank (mid-rank rule). For the exact "
                "expectation over random tie-breaks use `ranks, ties = target_ranks(..., "
                "return_ties=True)` and pass `ties=ties`.",
                UserWarning,
                stacklevel=3,
            )
        return r, None
    t = _as_numpy(ties, "ties")
    if t.shape != r.shape:
        raise ValueError(f"`ties` must have the shape of `ranks` {r.shape}, got {t.shape}.")
    if not np.issubdtype(t.dtype, np.integer) or t.min() < 0:
        raise ValueError("`ties` must hold non-negative integer tie counts.")
    t = t.astype(np.int64, copy=False)
    best = r - 0.5 * t
    if not np.all(best == np.round(best)) or best.min() < 1:
        raise ValueError(
            "`ranks - ties / 2` must be integers >= 1 (the best position of each target); "
            "pass the (ranks, ties) pair returned by target_ranks(..., return_ties=True)."
        )
    return r, t


def _hit_rate(r: np.ndarray, t: np.ndarray | None, k: int) -> np.ndarray:
    if t is None:
        return (r <= k).astype(np.float64)
    best = r - 0.5 * t
    return np.clip(k - best + 1, 0, t + 1) / (t + 1.0)


def _ndcg(r: np.ndarray, t: np.ndarray | None, k: int) -> np.ndarray:
    direct = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    if t is None or not t.any():
        return direct
    best = (r - 0.5 * t).astype(np.int64)
    worst = best + t
    kk = int(min(k, worst.max()))
    # cum[p] = sum over positions q = 1..p of 1 / log2(q + 1)
    cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2.0, kk + 2.0)))])
    mean = (cum[np.minimum(worst, kk)] - cum[np.minimum(best - 1, kk)]) / (t + 1.0)
    return np.where(t == 0, direct, mean)


def _harmonic(n: np.ndarray) -> np.ndarray:
    """Harmonic numbers ``H(n) = 1 + 1/2 + ... + 1/n`` (``H(0) = 0``), to float precision."""
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1.0, _HARMONIC_TABLE))])
    small = n < _HARMONIC_TABLE
    out = np.empty(n.shape, dtype=np.float64)
    out[small] = table[n[small]]
    x = n[~small].astype(np.float64)  # asymptotic series, error < 1 / (252 x^6) < 1e-20
    inv2 = 1.0 / (x * x)
    out[~small] = np.log(x) + np.euler_gamma + 0.5 / x - inv2 / 12.0 + inv2 * inv2 / 120.0
    return out


def _reciprocal_rank(r: np.ndarray, t: np.ndarray | None) -> np.ndarray:
    direct = 1.0 / r
    if t is None or not t.any():
        return direct
    best = (r - 0.5 * t).astype(np.int64)
    mean = (_harmonic(best + t) - _harmonic(best - 1)) / (t + 1.0)
    return np.where(t == 0, direct, mean)


def hit_rate(ranks: Any, k: int, ties: Any = None) -> np.ndarray:
    """Per-user hit rate at ``k``: ``1`` if the target is in the top ``k``, else ``0``.

    With ``ties``, the expectation over the random tie-break: the fraction of the positions
    ``g + 1 .. g + t + 1`` that are ``<= k``, where ``g + 1 = rank - t / 2``. Without, ``[rank <=
    k]`` (for a tie-averaged rank: the mid-rank rule, with a warning).

    Args:
        ranks: ``(N,)`` 1-based ranks (from :func:`target_ranks`).
        k: cut-off, a positive integer (larger than the catalogue is allowed).
        ties: ``(N,)`` tie counts from ``target_ranks(..., return_ties=True)`` for the exact
            expectation; without them the mid-rank rule (module docstring).

    Returns:
        ``(N,)`` ``float64`` values in ``[0, 1]``.

    Raises:
        ValueError: invalid ranks, ties or ``k``.

    Warns:
        UserWarning: fractional ranks without ``ties`` (likewise for the other metrics).

    Example:
        >>> hit_rate([1, 3, 11], k=10).tolist()
        [1.0, 1.0, 0.0]
        >>> hit_rate([5.5], k=2, ties=[9]).tolist()  # 10 tied items, positions 1..10
        [0.2]
    """
    k = _check_positive_int(k, "k")
    return _hit_rate(*_check_ranks(ranks, ties), k)


def ndcg(ranks: Any, k: int, ties: Any = None) -> np.ndarray:
    """Per-user NDCG at ``k`` with one relevant item: ``1 / log2(rank + 1)`` if ``rank <= k``.

    With ``ties``, the mean of that value over the positions ``g + 1 .. g + t + 1``. Without,
    the formula at the given rank (the mid-rank rule for a tie-averaged rank, with a warning).

    Args:
        ranks: ``(N,)`` 1-based ranks (from :func:`target_ranks`).
        k: cut-off, a positive integer.
        ties: ``(N,)`` tie counts for the exact expectation, else the mid-rank rule.

    Returns:
        ``(N,)`` ``float64`` values in ``[0, 1]``.

    Raises:
        ValueError: invalid ranks, ties or ``k``.

    Example:
        >>> ndcg([1, 3, 11], k=10).round(4).tolist()
        [1.0, 0.5, 0.0]
        >>> ndcg([1.5], k=1, ties=[1]).tolist()  # positions 1 or 2, only 1 is in the top 1
        [0.5]
    """
    k = _check_positive_int(k, "k")
    return _ndcg(*_check_ranks(ranks, ties), k)


def reciprocal_rank(ranks: Any, ties: Any = None) -> np.ndarray:
    """Per-user reciprocal rank ``1 / rank`` (its mean over users is MRR).

    With ``ties``, the mean of ``1 / p`` over the positions ``p = g + 1 .. g + t + 1`` (note
    ``E[1 / rank] != 1 / E[rank]``). Without, ``1 / rank`` (the mid-rank rule for a
    tie-averaged rank, with a warning).

    Args:
        ranks: ``(N,)`` 1-based ranks (from :func:`target_ranks`).
        ties: ``(N,)`` tie counts for the exact expectation, else the mid-rank rule.

    Returns:
        ``(N,)`` ``float64`` values in ``(0, 1]``.

    Raises:
        ValueError: invalid ranks or ties.

    Example:
        >>> reciprocal_rank([1, 2, 4]).tolist()
        [1.0, 0.5, 0.25]
        >>> reciprocal_rank([1.5], ties=[1]).tolist()  # (1 + 1/2) / 2
        [0.75]
    """
    return _reciprocal_rank(*_check_ranks(ranks, ties))


def ranking_metrics(
    ranks: Any, ks: Iterable[int] = (10, 20), ties: Any = None
) -> dict[str, np.ndarray]:
    """Per-user HR@k and NDCG@k for every ``k`` in ``ks``, and the reciprocal rank.

    Average each array over users for the usual summary (or bootstrap it, e.g.
    :func:`mmsafe.metrics.mean_ci`).

    Args:
        ranks: ``(N,)`` 1-based ranks (from :func:`target_ranks`).
        ks: cut-offs, positive integers.
        ties: ``(N,)`` tie counts for the exact expectation, else the mid-rank rule.

    Returns:
        ``{"hr@10": ..., "ndcg@10": ..., "hr@20": ..., "ndcg@20": ..., "mrr": ...}`` (keys in
        ``ks`` order, then ``"mrr"``), each a ``(N,)`` ``float64`` array.

    Raises:
        ValueError: invalid ranks, ties or ``ks`` (empty included).

    Example:
        >>> m = ranking_metrics([1, 3, 30], ks=(1, 10))
        >>> {key: round(float(v.mean()), 4) for key, v in m.items()}
        {'hr@1': 0.3333, 'ndcg@1': 0.3333, 'hr@10': 0.6667, 'ndcg@10': 0.5, 'mrr': 0.4556}
    """
    ks = [_check_positive_int(k, "k") for k in ks]
    if not ks:
        raise ValueError("`ks` is empty: give at least one cut-off, e.g. ks=(10, 20).")
    r, t = _check_ranks(ranks, ties)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"hr@{k}"] = _hit_rate(r, t, k)
        out[f"ndcg@{k}"] = _ndcg(r, t, k)
    out["mrr"] = _reciprocal_rank(r, t)
    return out


def popularity_scores(sequences: Iterable[Any], n_items: int) -> np.ndarray:
    """Item popularity: how often each item occurs in ``sequences`` (a non-personal baseline).

    Every user gets the same scores, so rank with a broadcast view, which costs no memory:
    ``target_ranks(np.broadcast_to(pop, (N, n_items)), ...)``. Popularity scores tie a lot
    (every unseen item scores 0): use ``return_ties=True`` and pass the ties to the metrics.

    Args:
        sequences: iterable of integer item-position arrays (e.g. training interaction
            sequences); repeats count each time.
        n_items: catalogue size ``I``; every item must lie in ``[0, I)``.

    Returns:
        ``(I,)`` ``float64`` interaction counts.

    Raises:
        ValueError: non-integer or out-of-range items, or an invalid ``n_items``.

    Example:
        >>> popularity_scores([[0, 2, 2], [2, 3], []], n_items=5).tolist()
        [1.0, 0.0, 3.0, 1.0, 0.0]
    """
    n_items = _check_positive_int(n_items, "n_items")
    parts = []
    for j, seq in enumerate(sequences):
        s = _as_numpy(seq, f"sequences[{j}]").ravel()
        if s.size and not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"`sequences[{j}]` must hold integer item positions, got {s.dtype}.")
        parts.append(s.astype(np.int64, copy=False))
    flat = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_items):
        bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
        raise ValueError(f"`sequences` contain item {bad}, outside [0, {n_items}).")
    return np.bincount(flat, minlength=n_items).astype(np.float64)
