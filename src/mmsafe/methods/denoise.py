"""Denoising implicit feedback from modal content (a reconstruction of GUIDER's three parts).

GUIDER (Teach Me How to Denoise, arXiv 2504.14214, 2025) denoises the interactions a
multimodal recommender trains on in three steps; this module holds the pure pieces:

1. **Re-calibration** (:func:`clean_probabilities`): each training interaction gets a
   probability of being clean, computed from the items' *content* (their frozen image and
   title embeddings, re-calibrated by co-occurrence and sequence neighbours,
   :func:`item_similarity`) and the histories, never from the recommender being audited. A
   misclick is an item that neither the user's own taste nor the usual *next-content*
   transitions explain (an item-level model and a topic HMM, :func:`topic_hmm_noise`).
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
    "expected_f1_threshold",
    "flag_quality",
    "item_similarity",
    "ot_distillation_loss",
    "sinkhorn",
    "topic_hmm_noise",
    "transition_model",
]


# --------------------------------------------------------------------------- re-calibration


def content_kernel(
    features: Sequence[np.ndarray] | np.ndarray,
    k: int = 5,
    sequences: Sequence[np.ndarray] | None = None,
    calibrate: float = 0.5,
    transitions: float = 0.0,
) -> np.ndarray:
    """``(I, I)`` row-stochastic neighbourhood kernel of the items in (calibrated) content space.

    Row ``i`` spreads item ``i``'s mass uniformly over its ``k`` most similar items (itself
    included) by :func:`item_similarity` (content, re-calibrated by the interactions when
    ``sequences`` are given).

    Example:
        >>> f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> content_kernel(f, k=2).round(2).tolist()[0]
        [0.5, 0.5, 0.0, 0.0]
    """
    sim = item_similarity(features, sequences, calibrate=calibrate, transitions=transitions, k=k)
    return _knn_kernel(sim, k)


def item_similarity(
    features: Sequence[np.ndarray] | np.ndarray,
    sequences: Sequence[np.ndarray] | None = None,
    *,
    calibrate: float = 0.5,
    transitions: float = 0.0,
    k: int = 5,
    rounds: int = 2,
) -> np.ndarray:
    """``(I, I)`` item similarity: content cosine, re-calibrated by the interactions.

    Each modality's features are L2-normalised and concatenated; the content similarity of two
    items is their cosine. With ``sequences`` it is re-calibrated (GUIDER's adaptive
    modality-similarity calibration, reconstructed) in two ways:

    * ``calibrate``: ``(1 - calibrate)`` times the content cosine plus ``calibrate`` times the
      cosine of the items' PPMI co-occurrence rows (items that the same users click);
    * ``transitions``: ``(1 - transitions)`` times that plus ``transitions`` times the cosine
      of the items' *sequence-neighbour profiles*: which items come right after them and right
      before them, each pooled over the ``k`` nearest neighbours of the current similarity.
      Two items of one topic share their predecessors and successors even when their content
      differs; a misclick is too rare to shape an item's profile. This is repeated ``rounds``
      times, each round pooling with the previous round's neighbourhoods.

    Example:
        >>> f = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> item_similarity(f).round(2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    mats = [features] if isinstance(features, np.ndarray) else list(features)
    x = _unit(np.concatenate([_unit(np.asarray(m, dtype=np.float64)) for m in mats], axis=1))
    base = x @ x.T
    if sequences is None:
        return base
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    if calibrate > 0:
        base = (1 - calibrate) * base + calibrate * _cooccurrence_similarity(seqs, len(x))
    if transitions <= 0:
        return base
    counts = _transition_counts(seqs, len(x))
    sim = base
    for _ in range(max(int(rounds), 1)):
        pool = _knn_kernel(sim, k)
        profile = _unit(np.concatenate([_unit(counts @ pool.T), _unit(counts.T @ pool.T)], 1))
        sim = (1 - transitions) * base + transitions * (profile @ profile.T)
    return sim


def _knn_kernel(sim: np.ndarray, k: int) -> np.ndarray:
    """Row ``i`` spreads ``1/k`` on each of the ``k`` items most similar to ``i`` (``i`` first)."""
    sim = np.array(sim, dtype=np.float64, copy=True)
    k = int(min(max(k, 1), len(sim)))
    sim[np.diag_indices_from(sim)] = np.inf  # itself first, whatever the ties
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    kernel = np.zeros_like(sim)
    np.put_along_axis(kernel, nearest, 1.0 / k, axis=1)
    return kernel


def _transition_counts(seqs: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``(n, n)`` counts of the consecutive pairs ``a -> b`` of the sequences."""
    counts = np.zeros((n, n))
    for s in seqs:
        if len(s) >= 2:
            np.add.at(counts, (s[:-1], s[1:]), 1.0)
    return counts


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
    counts = _transition_counts([np.asarray(s, dtype=np.int64) for s in sequences], n)
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
    transitions: float = 0.5,
    states: int = 30,
    prior: float = 0.1,
    iterations: int = 5,
    candidates: np.ndarray | None = None,
    popularity: float = 1.0,
    seed: int = 0,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Each interaction's posterior probability of being clean, from the items' content.

    Two models of the histories, both read the items' re-calibrated similarity
    (:func:`item_similarity`: content, co-occurrence and sequence-neighbour profiles) and no
    noise label; the clean probability is the mean of theirs:

    1. **Item-level** (each interaction ``b`` at position ``t``, ``a`` before it, ``c`` after
       it, when they exist):

       * *clean*: ``b`` follows ``a`` by the kernel-smoothed transition model
         (:func:`transition_model`) or the user's own taste (the kernel density of the user's
         *other* items), ``p(b) = follow P[a, b] + (1 - follow) taste_u(b)``, times ``b``'s
         popularity within its neighbourhood, and ``c`` follows ``b`` (``P[b, c]``);
       * *noisy*: ``b`` is any item (uniform over the ``candidates``, the items that occur) and
         ``c`` follows ``a`` in two steps (``P^2[a, c]``), the chain skipping the misclick.

       Its noise share (``prior``) is re-estimated by EM (``iterations``).
    2. **Topic HMM** (:func:`topic_hmm_noise`, skipped when ``states`` is 0): the items are
       clustered into ``states`` topics by the same similarity, and a hidden Markov chain over
       topics, each click either drawn from its topic or a uniform misclick, is fitted by
       Baum-Welch; forward-backward gives each interaction's misclick posterior from its whole
       history.

    Returns:
        ``(p_clean, info)``: one float array per sequence (same length), and ``info`` with the
        estimated noise share (the HMM's when it runs), ``threshold`` (the clean probability
        below which flagging maximises the *expected* F1 under these posteriors,
        :func:`expected_f1_threshold`) and the options.
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    sim = item_similarity(features, seqs, calibrate=calibrate, transitions=transitions, k=k)
    kernel = _knn_kernel(sim, k)
    n = kernel.shape[0]
    if candidates is None:
        occurs = np.zeros(n, dtype=bool)
        if seqs:
            occurs[np.concatenate(seqs)] = True
        candidates = occurs
    post, share = _item_posteriors(seqs, kernel, np.asarray(candidates, dtype=bool),
                                   follow=follow, prior=prior, iterations=iterations,
                                   popularity=popularity)  # fmt: skip
    info: dict[str, Any] = {"noise_share": share, "item_noise_share": share, "k": int(k),
                            "follow": follow, "states": 0}  # fmt: skip
    n_states = min(int(states), int(np.asarray(candidates).sum()))
    if n_states >= 2 and seqs:
        noisy, hmm = topic_hmm_noise(seqs, sim, states=n_states, seed=seed)
        post = [(c + (1.0 - q)) / 2.0 for c, q in zip(post, noisy, strict=True)]
        info.update(noise_share=hmm["noise_share"], states=n_states,
                    hmm_noise_share=hmm["noise_share"], substitutes=hmm["substitutes"])  # fmt: skip
    cut = expected_f1_threshold([1.0 - p for p in post])
    info["threshold"] = float(1.0 - cut + 1e-12)  # flags p < threshold: the cut included
    return post, info


def _item_posteriors(
    seqs: list[np.ndarray],
    kernel: np.ndarray,
    candidates: np.ndarray,
    *,
    follow: float,
    prior: float,
    iterations: int,
    popularity: float,
) -> tuple[list[np.ndarray], float]:
    """The item-level model of :func:`clean_probabilities`: clean posteriors and noise share."""
    n = kernel.shape[0]
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
    return post, pi


def topic_hmm_noise(
    sequences: Sequence[np.ndarray],
    similarity: np.ndarray,
    *,
    states: int = 30,
    iterations: int = 30,
    prior: float = 0.1,
    seed: int = 0,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Each interaction's posterior probability of being a misclick, by a topic HMM.

    The items that occur are clustered into ``states`` topics by spectral clustering of
    ``similarity`` (negative similarities count 0). A user's history is a hidden Markov chain
    over these topics (an initial distribution and a ``(states, states)`` transition matrix);
    each click is, with probability ``1 - rho``, an item of the current topic (in proportion to
    the item's count) and, with probability ``rho``, a misclick: any item that occurs,
    uniformly. The chain goes on underneath a misclick, so the clicks around it still say
    where it is. Baum-Welch (``iterations``, from ``rho = prior``) fits the initial
    distribution, the transitions and ``rho``; forward-backward then gives each click's
    misclick posterior from the whole history. No noise label is read.

    Returns:
        ``(p_noisy, info)``: one float array per sequence, and ``info`` with ``noise_share``
        (the fitted ``rho``), ``states``, the item ``topics`` (-1 for items that never occur)
        and ``substitutes``: per sequence and position, the most clicked item of the topic its
        neighbours put it in (what a misclick there most likely replaced).
    """
    import warnings

    from sklearn.cluster import SpectralClustering

    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    n = similarity.shape[0]
    counts = np.bincount(np.concatenate(seqs), minlength=n).astype(np.float64)
    occurs = np.flatnonzero(counts > 0)
    t_states = int(min(max(states, 2), len(occurs)))
    affinity = np.clip(similarity[np.ix_(occurs, occurs)], 0.0, None)
    affinity = (affinity + affinity.T) / 2
    np.fill_diagonal(affinity, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected": clusters all the same
        labels = SpectralClustering(t_states, affinity="precomputed", random_state=seed,
                                    assign_labels="cluster_qr").fit_predict(affinity)  # fmt: skip
    topics = np.full(n, -1, dtype=np.int64)
    topics[occurs] = labels
    emit = np.zeros((t_states, n))
    emit[labels, occurs] = counts[occurs]
    emit /= np.maximum(emit.sum(axis=1, keepdims=True), 1e-12)
    uniform = 1.0 / len(occurs)
    length = max(len(s) for s in seqs)
    x = np.zeros((len(seqs), length), dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)], mask[i, : len(s)] = s, True
    start = np.full(t_states, 1.0 / t_states)
    trans = np.full((t_states, t_states), 1.0 / t_states)
    rho = float(np.clip(prior, 1e-3, 0.5))
    noisy = np.zeros_like(x, dtype=np.float64)
    for _ in range(max(int(iterations), 1)):
        gamma, xi, noisy = _forward_backward(x, mask, start, trans, emit, rho, uniform)
        start = gamma[:, 0].sum(axis=0) + 1e-3
        start /= start.sum()
        trans = xi + 1e-3
        trans /= trans.sum(axis=1, keepdims=True)
        rho = float(np.clip(noisy[mask].mean(), 1e-3, 0.5))
    gamma, _, noisy = _forward_backward(x, mask, start, trans, emit, rho, uniform)
    # each click's topic judged by its neighbours alone (its own emission divided out), and
    # that topic's most clicked item: what a misclick most likely replaced
    e = (1 - rho) * emit[:, x].transpose(1, 2, 0) + rho * uniform
    best = np.argmax(gamma / e, axis=-1)
    likely = np.argmax(emit, axis=1)[best]
    out = [noisy[i, : len(s)] for i, s in enumerate(seqs)]
    subs = [likely[i, : len(s)] for i, s in enumerate(seqs)]
    return out, {"noise_share": rho, "states": t_states, "topics": topics, "substitutes": subs}


def _forward_backward(
    x: np.ndarray,
    mask: np.ndarray,
    start: np.ndarray,
    trans: np.ndarray,
    emit: np.ndarray,
    rho: float,
    uniform: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled forward-backward of the topic HMM over padded ``x`` (``mask``: real clicks).

    Returns the state posteriors ``(N, L, T)``, the summed transition posteriors ``(T, T)`` and
    each click's misclick posterior ``(N, L)`` (0 on padding).
    """
    n_seq, length = x.shape
    e = (1 - rho) * emit[:, x].transpose(1, 2, 0) + rho * uniform  # (N, L, T)
    e = np.where(mask[..., None], e, 1.0)
    alpha = np.zeros(e.shape)
    scale = np.ones((n_seq, length))
    a = start[None] * e[:, 0]
    scale[:, 0] = a.sum(axis=1)
    alpha[:, 0] = a / scale[:, :1]
    for t in range(1, length):
        a = (alpha[:, t - 1] @ trans) * e[:, t]
        a = np.where(mask[:, t, None], a, alpha[:, t - 1])  # padding carries the state over
        scale[:, t] = np.where(mask[:, t], a.sum(axis=1), 1.0)
        alpha[:, t] = a / scale[:, t : t + 1]
    beta = np.ones(e.shape)
    xi = np.zeros(trans.shape)
    for t in range(length - 2, -1, -1):
        valid = mask[:, t + 1]
        nxt = e[:, t + 1] * beta[:, t + 1] / scale[:, t + 1 : t + 2]
        beta[:, t] = np.where(valid[:, None], nxt @ trans.T, 1.0)
        pair = alpha[valid, t, :, None] * trans[None] * nxt[valid, None, :]
        xi += pair.sum(axis=0)
    gamma = alpha * beta
    gamma /= np.maximum(gamma.sum(axis=-1, keepdims=True), 1e-300)
    noisy = np.where(mask, (gamma * (rho * uniform / e)).sum(axis=-1), 0.0)
    return gamma, xi, noisy


def expected_f1_threshold(p_noisy: Sequence[np.ndarray]) -> float:
    """The cut on misclick posteriors whose flags maximise the F1 *expected* under them.

    Flagging the ``j`` most likely misclicks gives, in expectation, ``sum`` of their
    posteriors true positives out of ``sum`` of all posteriors noisy interactions, so the
    expected F1 is ``2 TP_j / (j + sum p)``. The cut is the ``j``-th posterior at the best
    ``j``: a threshold from the model's own (calibrated) posteriors, no label needed.

    Example:
        >>> expected_f1_threshold([np.array([0.9, 0.8, 0.1, 0.05])])
        0.8
    """
    flat = np.sort(np.concatenate([np.asarray(p, dtype=np.float64) for p in p_noisy]))[::-1]
    if len(flat) == 0 or flat[0] <= 0:
        return 1.0
    gain = 2 * np.cumsum(flat) / (np.arange(1, len(flat) + 1) + flat.sum())
    return float(flat[int(np.argmax(gain))])


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
