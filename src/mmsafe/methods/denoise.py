"""Denoising implicit feedback from modal content (a reconstruction of GUIDER's three parts).

GUIDER (Teach Me How to Denoise, arXiv 2504.14214, 2025) denoises the interactions a
multimodal recommender trains on in three steps; this module holds the pure pieces:

1. **Re-calibration** (:func:`clean_probabilities`): each training interaction gets a
   probability of being clean, computed from the items' *content* alone (their frozen image and
   title embeddings), never from the recommender being audited. A misclick is an item that
   neither the user's own taste nor the usual *next-content* transitions explain.
2. **DBPR** (:func:`dbpr_loss`): Bayesian Personalised Ranking whose positive interactions are
   weighted by their clean probability, and dropped below a threshold.
3. **OT-guided distillation** (:func:`sinkhorn`, :func:`ot_distillation_loss`): an entropic
   optimal-transport distance between the student's user states and the (teacher's) content
   representations of the items they should predict, whose target marginal is the clean
   probability, so noisy targets carry (next to) no mass.

The paper gives the three ideas, not a recipe this world can reuse as is (its calibration is
for graph MMRecs over user/item embeddings). What is reconstructed here, and how, is in
``docs/denoise.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "clean_probabilities",
    "content_kernel",
    "dbpr_loss",
    "flag_quality",
    "ot_distillation_loss",
    "sinkhorn",
    "transition_model",
]


# --------------------------------------------------------------------------- re-calibration


def content_kernel(
    features: Sequence[np.ndarray] | np.ndarray,
    k: int = 5,
    sequences: Sequence[np.ndarray] | None = None,
    calibrate: float = 0.5,
) -> np.ndarray:
    """``(I, I)`` row-stochastic neighbourhood kernel of the items in (calibrated) content space.

    Each modality's features are L2-normalised and concatenated; the similarity of two items is
    their cosine. With ``sequences``, it is *re-calibrated* by the interactions (GUIDER's
    adaptive modality-similarity calibration, reconstructed): ``(1 - calibrate)`` times the
    content cosine plus ``calibrate`` times the cosine of the items' PPMI co-occurrence rows
    (items that the same users click). Row ``i`` spreads item ``i``'s mass uniformly over its
    ``k`` most similar items (itself included).

    Example:
        >>> f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> content_kernel(f, k=2).round(2).tolist()[0]
        [0.5, 0.5, 0.0, 0.0]
    """
    mats = [features] if isinstance(features, np.ndarray) else list(features)
    x = _unit(np.concatenate([_unit(np.asarray(m, dtype=np.float64)) for m in mats], axis=1))
    sim = x @ x.T
    if sequences is not None and calibrate > 0:
        sim = (1 - calibrate) * sim + calibrate * _cooccurrence_similarity(sequences, len(x))
    k = int(min(max(k, 1), len(x)))
    sim[np.diag_indices_from(sim)] = np.inf  # itself first, whatever the ties
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    kernel = np.zeros_like(sim)
    np.put_along_axis(kernel, nearest, 1.0 / k, axis=1)
    return kernel


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cooccurrence_similarity(sequences: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``(n, n)`` cosine of the items' positive-PMI co-occurrence rows (same user)."""
    counts = np.zeros((n, n))
    for s in sequences:
        u = np.unique(np.asarray(s, dtype=np.int64))
        counts[np.ix_(u, u)] += 1.0
    np.fill_diagonal(counts, 0.0)
    total = counts.sum()
    if total <= 0:
        return np.zeros((n, n))
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / np.maximum(rows @ rows.T, 1e-12))
    ppmi = np.where(counts > 0, np.maximum(np.nan_to_num(pmi, neginf=0.0), 0.0), 0.0)
    v = _unit(ppmi)
    return v @ v.T


def transition_model(
    sequences: Sequence[np.ndarray], kernel: np.ndarray, smoothing: float = 1e-3
) -> np.ndarray:
    """``(I, I)`` next-item probabilities ``P[a, b]`` from content-smoothed transitions.

    The observed consecutive pairs ``a -> b`` are counted and smoothed on both sides by the
    content kernel (``K C K^T``): a transition between two topics supports every pair of their
    items. Random misclicks spread thinly over all pairs, so they hardly move it. Rows are
    normalised, with ``smoothing`` (a share of uniform mass) so no transition is impossible.
    """
    n = kernel.shape[0]
    counts = np.zeros((n, n))
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        if len(s) >= 2:
            np.add.at(counts, (s[:-1], s[1:]), 1.0)
    smooth = kernel @ counts @ kernel.T
    rows = smooth.sum(axis=1, keepdims=True)
    p = np.where(rows > 0, smooth / np.maximum(rows, 1e-12), 1.0 / n)
    return (1 - smoothing) * p + smoothing / n


