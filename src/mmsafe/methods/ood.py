"""OOD scores: one number per row, **higher = more in-distribution**.

Every function here is pure torch and returns a ``(N,)`` float64 tensor on the input's device.
The sign convention is the same for all of them, so the metrics of :mod:`mmsafe.metrics.ood`
(ID = positive, higher = ID) apply unchanged:

* :func:`msp`: maximum softmax probability ``max_c softmax(z)_c`` (Hendrycks & Gimpel, 2017).
* :func:`max_logit`: ``max_c z_c`` (Hendrycks et al., 2022).
* :func:`energy`: the *negative* free energy ``-E(x) = T * logsumexp(z / T)`` (Liu et al., 2020
  define ``E(x) = -T logsumexp(z / T)`` and flag OOD when the energy is *high*; we return its
  negation so that, like every other score here, high means in-distribution).
* :func:`mcm`: maximum concept matching (Ming et al., NeurIPS 2022):
  ``max_c softmax(cos(image, class_c) / tau)``, with cosine similarities to the class-prompt
  embeddings and temperature ``tau`` (1 by default, as in the paper).
* :func:`knn_score`: the negated distance to the ``k``-th nearest in-distribution embedding
  (Sun et al., ICML 2022, on L2-normalised embeddings): ``-|| z - z_(k) ||``.

MSP saturates: with CLIP-scale logits (``100 * cos``) many confident rows get an MSP of exactly
1.0 even in float64, and tie. The metrics handle ties correctly (each tied ID/OOD pair counts as
half), but this is why max-logit, energy or MCM can rank rows that MSP cannot.

Example:
    >>> z = torch.tensor([[4.0, 0.0], [1.0, 1.0]])  # a confident row and an ambivalent one
    >>> msp(z).tolist()[1], max_logit(z).tolist(), bool((energy(z)[0] > energy(z)[1]).item())
    (0.5, [4.0, 1.0], True)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

__all__ = ["energy", "knn_score", "max_logit", "mcm", "msp"]


def _logits(logits: Tensor) -> Tensor:
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be (N, C) with C >= 1, got shape {tuple(logits.shape)}.")
    return logits.detach().double()


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability per row.

    Example:
        >>> msp(torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])).round(decimals=4)
        tensor([0.2500, 0.9999], dtype=torch.float64)
    """
    return torch.softmax(_logits(logits), dim=-1).max(dim=-1).values


def max_logit(logits: Tensor) -> Tensor:
    """Largest logit per row.

    Example:
        >>> max_logit(torch.tensor([[1.0, 3.0], [-2.0, -1.0]]))
        tensor([ 3., -1.], dtype=torch.float64)
    """
    return _logits(logits).max(dim=-1).values


def energy(logits: Tensor, T: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` per row (higher = in-distribution).

    Args:
        logits: ``(N, C)``.
        T: temperature ``> 0``; as ``T -> 0`` the score tends to :func:`max_logit`.

    Example:
        >>> round(energy(torch.tensor([[0.0, 0.0]])).item(), 6)  # log 2
        0.693147
    """
    if not T > 0:
        raise ValueError(f"T must be positive, got {T}.")
    return T * torch.logsumexp(_logits(logits) / T, dim=-1)


def mcm(image_emb: Tensor, class_emb: Tensor, tau: float = 1.0) -> Tensor:
    """Maximum concept matching: the top softmax of cosine similarities to the classes over ``tau``.

    Both inputs are L2-normalised here, so the similarities are cosines whatever their scale.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        class_emb: ``(C, D)`` class (prompt) embeddings from the text tower.
        tau: softmax temperature ``> 0`` (the paper's default is 1).

    Example:
        >>> img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> mcm(img, torch.eye(2)).tolist()[1]  # equidistant from both classes: 1 / C
        0.5
    """
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"image_emb (N, D) and class_emb (C, D) must share D, got {tuple(image_emb.shape)} "
            f"and {tuple(class_emb.shape)}."
        )
    img = functional.normalize(image_emb.detach().double(), dim=-1)
    cls = functional.normalize(class_emb.detach().double().to(img.device), dim=-1)
    return torch.softmax(img @ cls.T / tau, dim=-1).max(dim=-1).values


def knn_score(query_emb: Tensor, bank_emb: Tensor, k: int = 10, chunk_size: int = 4096) -> Tensor:
    """Negated Euclidean distance from each query to its ``k``-th nearest bank embedding.

    Both sets are L2-normalised first (Sun et al. 2022), so the distance is
    ``sqrt(2 - 2 cos)``. Queries and bank are processed in ``chunk_size`` blocks, keeping a
    running top-``k``, so memory stays ``O(chunk_size^2)`` however large the bank is.

    Args:
        query_emb: ``(N, D)`` embeddings to score.
        bank_emb: ``(M, D)`` in-distribution embeddings (e.g. the training images), ``M >= k``.
        k: which neighbour; ``k = 1`` is the nearest.
        chunk_size: rows per block, for both queries and bank.

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> knn_score(torch.tensor([[1.0, 0.0]]), bank, k=1).tolist()  # its own copy: distance 0
        [-0.0]
        >>> round(knn_score(torch.tensor([[1.0, 0.0]]), bank, k=2).item() ** 2, 6)  # 2 - 2 cos 90
        2.0
    """
    if query_emb.ndim != 2 or bank_emb.ndim != 2 or query_emb.shape[1] != bank_emb.shape[1]:
        raise ValueError(
            f"query_emb (N, D) and bank_emb (M, D) must share D, got {tuple(query_emb.shape)} "
            f"and {tuple(bank_emb.shape)}."
        )
    if not 1 <= k <= bank_emb.shape[0]:
        raise ValueError(f"k must be in [1, {bank_emb.shape[0]}] (the bank size), got {k}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    query = functional.normalize(query_emb.detach().double(), dim=-1)
    bank = functional.normalize(bank_emb.detach().double().to(query.device), dim=-1)
    out = []
    for q in query.split(chunk_size):
        best = torch.full((q.shape[0], 0), -torch.inf, dtype=q.dtype, device=q.device)
        for b in bank.split(chunk_size):
            cand = torch.cat([best, q @ b.T], dim=1)
            best = cand.topk(min(k, cand.shape[1]), dim=1).values  # largest cosines, descending
        kth_cos = best[:, k - 1]
        out.append(-torch.sqrt(torch.clamp(2.0 - 2.0 * kth_cos, min=0.0)))
    if not out:
        return torch.zeros(0, dtype=torch.float64, device=query.device)
    return torch.cat(out)
