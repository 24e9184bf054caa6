"""Item promotion by image: a PGD perturbation of one item's pixels that lifts it up every ranking.

The threat (visually-aware recommenders, "adversarial item promotion", Cohen et al., 2021; Liu
& Larson, 2021): whoever uploads a new item controls its image. Under an L-inf budget ``eps`` on
``[0, 1]`` pixels, the attacker moves the image so that the recommender puts the item into as
many users' top-``k`` as possible. Everything here is a pure function of a differentiable
``scorer`` that maps the item's pixels ``(1, 3, H, W)`` to the ``(N, I)`` scores of the users the
attacker reads; :func:`item_scorer` builds it for a :class:`~mmsafe.models.seqrec.SeqRecommender`.

Objective (maximised): the mean over users of ``log sigmoid(s_t - s_(k))``, where ``s_t`` is the
target's score and ``s_(k)`` the ``k``-th best score among the user's other candidates (items
not in the user's history, the target left out): a smooth surrogate of HR@k that is linear for
users far from the top ``k`` and saturates for users already won. PGD starts at the clean image
(deterministic), steps ``2.5 * eps / steps`` along the gradient's sign, projects onto the eps
ball and clamps to ``[0, 1]``; the iterate that puts the target into the most of these users'
top ``k`` is kept (the higher objective breaks ties).

Guarantees: ``||x_adv - x||_inf <= eps`` (up to float rounding), ``0 <= x_adv <= 1``, and
``eps = 0`` returns ``x`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.metrics.bootstrap import check_options, percentile_interval

if TYPE_CHECKING:
    from mmsafe.models.seqrec import SeqRecommender

Scorer = Callable[[Tensor], Tensor]
"""The item's pixels ``(1, 3, H, W)`` in ``[0, 1]`` -> ``(N, I)`` scores; differentiable."""

__all__ = [
    "Scorer",
    "crossed_mean_ci",
    "eps_name",
    "exclusion_mask",
    "item_scorer",
    "promote_item",
    "promotion_margins",
    "random_sign",
    "replace_item",
]


def eps_name(eps: float) -> str:
    """A budget as it reads in metric names: ``k/255`` for whole 255ths, else 4 significant digits.

    Example:
        >>> eps_name(8 / 255), eps_name(0.0), eps_name(0.01)
        ('8/255', '0/255', '0.01')
    """
    k = round(float(eps) * 255)
    return f"{k}/255" if abs(float(eps) * 255 - k) < 1e-6 else f"{float(eps):.4g}"


def exclusion_mask(histories: Sequence[np.ndarray], n_items: int) -> Tensor:
    """``(N, I)`` bool: the items of each user's history (left out of the user's ranking).

    Example:
        >>> exclusion_mask([np.array([0, 2]), np.array([], dtype=int)], 3).tolist()
        [[True, False, True], [False, False, False]]
    """
    mask = torch.zeros(len(histories), n_items, dtype=torch.bool)
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories] or [np.zeros(0, int)])
    mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
    return mask


def promotion_margins(scores: Tensor, target: int, exclude: Tensor, k: int = 10) -> Tensor:
    """``(N,)``: the target's score minus the ``k``-th best of each user's other candidates.

    Positive where the target is in the user's top ``k`` (ties aside). The candidates are the
    items not in ``exclude`` (the history), the target left out; a user with fewer than ``k``
    candidates has the target in the top ``k`` whatever it scores (margin ``+inf``).

    Example:
        >>> s = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
        >>> promotion_margins(s, 3, torch.tensor([[True, False, False, False]]), k=1).tolist()
        [-2.0]
    """
    others = scores.masked_fill(exclude.to(scores.device), -torch.inf)
    others = others.index_fill(1, torch.tensor([target], device=scores.device), -torch.inf)
    kth = others.topk(min(k, others.shape[1]), dim=1).values[:, -1]
    return scores[:, target] - kth


def _objective(margins: Tensor) -> Tensor:
    finite = torch.isfinite(margins)  # users with fewer than k candidates are won already
    if not bool(finite.any()):
        return margins.new_zeros(())
    return nn.functional.logsigmoid(margins[finite]).sum() / margins.numel()


