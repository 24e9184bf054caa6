"""Nonparametric percentile bootstrap confidence intervals.

Both functions resample the ``N`` rows with replacement ``n_boot`` times, recompute the statistic
on each resample, and return the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of those
values (numpy's default linear interpolation): the plain *percentile* bootstrap, not BCa or the
basic/studentised variants. It assumes independent rows and can under-cover for very small ``N``
or statistics near a boundary (e.g. accuracy 0 or 1 gives the degenerate interval ``(1, 1)``).

Resampling indices are drawn from ``np.random.default_rng(seed)`` in chunks of whole resamples, in
the same order by both functions, so results are deterministic given ``seed`` and
:func:`mean_ci` reproduces ``bootstrap_ci(np.mean, values)`` for the same seed up to float
rounding.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mmsafe.metrics.arrays import as_numpy as _as_numpy

__all__ = ["bootstrap_ci", "mean_ci", "share_ci"]

_CHUNK_ELEMENTS = 1 << 22  # resampling indices drawn per chunk (32 MiB of intp)


def check_options(n_boot: Any, level: Any, seed: Any) -> None:
    """Validate the shared bootstrap options."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"`n_boot` must be a positive integer, got {n_boot!r}.")
    if not isinstance(level, numbers.Real) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1), e.g. 0.95, got {level!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")


def _index_chunks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``(rows, n)`` index matrices, ``n_boot`` rows in total, deterministically."""
    rng = np.random.default_rng(int(seed))
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n), dtype=np.intp)


def percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite-or-infinite (non-NaN) bootstrap statistics."""
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(lo), float(hi))


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic(*arrays)``.

    All arrays are resampled along their first axis with the *same* indices (so paired rows,
    e.g. ``probs`` and ``target``, stay together). Resamples whose statistic is ``NaN`` (e.g. a
    class missing from the resample) are ignored; if all are ``NaN`` the interval is
    ``(nan, nan)``. Exceptions raised by ``statistic`` propagate.

    Args:
        statistic: function of the resampled arrays returning a float.
        *arrays: one or more arrays with the same number of rows ``N >= 1`` (torch tensors are
            converted to numpy).
        n_boot: number of bootstrap resamples.
        level: confidence level in ``(0, 1)``.
        seed: seed for ``np.random.default_rng``.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: no arrays, empty or mismatched arrays, or invalid options.

    Example:
        >>> x = np.arange(100.0)
        >>> lo, hi = bootstrap_ci(np.median, x, n_boot=200)
        >>> bool(lo < 49.5 < hi)
        True
    """
    check_options(n_boot, level, seed)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample after `statistic`.")
    arrs = [_as_numpy(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise ValueError(f"arrays[{i}] is a scalar; pass arrays with one row per sample.")
    n = arrs[0].shape[0]
    if n == 0:
        raise ValueError("Cannot bootstrap empty arrays (N = 0).")
    lengths = [a.shape[0] for a in arrs]
    if any(length != n for length in lengths):
        raise ValueError(f"All arrays must have the same number of rows, got {lengths}.")
    stats = np.empty(int(n_boot), dtype=np.float64)
    b = 0
    for chunk in _index_chunks(n, int(n_boot), seed):
        for idx in chunk:
            stats[b] = float(statistic(*(a[idx] for a in arrs)))
            b += 1
    return percentile_interval(stats, level)


def mean_ci(
    values: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean, vectorised.

    Fast path for per-sample scores such as correctness (0/1): resamples are averaged as whole
    index matrices in chunks, so ``N = 1e5, n_boot = 1000`` takes well under a few seconds.
    Uses the same resamples as :func:`bootstrap_ci` for the same ``seed``.

    Args:
        values: ``(N,)`` numbers (bools allowed), ``N >= 1``, no NaN.
        n_boot: number of bootstrap resamples.
        level: confidence level in ``(0, 1)``.
        seed: seed for ``np.random.default_rng``.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: empty, non-1-D, non-numeric or NaN values, or invalid options.

    Example:
        >>> lo, hi = mean_ci(np.r_[np.ones(80), np.zeros(20)], n_boot=500)
        >>> bool(0.7 < lo < 0.8 < hi < 0.9)
        True
    """
    check_options(n_boot, level, seed)
    v = _as_numpy(values, "values")
    if v.ndim != 1:
        raise ValueError(f"`values` must be 1-D (one number per sample), got shape {v.shape}.")
    if v.shape[0] == 0:
        raise ValueError("Cannot bootstrap an empty `values` array (N = 0).")
    if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
        raise ValueError(f"`values` must be numeric, got dtype {v.dtype}.")
    v = v.astype(np.float64, copy=False)
    if np.isnan(v).any():
        raise ValueError("`values` contains NaN; drop those samples first.")
    means = np.concatenate(
        [v[idx].mean(axis=1) for idx in _index_chunks(v.shape[0], int(n_boot), seed)]
    )
    return percentile_interval(means, level)


