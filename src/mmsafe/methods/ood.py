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
* :func:`relative_mahalanobis`: the relative Mahalanobis distance of a feature vector (Ren et
  al., 2021, "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection"):
  ``-(min_c MD_c(x) - MD_0(x))``, class-conditional Gaussians with a shared covariance against
  one background Gaussian of all the in-distribution rows. :func:`mahalanobis` is the plain
  class-conditional ``-min_c MD_c(x)`` (Lee et al., 2018); :func:`relative_mahalanobis_oof`
  scores the in-distribution rows themselves out of fold.
* :func:`layer_ensemble`: the mean of per-layer scores, each standardised on in-distribution
  reference rows, for scores computed on several hidden layers (with :func:`pool_states`, the
  global mean pooling of one layer's hidden state).

MSP saturates: with CLIP-scale logits (``100 * cos``) many confident rows get an MSP of exactly
1.0 even in float64, and tie. The metrics handle ties correctly (each tied ID/OOD pair counts as
half), but this is why max-logit, energy or MCM can rank rows that MSP cannot.

Example:
    >>> z = torch.tensor([[4.0, 0.0], [1.0, 1.0]])  # a confident row and an ambivalent one
    >>> msp(z).tolist()[1], max_logit(z).tolist(), bool((energy(z)[0] > energy(z)[1]).item())
    (0.5, [4.0, 1.0], True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional

__all__ = [
    "energy",
    "knn_score",
    "layer_ensemble",
    "mahalanobis",
    "max_logit",
    "mcm",
    "msp",
    "pool_states",
    "relative_mahalanobis",
    "relative_mahalanobis_oof",
]


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


# --------------------------------------------------------------------------- feature space
def pool_states(state: Tensor) -> Tensor:
    """Global mean pooling of one hidden state: one ``(B, C)`` feature vector per row.

    ``(B, C, H, W)`` feature maps are averaged over the grid, ``(B, L, D)`` token states over
    the tokens (padding included: the states carry no mask), and ``(B, D)`` is returned as it
    is. The dtype and device are kept.

    Example:
        >>> pool_states(torch.arange(8.0).reshape(1, 2, 2, 2))  # two 2x2 channels
        tensor([[1.5000, 5.5000]])
        >>> pool_states(torch.ones(3, 5, 4)).shape, pool_states(torch.ones(3, 4)).shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """
    if state.ndim == 4:
        return state.mean(dim=(2, 3))
    if state.ndim == 3:
        return state.mean(dim=1)
    if state.ndim == 2:
        return state
    raise ValueError(
        f"a hidden state must be (B, C, H, W), (B, L, D) or (B, D), got {tuple(state.shape)}."
    )


def _shrunk_cholesky(centred: Tensor, shrinkage: float, what: str) -> Tensor:
    """The Cholesky factor of the shrunk empirical covariance of already centred rows.

    ``cov = centred.T @ centred / N`` (sklearn's ``empirical_covariance``), shrunk like
    sklearn's ``ShrunkCovariance``: ``(1 - s) * cov + s * trace(cov) / D * I``.
    """
    n, d = centred.shape
    cov = centred.T @ centred / n
    shrunk = (1.0 - shrinkage) * cov
    shrunk.diagonal().add_(shrinkage * torch.trace(cov) / d)
    chol, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) != 0:
        raise ValueError(
            f"the {what} covariance ({n} rows, {d} features) is singular; use shrinkage > 0 "
            "or more rows (or drop constant features)."
        )
    return chol


def _mahalanobis_parts(
    query: Tensor, bank: Tensor, bank_labels: Tensor | Sequence[int], shrinkage: float,
    chunk_size: int, background: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``(min_c MD_c, MD_0 or None)``: squared distances of each query row, float64."""
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query (N, D) and bank (M, D) must share D, got {tuple(query.shape)} and "
            f"{tuple(bank.shape)}."
        )
    labels = torch.as_tensor(bank_labels).reshape(-1)
    if labels.shape[0] != bank.shape[0]:
        raise ValueError(f"bank_labels must have one label per bank row ({bank.shape[0]}), got "
                         f"{labels.shape[0]}.")  # fmt: skip
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"bank_labels must be integers, got {labels.dtype}.")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    x = query.detach().double()
    b = bank.detach().double().to(x.device)
    if not (torch.isfinite(x).all() and torch.isfinite(b).all()):
        raise ValueError("query and bank must be finite (no NaN or inf).")
    labels = labels.to(x.device)
    known = labels >= 0
    classes = torch.unique(labels[known])  # sorted; a label without rows has no mean
    if classes.numel() == 0:
        raise ValueError("the bank needs at least one labelled row (label >= 0).")
    lb, yb = b[known], labels[known]
    means = torch.stack([lb[yb == c].mean(dim=0) for c in classes])  # (C, D)
    residuals = lb - means[torch.searchsorted(classes, yb)]
    chol = _shrunk_cholesky(residuals, shrinkage, "class-centred")
    white_means = torch.linalg.solve_triangular(chol, means.T, upper=False).T  # (C, D)
    if background:
        mu0 = b.mean(dim=0)
        chol0 = _shrunk_cholesky(b - mu0, shrinkage, "background")
    n_cls, d = white_means.shape
    step = max(1, min(chunk_size, 2**24 // max(1, n_cls * d)))  # (rows, C, D) <= 128 MiB
    mins, backs = [], []
    for q in x.split(step):
        z = torch.linalg.solve_triangular(chol, q.T, upper=False).T  # (rows, D), whitened
        diff = z[:, None, :] - white_means[None, :, :]
        mins.append(diff.square().sum(dim=-1).min(dim=1).values)
        if background:
            z0 = torch.linalg.solve_triangular(chol0, (q - mu0).T, upper=False).T
            backs.append(z0.square().sum(dim=-1))
    empty = torch.zeros(0, dtype=torch.float64, device=x.device)
    md = torch.cat(mins) if mins else empty
    if not background:
        return md, None
    return md, torch.cat(backs) if backs else empty


def mahalanobis(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor | Sequence[int],
    shrinkage: float = 0.01,
    chunk_size: int = 4096,
) -> Tensor:
    """Negated squared Mahalanobis distance to the nearest class mean, ``-min_c MD_c(x)``.

    The class-conditional Gaussians of Lee et al. (2018): one mean per class of ``bank`` and one
    covariance shared by all classes (of the class-centred rows), estimated and shrunk as in
    :func:`relative_mahalanobis`, which subtracts a background distance from this one.

    Args:
        query: ``(N, D)`` features to score.
        bank: ``(M, D)`` in-distribution features.
        bank_labels: ``(M,)`` class of each bank row, ``0..C-1``; rows with a label ``< 0`` are
            ignored.
        shrinkage: ``s`` in ``(1 - s) * cov + s * trace(cov) / D * I``, in ``[0, 1]``.
        chunk_size: the most query rows per block.

    Example:
        >>> bank = torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 1.0], [4.0, -1.0]])
        >>> # class means (0, 0) and (4, 0); shared covariance diag(0, 1), shrunk: diag(1/4, 3/4)
        >>> q = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        >>> mahalanobis(q, bank, [0, 0, 1, 1], shrinkage=0.5).tolist()  # 2^2 / (1/4) = 16
        [-0.0, -16.0]
    """
    return -_mahalanobis_parts(query, bank, bank_labels, shrinkage, chunk_size, False)[0]


def relative_mahalanobis(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor | Sequence[int],
    shrinkage: float = 0.01,
    chunk_size: int = 4096,
) -> Tensor:
    """Relative Mahalanobis distance (Ren et al., 2021), negated: ``-(min_c MD_c - MD_0)``.

    ``MD_c`` is the squared Mahalanobis distance to the mean of class ``c`` under one covariance
    shared by the classes (of the bank rows minus their class mean); ``MD_0`` the one to a
    background Gaussian, the mean and covariance of every bank row whatever its label.
    Subtracting ``MD_0`` removes the directions in which every in-distribution row varies alike
    (which dominate ``MD_c`` in high dimension and hide near-OOD inputs). Covariances are
    empirical (divided by the row count, like sklearn's ``empirical_covariance``) and shrunk
    like sklearn's ``ShrunkCovariance``: ``(1 - s) * cov + s * trace(cov) / D * I``. Everything
    runs in float64 through Cholesky factors (no explicit inverse); queries go in blocks of at
    most ``chunk_size`` rows (fewer when ``C * D`` is large), bounding the ``(rows, C, D)``
    differences.

    Args:
        query: ``(N, D)`` features to score.
        bank: ``(M, D)`` in-distribution features (e.g. the pooled hidden states of the train
            images).
        bank_labels: ``(M,)`` integer class of each bank row, ``0..C-1``; rows labelled ``< 0``
            are ignored by the class means but belong to the background. A class without rows
            has no mean; at least one class must have rows.
        shrinkage: ``s`` above, in ``[0, 1]``; ``> 0`` keeps the covariances invertible when
            ``D`` exceeds the number of rows.
        chunk_size: the most query rows per block.

    Returns:
        ``(N,)`` float64 on the query's device; higher = more in-distribution.

    Raises:
        ValueError: mismatched shapes, non-integer labels, no labelled row, a shrinkage outside
            ``[0, 1]``, non-finite values, or a singular covariance (``shrinkage = 0``).

    Example:
        >>> bank = torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 1.0], [4.0, -1.0]])
        >>> # background: mean (2, 0), covariance diag(4, 1), shrunk: diag(3.25, 1.75)
        >>> q = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # MD_0 = 4 / 3.25 and 0; MD_c = 0 and 16
        >>> relative_mahalanobis(q, bank, [0, 0, 1, 1], shrinkage=0.5).round(decimals=4)
        tensor([  1.2308, -16.0000], dtype=torch.float64)
    """
    md, md0 = _mahalanobis_parts(query, bank, bank_labels, shrinkage, chunk_size, True)
    assert md0 is not None
    return md0 - md


def relative_mahalanobis_oof(
    bank: Tensor,
    bank_labels: Tensor | Sequence[int],
    shrinkage: float = 0.01,
    folds: int = 5,
) -> Tensor:
    """Out-of-fold :func:`relative_mahalanobis` of the bank's own rows.

    Row ``i`` goes to fold ``i % folds``; each fold is scored by the Gaussians fitted on the
    other folds. Scoring the rows a fit has seen is biased towards in-distribution, the more so
    the more features there are per row (with ``D`` above the row count their class distances
    nearly vanish), so these are the scores to standardise on (:func:`layer_ensemble`) when no
    held-out in-distribution rows exist.

    Args:
        bank: ``(M, D)`` in-distribution features, ``M >= folds``.
        bank_labels: ``(M,)`` integer classes, as in :func:`relative_mahalanobis`.
        shrinkage: as in :func:`relative_mahalanobis`.
        folds: the number of folds, ``>= 2``.

    Returns:
        ``(M,)`` float64 on the bank's device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bank, labels = torch.randn(40, 60, generator=g), torch.arange(40) % 2  # D > M
        >>> new = relative_mahalanobis(torch.randn(40, 60, generator=g), bank, labels)
        >>> seen = relative_mahalanobis(bank, bank, labels)  # rows the fit has seen
        >>> oof = relative_mahalanobis_oof(bank, labels)
        >>> [round(float(x.std() / new.std()), 2) for x in (seen, oof)]  # spread vs new rows
        [0.0, 0.87]
    """
    labels = torch.as_tensor(bank_labels).reshape(-1)
    if bank.ndim != 2 or labels.shape[0] != bank.shape[0]:
        raise ValueError(
            f"bank must be (M, D) with one label per row, got {tuple(bank.shape)} and "
            f"{labels.shape[0]} labels."
        )
    if not 2 <= folds <= bank.shape[0]:
        raise ValueError(f"folds must be in [2, {bank.shape[0]}] (the bank size), got {folds}.")
    fold = torch.arange(bank.shape[0], device=bank.device) % folds
    labels = labels.to(bank.device)
    out = torch.empty(bank.shape[0], dtype=torch.float64, device=bank.device)
    for f in range(folds):
        held = fold == f
        out[held] = relative_mahalanobis(bank[held], bank[~held], labels[~held], shrinkage)
    return out


def layer_ensemble(scores: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """The mean over layers of each layer's score standardised on in-distribution rows.

    Layer ``l``'s scores become ``(scores[l] - mean(reference[l])) / std(reference[l])`` (the
    population std; ``1`` where it is ``0``), so that layers whose scores live on different
    scales weigh alike, then the layers are averaged.

    Args:
        scores: one ``(N,)`` score per layer, for the rows to score.
        reference: one ``(M,)`` score per layer, in the same layer order, for in-distribution
            reference rows (held-out rows when there are some).

    Returns:
        ``(N,)`` float64 on the first score's device.

    Example:
        >>> s = [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 10.0])]
        >>> ref = [torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])]  # std 1; std 0 -> 1
        >>> layer_ensemble(s, ref)  # ((-1 + 10) / 2, (1 + 10) / 2)
        tensor([4.5000, 5.5000], dtype=torch.float64)
    """
    if len(scores) == 0 or len(scores) != len(reference):
        raise ValueError(
            f"scores and reference need one entry per layer (at least one), got {len(scores)} "
            f"and {len(reference)}."
        )
    device = torch.as_tensor(scores[0]).device
    out = []
    n = None
    for layer, (s, r) in enumerate(zip(scores, reference, strict=True)):
        s = torch.as_tensor(s).detach().double().to(device)
        r = torch.as_tensor(r).detach().double().to(device)
        if s.ndim != 1 or r.ndim != 1 or r.numel() == 0:
            raise ValueError(
                f"layer {layer}: scores must be (N,) and reference (M,) with M >= 1, got "
                f"{tuple(s.shape)} and {tuple(r.shape)}."
            )
        if n is not None and s.numel() != n:
            raise ValueError(f"layer {layer} scores {s.numel()} rows, layer 0 scores {n}.")
        n = s.numel()
        std = r.std(correction=0)
        out.append((s - r.mean()) / (std if std > 0 else 1.0))
    return torch.stack(out).mean(dim=0)
