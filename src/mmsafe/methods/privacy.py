"""Membership inference and memorisation: pure functions behind ``controllability.privacy``.

A membership-inference attack gives every row a score, higher meaning "more likely a training
member". The threshold attacks here need only the audited model's outputs:

* **loss**: ``-CE(logits, label)``; members were fitted, so their loss is lower;
* **confidence**: the top softmax probability;
* **entropy**: ``-H(softmax)``; members get sharper predictions;
* **cosine** (CLIP, Ko et al. 2023, methods reference §12a): ``cos(f_img(x), f_txt(t))`` of a
  row's own image and caption; the contrastive loss pulled training pairs together.

An attack is scored on known members and non-members. The scores are the ROC AUC, the best
balanced accuracy over thresholds, and the TPR at a fixed low FPR (Carlini et al. 2022). The
best-threshold balanced accuracy is chosen on the same rows, so it is optimistic. The TPR at FPR
``α`` is the largest TPR among thresholds whose empirical FPR is ``<= α``. With ``n``
non-members the smallest non-zero FPR is ``1/n``: when ``α < 1/n`` only FPR 0 is reachable, the
value is the TPR at FPR 0 (a conservative lower bound), and :func:`fpr_resolvable` says so.

The memorisation helpers rank training rows against the non-member score distribution
(:func:`nonmember_percentile`). They also group exact copies (:func:`content_groups`) and count
near-duplicates in embedding space (:func:`near_duplicate_counts`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "AttackResult",
    "attack_metrics",
    "auc_bootstrap_ci",
    "best_balanced_accuracy",
    "caption_logit_scores",
    "confidence_scores",
    "content_groups",
    "content_ids",
    "contrast_scores",
    "cosine_scores",
    "entropy_scores",
    "fpr_resolvable",
    "lira_scores",
    "logit_confidence",
    "loss_scores",
    "membership_auc",
    "near_duplicate_counts",
    "nonmember_percentile",
    "roc_points",
    "tpr_at_fpr",
]


# --------------------------------------------------------------------------- attack scores


def _log_softmax(logits: Any) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def loss_scores(logits: Any, labels: Any) -> np.ndarray:
    """``-CE(logits, label)`` per row (higher = lower loss = more member-like).

    Example:
        >>> s = loss_scores([[2.0, 0.0], [0.0, 0.0]], [0, 1])
        >>> [round(float(x), 4) for x in s]
        [-0.1269, -0.6931]
    """
    lp = _log_softmax(logits)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (lp.shape[0],) or (y < 0).any() or (y >= lp.shape[1]).any():
        raise ValueError("labels must be (N,) class indices in [0, C) for (N, C) logits.")
    return lp[np.arange(len(y)), y]


def confidence_scores(logits: Any) -> np.ndarray:
    """The top softmax probability per row.

    Example:
        >>> confidence_scores([[0.0, 0.0], [np.log(3.0), 0.0]]).round(12).tolist()
        [0.5, 0.75]
    """
    return np.exp(_log_softmax(logits).max(axis=1))


def entropy_scores(logits: Any) -> np.ndarray:
    """Minus the predictive entropy (nats) per row (higher = sharper = more member-like).

    Example:
        >>> round(float(entropy_scores([[0.0, 0.0]])[0]), 4)
        -0.6931
    """
    lp = _log_softmax(logits)
    return (np.exp(lp) * lp).sum(axis=1)


def cosine_scores(image_emb: Any, text_emb: Any) -> np.ndarray:
    """Cosine similarity of each row's image and text embeddings (CLIP's CSA attack).

    Example:
        >>> cosine_scores([[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [1.0, 0.0]]).round(4).tolist()
        [1.0, 0.7071]
    """
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(text_emb, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def contrast_scores(
    image_emb: Any, text_emb: Any, reference: Any, temperature: float = 1.0 / 0.07
) -> np.ndarray:
    """Log-softmax of a row's own caption among reference captions (image -> text).

    ``score_i = τ cos(x_i, t_i) - logsumexp_j(τ cos(x_i, t_j))`` over ``j`` in ``{i} ∪
    reference``, the reference rows being known non-members. A reference caption identical to
    row ``i``'s own (text cosine ``>= 1 - 1e-6``, which includes a reference row itself) is not
    a competitor. Without that rule a reference row would face one copy of its caption fewer
    than a member with the same caption, which biases the attack towards calling reference
    rows members. This is the "softmax of the true caption among candidates" statistic of
    methods reference §12b. It normalises away how easy a caption is in general, which the
    raw cosine does not.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(N, D)`` text embeddings (row ``i`` is row ``i``'s caption).
        reference: indices (or a boolean mask) of the reference rows (non-members).
        temperature: ``τ``, e.g. the model's logit scale.

    Example:
        >>> img = np.eye(3); txt = np.eye(3)
        >>> s = contrast_scores(img, txt, [1, 2], temperature=1.0)
        >>> bool(s[0] < 0) and bool(np.isclose(s[1], s[2]))
        True
    """
    own, sims = _caption_logits(image_emb, text_emb, reference, temperature)
    both = np.concatenate([sims, own[:, None]], axis=1)
    return own - _logsumexp(both)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise ``log sum exp``; a row of only ``-inf`` gives ``-inf``."""
    top = x.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[:, None]).sum(axis=1))


