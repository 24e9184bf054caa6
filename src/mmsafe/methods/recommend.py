"""Recommendation: histories, interaction counts, cold items, and ranking users' targets.

Pure functions over recommendation data (users whose ``sequence`` column holds item
positions, with the held-out next item as the label; see :class:`mmsafe.data.Dataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsafe.metrics.ranking import ranking_metrics, target_ranks

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset


def histories(data: Dataset) -> list[np.ndarray]:
    """Each user's history (item positions, oldest first) as int64 arrays."""
    return [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]


def interaction_counts(sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """``(n_items,)`` how often each item occurs in ``sequences``.

    Example:
        >>> interaction_counts([np.array([0, 2]), np.array([2])], 4).tolist()
        [1, 0, 2, 0]
    """
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences] or [np.zeros(0, int)])
    return np.bincount(flat, minlength=n_items)[:n_items]


def cold_items(sequences: Sequence[np.ndarray], n_items: int, max_interactions: int) -> np.ndarray:
    """Boolean ``(n_items,)``: items seen at most ``max_interactions`` times in the histories.

    The histories are what a recommender trains on, so these are the items it has (next to)
    no interaction evidence for: the cold-start items.

    Example:
        >>> cold_items([np.array([0, 0, 1])], 3, 1).tolist()
        [False, True, True]
    """
    return interaction_counts(sequences, n_items) <= max_interactions


def user_metrics(scores: Any, data: Dataset, ks: Sequence[int] = (10, 20)) -> dict[str, np.ndarray]:
    """Per-user ``hr@k``, ``ndcg@k`` and ``mrr`` of the labels under full ranking.

    Each user's history items are excluded from its ranking (the label itself never is),
    the protocol of RecBole's full-sort evaluation; tied scores count as a random tie-break
    would on average (popularity ties often).
    """
    ranks, ties = target_ranks(scores, data.labels, exclude=histories(data), return_ties=True)
    return ranking_metrics(ranks, ks=tuple(ks), ties=ties)


def alignment_outliers(
    image: np.ndarray, text: np.ndarray, k: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(z, flagged)``: items whose title matches their own image far worse than usual.

    For each item, ``z`` is the similarity of its image to its own title, standardised over
    its image's similarities to every title of the catalogue (one shared embedding space, a
    CLIP-style encoder). Raw cosines vary a lot from item to item; the standardised score
    does not, so an item is flagged when its ``z`` falls more than ``k`` robust standard
    deviations (1.4826 x MAD) below the catalogue's median. Computed from the titles' mean
    and second moment, in ``O(I D^2)``: no ``I x I`` matrix.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> img = rng.normal(size=(40, 32)); txt = img + 0.3 * rng.normal(size=(40, 32))
        >>> txt[7] = rng.normal(size=32)  # a title that describes something else
        >>> np.flatnonzero(alignment_outliers(img, txt)[1]).tolist()
        [7]
    """
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(text, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    mean = a @ b.mean(axis=0)
    second = np.einsum("id,de,ie->i", a, b.T @ b / len(b), a)
    std = np.sqrt(np.maximum(second - mean**2, 1e-12))
    z = ((a * b).sum(axis=1) - mean) / std
    med = float(np.median(z))
    spread = 1.4826 * float(np.median(np.abs(z - med)))
    return z, z < med - k * max(spread, 1e-6)


def membership_pairs(
    model: Any, features: Any, data: Dataset, final_scores: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``(member, non_member)`` log-probabilities of a next item, one pair per user.

    The member is the last item a recommender trained on (``sequence[-2]``, predicted from
    the items before it); the non-member is the held-out label, predicted from the whole
    history (``final_scores``: the task's ``(N, I)`` scores). Both are next-item predictions
    at the end of the same history, so a model that scores its training targets above fresh
    ones is remembering the users' interactions (a loss attack, Yeom et al., 2018).
    Users with fewer than 3 items in their history score NaN.
    """
    import torch

    hist = histories(data)
    table = model.item_table(features)
    ok = np.array([len(h) >= 3 for h in hist])
    prefixes = [h[:-2] for h, keep in zip(hist, ok, strict=True) if keep]
    member = np.full(len(hist), np.nan)
    with torch.no_grad():
        scores = model.scores(prefixes, table).double()
    logp = torch.log_softmax(scores, dim=-1).numpy()
    targets = np.array([h[-2] for h, keep in zip(hist, ok, strict=True) if keep], dtype=np.int64)
    member[ok] = logp[np.arange(len(targets)), targets]
    final = torch.log_softmax(torch.as_tensor(final_scores).double(), dim=-1).numpy()
    non_member = final[np.arange(len(hist)), data.labels]
    return member, non_member