def promote_item(
    scorer: Scorer,
    x: Tensor,
    target: int,
    exclude: Tensor,
    eps: float,
    steps: int = 10,
    k: int = 10,
    step_size: float | None = None,
) -> Tensor:
    """L-inf PGD on one item's pixels that pushes it into the users' top ``k``.

    Args:
        scorer: pixels ``(1, 3, H, W)`` -> ``(N, I)`` scores of the attacked users.
        x: the item's clean pixels ``(1, 3, H, W)`` in ``[0, 1]``.
        target: the item's column in the scores.
        exclude: ``(N, I)`` bool, each user's history (see :func:`exclusion_mask`).
        eps: the L-inf budget on ``[0, 1]`` pixels (``0``: ``x`` is returned unchanged).
        steps: gradient steps.
        k: the cut-off the attack aims at (HR@k).
        step_size: ``alpha`` per step; default ``2.5 * eps / steps``.

    Returns:
        The kept iterate, detached, in ``[0, 1]`` with ``||x_adv - x||_inf <= eps``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # item 1 scores its pixel 0
        >>> scorer = lambda p: torch.stack([torch.tensor(0.5), p.flatten()[0]])[None] @ w
        >>> x = torch.full((1, 1, 1, 2), 0.4)
        >>> adv = promote_item(scorer, x, 1, torch.zeros(1, 2, dtype=torch.bool), 0.2, k=1)
        >>> [round(v, 4) for v in adv.flatten().tolist()]
        [0.6, 0.4]
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1 or k < 1:
        raise ValueError("steps and k must be >= 1")
    x = x.detach()
    if eps == 0:
        return x.clone()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x_adv, best, best_key = x.clone(), x.clone(), (-1.0, -torch.inf)
    for i in range(steps + 1):
        x_adv = x_adv.detach().requires_grad_(i < steps)
        with torch.enable_grad() if i < steps else torch.no_grad():
            margins = promotion_margins(scorer(x_adv).float(), target, exclude, k)
            objective = _objective(margins)
            grad = torch.autograd.grad(objective, x_adv)[0] if i < steps else None
        key = (float((margins > 0).float().mean()), float(objective.detach()))
        if key > best_key:
            best, best_key = x_adv.detach().clone(), key
        if grad is not None:
            step = x_adv.detach() + alpha * grad.sign() - x
            x_adv = (x + step.clamp(-eps, eps)).clamp(0.0, 1.0)
    return best


def random_sign(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """The control: ``x`` plus ``eps`` times an independent random sign per pixel, clamped.

    A perturbation as large as the attack's, aimed nowhere: it should not promote the item.

    Example:
        >>> x = torch.full((1, 3, 2, 2), 0.5)
        >>> d = random_sign(x, 0.1, torch.Generator().manual_seed(0)) - x
        >>> sorted({round(v, 4) for v in d.flatten().tolist()})
        [-0.1, 0.1]
    """
    signs = torch.randint(0, 2, x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
    return (x + eps * (2 * signs - 1)).clamp(0.0, 1.0).detach()


def replace_item(
    features: Mapping[str, Tensor], item: int, modality: str, row: Tensor
) -> dict[str, Tensor]:
    """``features`` with ``features[modality][item]`` replaced by ``row`` (differentiably).

    The other rows and modalities are the given tensors (not copied).

    Example:
        >>> f = replace_item({"image": torch.zeros(3, 2)}, 1, "image", torch.ones(2))
        >>> f["image"].tolist()
        [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    base = features[modality]
    hit = torch.zeros(base.shape[0], 1, dtype=torch.bool, device=base.device)
    hit[item] = True
    return {**features, modality: torch.where(hit, row.to(base.device, base.dtype), base)}


def item_scorer(
    model: SeqRecommender,
    task: Any,
    features: Mapping[str, Tensor],
    item: int,
    users: np.ndarray,
    histories: Sequence[np.ndarray],
    clean_scores: Tensor,
    modality: str = "image",
    batch_size: int = 512,
) -> Scorer:
    """The differentiable map: the item's pixels -> the ``(len(users), I)`` scores of ``users``.

    The pixels go through the recommender's encoder into the item's ``modality`` feature. When
    the item is in none of the users' histories their states do not read it, and only its
    column changes: the scorer then holds the states and the clean scores of the other items
    fixed, and scores the one item (``O(N)`` per step instead of the whole model). Otherwise
    it calls ``task.logits`` on the edited features, which is exact for any item. Either way
    the check scores its final images through ``task.logits``.

    Args:
        model: the recommender (content items, an encoder that reads ``modality``).
        task: the prepared ``seqrec`` task (its histories are every evaluated user's).
        features: the clean item features ``{modality: (I, D)}``.
        item: the attacked item.
        users: the rows of the users whose scores the attacker reads.
        histories: every evaluated user's history (rows of ``task``).
        clean_scores: ``(N, I)`` clean scores of every evaluated user.
        modality: the attacked modality.
        batch_size: users per pass when computing the states.
    """
    from mmsafe.models.seqrec import pad_histories

    encoder = model.encoder
    assert encoder is not None
    rows = torch.as_tensor(users, dtype=torch.long)
    if any(item in np.asarray(histories[u]) for u in users):

        def full(pixels: Tensor) -> Tensor:
            row = encoder.encode({modality: pixels})[modality][0]
            return task.logits(replace_item(features, item, modality, row))[rows.to(row.device)]

        return full

    with torch.no_grad():
        model.eval()
        table = model.item_table(features)
        states = torch.cat([
            model.user_states(pad_histories([histories[u] for u in users[s : s + batch_size]],
                                            model.cfg.max_len), table)
            for s in range(0, len(users), batch_size)
        ])  # fmt: skip
    fixed = clean_scores[rows].to(states.device, states.dtype)
    column = torch.zeros(fixed.shape[1], dtype=torch.bool, device=states.device)
    column[item] = True
    one = {m: f[item : item + 1] for m, f in features.items()}

    def fast(pixels: Tensor) -> Tensor:
        row = encoder.encode({modality: pixels})[modality]
        h = model.item_table({**one, modality: row})  # (1, H): the item's representation
        return torch.where(column, states @ h.T.to(states.device), fixed)

    return fast


def crossed_mean_ci(
    values: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of a ``(users, targets)`` matrix, both resampled.

    Each resample draws the users (rows) and the targets (columns) independently with
    replacement, so the interval covers both sources of variation: which users were scored
    and which items were attacked.

    Example:
        >>> m = np.r_[np.ones((50, 4)), np.zeros((50, 4))]
        >>> lo, hi = crossed_mean_ci(m, n_boot=400)
        >>> bool(0.35 < lo < 0.5 < hi < 0.65)
        True
    """
    check_options(n_boot, level, seed)
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"`values` must be a non-empty (users, targets) matrix, got {m.shape}")
    n, t = m.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(int(n_boot))
    for s in range(0, int(n_boot), 256):
        b = min(256, int(n_boot) - s)
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=b) / n  # (b, N) row weights
        v = rng.multinomial(t, np.full(t, 1.0 / t), size=b) / t  # (b, T) column weights
        stats[s : s + b] = np.einsum("bn,nt,bt->b", w, m, v)
    return percentile_interval(stats, level)