def _caption_logits(
    image_emb: Any, text_emb: Any, reference: Any, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(own, sims)``: own-pair and reference-caption logits at temperature ``τ``.

    ``own_i = τ cos(x_i, t_i)``; ``sims_ij = τ cos(x_i, t_j)`` over reference rows ``j``, with
    ``-inf`` where caption ``j`` is identical to row ``i``'s own (not a competitor).
    """
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(text_emb, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    ref = np.asarray(reference)
    ref = np.flatnonzero(ref) if ref.dtype == bool else ref.astype(np.int64)
    own = temperature * (a * b).sum(axis=1)
    sims = temperature * (a @ b[ref].T)  # (N, R)
    same_caption = b @ b[ref].T >= 1.0 - 1e-6  # includes a reference row's own caption
    sims[same_caption] = -np.inf
    return own, sims


def caption_logit_scores(
    image_emb: Any, text_emb: Any, temperature: float = 1.0 / 0.07, max_logit: float = 50.0
) -> np.ndarray:
    """LiRA's statistic for an image-text pair: ``log(p / (1 - p))`` of the own caption.

    ``p`` is the softmax probability, at temperature ``τ``, of row ``i``'s own caption among
    the captions of *all* rows (image -> text), so ``log(p / (1 - p)) = τ cos(x_i, t_i) -
    logsumexp_{j != i} τ cos(x_i, t_j)``. Captions identical to row ``i``'s own are not
    competitors (as in :func:`contrast_scores`). This is :func:`logit_confidence` for a
    contrastive model whose "classes" are the candidate captions (methods reference §12b): the
    logit of a probability is close to Gaussian across models, and subtracting the
    competitors' log-mass cancels shifts shared by all pairs of one model (its temperature
    and its overall cosine level), which would otherwise widen LiRA's Gaussians.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(N, D)`` text embeddings (row ``i`` is row ``i``'s caption).
        temperature: ``τ``, e.g. the model's logit scale.
        max_logit: clip to ``±max_logit`` (a row with no competitor gets ``+max_logit``).

    Example:
        >>> img = np.eye(3); txt = np.eye(3)
        >>> s = caption_logit_scores(img, txt, temperature=1.0)  # log(e / 2)
        >>> np.round(s, 4).tolist()
        [0.3069, 0.3069, 0.3069]
    """
    n = np.asarray(image_emb).shape[0]
    own, sims = _caption_logits(image_emb, text_emb, np.arange(n), temperature)
    return np.clip(own - _logsumexp(sims), -max_logit, max_logit)


def logit_confidence(logits: Any, labels: Any) -> np.ndarray:
    """LiRA's statistic ``log(p_y / (1 - p_y))``, computed stably from logits.

    It equals ``z_y - logsumexp_{j != y} z_j`` and is close to Gaussian across models, which is
    what LiRA's per-example Gaussians assume (methods reference §12b).

    Example:
        >>> round(float(logit_confidence([[np.log(3.0), 0.0]], [0])[0]), 4)  # p = 0.75
        1.0986
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    own = z[np.arange(len(y)), y]
    rest = z.copy()
    rest[np.arange(len(y)), y] = -np.inf
    top = rest.max(axis=1)
    return own - (top + np.log(np.exp(rest - top[:, None]).sum(axis=1)))