def clean_probabilities(
    sequences: Sequence[np.ndarray],
    features: Sequence[np.ndarray] | np.ndarray,
    *,
    k: int = 5,
    follow: float = 0.8,
    calibrate: float = 0.5,
    prior: float = 0.1,
    iterations: int = 5,
    candidates: np.ndarray | None = None,
    popularity: float = 1.0,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Each interaction's posterior probability of being clean, from the items' content.

    A two-component model per interaction ``b`` at position ``t`` of a user's sequence (``a``
    before it, ``c`` after it, when they exist):

    * **clean**: ``b`` follows ``a`` by the content transition model (:func:`transition_model`)
      or the user's own taste (the content-kernel density of the user's *other* items),
      ``p(b) = follow P[a, b] + (1 - follow) taste_u(b)``, and ``c`` follows ``b``
      (``P[b, c]``);
    * **noisy**: ``b`` is any item (uniform over the ``candidates``, the items that occur) and
      ``c`` follows ``a`` in two steps (``P^2[a, c]``), the chain skipping the misclick.

    The share of noisy interactions (``prior``) is re-estimated by EM (``iterations``), the
    "re-calibration": no label of which interaction is noisy is ever read.

    Returns:
        ``(p_clean, info)``: one float array per sequence (same length), and ``info`` with the
        estimated noise share.
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    kernel = content_kernel(features, k=k, sequences=seqs, calibrate=calibrate)
    n = kernel.shape[0]
    if candidates is None:
        occurs = np.zeros(n, dtype=bool)
        if seqs:
            occurs[np.concatenate(seqs)] = True
        candidates = occurs
    uniform = 1.0 / max(int(np.asarray(candidates).sum()), 1)
    trans = transition_model(seqs, kernel)
    two = trans @ trans
    # within a neighbourhood, a clean click follows the items' popularity; a misclick does not
    counts = (
        np.bincount(np.concatenate(seqs), minlength=n).astype(np.float64) if seqs else np.zeros(n)
    )
    pop = (counts + 0.5) / (kernel @ (counts + 0.5))
    pop = pop ** float(popularity)
    eps = 1e-12
    log_clean, log_noisy = [], []
    for s in seqs:
        m = len(s)
        if m == 0:
            log_clean.append(np.zeros(0))
            log_noisy.append(np.zeros(0))
            continue
        # the user's taste at each position: kernel density of the other items (leave-one-out)
        dens = kernel[s].sum(axis=0)  # (I,) mass the user's items put on each item
        taste = (dens[None, :] - kernel[s]) / max(m - 1, 1)  # (m, I) without position t
        taste_b = taste[np.arange(m), s] if m > 1 else np.full(m, uniform)
        taste_b = 0.9 * taste_b + 0.1 * uniform
        prev_b = np.full(m, np.nan)
        prev_b[1:] = trans[s[:-1], s[1:]]
        emit = np.where(np.isnan(prev_b), taste_b, follow * np.nan_to_num(prev_b) +
                        (1 - follow) * taste_b) * pop[s]  # fmt: skip
        lc = np.log(emit + eps)
        ln = np.full(m, np.log(uniform))
        if m >= 2:
            lc[:-1] += np.log(trans[s[:-1], s[1:]] + eps)  # c follows b
            skip = np.empty(m - 1)  # noisy b: c follows a in two steps, or the taste at t = 0
            skip[1:] = two[s[:-2], s[2:]]
            rest = (dens[s[1]] - kernel[s[0], s[1]] - kernel[s[1], s[1]]) / max(m - 2, 1)
            skip[0] = 0.9 * rest + 0.1 * uniform if m > 2 else uniform
            ln[:-1] += np.log(skip + eps)
        log_clean.append(lc)
        log_noisy.append(ln)
    pi = float(np.clip(prior, 1e-4, 0.5))
    post: list[np.ndarray] = []
    for _ in range(max(int(iterations), 1)):
        post = [
            1.0 / (1.0 + np.exp(np.clip(ln + np.log(pi) - lc - np.log(1 - pi), -50, 50)))
            for lc, ln in zip(log_clean, log_noisy, strict=True)
        ]
        flat = np.concatenate(post) if post else np.ones(1)
        pi = float(np.clip(1.0 - flat.mean(), 1e-4, 0.5))
    return post, {"noise_share": pi, "k": int(k), "follow": follow}


