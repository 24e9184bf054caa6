"""Provenance of images: detect generated images and attribute them to their generator.

The ``generative.provenance`` check asks whether generated images can be told from real ones by
a cheap detector, and whether that detector survives generators it never saw.

* **Detector** (UniversalFakeDetect, Ojha et al., CVPR 2023, "Towards Universal Fake Image
  Detectors that Generalize Across Generative Models"): a linear probe, here a logistic
  regression on standardised *frozen* features (CLIP image embeddings, or the audited
  encoder's), :func:`fit_probe` / :func:`probe_scores`.
* **Leave-one-generator-out** (:func:`leave_one_generator_out`): for each generator ``g`` the
  probe is trained on real images against the *other* generators and tested on held-out real
  images against ``g``, the setting in which fixed thresholds fail: a probe's scores on an
  unseen generator drift towards the real side, so the usual ``p > 0.5`` rule misses most of
  its images (Ojha et al. report the collapse of trained detectors on unseen generators).
* **Calibrated threshold** (:func:`calibrate_threshold`): the threshold is set on held-out
  *real* images only, with split conformal prediction
  (:func:`mmsafe.methods.conformal.conformal_quantile`): ``t`` is the ``ceil((n + 1)(1 -
  alpha))``-th smallest real calibration score and an image is flagged when its score exceeds
  ``t``. If calibration and test real images are exchangeable, the false-positive rate on real
  images is at most ``alpha`` (over the draw of the calibration set) whatever the probe and
  whatever the generators: the guarantee concerns real images only, so it holds for unseen
  generators too, and what varies is the detection rate.
* **Metrics** (:func:`detection_metrics`): average precision (threshold-free, sklearn's
  ``average_precision_score``) and accuracy, balanced accuracy, TPR and FPR at a threshold.
* **Attribution** (:func:`attribution`): a multinomial logistic regression on the same features
  names the generator (or "real"); macro accuracy (mean per-class recall, sklearn's
  ``balanced_accuracy_score``), accuracy and the confusion matrix on a stratified held-out
  split.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (200, 4)), rng.normal(1.5, 1, (200, 4))]
    >>> y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    >>> s = probe_scores(fit_probe(x, y), x)
    >>> t = calibrate_threshold(s[:200], alpha=0.1)
    >>> m = detection_metrics(s, y, t)
    >>> bool(m["fpr"] <= 0.1 and m["ap"] > 0.95)
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mmsafe.methods.conformal import conformal_quantile, min_calibration_size
from mmsafe.metrics.arrays import as_numpy as _as_numpy

__all__ = [
    "attribution",
    "calibrate_threshold",
    "detection_metrics",
    "fit_probe",
    "leave_one_generator_out",
    "probe_scores",
]


# ------------------------------------------------------------------------------ validation
def _features(x: Any, name: str = "features") -> np.ndarray:
    f = _as_numpy(x, name)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty (N, D) matrix, got shape {f.shape}.")
    if not np.issubdtype(f.dtype, np.number):
        raise ValueError(f"`{name}` must be numeric, got dtype {f.dtype}.")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return f


def _binary(y: Any, n: int, name: str = "is_fake") -> np.ndarray:
    b = _as_numpy(y, name)
    if b.ndim != 1 or b.shape[0] != n:
        raise ValueError(f"`{name}` must be 1-D with {n} entries, got shape {b.shape}.")
    if not np.isin(b, (0, 1)).all():
        raise ValueError(f"`{name}` must be 0 (real) / 1 (generated), or bool.")
    return b.astype(np.int64)


def _alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), e.g. 0.05, got {alpha!r}.")
    return float(alpha)


def _positive(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not x > 0:
        raise ValueError(f"`{name}` must be a positive number, got {x!r}.")
    return float(x)


# ------------------------------------------------------------------------------ probe
def fit_probe(features: Any, is_fake: Any, *, C: float = 1.0, max_iter: int = 1000) -> Pipeline:
    """Fit the linear real-vs-generated probe: standardise, then an L2 logistic regression.

    Args:
        features: ``(N, D)`` frozen features (e.g. CLIP image embeddings).
        is_fake: ``(N,)`` 1 for generated images, 0 for real ones; both must occur.
        C: inverse L2 regularisation strength (sklearn's ``C``).
        max_iter: the solver's iteration cap.

    Returns:
        The fitted sklearn ``Pipeline(StandardScaler, LogisticRegression)``.

    Raises:
        ValueError: bad shapes or labels, a single class, or a non-positive ``C``.

    Example:
        >>> probe = fit_probe([[0.0], [0.1], [1.0], [1.1]], [0, 0, 1, 1])
        >>> probe.predict([[0.05], [1.05]]).tolist()
        [0, 1]
    """
    x = _features(features)
    y = _binary(is_fake, x.shape[0])
    if np.unique(y).size < 2:
        raise ValueError("`is_fake` must contain both real (0) and generated (1) rows.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}.")
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=_positive(C, "C"), max_iter=int(max_iter))
    )
    return model.fit(x, y)


def probe_scores(probe: Any, features: Any) -> np.ndarray:
    """The probe's probability that each image is generated.

    Args:
        probe: a fitted binary classifier with ``predict_proba`` and ``classes_`` containing 1
            (e.g. from :func:`fit_probe`).
        features: ``(N, D)`` features.

    Returns:
        ``(N,)`` scores in ``[0, 1]`` (float64).

    Raises:
        ValueError: bad features or a probe without the generated class.

    Example:
        >>> probe = fit_probe([[0.0], [1.0]], [0, 1])
        >>> probe_scores(probe, [[0.0], [1.0]]).round(2).tolist()
        [0.34, 0.66]
    """
    x = _features(features)
    classes = list(getattr(probe, "classes_", []))
    if 1 not in classes:
        raise ValueError("`probe` must be a fitted classifier whose classes_ include 1.")
    return np.asarray(probe.predict_proba(x)[:, classes.index(1)], dtype=np.float64)


def calibrate_threshold(real_scores: Any, alpha: float = 0.05) -> float:
    """Split-conformal detection threshold with false-positive rate at most ``alpha``.

    The threshold is :func:`mmsafe.methods.conformal.conformal_quantile` of the *real*
    calibration scores at level ``1 - alpha``; an image is flagged as generated when its score is
    strictly above it. For a new real image exchangeable with the calibration ones,
    ``P(score > t) <= alpha``. The calibration images must not have been used to fit the probe.
    With fewer than ``min_calibration_size(1 - alpha)`` rows the threshold is ``+inf`` (nothing
    is flagged), the only way to keep the guarantee.

    Args:
        real_scores: ``(n,)`` probe scores of held-out real images.
        alpha: the false-positive rate to guarantee, in ``(0, 1)``.

    Returns:
        The threshold ``t``.

    Raises:
        ValueError: a bad ``alpha``, NaN scores or non-1-D scores.

    Example:
        >>> calibrate_threshold(np.arange(1, 20) / 20, alpha=0.1)  # ceil(20 * 0.9) = 18th
        0.9
    """
    a = _alpha(alpha)
    s = _as_numpy(real_scores, "real_scores")
    if s.ndim != 1:
        raise ValueError(f"`real_scores` must be 1-D, got shape {s.shape}.")
    return conformal_quantile(s.astype(np.float64), 1.0 - a)


def detection_metrics(scores: Any, is_fake: Any, threshold: float) -> dict[str, Any]:
    """Average precision; accuracy, balanced accuracy, TPR and FPR flagging ``> threshold``.

    Args:
        scores: ``(N,)`` detector scores (higher = more likely generated).
        is_fake: ``(N,)`` 1 for generated images, 0 for real ones.
        threshold: flag when ``score > threshold`` (may be ``inf``).

    Returns:
        ``{"ap", "accuracy", "balanced_accuracy", "tpr", "fpr", "threshold", "n_real",
        "n_fake"}``; ``ap`` is None without both classes, ``tpr`` / ``fpr`` are NaN without
        generated / real rows.

    Raises:
        ValueError: bad shapes, NaN scores or labels.

    Example:
        >>> m = detection_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.3)
        >>> m["tpr"], m["fpr"], m["accuracy"], round(m["ap"], 4)
        (1.0, 0.5, 0.75, 0.8333)
    """
    s = _as_numpy(scores, "scores")
    if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"`scores` must be a non-empty numeric 1-D array, got shape {s.shape}.")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("`scores` contains NaN.")
    y = _binary(is_fake, s.size)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"`threshold` must be a number, got {threshold!r}.")
    flag = s > float(threshold)
    n_fake, n_real = int(y.sum()), int((1 - y).sum())
    tpr = float(flag[y == 1].mean()) if n_fake else float("nan")
    fpr = float(flag[y == 0].mean()) if n_real else float("nan")
    both = n_fake > 0 and n_real > 0
    return {
        "ap": float(average_precision_score(y, s)) if both else None,
        "accuracy": float((flag == y.astype(bool)).mean()),
        "balanced_accuracy": float((tpr + 1.0 - fpr) / 2.0) if both else float("nan"),
        "tpr": tpr,
        "fpr": fpr,
        "threshold": float(threshold),
        "n_real": n_real,
        "n_fake": n_fake,
    }


# ------------------------------------------------------------------------------ LOGO
def _sources(sources: Any, n: int) -> np.ndarray:
    src = list(sources)
    if len(src) != n:
        raise ValueError(f"`sources` has {len(src)} entries for {n} feature rows.")
    arr = np.empty(n, dtype=object)
    arr[:] = src
    return arr


def leave_one_generator_out(
    features: Any,
    sources: Sequence[Hashable],
    *,
    real: Hashable = "real",
    alpha: float = 0.05,
    train_fraction: float = 0.5,
    calibration_fraction: float = 0.25,
    fixed_threshold: float = 0.5,
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train on real vs all generators but one, test on real vs the held-out generator.

    Real rows are split once (seeded) into a training part, a calibration part and a test part
    (the rest). For each generator ``g``: the probe (:func:`fit_probe`) is fitted on the real
    training rows against every row of the other generators; the threshold is calibrated on the
    real calibration rows (:func:`calibrate_threshold`, FPR ``<= alpha``); and the probe is
    scored on the real test rows against every row of ``g`` (:func:`detection_metrics`), at the
    calibrated threshold and at the fixed ``fixed_threshold`` for comparison.

    Args:
        features: ``(N, D)`` frozen features of real and generated images.
        sources: ``(N,)`` where each row comes from: ``real`` or a generator's name.
        real: the label of real rows in ``sources``.
        alpha: the false-positive rate the calibrated threshold guarantees.
        train_fraction: share of real rows used for training.
        calibration_fraction: share of real rows used for calibration (the rest are test rows).
        fixed_threshold: the naive threshold to compare with (``0.5`` on the probability).
        C: the probe's inverse regularisation strength.
        seed: seed of the real-row split.

    Returns:
        ``{"generators": {g: {"ap", "calibrated": metrics, "fixed": metrics}}, "mean_ap",
        "mean_tpr_calibrated", "mean_tpr_fixed", "alpha", "n_real_train",
        "n_real_calibration", "n_real_test"}``; ``metrics`` as :func:`detection_metrics`,
        generators in order of first appearance.

    Raises:
        ValueError: fewer than two generators, no real rows, fractions that leave a part empty
            or a calibration part smaller than ``min_calibration_size(1 - alpha)``, or bad
            inputs.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.r_[rng.normal(0, 1, (120, 3)), rng.normal(2, 1, (60, 3)),
        ...           rng.normal(1.5, 1, (60, 3))]
        >>> src = ["real"] * 120 + ["gan"] * 60 + ["diffusion"] * 60
        >>> r = leave_one_generator_out(x, src, alpha=0.1)
        >>> sorted(r["generators"]), bool(r["mean_ap"] > 0.9)
        (['diffusion', 'gan'], True)
    """
    x = _features(features)
    src = _sources(sources, x.shape[0])
    a = _alpha(alpha)
    for name, frac in (
        ("train_fraction", train_fraction),
        ("calibration_fraction", calibration_fraction),
    ):
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real) or not 0 < frac < 1:
            raise ValueError(f"`{name}` must be in (0, 1), got {frac!r}.")
    if train_fraction + calibration_fraction >= 1:
        raise ValueError("`train_fraction + calibration_fraction` must be below 1 (test rows).")
    if isinstance(fixed_threshold, bool) or not isinstance(fixed_threshold, numbers.Real):
        raise ValueError(f"`fixed_threshold` must be a number, got {fixed_threshold!r}.")
    is_real = src == real
    gens = [s for s in dict.fromkeys(src.tolist()) if s != real]
    if not is_real.any():
        raise ValueError(f"no real rows (label {real!r}) in `sources`.")
    if len(gens) < 2:
        raise ValueError(f"leave-one-generator-out needs at least two generators, got {gens}.")
    real_idx = np.random.default_rng(int(seed)).permutation(np.flatnonzero(is_real))
    n_tr = int(round(train_fraction * real_idx.size))
    n_cal = int(round(calibration_fraction * real_idx.size))
    tr, cal, te = np.split(real_idx, [n_tr, n_tr + n_cal])
    if tr.size == 0 or te.size == 0:
        raise ValueError(f"the real split is too small: {tr.size} train, {te.size} test rows.")
    need = min_calibration_size(1.0 - a)
    if cal.size < need:
        raise ValueError(
            f"{cal.size} real calibration rows; alpha={a} needs at least {need} for a finite "
            f"threshold. Add real rows or raise `calibration_fraction`."
        )
    per: dict[Hashable, Any] = {}
    for g in gens:
        others = np.flatnonzero((~is_real) & (src != g))
        held = np.flatnonzero(src == g)
        train = np.r_[tr, others]
        probe = fit_probe(x[train], np.r_[np.zeros(tr.size), np.ones(others.size)], C=C)
        t = calibrate_threshold(probe_scores(probe, x[cal]), a)
        test = np.r_[te, held]
        y = np.r_[np.zeros(te.size), np.ones(held.size)].astype(np.int64)
        s = probe_scores(probe, x[test])
        calibrated = detection_metrics(s, y, t)
        per[g] = {
            "ap": calibrated["ap"],
            "calibrated": calibrated,
            "fixed": detection_metrics(s, y, float(fixed_threshold)),
        }
    return {
        "generators": per,
        "mean_ap": float(np.mean([r["ap"] for r in per.values()])),
        "mean_tpr_calibrated": float(np.mean([r["calibrated"]["tpr"] for r in per.values()])),
        "mean_tpr_fixed": float(np.mean([r["fixed"]["tpr"] for r in per.values()])),
        "alpha": a,
        "n_real_train": int(tr.size),
        "n_real_calibration": int(cal.size),
        "n_real_test": int(te.size),
    }


