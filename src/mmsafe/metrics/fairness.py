"""Group fairness of a multiclass classifier: per-group rates and between-group gaps.

A multiclass prediction is audited **one class against the rest**: for class ``c`` the binary
prediction is ``pred == c`` and the binary truth is ``target == c``. Per group ``g`` and class
``c``:

* selection rate ``SR[g, c] = P(pred = c | g)``,
* true-positive rate ``TPR[g, c] = P(pred = c | target = c, g)``,
* false-positive rate ``FPR[g, c] = P(pred = c | target != c, g)``,

and per group the (multiclass) accuracy ``P(pred = target | g)``. A rate whose denominator is
empty (no row of class ``c`` in group ``g``) is ``NaN`` and is left out of the gaps; fairlearn's
own ``true_positive_rate`` returns ``0`` there instead, so the two agree whenever every rate is
defined.

The gaps for class ``c`` are fairlearn's binary ones (methods reference §10h):

* statistical-parity difference ``max_g SR - min_g SR`` and ratio ``min_g SR / max_g SR``,
* equal-opportunity difference ``max_g TPR - min_g TPR``,
* equalized-odds difference ``max(ΔTPR, ΔFPR)`` (``agg="worst_case"``).

Each is summarised over classes as the **macro** mean (NaN classes skipped) and as the **worst**
class (the largest difference, the smallest ratio). Point estimates are computed with fairlearn's
:class:`~fairlearn.metrics.MetricFrame` (:func:`group_fairness`); bootstrap CIs
(:func:`fairness_bootstrap`) reuse the same formulas on resampled count tables, vectorised over
resamples with :func:`mmsafe.metrics.bootstrap.resample_counts`. Note that a max-minus-min gap is
biased upwards on finite samples, so its CI rarely contains 0 even without a true gap.

fairlearn (and pandas) are imported lazily, only when a point estimate is computed.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmsafe.metrics.bootstrap import check_options, percentile_interval, resample_counts

__all__ = [
    "SUMMARY_METRICS",
    "FairnessReport",
    "binary_fpr",
    "binary_selection_rate",
    "binary_tpr",
    "encode_groups",
    "fairness_bootstrap",
    "group_fairness",
    "summarise_rates",
]

SUMMARY_METRICS: tuple[str, ...] = (
    "statistical_parity_difference",
    "statistical_parity_ratio",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "accuracy_difference",
)
"""The between-group summaries, each also reported for the worst class as ``<name>_worst``
(except ``accuracy_difference``, which is multiclass already)."""


# --------------------------------------------------------------------------- binary rates


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def binary_selection_rate(y_true: Any, y_pred: Any) -> float:
    """``P(pred = 1)``; ``NaN`` on no rows.

    Example:
        >>> binary_selection_rate([0, 1, 1, 0], [1, 1, 0, 0])
        0.5
    """
    p = np.asarray(y_pred, dtype=bool)
    return _ratio(p.sum(), p.size)


def binary_tpr(y_true: Any, y_pred: Any) -> float:
    """``P(pred = 1 | true = 1)``; ``NaN`` when there is no positive row.

    Example:
        >>> binary_tpr([0, 1, 1, 0], [1, 1, 0, 0]), binary_tpr([0, 0], [1, 0])
        (0.5, nan)
    """
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    return _ratio((t & p).sum(), t.sum())


def binary_fpr(y_true: Any, y_pred: Any) -> float:
    """``P(pred = 1 | true = 0)``; ``NaN`` when there is no negative row.

    Example:
        >>> binary_fpr([0, 1, 1, 0], [1, 1, 0, 0])
        0.5
    """
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    return _ratio((~t & p).sum(), (~t).sum())


def _accuracy(y_true: Any, y_pred: Any) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return _ratio((t == p).sum(), t.size)


def _one_vs_rest(y_true: Any, y_pred: Any, *, fn: Callable[[Any, Any], float], cls: int) -> float:
    return fn(np.asarray(y_true) == cls, np.asarray(y_pred) == cls)


# --------------------------------------------------------------------------- summaries


def _spread(x: np.ndarray) -> np.ndarray:
    """``max - min`` over the group axis (-2 for ``(..., G, C)``), NaN groups skipped."""
    with np.errstate(invalid="ignore"), _quiet():
        return np.nanmax(x, axis=-2) - np.nanmin(x, axis=-2)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN-slice RuntimeWarnings (NaN is the intended answer there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def summarise_rates(
    selection: np.ndarray, tpr: np.ndarray, fpr: np.ndarray, accuracy: np.ndarray
) -> dict[str, np.ndarray]:
    """Between-group gaps from per-group rates; vectorised over any leading axes.

    Args:
        selection: ``(..., G, C)`` selection rates.
        tpr: ``(..., G, C)`` true-positive rates (NaN where undefined).
        fpr: ``(..., G, C)`` false-positive rates (NaN where undefined).
        accuracy: ``(..., G)`` per-group accuracy.

    Returns:
        ``{name: (...) array}`` for every name in :data:`SUMMARY_METRICS` (macro over classes)
        and ``<name>_worst`` (worst class), plus the per-class ``(..., C)`` arrays under
        ``per_class/<name>``.

    Example:
        >>> sr = np.array([[0.5, 0.5], [0.2, 0.8]])
        >>> out = summarise_rates(sr, sr, 1 - sr, np.array([0.9, 0.6]))
        >>> [round(float(out[k]), 3) for k in ("statistical_parity_difference",
        ...  "statistical_parity_ratio", "accuracy_difference")]
        [0.3, 0.512, 0.3]
    """
    with np.errstate(invalid="ignore", divide="ignore"), _quiet():
        spd = _spread(selection)
        spr = np.nanmin(selection, axis=-2) / np.nanmax(selection, axis=-2)
        eopp = _spread(tpr)
        eod = np.fmax(eopp, _spread(fpr))
        per_class = {
            "statistical_parity_difference": spd,
            "statistical_parity_ratio": np.where(np.isfinite(spr), spr, np.nan),
            "equal_opportunity_difference": eopp,
            "equalized_odds_difference": eod,
        }
        out: dict[str, np.ndarray] = {}
        for name, v in per_class.items():
            out[name] = np.nanmean(v, axis=-1)
            worst = np.nanmin(v, axis=-1) if name.endswith("ratio") else np.nanmax(v, axis=-1)
            out[f"{name}_worst"] = worst
            out[f"per_class/{name}"] = v
        out["accuracy_difference"] = np.nanmax(accuracy, axis=-1) - np.nanmin(accuracy, axis=-1)
    return out


# --------------------------------------------------------------------------- point estimates


@dataclass(frozen=True)
class FairnessReport:
    """Per-group rates and between-group gaps of one classifier on one sensitive feature.

    Attributes:
        groups: the group names (sorted), ``G`` of them.
        n_classes: ``C``.
        counts: ``(G,)`` rows per group.
        accuracy: ``(G,)`` accuracy per group.
        selection_rate: ``(G, C)`` ``P(pred = c | g)``.
        tpr: ``(G, C)`` one-vs-rest true-positive rates (NaN where undefined).
        fpr: ``(G, C)`` one-vs-rest false-positive rates (NaN where undefined).
        summary: ``{name: float}``: :data:`SUMMARY_METRICS`, ``<name>_worst``, and
            ``overall_accuracy``.
        per_class: ``{name: (C,) array}``: each class's gap.
    """

    groups: list[str]
    n_classes: int
    counts: np.ndarray
    accuracy: np.ndarray
    selection_rate: np.ndarray
    tpr: np.ndarray
    fpr: np.ndarray
    summary: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tpr_macro(self) -> np.ndarray:
        """``(G,)`` mean one-vs-rest TPR per group (macro recall; NaN classes skipped)."""
        with _quiet():
            return np.nanmean(self.tpr, axis=1)

    @property
    def fpr_macro(self) -> np.ndarray:
        """``(G,)`` mean one-vs-rest FPR per group (NaN classes skipped)."""
        with _quiet():
            return np.nanmean(self.fpr, axis=1)


def group_fairness(
    target: Any, preds: Any, groups: Sequence[Any], n_classes: int
) -> FairnessReport:
    """Per-group rates and gaps, computed with fairlearn's ``MetricFrame``.

    Args:
        target: ``(N,)`` true class indices in ``[0, n_classes)``.
        preds: ``(N,)`` predicted class indices.
        groups: ``(N,)`` sensitive feature (any hashable; converted to ``str``).
        n_classes: ``C``.

    Returns:
        A :class:`FairnessReport`.

    Example:
        >>> r = group_fairness([0, 1, 0, 1], [0, 1, 1, 1], ["a", "a", "b", "b"], 2)
        >>> r.groups, r.accuracy.tolist(), r.summary["accuracy_difference"]
        (['a', 'b'], [1.0, 0.5], 0.5)
    """
    from fairlearn.metrics import MetricFrame

    y = np.asarray(target, dtype=np.int64)
    p = np.asarray(preds, dtype=np.int64)
    g = np.asarray([str(x) for x in groups])
    if y.ndim != 1 or y.shape != p.shape or y.shape != g.shape or y.size == 0:
        raise ValueError("target, preds and groups must be non-empty 1-D and of the same length.")
    fns: dict[str, Callable[..., float]] = {"accuracy": _accuracy, "count": _count}
    rates = {"sr": binary_selection_rate, "tpr": binary_tpr, "fpr": binary_fpr}
    for c in range(n_classes):
        for key, fn in rates.items():
            fns[f"{key}/{c}"] = functools.partial(_one_vs_rest, fn=fn, cls=c)
    frame = MetricFrame(metrics=fns, y_true=y, y_pred=p, sensitive_features=g)
    by = frame.by_group
    names = [str(x) for x in by.index]

    def table(key: str) -> np.ndarray:
        cols = [f"{key}/{c}" for c in range(n_classes)]
        return by[cols].to_numpy(dtype=np.float64)

    sr, tpr, fpr = table("sr"), table("tpr"), table("fpr")
    acc = by["accuracy"].to_numpy(dtype=np.float64)
    diff, ratio = frame.difference(), frame.ratio()

    def per_class(key: str, agg: Any) -> np.ndarray:
        return np.array([float(agg[f"{key}/{c}"]) for c in range(n_classes)])

    d_sr, d_tpr, d_fpr = per_class("sr", diff), per_class("tpr", diff), per_class("fpr", diff)
    r_sr = per_class("sr", ratio)
    cls = {
        "statistical_parity_difference": d_sr,
        "statistical_parity_ratio": r_sr,
        "equal_opportunity_difference": d_tpr,
        "equalized_odds_difference": np.fmax(d_tpr, d_fpr),
    }
    summary: dict[str, float] = {}
    with _quiet():
        for name, v in cls.items():
            summary[name] = float(np.nanmean(v))
            worst = np.nanmin(v) if name.endswith("ratio") else np.nanmax(v)
            summary[f"{name}_worst"] = float(worst)
    summary["accuracy_difference"] = float(diff["accuracy"])
    summary["overall_accuracy"] = float(frame.overall["accuracy"])
    return FairnessReport(
        groups=names,
        n_classes=n_classes,
        counts=by["count"].to_numpy(dtype=np.int64),
        accuracy=acc,
        selection_rate=sr,
        tpr=tpr,
        fpr=fpr,
        summary=summary,
        per_class=cls,
    )


def _count(y_true: Any, y_pred: Any) -> float:
    return float(np.asarray(y_true).size)


# --------------------------------------------------------------------------- bootstrap


def encode_groups(groups: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a sensitive feature, in the sorted order of its string values.

    Example:
        >>> encode_groups(["b", "a", "b"])
        (array([1, 0, 1]), ['a', 'b'])
    """
    names, codes = np.unique(np.asarray([str(x) for x in groups]), return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def _rates_from_sums(
    sums: np.ndarray, n_groups: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(B, K)`` design sums -> SR, TPR, FPR ``(B, G, C)`` and accuracy ``(B, G)``."""
    b = sums.shape[0]
    n = sums[:, :n_groups]
    correct = sums[:, n_groups : 2 * n_groups]
    rest = sums[:, 2 * n_groups :].reshape(b, 3, n_groups, n_classes)
    pred, pos, tp = rest[:, 0], rest[:, 1], rest[:, 2]
    nn = n[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        sr = np.where(nn > 0, pred / nn, np.nan)
        tpr = np.where(pos > 0, tp / pos, np.nan)
        neg = nn - pos
        fpr = np.where(neg > 0, (pred - tp) / neg, np.nan)
        acc = np.where(n > 0, correct / n, np.nan)
    return sr, tpr, fpr, acc


def fairness_bootstrap(
    target: Any,
    preds: Any,
    group_codes: Any,
    n_groups: int,
    n_classes: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of the per-group rates and of the gaps.

    Rows are resampled jointly (the resamples of :func:`mmsafe.metrics.bootstrap_ci` for the
    same seed); every statistic is a ratio of per-row sums, so each chunk of resamples is one
    matrix product. A resample in which a group is absent gives NaN for that group's rates and
    leaves it out of that resample's gaps.

    Args:
        target: ``(N,)`` true classes.
        preds: ``(N,)`` predicted classes.
        group_codes: ``(N,)`` integer groups in ``[0, n_groups)`` (see :func:`encode_groups`).
        n_groups: ``G``.
        n_classes: ``C``.
        n_boot: resamples.
        level: confidence level.
        seed: seed of the resamples.

    Returns:
        ``{name: (lo, hi)}`` with the summary names of :func:`summarise_rates` (macro and
        ``_worst``) and per group ``g`` (an integer code): ``accuracy/g``, ``tpr/g``, ``fpr/g``
        (macro over classes) and ``selection_rate/g/c``.

    Example:
        >>> y = np.array([0, 1] * 50); p = y.copy(); p[:10] = 1 - p[:10]
        >>> ci = fairness_bootstrap(y, p, np.r_[np.zeros(50), np.ones(50)], 2, 2, n_boot=200)
        >>> lo, hi = ci["accuracy_difference"]; bool(0.05 < hi < 0.5)
        True
    """
    check_options(n_boot, level, seed)
    y = np.asarray(target, dtype=np.int64)
    p = np.asarray(preds, dtype=np.int64)
    g = np.asarray(group_codes, dtype=np.int64)
    if y.ndim != 1 or y.shape != p.shape or y.shape != g.shape or y.size == 0:
        raise ValueError("target, preds and group_codes must be non-empty 1-D, same length.")
    eye_g, eye_c = np.eye(n_groups)[g], np.eye(n_classes)
    oh_p, oh_y = eye_c[p], eye_c[y]
    n = y.size
    design = np.concatenate(
        [
            eye_g,
            eye_g * (y == p)[:, None],
            (eye_g[:, :, None] * oh_p[:, None, :]).reshape(n, -1),
            (eye_g[:, :, None] * oh_y[:, None, :]).reshape(n, -1),
            (eye_g[:, :, None] * (oh_y * oh_p)[:, None, :]).reshape(n, -1),
        ],
        axis=1,
    )
    stats: dict[str, list[np.ndarray]] = {}
    for counts in resample_counts(n, int(n_boot), seed):
        sr, tpr, fpr, acc = _rates_from_sums(counts @ design, n_groups, n_classes)
        summ = {k: v for k, v in summarise_rates(sr, tpr, fpr, acc).items() if "/" not in k}
        with _quiet():
            tpr_m, fpr_m = np.nanmean(tpr, axis=2), np.nanmean(fpr, axis=2)
        for k in range(n_groups):
            summ[f"accuracy/{k}"] = acc[:, k]
            summ[f"tpr/{k}"] = tpr_m[:, k]
            summ[f"fpr/{k}"] = fpr_m[:, k]
            for c in range(n_classes):
                summ[f"selection_rate/{k}/{c}"] = sr[:, k, c]
        for key, v in summ.items():
            stats.setdefault(key, []).append(v)
    return {k: percentile_interval(np.concatenate(v), level) for k, v in stats.items()}
