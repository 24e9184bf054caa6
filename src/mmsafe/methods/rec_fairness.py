"""Recommender fairness: user-group quality gaps, item-group exposure, attribute leakage.

Pure functions behind ``controllability.rec_fairness`` (see ``docs/rec_fairness.md``):

* **user groups** (a sensitive attribute of the users): per-group means of a per-user metric
  (NDCG@10, HR@10), the gap between the best and the worst group, and bootstrap CIs of both
  (:func:`group_means`, :func:`group_gap_bootstrap`);
* **item exposure**: each user's top-``k`` list (history excluded, ties to the lower item
  position), position-discounted exposure ``1 / log2(1 + rank)`` summed per item
  (:func:`top_k_items`, :func:`user_exposure`), and over items its Gini coefficient, the
  catalogue coverage and each item group's exposure share against its catalogue share
  (:func:`exposure_summary`, :func:`exposure_bootstrap`);
* **leakage**: how well a probe predicts the user's group from the user representation, as a
  cross-validated macro one-vs-rest AUC (:func:`probe_probabilities`, :func:`macro_auc`), the
  FMMRec-style audit of whether a recommender encodes a sensitive attribute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from scipy.stats import rankdata

from mmsafe.metrics.bootstrap import check_options, percentile_interval, resample_counts

__all__ = [
    "balanced_permutation",
    "exposure_bootstrap",
    "exposure_summary",
    "exposure_weights",
    "gini",
    "group_gap_bootstrap",
    "group_means",
    "macro_auc",
    "macro_auc_bootstrap",
    "macro_auc_resamples",
    "popularity_item_groups",
    "probe_probabilities",
    "top_k_items",
    "user_exposure",
]


# --------------------------------------------------------------------------- user groups


def group_means(values: Any, codes: Any, n_groups: int) -> np.ndarray:
    """``(G,)`` mean of ``values`` within each group (NaN for an empty group).

    Example:
        >>> group_means([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1], 2).tolist()
        [0.5, 0.5]
    """
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(codes, dtype=np.int64)
    total = np.bincount(g, weights=v, minlength=n_groups)
    count = np.bincount(g, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def group_gap_bootstrap(
    values: Any,
    codes: Any,
    n_groups: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-group means, the best-minus-worst gap and the worst group, with bootstrap CIs.

    Users are resampled jointly (the resamples of :func:`mmsafe.metrics.bootstrap_ci`). The
    gap is ``max - min`` of the group means. Its CI is that of the *signed* difference between
    the two groups that are best and worst on all users: it reaches below 0 when their order is
    not sure, where the ``max - min`` of each resample would be biased upwards and never cover
    0 (with two groups it is ``|difference|``).

    Returns:
        ``{"means": (G,), "gap": float, "gap_ci": (lo, hi), "min": float, "min_ci": (lo, hi),
        "means_ci": [(lo, hi)] * G, "best": int, "worst": int}``.

    Example:
        >>> v = np.r_[np.ones(50), np.zeros(50)]; g = np.r_[np.zeros(50), np.ones(50)]
        >>> out = group_gap_bootstrap(v, g, 2, n_boot=100)
        >>> out["gap"], out["gap_ci"], out["min"], (out["best"], out["worst"])
        (1.0, (1.0, 1.0), 0.0, (0, 1))
    """
    check_options(n_boot, level, seed)
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(codes, dtype=np.int64)
    if v.ndim != 1 or v.shape != g.shape or v.size == 0:
        raise ValueError("values and codes must be non-empty 1-D arrays of the same length.")
    means = group_means(v, g, n_groups)
    best, worst = int(np.nanargmax(means)), int(np.nanargmin(means))
    onehot = np.eye(n_groups)[g]
    design = np.column_stack([onehot * v[:, None], onehot])
    diffs, mins, per = [], [], []
    for counts in resample_counts(v.size, int(n_boot), seed):
        sums = counts @ design
        total, count = sums[:, :n_groups], sums[:, n_groups:]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        diffs.append(m[:, best] - m[:, worst])
        with np.errstate(invalid="ignore"):
            all_nan = np.isnan(m).all(axis=1)
            mins.append(np.where(all_nan, np.nan, np.nanmin(np.where(all_nan[:, None], 0, m), 1)))
        per.append(m)
    per_all = np.concatenate(per)
    return {
        "means": means,
        "gap": float(means[best] - means[worst]),
        "gap_ci": percentile_interval(np.concatenate(diffs), level),
        "min": float(means[worst]),
        "min_ci": percentile_interval(np.concatenate(mins), level),
        "means_ci": [percentile_interval(per_all[:, k], level) for k in range(n_groups)],
        "best": best,
        "worst": worst,
    }


