"""Explanations of multimodal predictions: modality Shapley values, DIME, Integrated Gradients.

Pure functions over tensors and callables; :mod:`mmsafe.checks.explain` wires them to an audit.

* **Exact Shapley values over modalities** (:func:`shapley_matrix`, :func:`shapley_values`,
  :func:`coalition_values`). The players are the ``M`` modalities (2 to 4); the value of a
  coalition ``S`` is the model's output for the target class when only the modalities in ``S``
  are present and every other one is replaced by a *null* embedding (the mean train embedding,
  or zeros). All ``2^M`` coalitions are evaluated for every row in one batched call, so the
  values are exact, not sampled. Efficiency: ``sum_m phi_m = v(all) - v(empty)``.
* **DIME disentanglement** (:func:`cross_grid`, :func:`dime_decompose`): Lyu et al., AIES 2022
  (arXiv 2203.02013). Every row's modality ``A`` is paired with every row's modality ``B``
  (``F[a, b] = f_c(x_A^a, x_B^b)``), and the diagonal cell ``F[i, i]`` is split into a grand
  mean, two unimodal contributions (row/column means minus the grand mean) and the
  multimodal-interaction remainder. This is DIME's disentanglement step (an EMAP additive
  projection); DIME's second step, fitting LIME to each part, is not reproduced here.
* **Integrated Gradients over image pixels** (:func:`integrated_gradients`, via captum) and a
  **deletion curve** (:func:`deletion_curve`, :func:`curve_auc`): delete the most-attributed
  pixels first (replace them by the baseline) and record the target-class score; a faithful
  attribution makes the score fall faster than a random deletion order, i.e. a lower AUC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Output = Literal["prob", "logit"]
LogitsFn = Callable[[Mapping[str, Tensor]], Tensor]

MAX_MODALITIES = 4


# --------------------------------------------------------------------------- Shapley


def coalition_masks(n_players: int) -> np.ndarray:
    """``(2^M, M)`` booleans: coalition ``k`` holds player ``j`` when bit ``j`` of ``k`` is set.

    Example:
        >>> coalition_masks(2).astype(int).tolist()
        [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    k = np.arange(2**n_players)[:, None]
    return ((k >> np.arange(n_players)[None, :]) & 1).astype(bool)


def shapley_matrix(n_players: int) -> np.ndarray:
    """``(2^M, M)`` weights ``W`` with ``phi = v @ W`` for a value table ``v`` of ``2^M`` entries.

    ``phi_j = sum_{S not containing j} |S|! (M - |S| - 1)! / M! * (v(S + j) - v(S))``, with
    coalitions indexed as in :func:`coalition_masks`.

    Example:
        >>> shapley_matrix(2).tolist()
        [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]
    """
    if not 1 <= n_players <= 8:
        raise ValueError(f"exact Shapley values need 1..8 players, got {n_players}")
    m = n_players
    w = np.zeros((2**m, m))
    for s in range(2**m):
        size = bin(s).count("1")
        weight = (
            math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            if (size < m)
            else 0.0
        )
        for j in range(m):
            if not s >> j & 1:
                w[s, j] -= weight
                w[s | 1 << j, j] += weight
    return w


def shapley_values(values: np.ndarray | Tensor, n_players: int) -> np.ndarray:
    """Exact Shapley values from a value table ``(..., 2^M)`` (coalitions as in the masks).

    Example:
        >>> # v(S) = 2*x1 + 3*x2 (additive): each player gets its own contribution
        >>> v = np.array([0.0, 2.0, 3.0, 5.0])
        >>> shapley_values(v, 2).tolist()
        [2.0, 3.0]
        >>> shapley_values(np.array([0.0, 0.0, 0.0, 1.0]), 2).tolist()  # v = x1 * x2
        [0.5, 0.5]
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=float)
    if v.shape[-1] != 2**n_players:
        raise ValueError(f"expected {2**n_players} coalition values, got {v.shape[-1]}")
    return v @ shapley_matrix(n_players)


def _score(logits: Tensor, target: Tensor, output: Output) -> Tensor:
    if output == "prob":
        logits = torch.softmax(logits.float(), dim=-1)
    elif output != "logit":
        raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
    return logits.gather(-1, target.reshape(-1, 1).to(logits.device)).squeeze(-1)


def coalition_values(
    logits_fn: LogitsFn,
    embeddings: Mapping[str, Tensor],
    null: Mapping[str, Tensor],
    target: Tensor | np.ndarray,
    modalities: Sequence[str] | None = None,
    output: Output = "prob",
) -> Tensor:
    """``(N, 2^M)`` value of every coalition of modalities for every row, in one batched call.

    Args:
        logits_fn: ``{modality: (B, D_m)} -> (B, C)`` logits (e.g. ``FusionTask.logits``).
        embeddings: ``{modality: (N, D_m)}`` the rows' embeddings.
        null: ``{modality: (D_m,) or (1, D_m)}`` what an absent modality becomes.
        target: ``(N,)`` class whose score is the value (predicted or true class).
        modalities: the players, in order (default: the keys of ``embeddings``).
        output: ``prob`` (softmax probability of ``target``) or ``logit``.

    Example:
        >>> fn = lambda e: torch.stack([e["a"][:, 0] + 2 * e["b"][:, 0], 0 * e["a"][:, 0]], -1)
        >>> emb = {"a": torch.ones(1, 1), "b": torch.ones(1, 1)}
        >>> null = {"a": torch.zeros(1), "b": torch.zeros(1)}
        >>> coalition_values(fn, emb, null, torch.tensor([0]), output="logit").tolist()
        [[0.0, 1.0, 2.0, 3.0]]
    """
    mods = list(modalities if modalities is not None else embeddings)
    if not 1 <= len(mods) <= MAX_MODALITIES:
        raise ValueError(f"1..{MAX_MODALITIES} modalities, got {len(mods)}")
    n = next(iter(embeddings.values())).shape[0]
    masks = coalition_masks(len(mods))
    batch: dict[str, Tensor] = {}
    for j, m in enumerate(mods):
        x = embeddings[m]
        z = null[m].reshape(1, -1).to(x.device, x.dtype).expand_as(x)
        batch[m] = torch.cat([x if masks[k, j] else z for k in range(len(masks))])
    for m, x in embeddings.items():  # non-player inputs stay as they are
        if m not in batch:
            batch[m] = x.repeat(len(masks), *([1] * (x.ndim - 1)))
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long).repeat(len(masks))
    with torch.inference_mode():
        scores = _score(logits_fn(batch), tgt, output)
    return scores.reshape(len(masks), n).T.float().cpu()


def modality_shares(phi: np.ndarray) -> np.ndarray:
    """Each player's share of the mean absolute Shapley value: ``mean|phi_m| / sum mean|phi|``.

    NaN everywhere when every value is 0.

    Example:
        >>> modality_shares(np.array([[1.0, -3.0], [1.0, 3.0]])).tolist()
        [0.25, 0.75]
    """
    a = np.abs(np.asarray(phi, dtype=float)).mean(axis=0)
    total = a.sum()
    return a / total if total > 0 else np.full_like(a, math.nan)


# --------------------------------------------------------------------------- DIME


def cross_grid(
    logits_fn: LogitsFn,
    emb_a: tuple[str, Tensor],
    emb_b: tuple[str, Tensor],
    output: Output = "prob",
    fixed: Mapping[str, Tensor] | None = None,
    chunk: int = 16384,
) -> Tensor:
    """``(N, N, C)`` outputs of every row's modality ``A`` paired with every row's ``B``.

    ``grid[a, b] = f(x_A^a, x_B^b)`` (softmax probabilities or logits over all classes). Other
    inputs of ``logits_fn`` can be held fixed (``fixed``, ``(D,)`` each). ``N^2`` forward passes,
    batched ``chunk`` pairs at a time.

    Example:
        >>> fn = lambda e: torch.cat([e["a"] + e["b"], e["a"] * e["b"]], -1)
        >>> a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [5.0]])
        >>> g = cross_grid(fn, ("a", a), ("b", b), "logit")
        >>> g[..., 1].tolist()
        [[3.0, 5.0], [6.0, 10.0]]
    """
    (ma, xa), (mb, xb) = emb_a, emb_b
    n = xa.shape[0]
    if xb.shape[0] != n:
        raise ValueError("both modalities need the same rows")
    ia, ib = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ia, ib = ia.reshape(-1), ib.reshape(-1)
    out = []
    with torch.inference_mode():
        for s in range(0, n * n, chunk):
            sl = slice(s, s + chunk)
            batch = {ma: xa[ia[sl]], mb: xb[ib[sl]]}
            for m, v in (fixed or {}).items():
                batch[m] = v.reshape(1, -1).expand(len(ia[sl]), -1)
            logits = logits_fn(batch).float()
            out.append(torch.softmax(logits, dim=-1) if output == "prob" else logits)
    return torch.cat(out).reshape(n, n, -1).cpu()


def dime_decompose(grid: Tensor | np.ndarray, target: np.ndarray | Tensor) -> dict[str, np.ndarray]:
    """Split each row's output into unimodal contributions and a multimodal interaction (DIME).

    With ``F = grid[..., c]`` for row ``i``'s target class ``c`` (EMAP / DIME disentanglement):
    ``base = mean F``, ``uni_a = mean_b F[i, b] - base``, ``uni_b = mean_a F[a, i] - base``,
    ``interaction = F[i, i] - base - uni_a - uni_b``; so ``F[i, i]`` is their sum.

    Args:
        grid: ``(N, N, C)`` from :func:`cross_grid` (or ``(N, N)`` for one class).
        target: ``(N,)`` class of each row (ignored for a 2-D grid).

    Returns:
        ``{"value", "base", "uni_a", "uni_b", "interaction"}``, each ``(N,)``.

    Example:
        >>> a, b = np.arange(3.0), np.array([1.0, 5.0, 2.0])
        >>> parts = dime_decompose(a[:, None] + b[None, :], np.zeros(3, int))  # additive
        >>> bool(np.abs(parts["interaction"]).max() < 1e-12)
        True
    """
    g = np.asarray(grid.detach().cpu() if isinstance(grid, Tensor) else grid, dtype=float)
    if g.ndim == 2:
        g = g[..., None]
        c = np.zeros(g.shape[0], dtype=np.int64)
    else:
        c = np.asarray(target, dtype=np.int64)
    n = g.shape[0]
    idx = np.arange(n)
    row_mean = g.mean(axis=1)  # (N_a, C): mean over partners b
    col_mean = g.mean(axis=0)  # (N_b, C)
    grand = g.mean(axis=(0, 1))  # (C,)
    base = grand[c]
    uni_a = row_mean[idx, c] - base
    uni_b = col_mean[idx, c] - base
    value = g[idx, idx, c]
    return {
        "value": value,
        "base": base,
        "uni_a": uni_a,
        "uni_b": uni_b,
        "interaction": value - base - uni_a - uni_b,
    }


# --------------------------------------------------------------------------- pixels


def integrated_gradients(
    forward: Callable[..., Tensor],
    inputs: Tensor,
    target: Tensor | np.ndarray,
    baseline: Tensor | None = None,
    n_steps: int = 32,
    extra: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor]:
    """Integrated Gradients of ``forward(inputs, *extra)[:, target]`` w.r.t. ``inputs`` (captum).

    Args:
        forward: ``(B, ...) , *extra -> (B, C)`` scores (e.g. class probabilities).
        inputs: ``(B, ...)`` e.g. pixels ``(B, 3, H, W)``.
        target: ``(B,)`` class per row.
        baseline: same shape as ``inputs`` (default zeros: a black image).
        n_steps: Riemann steps (Gauss-Legendre, captum's default method).
        extra: per-row tensors passed through unchanged (e.g. the other modalities).

    Returns:
        ``(attributions, delta)``: attributions like ``inputs``; ``delta`` ``(B,)`` is the
        completeness error ``sum(attr) - (f(x) - f(baseline))``.

    Example:
        >>> f = lambda x: torch.stack([(x**2).sum(-1), x.sum(-1)], -1)
        >>> attr, delta = integrated_gradients(f, torch.tensor([[1.0, 2.0]]), torch.tensor([0]))
        >>> [round(v, 3) for v in attr[0].tolist()], abs(float(delta[0])) < 1e-3
        ([1.0, 4.0], True)
    """
    from captum.attr import IntegratedGradients

    x = inputs.detach().float()
    base = torch.zeros_like(x) if baseline is None else baseline.detach().float().expand_as(x)
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long).to(x.device).tolist()
    ig = IntegratedGradients(forward)
    with torch.enable_grad():
        attr, delta = ig.attribute(
            x,
            baselines=base,
            target=tgt,
            additional_forward_args=tuple(extra) if extra else None,
            n_steps=n_steps,
            return_convergence_delta=True,
        )
    return attr.detach(), delta.detach().reshape(-1)


def deletion_curve(
    forward: Callable[..., Tensor],
    inputs: Tensor,
    saliency: Tensor,
    target: Tensor | np.ndarray,
    baseline: Tensor | None = None,
    steps: int = 20,
    extra: tuple[Tensor, ...] = (),
    chunk: int = 512,
) -> np.ndarray:
    """Target-class score as the most salient pixels are replaced by the baseline, first to last.

    Args:
        forward: ``(B, 3, H, W), *extra -> (B, C)`` scores.
        inputs: ``(B, 3, H, W)`` pixels.
        saliency: ``(B, H, W)`` per-pixel importance; higher is deleted first.
        target: ``(B,)`` class per row.
        baseline: what a deleted pixel becomes (default 0, black), broadcastable to ``inputs``.
        steps: the curve has ``steps + 1`` points, deleting ``0, 1/steps, ..., 1`` of the pixels.
        extra: per-row tensors passed to ``forward`` unchanged.
        chunk: images per forward call (several curve points are batched together).

    Returns:
        ``(B, steps + 1)`` scores.

    Example:
        >>> f = lambda x: x.sum(dim=(1, 2, 3))[:, None]
        >>> x = torch.tensor([[[[4.0, 1.0], [0.0, 3.0]]]])
        >>> deletion_curve(f, x, x[:, 0], torch.tensor([0]), steps=4).round(3).tolist()
        [[8.0, 4.0, 1.0, 0.0, 0.0]]
    """
    x = inputs.detach()
    b, _, h, w = x.shape
    base = (torch.zeros_like(x) if baseline is None else baseline.to(x)).expand_as(x)
    order = torch.argsort(saliency.reshape(b, -1).float(), dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    rank = rank.reshape(b, 1, h, w)
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long)
    counts = [round(k * h * w / steps) for k in range(steps + 1)]
    out = np.zeros((b, steps + 1))
    per_call = max(1, chunk // b)  # curve points evaluated per forward call
    with torch.inference_mode():
        for k0 in range(0, steps + 1, per_call):
            ks = counts[k0 : k0 + per_call]
            xs = torch.cat([torch.where(rank < n_del, base, x) for n_del in ks])
            rest = tuple(e.repeat(len(ks), *([1] * (e.ndim - 1))) for e in extra)
            scores = forward(xs, *rest)
            picked = scores.gather(1, tgt.repeat(len(ks)).reshape(-1, 1).to(scores.device))
            out[:, k0 : k0 + len(ks)] = picked[:, 0].reshape(len(ks), b).T.cpu().numpy()
    return out


def curve_auc(curve: np.ndarray) -> np.ndarray:
    """Area under deletion curves sampled evenly on ``[0, 1]`` (trapezoid), one per row.

    Example:
        >>> curve_auc(np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])).tolist()
        [0.5, 1.0]
    """
    c = np.atleast_2d(np.asarray(curve, dtype=float))
    return np.trapezoid(c, dx=1.0 / (c.shape[1] - 1), axis=1)


def random_saliency(shape: tuple[int, ...], seed: int) -> Tensor:
    """A random deletion order: i.i.d. uniform saliency of ``shape`` (e.g. ``(B, H, W)``).

    Example:
        >>> random_saliency((2, 3, 3), seed=0).shape
        torch.Size([2, 3, 3])
    """
    return torch.rand(shape, generator=torch.Generator().manual_seed(int(seed)))