def resample_counts(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The resamples of :func:`bootstrap_ci` as ``(rows, n)`` float count matrices, in chunks.

    Row ``b`` counts how often each original row appears in resample ``b``. Any statistic that
    is a ratio of per-row sums (means, per-group means, binned calibration gaps, per-class
    counts) is then one matrix product per chunk, for every resample at once.

    Example:
        >>> counts = np.concatenate(list(resample_counts(5, 3, seed=0)))
        >>> counts.shape, counts.sum(axis=1).tolist()
        ((3, 5), [5.0, 5.0, 5.0])
    """
    if n * n_boot <= _CHUNK_ELEMENTS:  # small enough to keep: checks of one audit share it
        yield from _cached_counts(n, n_boot, seed)
    else:
        yield from _counts(n, n_boot, seed)


def _counts(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    for idx in _index_chunks(n, n_boot, seed):
        rows = idx.shape[0]
        flat = (idx + n * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


@functools.lru_cache(maxsize=2)
def _cached_counts(n: int, n_boot: int, seed: int) -> tuple[np.ndarray, ...]:
    chunks = tuple(_counts(n, n_boot, seed))
    for c in chunks:
        c.setflags(write=False)
    return chunks


def share_ci(
    values: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> list[tuple[float, float]]:
    """Percentile CIs of each column's share ``m_j / sum(m)`` of the column means ``m``.

    ``values`` is ``(N, M)`` per-row non-negative contributions (e.g. ``|Shapley|`` values or
    accuracy costs); negative column means are clipped to 0 before normalising. A resample whose
    means sum to 0 has no shares and is dropped.

    Example:
        >>> share_ci(np.tile([[1.0, 3.0]], (10, 1)), n_boot=50)
        [(0.25, 0.25), (0.75, 0.75)]
    """
    check_options(n_boot, level, seed)
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    stats = []
    for counts in resample_counts(n, int(n_boot), seed):
        d = np.clip(counts @ v / n, 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append(d / d.sum(axis=1, keepdims=True))
    s = np.concatenate(stats)
    return [percentile_interval(s[:, j], level) for j in range(v.shape[1])]


def grouped_mean_ci(
    values: Any,
    groups: Any,
    n_groups: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """Bootstrap CIs of the overall mean and of the mean within each group, from one resample set.

    Rows are resampled jointly (a plain, non-stratified bootstrap, the same resamples as
    :func:`mean_ci` with the same seed, so the overall interval equals ``mean_ci``'s); a group's
    mean in a resample is taken over the resampled rows of that group, and resamples without any
    row of the group are ignored for it.

    Args:
        values: ``(N,)`` per-row numbers, e.g. correctness.
        groups: ``(N,)`` integer group per row in ``[0, n_groups)``.
        n_groups: number of groups.
        n_boot: number of resamples.
        level: confidence level.
        seed: seed of the resamples.

    Returns:
        ``(overall (lo, hi), [(lo, hi) per group])``; ``(nan, nan)`` for an empty group.

    Example:
        >>> v = np.r_[np.ones(50), np.zeros(50)]; g = np.r_[np.zeros(50), np.ones(50)].astype(int)
        >>> overall, per = grouped_mean_ci(v, g, 2, n_boot=200)
        >>> per
        [(1.0, 1.0), (0.0, 0.0)]
    """
    check_options(n_boot, level, seed)
    v = _as_numpy(values, "values").astype(np.float64)
    g = _as_numpy(groups, "groups").astype(np.int64)
    if v.ndim != 1 or v.shape != g.shape or v.size == 0:
        raise ValueError("values and groups must be non-empty 1-D arrays of the same length.")
    if g.min() < 0 or g.max() >= n_groups:
        raise ValueError(f"groups must lie in [0, {n_groups}).")
    onehot = np.eye(n_groups)[g]
    design = np.column_stack([v, onehot * v[:, None], onehot])  # sums, group sums, group counts
    overall, per = [], []
    for counts in resample_counts(v.size, int(n_boot), seed):
        sums = counts @ design
        overall.append(sums[:, 0] / v.size)
        total, count = sums[:, 1 : 1 + n_groups], sums[:, 1 + n_groups :]
        per.append(np.where(count > 0, total / np.maximum(count, 1), np.nan))
    per_all = np.concatenate(per)
    return (
        percentile_interval(np.concatenate(overall), level),
        [percentile_interval(per_all[:, k], level) for k in range(n_groups)],
    )
