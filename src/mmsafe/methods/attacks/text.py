"""Text, joint image+text (Co-Attack) and universal attacks on CLIP-like encoders.

Companion to :mod:`mmsafe.methods.attacks.pixel` (pixel attacks against task logits). Everything
here is a
pure, batched function:

* :func:`substitution_attack`: a query-bounded **black-box** word/char substitution attack. It
  ranks the words of a text by importance (one deletion query per word), then, most important
  word first, tries character edits (adjacent swap, drop, insert, keyboard neighbour) and word
  substitutions from a vocabulary (e.g. :func:`caption_vocabulary` of the dataset), greedily
  keeping the best edit, until the text is misclassified or the query budget is spent. Every text
  scored is one query. The query sequence does not depend on the budget, so the run with budget
  ``Q`` is a prefix of the run with any larger budget: success is monotone in ``Q``.
* :func:`hotflip`: a **white-box, gradient-guided** token substitution in embedding space
  (HotFlip, Ebrahimi et al. 2018): the gradient ``g`` of the loss w.r.t. the token embeddings
  gives the first-order gain ``(W[v] - W[t_i]) . g_i`` of putting token ``v`` at position ``i``;
  the ``n_candidates`` best swaps per row are scored exactly and the best is applied, ``n_flips``
  times. Needs the text tower's ``nn.Embedding`` (:func:`token_embedding`).
* :func:`co_attack`: Co-Attack (Zhang, Yi, Sang, ACM MM 2022; unimodal-embedding variant):
  the text first (HotFlip pushing the text embedding away from its clean self), then L-inf PGD on
  the image pushed away from both its clean embedding and the adversarial text embedding,
  ``L = (1 - cos(I', I)) + alpha * (1 - cos(I', T'))``. ``alpha = 0`` is the independent
  "Sep-Attack" baseline (:func:`sep_attack`).
* :func:`universal_perturbation`: one input-agnostic L-inf ``delta`` trained to maximise the
  embedding distortion ``1 - cos(f(x + delta), f(x))`` over a set of images (no labels, no task:
  the downstream-agnostic setting).

Embedding distances use cosine similarity of the L2-normalised embeddings (the paper's KL between
softmaxed embeddings ranks the same pushes; cosine is what CLIP-like heads read).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.methods.attacks.pixel import _ascent_direction, _clip, _random_delta
from mmsafe.models.base import EncoderModel
from mmsafe.models.tokens import TextTokens

TextObjective = Callable[[Tensor, Tensor], Tensor]
"""``(text_emb (n, D) unit-norm, rows (n,) batch positions) -> loss (n,)`` to maximise."""
TextSuccess = Callable[[Tensor, Tensor], Tensor]
"""``(text_emb (n, D), rows (n,)) -> (n,) bool``: whether the attack already succeeded."""
MarginFn = Callable[[Sequence[str], Sequence[int]], np.ndarray]
"""``(texts, rows) -> margins (n,)``: black-box score of each text for its row; ``< 0`` means
the attack succeeded (e.g. true-class logit minus the best other logit)."""

TEXT_ATTACKS: tuple[str, ...] = ("substitution", "hotflip")

_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORD = re.compile(r"[A-Za-z]+")


class AttackError(ValueError):
    """An attack cannot run on this model; the message says why and what to use instead."""


# --------------------------------------------------------------------------- token embeddings


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The text tower's token-embedding layer, for gradient-guided text attacks.

    Read from the adapter's ``text_tokens()`` capability (a
    :class:`~mmsafe.models.tokens.TextTokens`): ``model.token_embedding()`` if the adapter
    defines it; tiny-clip's byte embedding; a Hugging Face CLIP/SigLIP's
    ``text_model.embeddings.token_embedding``.

    Raises:
        AttackError: the model has no reachable ``nn.Embedding`` for its text tokens.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> token_embedding(TinyClip(TinyClipConfig.for_size("xs"))).num_embeddings
        259
    """
    layer = text_tokens(model).embedding()
    if layer is None:
        raise AttackError(
            f"{getattr(model, 'name', type(model).__name__)} has no reachable token-embedding "
            "layer (an nn.Embedding over its text tokens), so gradient-guided text attacks "
            "(hotflip, co_attack) cannot run on it. Use the black-box substitution_attack, or "
            "give the adapter a token_embedding() method returning that layer."
        )
    return layer