# --------------------------------------------------------------------------- exposure


def top_k_items(
    scores: Any, exclude: Sequence[Any] | None = None, k: int = 10, chunk_rows: int = 4096
) -> np.ndarray:
    """``(N, k)`` each user's ``k`` best-scoring items, best first; ``-1`` pads short lists.

    Excluded items (the user's history) never appear. Ties go to the lower item position, so
    the lists are deterministic. Reads ``chunk_rows`` users at a time (a torch tensor too).

    Raises:
        ValueError: a 1-D matrix, ``k < 1``, NaN scores, or one ``exclude`` entry per user missing.

    Example:
        >>> s = np.array([[0.1, 0.9, 0.9, 0.5], [1.0, 0.0, 0.0, 0.0]])
        >>> top_k_items(s, exclude=[[1], []], k=2).tolist()
        [[2, 3], [0, 1]]
        >>> top_k_items(s, exclude=[[0, 1, 2], []], k=2).tolist()
        [[3, -1], [0, 1]]
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(getattr(scores, "shape", ())) != 2:
        raise ValueError("scores must be a 2-D (users, items) matrix")
    n, n_items = int(scores.shape[0]), int(scores.shape[1])
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude must have one entry per user ({n}), got {len(exclude)}")
    out = np.full((n, k), -1, dtype=np.int64)
    kk = min(k, n_items)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        block = scores[start:stop]
        if hasattr(block, "detach"):
            block = block.detach().float().cpu().numpy()
        s = np.array(block, dtype=np.float64)  # a copy: excluded items are overwritten
        if np.isnan(s).any():
            raise ValueError("scores contain NaN; the top-k lists are undefined there")
        allowed = np.ones(s.shape, dtype=bool)
        if exclude is not None:
            for r, u in enumerate(range(start, stop)):
                h = np.asarray(exclude[u], dtype=np.int64).ravel()
                allowed[r, h] = False
        s[~allowed] = -np.inf
        kth = np.partition(s, n_items - kk, axis=1)[:, n_items - kk]  # the kk-th best score
        above = (s > kth[:, None]) & allowed
        tied = (s == kth[:, None]) & allowed
        room = kk - above.sum(axis=1)
        pick = above | (tied & (np.cumsum(tied, axis=1) <= room[:, None]))
        for r in range(stop - start):
            items = np.flatnonzero(pick[r])  # ascending positions
            items = items[np.argsort(-s[r, items], kind="stable")]  # best first, ties by position
            out[start + r, : len(items)] = items
    return out


def exposure_weights(k: int) -> np.ndarray:
    """``(k,)`` position weights ``1 / log2(1 + rank)`` for ranks ``1..k`` (DCG's discount).

    Example:
        >>> exposure_weights(3).round(4).tolist()
        [1.0, 0.6309, 0.5]
    """
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def user_exposure(top: Any, n_items: int) -> sparse.csr_matrix:
    """``(N, I)`` sparse exposure each user's top-``k`` list gives each item (``-1`` = none).

    Example:
        >>> user_exposure(np.array([[2, 0], [2, -1]]), 3).toarray().round(4).tolist()
        [[0.6309, 0.0, 1.0], [0.0, 0.0, 1.0]]
    """
    t = np.asarray(top, dtype=np.int64)
    n, k = t.shape
    w = np.broadcast_to(exposure_weights(k), t.shape)
    rows = np.broadcast_to(np.arange(n)[:, None], t.shape)
    keep = t >= 0
    return sparse.csr_matrix((w[keep], (rows[keep], t[keep])), shape=(n, n_items))


def gini(x: Any) -> float:
    """Gini coefficient of non-negative values: 0 all equal, ``1 - 1/n`` all on one; NaN if 0.

    ``G = sum_i (2 i - n - 1) x_(i) / (n * sum x)`` over the values sorted ascending, equal to
    the mean absolute difference over pairs divided by twice the mean.

    Example:
        >>> gini([1, 1, 1, 1]), gini([0, 0, 0, 4]), round(gini([1, 2, 3]), 4)
        (0.0, 0.75, 0.2222)
    """
    return float(_gini_rows(np.asarray(x, dtype=np.float64)[None])[0])


def _gini_rows(x: np.ndarray) -> np.ndarray:
    """Gini of each row of ``(B, n)`` non-negative values."""
    n = x.shape[1]
    s = np.sort(x, axis=1)
    coef = 2.0 * np.arange(1, n + 1) - n - 1
    total = s.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (s @ coef) / (n * total), np.nan)


def _summary_rows(
    exposure: np.ndarray,
    item_codes: np.ndarray,
    n_groups: int,
    item_weights: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """:func:`exposure_summary` of each row of ``(B, I)`` item exposure."""
    onehot = np.eye(n_groups)[item_codes]  # (I, G)
    catalog = onehot.mean(axis=0)
    w = np.ones(len(item_codes)) if item_weights is None else np.asarray(item_weights, float)
    reference = (w @ onehot) / w.sum()
    total = exposure.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (exposure @ onehot) / total, np.nan)
        rel = share / reference
        ratio = rel.min(axis=1) / rel.max(axis=1)
        ratio = np.where(np.isfinite(ratio), ratio, np.nan)
    return {
        "gini": _gini_rows(exposure),
        "coverage": (exposure > 0).mean(axis=1),
        "ratio": ratio,
        "share": share,
        "catalog_share": np.broadcast_to(catalog, share.shape),
        "reference_share": np.broadcast_to(reference, share.shape),
    }


def exposure_summary(
    item_exposure: Any, item_codes: Any, n_groups: int, item_weights: Any = None
) -> dict[str, Any]:
    """Gini, coverage and the group exposure ratio of ``(I,)`` per-item exposure.

    Args:
        item_exposure: ``(I,)`` exposure per item.
        item_codes: ``(I,)`` integer item group.
        n_groups: ``G``.
        item_weights: what each item deserves, e.g. its interactions in the histories; the
            reference share of a group is its share of the weights (``None``: one per item,
            the catalogue share).

    Returns:
        ``{"gini", "coverage", "ratio", "share": (G,), "catalog_share": (G,),
        "reference_share": (G,)}``: ``coverage`` is the share of items with any exposure;
        ``share[g]`` each item group's share of the exposure, ``catalog_share[g]`` its share
        of the items and ``reference_share[g]`` of the weights;
        ``ratio = min_g (share / reference) / max_g (share / reference)``, in ``[0, 1]``
        (1: exposure proportional to the reference).

    Example:
        >>> out = exposure_summary([3.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], 2)
        >>> out["coverage"], out["ratio"], out["share"].tolist(), out["catalog_share"].tolist()
        (0.5, 0.0, [1.0, 0.0], [0.5, 0.5])
    """
    e = np.asarray(item_exposure, dtype=np.float64)[None]
    rows = _summary_rows(e, np.asarray(item_codes, dtype=np.int64), n_groups, item_weights)
    return {
        "gini": float(rows["gini"][0]),
        "coverage": float(rows["coverage"][0]),
        "ratio": float(rows["ratio"][0]),
        "share": rows["share"][0].copy(),
        "catalog_share": np.array(rows["catalog_share"][0]),
        "reference_share": np.array(rows["reference_share"][0]),
    }


def exposure_bootstrap(
    exposure: sparse.spmatrix,
    item_codes: Any,
    n_groups: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    item_weights: Any = None,
) -> dict[str, Any]:
    """Bootstrap CIs over users of :func:`exposure_summary` (the items stay fixed).

    Args:
        exposure: ``(N, I)`` per-user exposure (:func:`user_exposure`).
        item_codes: ``(I,)`` integer item group in ``[0, n_groups)``.
        n_groups: ``G``.
        n_boot: resamples of the users (those of :func:`mmsafe.metrics.bootstrap_ci`).
        level: confidence level.
        seed: seed of the resamples.
        item_weights: the reference of the ratio (see :func:`exposure_summary`).

    Returns:
        ``{"gini": (lo, hi), "coverage": (lo, hi), "ratio": (lo, hi), "share": [(lo, hi)] * G}``.

    Example:
        >>> e = user_exposure(np.array([[0, 1], [0, 2]]), 4)
        >>> ci = exposure_bootstrap(e, [0, 0, 1, 1], 2, n_boot=50)
        >>> ci["share"][0][0] >= 0.5, ci["coverage"][1] <= 0.75
        (True, True)
    """
    check_options(n_boot, level, seed)
    codes = np.asarray(item_codes, dtype=np.int64)
    e_t = sparse.csr_matrix(exposure).T.tocsr()  # (I, N)
    stats: dict[str, list[np.ndarray]] = {}
    for counts in resample_counts(e_t.shape[1], int(n_boot), seed):
        rows = _summary_rows(np.asarray(e_t @ counts.T).T, codes, n_groups, item_weights)
        for key in ("gini", "coverage", "ratio", "share"):
            stats.setdefault(key, []).append(rows[key])
    out: dict[str, Any] = {
        key: percentile_interval(np.concatenate(stats[key]), level)
        for key in ("gini", "coverage", "ratio")
    }
    share = np.concatenate(stats["share"])
    out["share"] = [percentile_interval(share[:, g], level) for g in range(n_groups)]
    return out


def popularity_item_groups(
    sequences: Sequence[Any], n_items: int, head_share: float = 0.2
) -> list[str]:
    """``head`` for the ``ceil(head_share * I)`` most interacted items, ``tail`` for the rest.

    Interaction counts are read from ``sequences`` (the histories); ties go to the lower item
    position.

    Example:
        >>> popularity_item_groups([np.array([3, 3, 1])], 5, head_share=0.4)
        ['tail', 'head', 'tail', 'head', 'tail']
    """
    if not 0 < head_share < 1:
        raise ValueError(f"head_share must be in (0, 1), got {head_share}")
    flat = [np.asarray(s, dtype=np.int64).ravel() for s in sequences]
    counts = np.bincount(np.concatenate(flat or [np.zeros(0, np.int64)]), minlength=n_items)
    order = np.lexsort((np.arange(n_items), -counts[:n_items]))
    head = np.zeros(n_items, dtype=bool)
    head[order[: int(math.ceil(head_share * n_items))]] = True
    return ["head" if h else "tail" for h in head]


# --------------------------------------------------------------------------- leakage


def balanced_permutation(codes: Any, rng: np.random.Generator) -> np.ndarray:
    """A random relabelling of ``codes`` that is independent of them, up to rounding.

    The group sizes stay the same, and every group's members are spread over the new labels in
    proportion to their sizes (each cell of the ``(old, new)`` table is within one of
    ``n_old * n_new / N``). A plain permutation keeps a chance overlap with the true groups
    (about ``0.5 / sqrt(N)``), which a probe picks up when the representation encodes the true
    group well; this one leaves it nothing to pick up, so its AUC is the probe's pure chance.

    Example:
        >>> y = np.repeat([0, 1], 50)
        >>> z = balanced_permutation(y, np.random.default_rng(0))
        >>> np.bincount(z).tolist(), np.bincount(z[y == 0]).tolist()
        ([50, 50], [25, 25])
    """
    y = np.asarray(codes, dtype=np.int64)
    n = y.size
    users = np.lexsort((rng.random(n), y))  # grouped by old label, shuffled within
    labels, sizes = np.unique(y, return_counts=True)
    # every new label's copies at evenly spaced times (k + u) / size: sorting them by time
    # interleaves the labels, so any contiguous run of users gets them in proportion
    times = np.concatenate([(np.arange(m) + rng.random()) / m for m in sizes.tolist()])
    spread = np.repeat(labels, sizes)[np.argsort(times, kind="stable")]
    out = np.empty(n, dtype=np.int64)
    out[users] = spread
    return out


def probe_probabilities(
    states: Any, codes: Any, seed: int = 0, n_splits: int = 5, C: float = 1.0
) -> np.ndarray:
    """``(N, G)`` cross-validated probabilities of each user's group from its representation.

    A standardised logistic regression (scikit-learn), fitted ``n_splits`` times by
    ``StratifiedKFold(shuffle=True, random_state=seed)``; each user's probabilities come from
    the fit that did not see it (``cross_val_predict(..., method="predict_proba")``).

    Args:
        states: ``(N, H)`` user representations.
        codes: ``(N,)`` integer groups in ``[0, G)``; every group needs ``n_splits`` users.
        seed: the fold split's seed (any integer; reduced to 32 bits).
        n_splits: folds.
        C: inverse L2 regularisation strength.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.r_[np.zeros(50), np.ones(50)].astype(int)
        >>> x = rng.normal(size=(100, 3)) + 3 * y[:, None]
        >>> round(macro_auc(probe_probabilities(x, y), y), 2)
        1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x = np.asarray(states, dtype=np.float64)
    y = np.asarray(codes, dtype=np.int64)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(seed) % 2**32)
    # one BLAS thread: the products are small, and threads on a busy machine cost 10x here
    with threadpool_limits(limits=1, user_api="blas"):
        return cross_val_predict(probe, x, y, cv=folds, method="predict_proba")


