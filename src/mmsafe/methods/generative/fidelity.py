"""Prompt fidelity of generated images: CLIPScore and attribute-level prompt following.

Two measurements for the ``generative.fidelity`` check:

1. **CLIPScore** (Hessel et al., EMNLP 2021) :func:`clip_score`, :func:`clip_score_summary`:
   ``scale * max(cos(E_image, E_text), 0)`` per (image, prompt) pair, from *any* encoder's
   embeddings (the caller embeds; nothing is downloaded). ``scale = 100`` is torchmetrics'
   ``CLIPScore`` (the paper uses ``w = 2.5``). Note that torchmetrics clamps the *batch mean*
   (``max(mean(100 cos), 0)``) whereas the paper clamps each pair; both are reported, and they
   agree whenever every cosine is non-negative.
2. **Attribute prompt following** (TIFA, Hu et al., ICCV 2023; DSG, Cho et al., ICLR 2024)
   :func:`attribute_following`: each prompt asks for a few attributes (``{"shape": "circle",
   "colour": "red", "position": "left"}``), a judge (a VQA model or an attribute classifier)
   predicts the same attributes on the generated image, and a question is answered correctly
   when the prediction equals the request. Reported: per-attribute accuracy, all-attributes
   accuracy (every requested attribute right, DSG's strict score) and the TIFA score (the mean
   per-image share of attributes right), with Wilson / bootstrap intervals.

   The judge is imperfect. Given its per-attribute accuracy ``a`` on *real* images (where the
   truth is known), the raw figure is reported beside it and, for each attribute with ``K``
   possible values, a Rogan-Gladen corrected accuracy (:func:`mmsafe.methods.generative.safety.
   rogan_gladen`) treating agreement as a binary test: the judge confirms a correct image with
   probability ``tpr = a`` and, assuming its errors are spread evenly over the ``K - 1`` other
   values, confirms a wrong one with probability ``fpr = (1 - a) / (K - 1)``. Its interval maps
   the Wilson interval through the (monotone) correction, treating ``a`` as exact. The
   symmetric-error assumption is the simplification: a judge that confuses "red" mostly with
   "orange" needs its confusion matrix instead.

Example:
    >>> clip_score([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]).round(2).tolist()
    [70.71, 0.0]
    >>> r = attribute_following([{"shape": "circle", "colour": "red"}, {"shape": "square"}],
    ...                         [{"shape": "circle", "colour": "blue"}, {"shape": "square"}])
    >>> r["attributes"]["shape"]["accuracy"], r["all_accuracy"], r["tifa"]
    (1.0, 0.5, 0.75)
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from mmsafe.methods.generative.safety import rogan_gladen
from mmsafe.methods.hallucination import wilson_interval
from mmsafe.metrics.arrays import as_numpy as _as_numpy
from mmsafe.metrics.bootstrap import check_options as _check_options
from mmsafe.metrics.bootstrap import mean_ci

__all__ = ["attribute_following", "clip_score", "clip_score_summary", "cosine_similarity"]


# ------------------------------------------------------------------------------ CLIPScore
def _embeddings(x: Any, name: str) -> np.ndarray:
    e = _as_numpy(x, name)
    if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty (N, D) matrix, got shape {e.shape}.")
    if not np.issubdtype(e.dtype, np.number):
        raise ValueError(f"`{name}` must be numeric, got dtype {e.dtype}.")
    e = e.astype(np.float64)
    if not np.isfinite(e).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    if (np.linalg.norm(e, axis=1) == 0).any():
        raise ValueError(f"`{name}` has an all-zero row; its cosine is undefined.")
    return e


def cosine_similarity(image_emb: Any, text_emb: Any) -> np.ndarray:
    """Row-wise cosine similarity of paired image and text embeddings.

    Args:
        image_emb: ``(N, D)`` image embeddings (numpy or torch).
        text_emb: ``(N, D)`` embeddings of the matching prompts.

    Returns:
        ``(N,)`` cosines in ``[-1, 1]`` (float64).

    Raises:
        ValueError: shapes differ, empty, non-finite or all-zero rows.

    Example:
        >>> cosine_similarity([[3.0, 4.0]], [[4.0, 3.0]]).round(2).tolist()
        [0.96]
    """
    a, b = _embeddings(image_emb, "image_emb"), _embeddings(text_emb, "text_emb")
    if a.shape != b.shape:
        raise ValueError(f"`image_emb` {a.shape} and `text_emb` {b.shape} must have one shape.")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.clip((a * b).sum(axis=1), -1.0, 1.0)


def clip_score(image_emb: Any, text_emb: Any, *, scale: float = 100.0) -> np.ndarray:
    """CLIPScore of each (image, prompt) pair: ``scale * max(cos(image, text), 0)``.

    Args:
        image_emb: ``(N, D)`` image embeddings from any joint image-text encoder.
        text_emb: ``(N, D)`` embeddings of each image's prompt, same encoder.
        scale: ``100`` as torchmetrics (range ``[0, 100]``), ``2.5`` as Hessel et al.

    Returns:
        ``(N,)`` scores (float64).

    Raises:
        ValueError: bad embeddings or a non-positive ``scale``.

    Example:
        >>> clip_score([[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [-1.0, 0.0]]).tolist()
        [100.0, 0.0]
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
        raise ValueError(f"`scale` must be a positive number, got {scale!r}.")
    return float(scale) * np.maximum(cosine_similarity(image_emb, text_emb), 0.0)


def clip_score_summary(
    image_emb: Any,
    text_emb: Any,
    *,
    scale: float = 100.0,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean CLIPScore over pairs with a percentile bootstrap interval, and torchmetrics' figure.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(N, D)`` prompt embeddings.
        scale: score scale (see :func:`clip_score`).
        n_boot: bootstrap resamples.
        level: confidence level.
        seed: seed of the resamples.

    Returns:
        ``{"clip_score": mean of the per-pair scores (each clamped at 0), "ci": (lo, hi),
        "torchmetrics": max(mean(scale * cos), 0) (what torchmetrics' ``CLIPScore`` returns on
        the batch), "n", "scale", "level"}``.

    Raises:
        ValueError: bad embeddings or options.

    Example:
        >>> s = clip_score_summary([[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [-0.5, 1.0]],
        ...                        n_boot=100)
        >>> round(s["clip_score"], 2), round(s["torchmetrics"], 2)
        (50.0, 27.64)
    """
    _check_options(n_boot, level, seed)
    per = clip_score(image_emb, text_emb, scale=scale)
    cos = cosine_similarity(image_emb, text_emb)
    return {
        "clip_score": float(per.mean()),
        "ci": mean_ci(per, n_boot=n_boot, level=level, seed=seed),
        "torchmetrics": float(max(float(scale) * cos.mean(), 0.0)),
        "n": int(per.size),
        "scale": float(scale),
        "level": float(level),
    }


# ------------------------------------------------------------------------------ attributes
def _attribute_rows(rows: Any, name: str) -> list[Mapping[str, Hashable]]:
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise ValueError(f"`{name}` must be a sequence of dicts, one per image.")
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"`{name}[{i}]` must be a dict of attribute -> value, got {r!r}.")
    return list(rows)


def _judge_rate(a: Any, key: str) -> float:
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"judge accuracy for {key!r} must be in [0, 1], got {a!r}.")
    return float(a)


def attribute_following(
    requested: Sequence[Mapping[str, Hashable]],
    predicted: Sequence[Mapping[str, Hashable]],
    *,
    judge_accuracy: Mapping[str, float] | None = None,
    n_values: Mapping[str, int] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """TIFA / DSG-style prompt following from requested and predicted attributes.

    Row ``i`` pairs the attributes prompt ``i`` asked for (a missing key was not asked) with
    the judge's predictions on its generated image (a missing or ``None`` prediction counts as
    wrong; predicted keys that were not requested are ignored; a requested ``None`` means not
    asked). Images whose prompt requested
    nothing are left out of every figure and counted in ``n_unrequested``.

    Args:
        requested: per image, ``{attribute: requested value}``.
        predicted: per image, ``{attribute: predicted value}``, same length.
        judge_accuracy: per attribute, the judge's accuracy on real images (optional); enables
            the Rogan-Gladen corrected accuracy (see the module docstring).
        n_values: per attribute, the number of possible values ``K`` (for the judge's
            false-confirmation rate ``(1 - a) / (K - 1)``); by default the number of distinct
            values seen among requests and predictions of that attribute (at least 2).
        n_boot: bootstrap resamples of the TIFA score's interval.
        level: confidence level of all intervals.
        seed: seed of the resamples.

    Returns:
        ``{"attributes": {name: {"n", "correct", "accuracy", "ci", "judge_accuracy",
        "corrected", "corrected_ci"}}, "all_accuracy", "all_ci", "tifa", "tifa_ci", "n",
        "n_unrequested", "level"}``. Per-attribute and all-attributes intervals are Wilson; the
        TIFA interval is a percentile bootstrap over images. ``corrected`` is None for
        attributes without a judge accuracy, and when the judge is no better than chance
        (``a <= 1 / K``). Attributes are sorted by name.

    Raises:
        ValueError: mismatched lengths, non-dict rows, no requested attribute at all, bad
            judge accuracies or ``n_values``, or bad bootstrap options.

    Example:
        >>> r = attribute_following([{"colour": "red"}] * 4,
        ...                         [{"colour": "red"}] * 3 + [{"colour": "blue"}],
        ...                         judge_accuracy={"colour": 0.9}, n_values={"colour": 2})
        >>> r["attributes"]["colour"]["accuracy"], round(r["attributes"]["colour"]["corrected"], 4)
        (0.75, 0.8125)
    """
    _check_options(n_boot, level, seed)
    req = [
        {k: v for k, v in r.items() if v is not None}
        for r in _attribute_rows(requested, "requested")
    ]
    pred = _attribute_rows(predicted, "predicted")
    if len(req) != len(pred):
        raise ValueError(f"`requested` has {len(req)} rows but `predicted` has {len(pred)}.")
    asked = [i for i, r in enumerate(req) if r]
    if not asked:
        raise ValueError("no prompt requested any attribute; nothing to score.")
    judge = dict(judge_accuracy or {})
    counts = dict(n_values or {})
    names = sorted({k for i in asked for k in req[i]})
    for k in judge:
        _judge_rate(judge[k], k)
    for k, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 2:
            raise ValueError(f"`n_values[{k!r}]` must be an integer >= 2, got {v!r}.")

    right = {i: [pred[i].get(k) == v for k, v in req[i].items()] for i in asked}
    attributes: dict[str, Any] = {}
    for k in names:
        rows = [i for i in asked if k in req[i]]
        hits = sum(pred[i].get(k) == req[i][k] for i in rows)
        n = len(rows)
        entry: dict[str, Any] = {
            "n": n,
            "correct": int(hits),
            "accuracy": hits / n,
            "ci": wilson_interval(int(hits), n, level),
            "judge_accuracy": judge.get(k),
            "corrected": None,
            "corrected_ci": None,
        }
        if k in judge:
            seen = {req[i][k] for i in rows} | ({pred[i].get(k) for i in rows} - {None})
            n_k = int(counts.get(k, max(2, len(seen))))
            tpr, fpr = float(judge[k]), (1.0 - float(judge[k])) / (n_k - 1)
            if tpr > fpr:
                entry["corrected"] = rogan_gladen(hits / n, tpr, fpr)
                lo, hi = entry["ci"]
                entry["corrected_ci"] = (rogan_gladen(lo, tpr, fpr), rogan_gladen(hi, tpr, fpr))
            entry["n_values"] = n_k
        attributes[k] = entry

    all_right = np.array([all(right[i]) for i in asked], dtype=np.float64)
    share = np.array([np.mean(right[i]) for i in asked], dtype=np.float64)
    k_all = int(all_right.sum())
    return {
        "attributes": attributes,
        "all_accuracy": k_all / all_right.size,
        "all_ci": wilson_interval(k_all, int(all_right.size), level),
        "tifa": float(share.mean()),
        "tifa_ci": mean_ci(share, n_boot=n_boot, level=level, seed=seed),
        "n": len(asked),
        "n_unrequested": len(req) - len(asked),
        "level": float(level),
    }