def lira_scores(
    target: Any, shadow: Any, shadow_in: Any, online: bool = True, min_std: float = 1e-3
) -> np.ndarray:
    """LiRA (Carlini et al. 2022): per-example likelihood ratio of IN vs OUT shadow statistics.

    For every example, the statistic of the shadow models that trained on it (IN) and of
    those that did not (OUT) are modelled as Gaussians. The means are per example; the
    standard deviation is pooled over all examples (the paper's "fixed variance" variant,
    which is the stable one with few shadows).

    * online: ``log N(φ; μ_in, σ_in) - log N(φ; μ_out, σ_out)``;
    * offline: ``log Φ((φ - μ_out) / σ_out)``, a one-sided test against OUT only.

    An example without an IN (online) or OUT shadow falls back to the pooled mean of that
    side.

    Args:
        target: ``(N,)`` the target model's statistic (see :func:`logit_confidence`).
        shadow: ``(K, N)`` each shadow model's statistic on every example.
        shadow_in: ``(K, N)`` booleans, example ``n`` in shadow ``k``'s training set.
        online: use both Gaussians (else OUT only).
        min_std: floor of the pooled standard deviations.

    Returns:
        ``(N,)`` scores, higher = more member-like.

    Example:
        >>> shadow = np.array([[2.0, 0.0], [0.0, 2.0], [2.1, 0.1], [0.1, 2.1]])
        >>> inside = np.array([[True, False], [False, True], [True, False], [False, True]])
        >>> s = lira_scores(np.array([2.0, 0.0]), shadow, inside)
        >>> bool(s[0] > 0 > s[1])
        True
    """
    from scipy.stats import norm

    phi = np.asarray(target, dtype=np.float64)
    sh = np.asarray(shadow, dtype=np.float64)
    inside = np.asarray(shadow_in, dtype=bool)
    if sh.ndim != 2 or sh.shape != inside.shape or sh.shape[1] != phi.shape[0]:
        raise ValueError("shadow and shadow_in must be (K, N) for a target of shape (N,)")

    def side(mask: np.ndarray) -> tuple[np.ndarray, float]:
        n = mask.sum(axis=0)
        total = np.where(mask, sh, 0.0).sum(axis=0)
        pooled_mean = float(sh[mask].mean()) if mask.any() else 0.0
        mu = np.where(n > 0, total / np.maximum(n, 1), pooled_mean)
        resid = np.where(mask, sh - mu[None, :], 0.0)
        dof = max(int(mask.sum()) - int((n > 0).sum()), 1)
        return mu, max(float(np.sqrt((resid**2).sum() / dof)), min_std)

    mu_out, sd_out = side(~inside)
    if not online:
        return norm.logcdf((phi - mu_out) / sd_out)
    mu_in, sd_in = side(inside)
    return norm.logpdf(phi, mu_in, sd_in) - norm.logpdf(phi, mu_out, sd_out)


# --------------------------------------------------------------------------- attack metrics