def macro_auc(probs: Any, codes: Any) -> float:
    """Macro one-vs-rest ROC AUC of ``(N, G)`` group probabilities (sklearn's ``ovr``/``macro``).

    Each group's AUC is the Mann-Whitney probability that one of its users gets a higher
    probability of it than a user of another group (ties count one half); groups absent from
    ``codes`` are left out; NaN with fewer than two groups present. With two groups it is the
    plain binary AUC (``roc_auc_score(codes, probs[:, 1])``).

    Example:
        >>> macro_auc([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]], [0, 1, 1, 0])
        0.5
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(codes, dtype=np.int64)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    aucs = []
    for g in present.tolist():
        pos = y == g
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        ranks = rankdata(p[:, g])
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return float(np.mean(aucs))


def macro_auc_bootstrap(
    probs: Any, codes: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`macro_auc`, vectorised over resamples.

    The resamples of :func:`mmsafe.metrics.bootstrap_ci` (users drawn jointly), so the interval
    equals ``bootstrap_ci(macro_auc, probs, codes, ...)`` up to float rounding; each group's
    AUC in a resample is the Mann-Whitney sum with every user weighted by how often it was
    drawn, from one sort of the scores. A group absent from a resample is left out of it.

    Example:
        >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> lo, hi = macro_auc_bootstrap(p, [0, 0, 1, 1], n_boot=200)
        >>> bool(0.0 <= lo <= macro_auc(p, [0, 0, 1, 1]) <= hi <= 1.0)
        True
    """
    check_options(n_boot, level, seed)
    return percentile_interval(macro_auc_resamples(probs, codes, n_boot, seed), level)


