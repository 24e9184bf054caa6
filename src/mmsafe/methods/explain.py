"""Explanations of multimodal predictions: modality Shapley values, DIME, Integrated Gradients.

Pure functions over tensors and callables; :mod:`mmsafe.checks.controllability.explain` wires them
to an audit.

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
* **Integrated Gradients over text tokens** (:func:`text_integrated_gradients`, captum's
  ``LayerIntegratedGradients`` on the token-embedding layer, :func:`text_embedding_layer`)
  from a pad or zero-embedding baseline (:func:`text_baseline_ids`), summed over the embedding
  dimension per token and over tokens per word (:func:`token_words`,
  :func:`word_attributions`), with a token deletion curve (:func:`token_deletion_curve`).
* **Grad-CAM** (:func:`grad_cam`, captum's ``LayerGradCam``) on the image tower's last conv
  stage (:func:`image_cam_layer`), upsampled to the image (:func:`upsample_map`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

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


# --------------------------------------------------------------------------- text tokens

ZERO_TOKEN = -1
"""A baseline token id meaning "the zero embedding" (see :func:`text_baseline_ids`)."""


class ExplainError(ValueError):
    """An explanation method cannot run on this model; the message says why and what to do."""


def _model_name(model: nn.Module) -> str:
    return str(getattr(model, "name", type(model).__name__))


def text_embedding_layer(model: nn.Module) -> nn.Embedding:
    """The text tower's token-embedding layer (via :func:`~.attacks.text.token_embedding`).

    Raises:
        ExplainError: the model exposes no ``nn.Embedding`` over its text tokens.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> text_embedding_layer(TinyClip(TinyClipConfig.for_size("xs"))).embedding_dim
        32
    """
    from mmsafe.methods.attacks.text import AttackError, token_embedding

    try:
        return token_embedding(model)
    except AttackError as err:
        raise ExplainError(
            f"{_model_name(model)} has no reachable token-embedding layer (an nn.Embedding over "
            "its text tokens), so text Integrated Gradients cannot run on it. Give the adapter a "
            "token_embedding() method returning that layer, or explain the text modality as a "
            "whole (modality Shapley values)."
        ) from err


def text_baseline_ids(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, kind: Literal["zeros", "pad"]
) -> Tensor:
    """Baseline token ids: every real, non-special token replaced, special tokens kept.

    ``kind="zeros"`` writes :data:`ZERO_TOKEN` (the zero embedding, handled by
    :func:`text_integrated_gradients` and :func:`token_deletion_curve`); ``kind="pad"`` writes
    the pad token (tiny-clip's ``PAD``, or the tokenizer's / config's ``pad_token_id``).
    Positions where the baseline differs from ``input_ids`` are the attributed (deletable) ones.

    Example:
        >>> from mmsafe.models.tiny_clip import PAD, TinyClip, TinyClipConfig, tokenize
        >>> m, b = TinyClip(TinyClipConfig.for_size("xs")), tokenize(["ab", "c"])
        >>> text_baseline_ids(m, b["input_ids"], b["attention_mask"], "zeros").tolist()
        [[256, -1, -1, 257], [256, -1, 257, 258]]
    """
    from mmsafe.methods.attacks.text import special_token_ids

    ids = input_ids.clone()
    special = torch.as_tensor(special_token_ids(model), dtype=ids.dtype, device=ids.device)
    content = attention_mask.bool() & ~torch.isin(ids, special)
    if kind == "zeros":
        fill = ZERO_TOKEN
    elif kind == "pad":
        fill = _pad_id(model)
    else:
        raise ValueError(f"kind must be 'zeros' or 'pad', got {kind!r}")
    return ids.masked_fill(content, fill)


def _pad_id(model: nn.Module) -> int:
    from mmsafe.methods.attacks.text import text_tokens

    pad, eos = text_tokens(model).pad_ids()
    if pad is None:
        raise ExplainError(f"{_model_name(model)} has no pad token id; use the 'zeros' baseline")
    if pad in eos:  # e.g. CLIP: pad = <|endoftext|>, which also marks the pooled token
        raise ExplainError(
            f"{_model_name(model)}'s pad token is its end-of-text token, which the text "
            "tower pools on; use the 'zeros' baseline"
        )
    return pad


@contextmanager
def _zero_token(layer: nn.Module) -> Iterator[None]:
    """While active, ``layer`` maps :data:`ZERO_TOKEN` ids to the zero embedding."""
    store: dict[str, Tensor] = {}

    def pre(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        store["zero"] = ids == ZERO_TOKEN
        return (ids.clamp_min(0), *args[1:])

    def post(_mod: nn.Module, _args: tuple[Any, ...], out: Tensor) -> Tensor:
        zero = store.pop("zero", None)
        return out if zero is None or not zero.any() else out.masked_fill(zero[..., None], 0.0)

    handles = [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def text_integrated_gradients(
    forward: Callable[..., Tensor],
    layer: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    baseline_ids: Tensor,
    target: Tensor | np.ndarray,
    n_steps: int = 32,
    extra: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor]:
    """Integrated Gradients over text tokens at the token-embedding layer (captum).

    captum's ``LayerIntegratedGradients`` integrates the gradient of
    ``forward(ids, mask, *extra)[:, target]`` along the straight path from the baseline's
    token embeddings to the input's; each token's attribution is the sum over the embedding
    dimension. Completeness: ``attr.sum(1) ~= f(x) - f(baseline)``.

    Args:
        forward: ``(input_ids, attention_mask, *extra) -> (B, C)`` scores.
        layer: the token-embedding layer (:func:`text_embedding_layer`).
        input_ids: ``(B, L)`` token ids.
        attention_mask: ``(B, L)`` (passed through unchanged; padding is never attributed).
        baseline_ids: ``(B, L)`` from :func:`text_baseline_ids`; :data:`ZERO_TOKEN` is the zero
            embedding.
        target: ``(B,)`` class per row.
        n_steps: Riemann steps (Gauss-Legendre).
        extra: per-row tensors passed through unchanged (e.g. the other modalities).

    Returns:
        ``(attributions (B, L), delta (B,))``, ``delta`` being captum's convergence delta
        ``sum(attr) - (f(x) - f(baseline))``.

    Example:
        >>> emb = nn.Embedding(4, 2)
        >>> f = lambda ids, mask: torch.stack([(emb(ids) ** 2).sum((1, 2)), 0 * ids[:, 0]], 1)
        >>> ids, base = torch.tensor([[1, 2]]), torch.tensor([[ZERO_TOKEN, 2]])
        >>> attr, d = text_integrated_gradients(f, emb, ids, torch.ones(1, 2), base, [0])
        >>> bool(attr[0, 1] == 0), bool(abs(attr[0, 0] - (emb.weight[1] ** 2).sum()) < 1e-4)
        (True, True)
    """
    from captum.attr import LayerIntegratedGradients

    ids = input_ids.long()
    base = baseline_ids.to(ids)
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long).tolist()
    lig = LayerIntegratedGradients(forward, layer)
    with torch.enable_grad(), _zero_token(layer):
        attr, delta = lig.attribute(
            ids,
            baselines=base,
            target=tgt,
            additional_forward_args=(attention_mask, *extra),
            n_steps=n_steps,
            return_convergence_delta=True,
        )
    return attr.detach().float().sum(-1), delta.detach().reshape(-1)


def token_deletion_curve(
    forward: Callable[..., Tensor],
    layer: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    baseline_ids: Tensor,
    saliency: Tensor,
    target: Tensor | np.ndarray,
    steps: int = 10,
    extra: tuple[Tensor, ...] = (),
    chunk: int = 512,
) -> np.ndarray:
    """Target score as the most salient tokens are replaced by the baseline, first to last.

    Only positions where ``baseline_ids`` differs from ``input_ids`` are deleted; row ``i``
    with ``n_i`` of them has ``round(k * n_i / steps)`` deleted at point ``k``.

    Args:
        forward: ``(input_ids, attention_mask, *extra) -> (B, C)`` scores.
        layer: the token-embedding layer (maps :data:`ZERO_TOKEN` to zeros while this runs).
        input_ids: ``(B, L)``.
        attention_mask: ``(B, L)``.
        baseline_ids: ``(B, L)`` what a deleted token becomes.
        saliency: ``(B, L)`` per-token importance; higher is deleted first.
        target: ``(B,)`` class per row.
        steps: the curve has ``steps + 1`` points.
        extra: per-row tensors passed to ``forward`` unchanged.
        chunk: rows per forward call.

    Returns:
        ``(B, steps + 1)`` scores.

    Example:
        >>> emb = nn.Embedding(3, 1)
        >>> _ = emb.weight.data.copy_(torch.tensor([[0.0], [1.0], [2.0]]))
        >>> f = lambda ids, mask: emb(ids).sum((1, 2))[:, None]
        >>> ids = torch.tensor([[1, 2, 2, 1]])
        >>> base = torch.full_like(ids, ZERO_TOKEN)
        >>> sal = torch.tensor([[0.0, 2.0, 1.0, 3.0]])
        >>> token_deletion_curve(f, emb, ids, torch.ones(1, 4), base, sal, [0], steps=4).tolist()
        [[6.0, 5.0, 3.0, 1.0, 0.0]]
    """
    ids = input_ids.long()
    base = baseline_ids.to(ids)
    b = ids.shape[0]
    deletable = base != ids
    n = deletable.sum(dim=1)  # (B,)
    score = saliency.float().to(ids.device).masked_fill(~deletable, -math.inf)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(ids.shape[1], device=ids.device).expand(b, -1))
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long)
    out = np.zeros((b, steps + 1))
    per_call = max(1, chunk // max(b, 1))
    with torch.inference_mode(), _zero_token(layer):
        for k0 in range(0, steps + 1, per_call):
            ks = list(range(k0, min(k0 + per_call, steps + 1)))
            xs = []
            for k in ks:
                n_del = torch.round(n.double() * k / steps).long()[:, None]
                xs.append(torch.where(deletable & (rank < n_del), base, ids))
            rest = tuple(e.repeat(len(ks), *([1] * (e.ndim - 1))) for e in extra)
            scores = forward(torch.cat(xs), attention_mask.repeat(len(ks), 1), *rest)
            picked = scores.gather(1, tgt.repeat(len(ks)).reshape(-1, 1).to(scores.device))
            out[:, k0 : k0 + len(ks)] = picked[:, 0].reshape(len(ks), b).T.float().cpu().numpy()
    return out


def random_token_saliency(input_ids: Tensor, seed: int) -> Tensor:
    """A random token deletion order: i.i.d. uniform ``(B, L)`` saliency.

    Example:
        >>> random_token_saliency(torch.zeros(2, 5, dtype=torch.long), seed=0).shape
        torch.Size([2, 5])
    """
    return random_saliency(tuple(input_ids.shape), seed).to(input_ids.device)


def token_words(
    model: nn.Module, input_ids: Tensor, baseline_ids: Tensor
) -> list[list[tuple[str, list[int]]]]:
    """Group each row's attributed tokens into whitespace-separated words.

    tiny-clip tokens are UTF-8 bytes: consecutive non-whitespace bytes form a word (whitespace
    bytes belong to none). Other models: the tokenizer's pieces, a new word starting at a piece
    with a ``▁``/``Ġ`` prefix or after one with a ``</w>`` suffix (SentencePiece, GPT-2 and CLIP
    BPE conventions); without a tokenizer each token is a word. Only positions where
    ``baseline_ids`` differs from ``input_ids`` are grouped.

    Returns:
        Per row, ``[(word, [positions]), ...]`` in text order.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig, tokenize
        >>> m, b = TinyClip(TinyClipConfig.for_size("xs")), tokenize(["a red  cat"])
        >>> base = text_baseline_ids(m, b["input_ids"], b["attention_mask"], "zeros")
        >>> token_words(m, b["input_ids"], base)
        [[('a', [1]), ('red', [3, 4, 5]), ('cat', [8, 9, 10])]]
    """
    from mmsafe.methods.attacks.text import text_tokens

    tokens = text_tokens(model)
    ids, live = input_ids.cpu(), (baseline_ids.to(input_ids) != input_ids).cpu()
    return [
        tokens.words(row, [j for j, k in enumerate(keep) if k])
        for row, keep in zip(ids.tolist(), live.tolist(), strict=True)
    ]


def word_attributions(
    token_attr: Tensor | np.ndarray, words: Sequence[tuple[str, list[int]]]
) -> list[tuple[str, float]]:
    """Sum one row's token attributions over each word's positions.

    Example:
        >>> word_attributions(np.array([0.0, 0.5, 0.25, 1.0]), [("ab", [1, 2]), ("c", [3])])
        [('ab', 0.75), ('c', 1.0)]
    """
    a = np.asarray(
        token_attr.detach().cpu() if isinstance(token_attr, Tensor) else token_attr, dtype=float
    )
    return [(w, float(a[pos].sum())) for w, pos in words]


# --------------------------------------------------------------------------- Grad-CAM


def image_cam_layer(model: nn.Module) -> nn.Module:
    """The image tower's last convolutional stage, for Grad-CAM.

    Resolved, in order: ``model.cam_layer()`` if the adapter defines it; tiny-clip's last CNN
    stage (``image.stages[-1]``). Vision transformers have no spatial feature map to weight
    and are not supported.

    Raises:
        ExplainError: no convolutional feature map is known for this model.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> m = TinyClip(TinyClipConfig.for_size("xs"))
        >>> image_cam_layer(m) is m.image.stages[-1]
        True
    """
    hook = getattr(model, "cam_layer", None)
    layer: Any = hook() if callable(hook) else None
    if layer is None:
        stages = getattr(getattr(model, "image", None), "stages", None)
        if isinstance(stages, nn.ModuleList) and len(stages):
            layer = stages[-1]
    if not isinstance(layer, nn.Module):
        raise ExplainError(
            f"Grad-CAM is not supported for {_model_name(model)}: it needs a convolutional "
            "feature map in the image tower (vision transformers have none). Give the adapter a "
            "cam_layer() method returning the last conv stage, or read the pixel IG maps."
        )
    return layer


def grad_cam(
    forward: Callable[..., Tensor],
    layer: nn.Module,
    inputs: Tensor,
    target: Tensor | np.ndarray,
    extra: tuple[Tensor, ...] = (),
    upsample: bool = True,
) -> Tensor:
    """Grad-CAM (captum ``LayerGradCam``) upsampled bilinearly to the input, ``(B, H, W)``.

    The layer's channels are weighted by their mean gradient of ``forward(inputs, *extra)``'s
    target score, summed and rectified (ReLU), then upsampled from the layer's grid
    (``upsample=False`` keeps the layer's ``(B, h, w)`` grid).

    Example:
        >>> conv = nn.Conv2d(1, 2, 1)
        >>> f = lambda x: conv(x).mean((2, 3))
        >>> grad_cam(f, conv, torch.rand(3, 1, 4, 4), [0, 1, 0]).shape
        torch.Size([3, 4, 4])
    """
    from captum.attr import LayerGradCam

    x = inputs.detach().float()
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long).tolist()
    with torch.enable_grad():
        cam = LayerGradCam(forward, layer).attribute(
            x,
            target=tgt,
            additional_forward_args=tuple(extra) if extra else None,
            relu_attributions=True,
        )
    if not upsample:
        return cam.detach()[:, 0]
    return upsample_map(cam.detach()[:, 0], tuple(x.shape[-2:]))


def upsample_map(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear upsampling of ``(B, h, w)`` maps to ``(B, *size)`` (captum's ``interpolate``).

    Example:
        >>> upsample_map(torch.ones(2, 2, 2), (4, 4)).shape
        torch.Size([2, 4, 4])
    """
    from captum.attr import LayerAttribution

    return LayerAttribution.interpolate(maps[:, None], tuple(size), "bilinear")[:, 0]