def flag_quality(
    flagged: Sequence[np.ndarray], truth: Sequence[Sequence[bool]]
) -> dict[str, float]:
    """Precision, recall and F1 of flagged interactions against the true noisy ones.

    Example:
        >>> flag_quality([np.array([True, False, True])], [[True, True, False]])
        {'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'flagged': 2, 'noisy': 2}
    """
    f = np.concatenate([np.asarray(x, dtype=bool) for x in flagged])
    t = np.concatenate([np.asarray(x, dtype=bool) for x in truth])
    tp = int((f & t).sum())
    precision = tp / f.sum() if f.sum() else 0.0
    recall = tp / t.sum() if t.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
            "flagged": int(f.sum()), "noisy": int(t.sum())}  # fmt: skip


# --------------------------------------------------------------------------- DBPR


def dbpr_loss(positive: Tensor, negative: Tensor, clean: Tensor, threshold: float = 0.5) -> Tensor:
    """Denoised BPR: ``-sum_i w_i mean_j log sigmoid(s+_i - s-_ij) / sum_i w_i``.

    Args:
        positive: ``(N,)`` scores of the observed (positive) interactions.
        negative: ``(N,)`` or ``(N, J)`` scores of sampled negatives for each.
        clean: ``(N,)`` clean probabilities ``w_i``; those below ``threshold`` count 0 (the
            interaction is filtered out), the others are weighted by ``w_i``.
        threshold: the filter; 0 keeps every interaction, weighted.

    Returns:
        A scalar; 0 when every interaction is filtered out.

    Example:
        >>> import torch
        >>> round(float(dbpr_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]),
        ...                       torch.tensor([1.0, 0.2]))), 4)  # the second is filtered
        0.1269
    """
    if negative.dim() == 1:
        negative = negative[:, None]
    w = torch.where(clean >= threshold, clean, torch.zeros_like(clean)).to(positive.dtype)
    per = -torch.nn.functional.logsigmoid(positive[:, None] - negative).mean(dim=1)
    total = w.sum()
    return (w * per).sum() / total if float(total) > 0 else per.sum() * 0.0


# --------------------------------------------------------------------------- optimal transport


def sinkhorn(
    cost: Tensor, a: Tensor, b: Tensor, eps: float = 0.05, iterations: int = 200
) -> Tensor:
    """The entropic OT plan between histograms ``a`` (n,) and ``b`` (m,) for ``cost`` (n, m).

    Log-domain Sinkhorn (stable for a small ``eps``): alternately set the dual potentials
    ``f = eps (log a - LSE((g - C) / eps))`` and ``g = eps (log b - LSE((f - C) / eps))``; the
    plan is ``exp((f + g - C) / eps)``. Zero-mass entries get zero rows/columns. As
    ``eps -> 0`` the plan tends to an exact (unregularised) optimal plan.

    Example:
        >>> import torch
        >>> t = lambda x: torch.tensor(x, dtype=torch.float64)
        >>> p = sinkhorn(t([[0.0, 1.0], [1.0, 0.0]]), t([0.7, 0.3]), t([0.4, 0.6]), eps=0.01)
        >>> p.round(decimals=3).tolist()
        [[0.4, 0.3], [0.0, 0.3]]
    """
    cost = cost.to(torch.float64) if cost.dtype == torch.float64 else cost.float()
    a = a.to(cost.dtype)
    b = b.to(cost.dtype)
    log_a = torch.log(a.clamp_min(0)).nan_to_num(neginf=-1e30)
    log_b = torch.log(b.clamp_min(0)).nan_to_num(neginf=-1e30)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(int(iterations)):
        f = eps * (log_a - torch.logsumexp((g[None, :] - cost) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f[:, None] - cost) / eps, dim=0))
    return torch.exp((f[:, None] + g[None, :] - cost) / eps)


def ot_distillation_loss(
    states: Tensor, targets: Tensor, clean: Tensor, eps: float = 0.05, iterations: int = 50
) -> Tensor:
    """The OT distance between user states and their targets' teacher representations.

    The cost is the cosine distance between each student state ``states[i]`` and each teacher
    content representation ``targets[j]`` (of the item the state should predict). The source
    marginal is uniform; the target marginal is the clean probability (normalised), so noisy
    targets draw (next to) no state towards them. The plan is computed without gradient
    (Sinkhorn's envelope theorem), and the loss ``<P, C>`` pulls each state towards the clean
    content it is matched with: the teacher's content space guides the student's user space.
    """
    s = torch.nn.functional.normalize(states, dim=-1)
    t = torch.nn.functional.normalize(targets.detach(), dim=-1)
    cost = 1.0 - s @ t.T
    n = len(s)
    if n == 0:
        return states.sum() * 0.0
    w = clean.detach().clamp_min(0).to(cost.dtype)
    if float(w.sum()) <= 0:
        return states.sum() * 0.0
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    with torch.no_grad():
        plan = sinkhorn(cost.detach(), a, w / w.sum(), eps=eps, iterations=iterations)
    return (plan * cost).sum()