def macro_auc_resamples(probs: Any, codes: Any, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``(n_boot,)`` :func:`macro_auc` of each resample of :func:`macro_auc_bootstrap`.

    NaN where fewer than two groups were drawn. Averaging the arrays of several probes (same
    ``seed``, same users) bootstraps their mean AUC.

    Example:
        >>> macro_auc_resamples([[0.9, 0.1], [0.2, 0.8]], [0, 1], n_boot=4).tolist()
        [nan, 1.0, nan, nan]
    """
    check_options(n_boot, 0.95, seed)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(codes, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],) or y.size == 0:
        raise ValueError("probs must be (N, G) and codes (N,), N >= 1.")
    groups = np.unique(y).tolist()
    sorted_ = []
    for g in groups:
        order = np.argsort(p[:, g], kind="stable")
        s = p[order, g]
        new = np.r_[True, s[1:] != s[:-1]]  # the first position of each score level
        sorted_.append((order, y[order] == g, np.flatnonzero(new), np.cumsum(new) - 1))
    stats = []
    for counts in resample_counts(y.size, int(n_boot), seed):
        aucs = np.full((counts.shape[0], len(groups)), np.nan)
        for j, (order, pos, starts, level_of) in enumerate(sorted_):
            c = counts[:, order]
            w_pos, w_neg = c * pos, c * ~pos
            at = np.add.reduceat(w_neg, starts, axis=1)  # negative weight at each score level
            below = np.cumsum(at, axis=1) - at
            wins = (w_pos * (below + 0.5 * at)[:, level_of]).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs[:, j] = wins / (w_pos.sum(axis=1) * w_neg.sum(axis=1))
        aucs[~np.isfinite(aucs)] = np.nan
        present = (~np.isnan(aucs)).sum(axis=1)
        total = np.nansum(aucs, axis=1) / np.maximum(present, 1)
        stats.append(np.where(present >= 2, total, np.nan))
    return np.concatenate(stats)