def text_tokens(model: nn.Module) -> TextTokens:
    """The adapter's :class:`~mmsafe.models.tokens.TextTokens` (generic when it has none)."""
    hook = getattr(model, "text_tokens", None)
    return hook() if callable(hook) else TextTokens(model)


def special_token_ids(model: nn.Module) -> list[int]:
    """Ids of the text tower's special tokens (BOS, EOS, PAD, ...).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> special_token_ids(TinyClip(TinyClipConfig.for_size("xs")))
        [256, 257, 258]
    """
    return text_tokens(model).special_ids()


def candidate_tokens(model: nn.Module) -> Tensor:
    """Token ids a gradient-guided attack may write.

    Printable ASCII bytes for tiny-clip's byte-level tokenizer (so the text stays valid UTF-8),
    every non-special id otherwise.

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> ids = candidate_tokens(TinyClip(TinyClipConfig.for_size("xs")))
        >>> len(ids), int(ids[0]), int(ids[-1])
        (95, 32, 126)
    """
    return text_tokens(model).candidates(token_embedding(model).num_embeddings)


def _editable(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Positions a token attack may change: real, non-special tokens (ASCII bytes for tiny-clip)."""
    return text_tokens(model).editable(ids, mask)


def decode_tokens(model: nn.Module, batch: dict[str, Tensor]) -> list[str]:
    """Strings of a token batch (tiny-clip bytes, or the adapter's tokenizer; ``""`` if none).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig, tokenize
        >>> decode_tokens(TinyClip(TinyClipConfig.for_size("xs")), tokenize(["a cat", "dog"]))
        ['a cat', 'dog']
    """
    return text_tokens(model).decode(batch["input_ids"], batch["attention_mask"])


def _encode_text(model: EncoderModel, ids: Tensor, mask: Tensor) -> Tensor:
    return model.encode({"text": {"input_ids": ids, "attention_mask": mask}})["text"]


# --------------------------------------------------------------------------- HotFlip


@dataclass(frozen=True)
class HotFlipResult:
    """The outcome of :func:`hotflip`.

    Attributes:
        batch: the adversarial ``{"input_ids", "attention_mask"}`` (same shapes as the input).
        texts: the adversarial strings (see :func:`decode_tokens`).
        n_flips: ``(B,)`` tokens changed per row.
        first_success: ``(B,)`` the number of flips after which ``success`` first held
            (``0``: already at the start; ``-1``: never, or no ``success`` given).
        loss: ``(B,)`` the objective at the returned text.
    """

    batch: dict[str, Tensor]
    texts: list[str]
    n_flips: Tensor
    first_success: Tensor
    loss: Tensor


def hotflip(
    model: EncoderModel,
    batch: dict[str, Tensor],
    objective: TextObjective,
    n_flips: int = 1,
    n_candidates: int = 8,
    success: TextSuccess | None = None,
) -> HotFlipResult:
    """Gradient-guided token substitution (HotFlip) maximising ``objective``.

    Each round: one forward/backward gives ``g = dL/de`` at the token embeddings ``e``; the
    first-order gain of writing token ``v`` at position ``i`` is ``(W[v] - W[t_i]) . g_i``; the
    ``n_candidates`` best (position, token) pairs per row are scored exactly and the best is kept
    if it raises the loss (else the row stops). A position is changed at most once. Rows for
    which ``success`` holds stop early.

    Args:
        model: the encoder; must expose its token embedding (:func:`token_embedding`).
        batch: ``model.preprocess("text", texts)``.
        objective: per-row loss of the (unit-norm) text embeddings, to maximise.
        n_flips: the most tokens changed per row.
        n_candidates: first-order candidates scored exactly per row and round.
        success: optional early-stop test per row.

    Returns:
        A :class:`HotFlipResult`.

    Raises:
        AttackError: no reachable token-embedding layer.
    """
    layer = token_embedding(model)
    if n_flips < 0 or n_candidates < 1:
        raise ValueError("n_flips must be >= 0 and n_candidates >= 1")
    device = layer.weight.device
    weight = layer.weight.detach()
    cand = candidate_tokens(model).to(device)
    w_cand = weight[cand].float()  # (K, d)
    ids = batch["input_ids"].to(device).clone()
    mask = batch["attention_mask"].to(device)
    b, length = ids.shape
    free = _editable(model, ids, mask)
    rows_all = torch.arange(b, device=device)
    flips = torch.zeros(b, dtype=torch.long, device=device)
    first = torch.full((b,), -1, dtype=torch.long, device=device)
    with torch.no_grad():
        emb = _encode_text(model, ids, mask)
        loss = objective(emb, rows_all).float()
        if success is not None:
            first[success(emb, rows_all)] = 0
    active = (first < 0) & free.any(dim=1)
    store: dict[str, Tensor] = {}

    def grab(_mod: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        out = out.detach().requires_grad_(True)
        store["e"] = out
        return out

    for k in range(1, n_flips + 1):
        rows = torch.nonzero(active).squeeze(1)
        if rows.numel() == 0:
            break
        handle = layer.register_forward_hook(grab)
        try:
            with torch.enable_grad():
                e = _encode_text(model, ids[rows], mask[rows])
                (grad,) = torch.autograd.grad(objective(e, rows).float().sum(), store["e"])
        finally:
            handle.remove()
        grad = grad.float()  # (n, L, d)
        gain = grad @ w_cand.T - (grad * weight[ids[rows]].float()).sum(-1, keepdim=True)
        gain = gain.masked_fill(~free[rows].unsqueeze(-1), -math.inf)
        gain = gain.masked_fill(cand.view(1, 1, -1) == ids[rows].unsqueeze(-1), -math.inf)
        m = min(n_candidates, length * len(cand))
        top = gain.flatten(1).topk(m, dim=1)
        ok = torch.isfinite(top.values)  # (n, m)
        pos = top.indices // len(cand)
        tok = cand[top.indices % len(cand)]
        trial = ids[rows].unsqueeze(1).repeat(1, m, 1)  # (n, m, L)
        trial.scatter_(2, pos.unsqueeze(-1), tok.unsqueeze(-1))
        trial_rows = rows.repeat_interleave(m)
        with torch.no_grad():
            t_emb = _encode_text(model, trial.flatten(0, 1), mask[trial_rows])
            t_loss = objective(t_emb, trial_rows).float().view(-1, m)
            t_loss = t_loss.masked_fill(~ok, -math.inf)
        best_loss, best = t_loss.max(dim=1)
        better = best_loss > loss[rows]
        take = rows[better]
        pick = best[better]
        ar = torch.arange(len(pick), device=device)
        ids[take] = trial[better][ar, pick]
        free[take, pos[better][ar, pick]] = False
        loss[take] = best_loss[better]
        flips[take] += 1
        active[rows[~better]] = False
        if success is not None and take.numel():
            hit = success(t_emb.view(len(rows), m, -1)[better][ar, pick], take)
            first[take[hit]] = k
            active[take[hit]] = False
        active &= free.any(dim=1)
    out = {"input_ids": ids, "attention_mask": mask}
    return HotFlipResult(out, decode_tokens(model, out), flips.cpu(), first.cpu(), loss.cpu())


# --------------------------------------------------------------------------- black-box


def caption_vocabulary(texts: Sequence[str], min_count: int = 1) -> list[str]:
    """The lower-cased alphabetic words of some texts, most frequent first (ties: A-Z).

    Example:
        >>> caption_vocabulary(["a red circle", "A blue circle."])
        ['a', 'circle', 'blue', 'red']
    """
    counts: dict[str, int] = {}
    for t in texts:
        for w in _WORD.findall(str(t).lower()):
            counts[w] = counts.get(w, 0) + 1
    return sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))


def _keyboard_neighbours() -> dict[str, str]:
    out: dict[str, str] = {}
    for r, row in enumerate(_KEYBOARD_ROWS):
        for i, ch in enumerate(row):
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            for rr in (r - 1, r + 1):
                if 0 <= rr < len(_KEYBOARD_ROWS):
                    other = _KEYBOARD_ROWS[rr]
                    near += [other[j] for j in (i - 1, i, i + 1) if 0 <= j < len(other)]
            out[ch] = "".join(near)
    return out


_NEIGHBOURS = _keyboard_neighbours()


def char_edits(word: str) -> list[str]:
    """Every one-edit typo of ``word``, deduplicated and never ``word`` itself.

    In order: adjacent swaps, drops, keyboard-neighbour replacements, single-letter inserts.

    Example:
        >>> char_edits("ab")[:4]
        ['ba', 'b', 'a', 'sb']
    """
    out: list[str] = []
    n = len(word)
    out += [word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(n - 1)]
    out += [word[:i] + word[i + 1 :] for i in range(n)] if n > 1 else []
    for i, ch in enumerate(word):
        out += [word[:i] + c + word[i + 1 :] for c in _NEIGHBOURS.get(ch.lower(), "")]
    out += [word[:i] + c + word[i:] for i in range(n + 1) for c in _LETTERS]
    seen: set[str] = {word}
    return [w for w in out if not (w in seen or seen.add(w))]


@dataclass(frozen=True)
class SubstitutionResult:
    """The outcome of :func:`substitution_attack`.

    Attributes:
        texts: the adversarial texts (the clean ones where nothing was changed).
        success: ``(N,)`` bool, the text is misclassified (margin ``< 0``) within the budget.
        queries: ``(N,)`` queries spent per row (up to and including the successful one).
        words_changed: ``(N,)`` words edited per row.
        attacked: ``(N,)`` bool, rows that were attacked (clean margin ``>= 0``).
    """

    texts: list[str]
    success: np.ndarray
    queries: np.ndarray
    words_changed: np.ndarray
    attacked: np.ndarray


def substitution_attack(
    margin_fn: MarginFn,
    texts: Sequence[str],
    budget: int,
    vocabulary: Sequence[str] = (),
    *,
    clean_margin: np.ndarray | None = None,
    max_words: int | None = None,
    n_char_edits: int = 8,
    n_word_subs: int = 16,
    seed: int = 0,
) -> SubstitutionResult:
    """Query-bounded black-box word/char substitution (greedy, importance-ranked).

    Per row: rank the words by the margin gained when the word is deleted (one query each);
    then, most important first, query ``n_char_edits`` one-edit typos of the word and
    ``n_word_subs`` vocabulary words in its place, keep the edit with the lowest margin if it
    lowers it, and stop at the first misclassified text (margin ``< 0``) or when ``budget``
    queries are spent. The candidates of a row are fixed by ``seed`` and the row, not by the
    budget, so the queries made under budget ``Q`` are a prefix of those under ``Q' > Q``.

    Args:
        margin_fn: the black box: margins of texts for rows (``< 0``: success).
        texts: the clean texts.
        budget: the most queries per row (``0``: nothing is changed).
        vocabulary: replacement words (e.g. :func:`caption_vocabulary` of the dataset).
        clean_margin: the cached clean margins ``(N,)``; rows with a negative margin (already
            wrong) are not attacked. ``None``: one query per row is spent to get it.
        max_words: the most words edited per row (``None``: any).
        n_char_edits: typos tried per word.
        n_word_subs: vocabulary words tried per word.
        seed: seeds the candidate choice.

    Returns:
        A :class:`SubstitutionResult`; ``queries <= budget`` for every row.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = len(texts)
    out = [str(t) for t in texts]
    success = np.zeros(n, dtype=bool)
    queries = np.zeros(n, dtype=np.int64)
    changed = np.zeros(n, dtype=np.int64)
    attacked = np.zeros(n, dtype=bool)
    vocab = [str(v) for v in vocabulary]
    for r in range(n):
        left = budget
        if clean_margin is not None:
            m0 = float(clean_margin[r])
        else:
            if left < 1:
                continue
            m0 = float(margin_fn([out[r]], [r])[0])
            left -= 1
        if m0 < 0:
            queries[r] = budget - left
            continue
        attacked[r] = True
        if left <= 0:
            continue
        words = out[r].split(" ")
        slots = [i for i, w in enumerate(words) if _WORD.search(w)]
        if not slots:
            queries[r] = budget - left
            continue
        dels = [" ".join(words[:i] + words[i + 1 :]) for i in slots][:left]
        margins = margin_fn(dels, [r] * len(dels))
        left -= len(dels)
        if len(dels) < len(slots):
            queries[r] = budget
            continue
        order = [slots[i] for i in np.argsort(-(m0 - np.asarray(margins)), kind="stable")]
        rng = np.random.default_rng([seed, r])
        current = m0
        for i in order[: max_words or len(order)]:
            if left <= 0:
                break
            word = words[i]
            core = _WORD.search(word)
            assert core is not None
            a, z = core.span()
            typos = char_edits(core.group())
            pick = rng.permutation(len(typos))[:n_char_edits]
            subs = [v for v in vocab if v != core.group().lower()]
            spick = rng.permutation(len(subs))[:n_word_subs] if subs else []
            forms = [typos[j] for j in pick] + [subs[j] for j in spick]
            cands = [word[:a] + f + word[z:] for f in forms][:left]
            trials = [" ".join(words[:i] + [c] + words[i + 1 :]) for c in cands]
            if not trials:
                break
            ms = np.asarray(margin_fn(trials, [r] * len(trials)), dtype=np.float64)
            hit = np.flatnonzero(ms < 0)
            if len(hit):  # stop at the first success, in query order
                j = int(hit[0])
                left -= j + 1
                words[i] = cands[j]
                changed[r] += 1
                success[r] = True
                break
            left -= len(trials)
            j = int(np.argmin(ms))
            if ms[j] < current:
                current = float(ms[j])
                words[i] = cands[j]
                changed[r] += 1
        out[r] = " ".join(words)
        queries[r] = budget - left
    return SubstitutionResult(out, success, queries, changed, attacked)


# --------------------------------------------------------------------------- Co-Attack


@dataclass(frozen=True)
class JointAttackResult:
    """An adversarial (image, text) pair from :func:`co_attack` / :func:`sep_attack`.

    Attributes:
        pixels: adversarial pixels ``(B, 3, H, W)`` in ``[0, 1]``, ``||delta||_inf <= eps``.
        text: the adversarial token batch.
        texts: the adversarial strings.
        image_embedding: ``(B, D)`` unit-norm embeddings of ``pixels``.
        text_embedding: ``(B, D)`` unit-norm embeddings of ``text``.
    """

    pixels: Tensor
    text: dict[str, Tensor]
    texts: list[str]
    image_embedding: Tensor
    text_embedding: Tensor


def embedding_pgd(
    model: EncoderModel,
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L-inf PGD on the pixels maximising ``objective(image_embedding) -> (B,)`` (no labels).

    Step ``step_size`` (default ``2.5 * eps / steps``) along the gradient sign, projection onto the
    ``eps`` ball, clamp to ``[0, 1]``; returns the last iterate.
    """
    if not eps >= 0 or steps < 1:
        raise ValueError("eps must be >= 0 and steps >= 1")
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach()
    delta = _random_delta(x, eps, "linf", generator) if random_start else torch.zeros_like(x)
    x_adv = _clip(x, delta, eps, "linf")
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = objective(model.encode({"image": x_adv})["image"]).float().sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = _clip(x, x_adv.detach() + alpha * _ascent_direction(grad, "linf") - x, eps, "linf")
    return x_adv.detach()


def co_attack(
    model: EncoderModel,
    pixels: Tensor,
    text: dict[str, Tensor],
    eps: float = 2 / 255,
    *,
    alpha: float = 3.0,
    steps: int = 10,
    step_size: float | None = None,
    n_flips: int = 1,
    n_candidates: int = 8,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    text_target: Tensor | None = None,
    adversarial_text: dict[str, Tensor] | None = None,
) -> JointAttackResult:
    """Co-Attack: the text first, then the image pushed away from its clean self and the new text.

    Zhang et al. 2022, unimodal-embedding variant:

    1. Text: :func:`hotflip` (``n_flips`` tokens) maximising ``1 - cos(T', T)``.
    2. Image: L-inf PGD (:func:`embedding_pgd`) maximising
       ``(1 - cos(I', I)) + alpha * (1 - cos(I', T'))``.

    Args:
        model: the encoder (white-box; needs :func:`token_embedding`).
        pixels: clean pixels ``(B, 3, H, W)`` in ``[0, 1]``.
        text: the paired texts, ``model.preprocess("text", texts)``.
        eps: the L-inf image budget on ``[0, 1]`` pixels (paper: 2/255).
        alpha: weight of the cross-modal term (paper: 3); ``0`` gives :func:`sep_attack`.
        steps: PGD steps (paper: 10).
        step_size: PGD step; default ``2.5 * eps / steps``.
        n_flips: tokens the text attack may change (bytes for tiny-clip).
        n_candidates: HotFlip candidates scored exactly per round.
        random_start: uniform random start in the ball.
        generator: CPU generator for the random start.
        text_target: optional ``(B, D)`` unit-norm embeddings standing in for the adversarial
            text in step 2 (e.g. a zero-shot class embedding rebuilt from the adversarial
            prompt); default: the adversarial text's own embedding.
        adversarial_text: the adversarial token batch of an earlier call on the same ``text``
            (its ``result.text``): step 1 is skipped and this batch is used. Step 1 depends on
            neither ``eps`` nor ``alpha``, so a sweep over budgets (or Sep-Attack next to
            Co-Attack) runs HotFlip once.

    Returns:
        A :class:`JointAttackResult`.

    Raises:
        AttackError: the model exposes no token-embedding layer.
    """
    device = model.device
    x = pixels.to(device)
    with torch.no_grad():
        img0 = model.encode({"image": x})["image"]
        txt0 = _encode_text(model, text["input_ids"].to(device), text["attention_mask"].to(device))
    if adversarial_text is None:
        flipped = hotflip(
            model,
            text,
            lambda e, rows: 1 - (e * txt0[rows]).sum(-1),
            n_flips=n_flips,
            n_candidates=n_candidates,
        )
        adv_batch, adv_texts = flipped.batch, flipped.texts
    else:
        adv_batch = {k: v.to(device) for k, v in adversarial_text.items()}
        adv_texts = decode_tokens(model, adv_batch)
    with torch.no_grad():
        txt_adv = _encode_text(model, adv_batch["input_ids"], adv_batch["attention_mask"])
    target = txt_adv if text_target is None else text_target.to(device)

    def objective(e: Tensor) -> Tensor:
        return (1 - (e * img0).sum(-1)) + alpha * (1 - (e * target).sum(-1))

    x_adv = embedding_pgd(model, x, objective, eps, steps, step_size, random_start, generator)
    with torch.no_grad():
        img_adv = model.encode({"image": x_adv})["image"]
    return JointAttackResult(x_adv, adv_batch, adv_texts, img_adv, txt_adv)


def sep_attack(
    model: EncoderModel,
    pixels: Tensor,
    text: dict[str, Tensor],
    eps: float = 2 / 255,
    **kwargs: Any,
) -> JointAttackResult:
    """The independent baseline ("Sep-Attack"): the same text attack, and an image-only PGD.

    ``alpha = 0``: the image is pushed away from its clean embedding only.

    Takes the keyword arguments of :func:`co_attack` (but ``alpha``).
    """
    kwargs.pop("alpha", None)
    return co_attack(model, pixels, text, eps, alpha=0.0, **kwargs)


def retrieval_recall_at_1(
    image_emb: Tensor, text_emb: Tensor, positives: np.ndarray | Tensor
) -> tuple[float, float]:
    """Image->text (TR) and text->image (IR) recall@1 of paired unit-norm embeddings.

    Args:
        image_emb: ``(N, D)``.
        text_emb: ``(N, D)``; row ``i`` is the caption of image ``i``.
        positives: ``(N, N)`` bool, image ``i`` matches text ``j`` (e.g. equal captions).

    Example:
        >>> e = torch.eye(3)
        >>> [round(r, 4) for r in retrieval_recall_at_1(e, e[[0, 2, 1]], np.eye(3, dtype=bool))]
        [0.3333, 0.3333]
    """
    pos = torch.as_tensor(np.asarray(positives, dtype=bool))
    sim = (image_emb.float() @ text_emb.float().T).cpu()
    ar = torch.arange(sim.shape[0])
    tr = pos[ar, sim.argmax(dim=1)].float().mean()
    ir = pos[sim.argmax(dim=0), ar].float().mean()
    return float(tr), float(ir)


# --------------------------------------------------------------------------- universal


def universal_perturbation(
    model: EncoderModel,
    pixels: Tensor,
    eps: float,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One input-agnostic L-inf perturbation maximising the embedding distortion.

    Sign-gradient ascent on ``mean(1 - cos(f(clamp(x + delta)), f(x)))`` over mini-batches of
    ``pixels`` (shuffled each epoch), with ``delta`` projected onto the ``eps`` ball after each
    step. Uses no labels and no task, so it transfers to any downstream head.

    Args:
        model: the encoder.
        pixels: training images ``(N, 3, H, W)`` in ``[0, 1]``.
        eps: the L-inf budget on ``[0, 1]`` pixels.
        epochs: passes over ``pixels``.
        batch_size: images per step.
        step_size: default ``eps / 4``.
        generator: CPU generator for the random start and the shuffles.

    Returns:
        ``delta`` of shape ``(1, 3, H, W)`` with ``||delta||_inf <= eps``; apply it as
        ``(x + delta).clamp(0, 1)``.
    """
    if not eps >= 0 or epochs < 1 or batch_size < 1:
        raise ValueError("eps must be >= 0, epochs and batch_size >= 1")
    if len(pixels) == 0:
        raise ValueError("universal_perturbation needs at least one image")
    device = model.device
    step = eps / 4 if step_size is None else float(step_size)
    u = torch.rand((1, *pixels.shape[1:]), generator=generator)
    delta = ((2 * u - 1) * eps).to(device)
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for lo in range(0, len(pixels), batch_size):
            x = pixels[order[lo : lo + batch_size]].to(device)
            with torch.no_grad():
                clean = model.encode({"image": x})["image"]
            d = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                adv = model.encode({"image": (x + d).clamp(0, 1)})["image"]
                loss = (1 - (adv * clean).sum(-1)).mean()
                (grad,) = torch.autograd.grad(loss, d)
            delta = (delta + step * grad.sign()).clamp(-eps, eps)
    return delta.detach()


@torch.no_grad()
def embedding_cosine(
    model: EncoderModel, pixels: Tensor, delta: Tensor, batch_size: int = 128
) -> Tensor:
    """``cos(f(clamp(x + delta)), f(x))`` per image ``(N,)`` (1 = undistorted)."""
    device = model.device
    out = []
    for lo in range(0, len(pixels), batch_size):
        x = pixels[lo : lo + batch_size].to(device)
        a = model.encode({"image": x})["image"]
        b = model.encode({"image": (x + delta.to(device)).clamp(0, 1)})["image"]
        out.append((a * b).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


__all__ = [
    "TEXT_ATTACKS",
    "AttackError",
    "HotFlipResult",
    "JointAttackResult",
    "SubstitutionResult",
    "candidate_tokens",
    "special_token_ids",
    "text_tokens",
    "caption_vocabulary",
    "char_edits",
    "co_attack",
    "decode_tokens",
    "embedding_cosine",
    "embedding_pgd",
    "hotflip",
    "retrieval_recall_at_1",
    "sep_attack",
    "substitution_attack",
    "token_embedding",
    "universal_perturbation",
]