# ------------------------------------------------------------------------------ attribution
def attribution(
    features: Any,
    sources: Sequence[Hashable],
    *,
    test_fraction: float = 0.3,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Which generator made an image: multinomial logistic regression on frozen features.

    A stratified split (sklearn's ``train_test_split(stratify=sources, random_state=seed)``)
    holds out ``test_fraction`` of the rows; ``StandardScaler`` + ``LogisticRegression``
    (multinomial with sklearn's default lbfgs solver) is fitted on the rest.

    Args:
        features: ``(N, D)`` frozen features.
        sources: ``(N,)`` the generator (or ``"real"``) of each row; at least two classes, each
            with enough rows for the stratified split.
        test_fraction: share of rows held out, in ``(0, 1)``.
        C: inverse regularisation strength.
        max_iter: the solver's iteration cap.
        seed: seed of the split.

    Returns:
        ``{"macro_accuracy" (mean per-class recall), "accuracy", "classes", "confusion"
        (rows true, columns predicted, in ``classes`` order), "per_class_recall",
        "train_index", "test_index"}`` (the split's row indices, in sklearn's order).

    Raises:
        ValueError: fewer than two classes, a split sklearn cannot stratify, or bad inputs.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.r_[rng.normal(0, 1, (40, 2)), rng.normal(4, 1, (40, 2))]
        >>> r = attribution(x, ["a"] * 40 + ["b"] * 40)
        >>> r["macro_accuracy"], r["classes"]
        (1.0, ['a', 'b'])
    """
    x = _features(features)
    src = _sources(sources, x.shape[0])
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    classes = list(dict.fromkeys(src.tolist()))
    if len(classes) < 2:
        raise ValueError(f"attribution needs at least two sources, got {classes}.")
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[s] for s in src], dtype=np.int64)
    train, test = train_test_split(
        np.arange(y.size), test_size=float(test_fraction), stratify=y, random_state=int(seed)
    )
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=_positive(C, "C"), max_iter=int(max_iter))
    ).fit(x[train], y[train])
    pred = model.predict(x[test])
    cm = confusion_matrix(y[test], pred, labels=np.arange(len(classes)))
    recall = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
    return {
        "macro_accuracy": float(balanced_accuracy_score(y[test], pred)),
        "accuracy": float((pred == y[test]).mean()),
        "classes": classes,
        "confusion": cm.tolist(),
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "train_index": train,
        "test_index": test,
    }