def _validate(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.ndim != 1 or s.shape != m.shape:
        raise ValueError("scores and is_member must be 1-D arrays of the same length.")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite.")
    if m.all() or not m.any():
        raise ValueError("need at least one member and one non-member.")
    return s, m


def membership_auc(scores: Any, is_member: Any) -> float:
    """ROC AUC of member vs non-member scores (Mann-Whitney U; ties count one half).

    Example:
        >>> membership_auc([0.9, 0.8, 0.3, 0.8], [True, True, False, False])
        0.875
    """
    s, m = _validate(scores, is_member)
    ranks = rankdata(s)
    n1, n0 = int(m.sum()), int((~m).sum())
    return float((ranks[m].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_bootstrap_ci(
    scores: Any, is_member: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`membership_auc`, vectorised over resamples.

    Uses the resamples of :func:`mmsafe.metrics.bootstrap_ci` for the same ``seed`` (rows
    resampled jointly); a resample without a member or a non-member is ignored. Equals
    ``bootstrap_ci(membership_auc, scores, is_member, ...)`` up to float rounding.

    Example:
        >>> lo, hi = auc_bootstrap_ci(np.arange(100.0), np.arange(100) >= 50, n_boot=100)
        >>> (lo, hi)
        (1.0, 1.0)
    """
    from mmsafe.metrics.bootstrap import check_options, percentile_interval, resample_counts

    check_options(n_boot, level, seed)
    s, m = _validate(scores, is_member)
    order = np.argsort(s, kind="stable")
    s_sorted, m_sorted = s[order], m[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    stats = []
    for counts in resample_counts(s.size, int(n_boot), seed):
        w = counts[:, order]
        pos = np.add.reduceat(w * m_sorted, starts, axis=1)  # (B, K) member weight per value
        neg = np.add.reduceat(w * ~m_sorted, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # non-member weight strictly below
        n1, n0 = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append((pos * (below + 0.5 * neg)).sum(axis=1) / (n1 * n0))
    return percentile_interval(np.concatenate(stats), level)


def roc_points(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve: ``(fpr, tpr, thresholds)``, predicting member when ``score >= t``.

    Thresholds are the distinct scores in decreasing order, preceded by ``+inf`` (nothing
    predicted member, the point ``(0, 0)``).

    Example:
        >>> fpr, tpr, t = roc_points([0.9, 0.8, 0.3, 0.8], [True, True, False, False])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    s, m = _validate(scores, is_member)
    thresholds, inverse = np.unique(-s, return_inverse=True)  # ascending in -s
    pos = np.bincount(inverse, weights=m.astype(float), minlength=thresholds.size)
    neg = np.bincount(inverse, weights=(~m).astype(float), minlength=thresholds.size)
    tpr = np.concatenate([[0.0], np.cumsum(pos) / m.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / (~m).sum()])
    return fpr, tpr, np.concatenate([[np.inf], -thresholds])


def tpr_at_fpr(scores: Any, is_member: Any, fpr: float) -> float:
    """The largest TPR among thresholds whose empirical FPR is ``<= fpr``.

    Example:
        >>> s = [5, 4, 3, 2.5, 2, 1]; mem = [True, True, False, True, False, False]
        >>> tpr_at_fpr(s, mem, 0.0), tpr_at_fpr(s, mem, 0.34), tpr_at_fpr(s, mem, 0.7)
        (0.6666666666666666, 1.0, 1.0)
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc_points(scores, is_member)
    return float(t[f <= fpr + 1e-12].max())


def fpr_resolvable(n_non_members: int, fpr: float) -> bool:
    """Whether ``n_non_members`` rows can resolve an FPR of ``fpr`` (``fpr * n >= 1``).

    Example:
        >>> fpr_resolvable(500, 0.001), fpr_resolvable(1000, 0.001)
        (False, True)
    """
    return fpr * n_non_members >= 1.0 - 1e-9


def best_balanced_accuracy(scores: Any, is_member: Any) -> float:
    """``max_t (TPR(t) + 1 - FPR(t)) / 2`` over thresholds: optimistic, chosen in-sample.

    Example:
        >>> best_balanced_accuracy([0.9, 0.8, 0.3, 0.8], [True, True, False, False])
        0.75
    """
    f, t, _ = roc_points(scores, is_member)
    return float(((t + 1.0 - f) / 2.0).max())


@dataclass(frozen=True)
class AttackResult:
    """How well one attack separates members from non-members.

    Attributes:
        auc: ROC AUC (0.5 = chance).
        balanced_accuracy: best balanced accuracy over thresholds (in-sample, optimistic).
        tpr_at_fpr: ``{fpr: tpr}``.
        resolvable: ``{fpr: bool}``: enough non-members for that FPR (see module docs).
        n_members: members scored.
        n_non_members: non-members scored.
    """

    auc: float
    balanced_accuracy: float
    tpr_at_fpr: dict[float, float] = field(default_factory=dict)
    resolvable: dict[float, bool] = field(default_factory=dict)
    n_members: int = 0
    n_non_members: int = 0


def attack_metrics(
    scores: Any, is_member: Any, fprs: Sequence[float] = (0.001, 0.01)
) -> AttackResult:
    """AUC, best balanced accuracy and TPR at each of ``fprs``.

    Example:
        >>> r = attack_metrics([0.9, 0.8, 0.3, 0.8], [True, True, False, False], fprs=(0.5,))
        >>> r.auc, r.balanced_accuracy, r.tpr_at_fpr, r.resolvable
        (0.875, 0.75, {0.5: 1.0}, {0.5: True})
    """
    s, m = _validate(scores, is_member)
    n0 = int((~m).sum())
    return AttackResult(
        auc=membership_auc(s, m),
        balanced_accuracy=best_balanced_accuracy(s, m),
        tpr_at_fpr={float(a): tpr_at_fpr(s, m, a) for a in fprs},
        resolvable={float(a): fpr_resolvable(n0, a) for a in fprs},
        n_members=int(m.sum()),
        n_non_members=n0,
    )


# --------------------------------------------------------------------------- memorisation


def nonmember_percentile(scores: Any, reference: Any) -> np.ndarray:
    """Per row, the share of ``reference`` (non-member) scores below it (ties count half).

    1.0 means the row scores above every non-member: a membership outlier.

    Example:
        >>> nonmember_percentile([0.5, 2.0, 1.0], [0.0, 1.0]).tolist()
        [0.5, 1.0, 0.75]
    """
    s = np.asarray(scores, dtype=np.float64)
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.size == 0:
        raise ValueError("need at least one reference score")
    below = np.searchsorted(ref, s, side="left")
    at_or_below = np.searchsorted(ref, s, side="right")
    return (below + at_or_below) / (2.0 * ref.size)


def content_ids(images: Sequence[Any], texts: Sequence[str] | None = None) -> np.ndarray:
    """Exact-copy group ids: rows with the same image bytes (and text) share an id.

    Ids are ``0..G-1`` in order of first appearance.

    Example:
        >>> a, b = np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 3), np.uint8)
        >>> content_ids([b, a, b.copy()], ["x", "x", "x"]).tolist()
        [0, 1, 0]
    """
    keys: dict[str, int] = {}
    out = np.empty(len(images), dtype=np.int64)
    for i, img in enumerate(images):
        h = hashlib.blake2b(digest_size=16)
        arr = np.ascontiguousarray(np.asarray(img))
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
        if texts is not None:
            h.update(b"\x00" + str(texts[i]).encode())
        out[i] = keys.setdefault(h.hexdigest(), len(keys))
    return out


def content_groups(images: Sequence[Any], texts: Sequence[str] | None = None) -> np.ndarray:
    """Exact-copy group sizes: per row, how many rows have the same image bytes (and text).

    Example:
        >>> a, b = np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 3), np.uint8)
        >>> content_groups([a, b, a.copy()], ["x", "x", "x"]).tolist()
        [2, 1, 2]
        >>> content_groups([a, b, a.copy()], ["x", "x", "y"]).tolist()
        [1, 1, 1]
    """
    ids = content_ids(images, texts)
    return np.bincount(ids)[ids].astype(np.int64)


def near_duplicate_counts(
    embeddings: Sequence[Any], threshold: float = 0.995, chunk: int = 1024
) -> np.ndarray:
    """Per row, how many *other* rows are within cosine ``threshold`` in every embedding.

    Args:
        embeddings: one or more ``(N, D_m)`` arrays (e.g. image and text); a pair counts only
            when its cosine similarity reaches ``threshold`` in all of them.
        threshold: cosine similarity at or above which two rows are near-duplicates.
        chunk: rows compared at once (memory is ``chunk * N`` floats per embedding).

    Example:
        >>> e = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
        >>> near_duplicate_counts([e]).tolist()
        [1, 1, 0]
    """
    mats = []
    for e in embeddings:
        x = np.asarray(e, dtype=np.float64)
        mats.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    if not mats:
        raise ValueError("need at least one embedding array")
    n = mats[0].shape[0]
    if any(m.shape[0] != n for m in mats):
        raise ValueError("every embedding array needs the same number of rows")
    out = np.zeros(n, dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        close = np.ones((stop - start, n), dtype=bool)
        for x in mats:
            close &= x[start:stop] @ x.T >= threshold
        close[np.arange(stop - start), np.arange(start, stop)] = False
        out[start:stop] = close.sum(axis=1)
    return out
