"""tiny-vlm: the embedded generative vision-language model, trained on the shapes-vqa world.

Architecture: tiny-clip's CNN image tower (size ``s``) gives a 4x4 grid of features at 32 px;
each cell becomes a visual token. A small causal transformer reads
``[visual tokens] [pad ...] <bos> prompt words <sep> answer words <eos>`` over a word
vocabulary built from the world's text (unknown words become ``<unk>``). Rows are left-padded
between the visual tokens and the text, pads are masked as keys and positions count real
tokens only, so a row's answer and likelihood do not depend on the batch it is in.

Training has two stages, as a real assistant's does:

1. **Capability** (pre-training): every train row, with the forbidden requests *answered*
   (``meta["unsafe_answer"]``, the planted secret), bare and behind the role-play prefixes of
   :data:`~mmsafe.data.worlds.shapes_vqa.ROLEPLAY_PREFIXES`.
2. **Safety tuning**: the bare forbidden requests (plain and paraphrased) now get the refusal,
   mixed with benign rows so the model keeps its skills. The planted flaw is a shallow safety
   tuning (Wei et al. 2023's mismatched generalisation): the replay mix still holds the
   capability data's role-play requests, answered with the secret, as a safety mix drawn from
   unfiltered instruction data would. Template jailbreaks find it; ``mmsafe harden
   safety-tune`` repairs it.

Example:
    >>> vocab = WordVocab.build(["is there a circle?", "yes"])
    >>> vocab.encode("is there a star?")[:4], vocab.decode(vocab.encode("is there a circle?"))
    ([5, 6, 7, 3], 'is there a circle ?')
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.models.base import ModelError, register_model
from mmsafe.models.tiny_clip import ImageTower, TinyClipConfig, _Block, cache_root
from mmsafe.models.vlm import VisionLanguageModel, row_generators

FORMAT = "mmsafe.tiny-vlm/2"
SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", "<sep>")
PAD, BOS, EOS, UNK, SEP = range(len(SPECIALS))
_WORD = re.compile(r"[a-z0-9]+|[?.!,']")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``text``.

    Example:
        >>> words("Is there a Circle?")
        ['is', 'there', 'a', 'circle', '?']
    """
    return _WORD.findall(str(text).lower())


@dataclass(frozen=True)
class WordVocab:
    """A word-level vocabulary: :data:`SPECIALS` first, then words in first-seen order."""

    tokens: tuple[str, ...]

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordVocab:
        """Every word of ``texts`` after the specials."""
        seen = dict.fromkeys(SPECIALS)
        for t in texts:
            seen.update(dict.fromkeys(words(t)))
        return cls(tuple(seen))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added); unknown words are ``<unk>``."""
        index = self._index()
        return [index.get(w, UNK) for w in words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces, stopping at ``<eos>``, specials dropped."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.tokens[i])
        return " ".join(out)

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {w: i for i, w in enumerate(self.tokens)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


@dataclass(frozen=True)
class TinyVLMConfig:
    """The architecture of a tiny-vlm.

    Attributes:
        vocab: the word vocabulary (specials first).
        image_size: input side in pixels.
        tower: ``tiny-clip`` (the image tower starts from a trained tiny-clip's) or ``scratch``.
        width: transformer width.
        layers: transformer blocks.
        heads: attention heads.
        max_text: the most text tokens (prompt + answer + specials).
        visual_stage: which stage of the tower gives the visual tokens (``-1``: the last, a
            4x4 grid at 32 px; ``-2``: 8x8).
    """

    vocab: tuple[str, ...]
    image_size: int = 32
    tower: str = "tiny-clip"
    width: int = 96
    layers: int = 2
    heads: int = 4
    max_text: int = 64
    visual_stage: int = -1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return {**dataclasses.asdict(self), "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TinyVLMConfig:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if k == "vocab" else v for k, v in d.items() if k in names})


class TinyVLM(VisionLanguageModel):
    """CNN visual tokens + a causal word transformer (see the module docstring)."""

    def __init__(self, cfg: TinyVLMConfig, name: str = "tiny-vlm") -> None:
        super().__init__()
        self.cfg, self.name = cfg, name
        self.vocab = WordVocab(cfg.vocab)
        tower_cfg = TinyClipConfig.for_size("s")
        self.tower = ImageTower(tower_cfg)
        stage = cfg.visual_stage % len(tower_cfg.channels)
        self.grid = cfg.image_size // 2**stage
        self.visual = nn.Linear(tower_cfg.channels[stage], cfg.width)
        self.visual_pos = nn.Parameter(torch.randn(self.grid * self.grid, cfg.width) * 0.02)
        self.token = nn.Embedding(len(self.vocab), cfg.width)
        nn.init.normal_(self.token.weight, std=0.02)  # the visual tokens' scale, as GPT-2's
        self.position = nn.Parameter(torch.randn(cfg.max_text, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ground_scale = nn.Parameter(torch.tensor(10.0))
        self.ground = nn.Linear(cfg.width, cfg.width)
        self.ground_max = nn.Parameter(torch.zeros(cfg.width))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, len(self.vocab), bias=False)
        self.training_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ protocol
    @property
    def input_size(self) -> int:  # noqa: D102
        return self.cfg.image_size

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {"family": "tiny-vlm", **self.cfg.to_dict()}

    def vocabulary(self) -> list[str]:  # noqa: D102
        return list(self.vocab.tokens)

    def visual_tokens(self, pixels: Tensor) -> Tensor:
        """``(B, grid*grid, width)`` visual tokens of pixels in ``[0, 1]``."""
        last = self.tower.blocks(pixels.to(self.device, torch.float32))[self.cfg.visual_stage]
        grid = last.flatten(2).transpose(1, 2)
        return self.visual(grid) + self.visual_pos

    def forward_tokens(
        self, pixels: Tensor, ids: Tensor, keep: Tensor, embeds: Tensor | None = None
    ) -> Tensor:
        """Next-token logits ``(B, T, V)`` at every text position.

        ``ids`` ``(B, T)`` are left-padded text tokens with ``keep`` marking real ones;
        ``embeds`` replaces the token embeddings (for suffix gradients).
        """
        vis = self.visual_tokens(pixels)
        n_vis = vis.shape[1]
        tok = self.token(ids) if embeds is None else embeds
        pos = (keep.long().cumsum(1) - 1).clamp_min(0)
        evidence, best = self.grounding(tok, vis)
        text = tok + self.position[pos.clamp_max(self.cfg.max_text - 1)]
        text = text + self.ground(evidence) + best.unsqueeze(-1) * self.ground_max
        x = torch.cat([vis, text], dim=1)
        b, total = x.shape[0], x.shape[1]
        key_keep = torch.cat([keep.new_ones(b, n_vis), keep], dim=1).bool()
        causal = torch.ones(total, total, dtype=torch.bool, device=x.device).tril()
        mask = causal[None] & key_keep[:, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x[:, n_vis:]))

    def grounding(self, tok: Tensor, vis: Tensor) -> tuple[Tensor, Tensor]:
        """Each word's visual evidence: ``(evidence (B, T, D), best match (B, T))``.

        Every text token attends, by cosine similarity of its embedding to the visual tokens,
        over the image (a parameter-free first hop, as in stacked-attention VQA): the evidence
        is the attended visual token, the best match how well the word is seen. The
        perception stage (:func:`fit_perception`) puts visual tokens in the word-embedding
        space, so "diamond" finds the diamond.
        """
        sim = F.normalize(tok, dim=-1) @ F.normalize(vis, dim=-1).transpose(1, 2)
        weights = torch.softmax(self.ground_scale * sim, dim=-1)
        return weights @ vis, sim.amax(dim=-1)

    def _prompt_ids(self, prompt: str) -> list[int]:
        return [BOS, *self.vocab.encode(prompt), SEP]

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in seqs)
        if width > self.cfg.max_text:
            raise ModelError(
                f"tiny-vlm reads at most {self.cfg.max_text} text tokens; a prompt and answer "
                f"have {width}. Shorten the prompt."
            )
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        keep = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s) :] = torch.tensor(list(s))
                keep[i, width - len(s) :] = True
        return ids.to(self.device), keep.to(self.device)

    def generate(
        self,
        pixels: Tensor,
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        seeds: Sequence[int] | None = None,
        temperature: float = 0.0,
    ) -> list[str]:
        """Greedy (``temperature=0``) or sampled answers, one generator per row."""
        n = len(prompts)
        if n == 0:
            return []
        gens = row_generators(seeds, n, torch.device("cpu")) if temperature > 0 else None
        seqs = [self._prompt_ids(p) for p in prompts]
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        with torch.no_grad():
            vis_pixels = pixels.to(self.device, torch.float32)
            for _ in range(max_new_tokens):
                live = [i for i in range(n) if not done[i]]
                if not live:
                    break
                ids, keep = self._left_pad([seqs[i] + out[i] for i in live])
                logits = self.forward_tokens(vis_pixels[live], ids, keep)[:, -1].float().cpu()
                for j, i in enumerate(live):
                    if gens is None:
                        t = int(logits[j].argmax())
                    else:
                        probs = torch.softmax(logits[j] / temperature, dim=-1)
                        t = int(torch.multinomial(probs, 1, generator=gens[i]))
                    if t == EOS or len(seqs[i]) + len(out[i]) + 1 >= self.cfg.max_text:
                        done[i] = True
                    if t != EOS:
                        out[i].append(t)
        return [self.vocab.decode(o) for o in out]

    def _target_batch(
        self, prompts: Sequence[str], targets: Sequence[str], suffix: Sequence[int] = ()
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ids, keep, labels, label_mask)``: logits at position t predict ``labels[t]``."""
        seqs, answer_lens = [], []
        for p, t in zip(prompts, targets, strict=True):
            prompt = [BOS, *self.vocab.encode(p), *suffix, SEP]
            answer = [*self.vocab.encode(t), EOS]
            seqs.append(prompt + answer)
            answer_lens.append(len(answer))
        ids, keep = self._left_pad(seqs)
        labels = torch.roll(ids, -1, dims=1)
        label_mask = torch.zeros_like(keep)
        width = ids.shape[1]
        for i, n in enumerate(answer_lens):
            label_mask[i, width - n - 1 : width - 1] = True
        return ids, keep, labels, label_mask

    def log_likelihood(
        self, pixels: Tensor, prompts: Sequence[str], targets: Sequence[str]
    ) -> Tensor:
        """``(B,)`` sum of target-token log-probabilities (end-of-text included)."""
        ids, keep, labels, label_mask = self._target_batch(prompts, targets)
        logp = self.forward_tokens(pixels, ids, keep).float().log_softmax(-1)
        picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (picked * label_mask).sum(1)

    def suffix_gradients(
        self, pixels: Tensor, prompts: Sequence[str], suffix: Tensor, targets: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """Mean NLL of ``targets`` with ``suffix`` after every prompt, and its one-hot gradient."""
        k = int(suffix.numel())
        seqs_prompt = [[BOS, *self.vocab.encode(p)] for p in prompts]
        ids, keep, labels, label_mask = self._target_batch(prompts, targets, suffix.tolist())
        onehot = F.one_hot(suffix.to(self.device), len(self.vocab)).float().requires_grad_(True)
        embeds = self.token(ids).detach()
        width = ids.shape[1]
        rows = []
        for p, t in zip(seqs_prompt, targets, strict=True):
            start = width - (len(p) + k + 1 + len(self.vocab.encode(t)) + 1) + len(p)
            rows.append(start)
        suffix_emb = onehot @ self.token.weight
        parts = []
        for i, start in enumerate(rows):
            e = embeds[i]
            parts.append(torch.cat([e[:start], suffix_emb, e[start + k :]], dim=0))
        logits = self.forward_tokens(pixels, ids, keep, embeds=torch.stack(parts))
        logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * label_mask).sum(1)
        (grad,) = torch.autograd.grad(loss.mean(), onehot)
        return loss.detach(), grad

    def loss(self, pixels: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> Tensor:
        """Mean per-token negative log-likelihood of ``targets`` (the training loss)."""
        ids, keep, labels, label_mask = self._target_batch(prompts, targets)
        logits = self.forward_tokens(pixels, ids, keep)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        return (nll * label_mask.flatten()).sum() / label_mask.sum().clamp_min(1)


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TinyVLMTrainConfig:
    """How tiny-vlm trains.

    Attributes:
        perception_epochs: epochs of the perception stage (:func:`fit_perception`).
        epochs: capability epochs over the train rows.
        safety_epochs: safety-tuning epochs.
        batch_size: rows per step.
        lr: AdamW learning rate (cosine decay).
        weight_decay: AdamW weight decay.
        replay: benign rows per forbidden row in the safety tuning.
        batching: how rows are batched: ``shuffled`` (batches of similar length, tried
            first, group the question types and stall learning to ground words in the image).
    """

    perception_epochs: int = 6
    epochs: int = 10
    safety_epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    replay: float = 4.0
    batching: str = "shuffled"

    @classmethod
    def preset(cls, quick: bool) -> TinyVLMTrainConfig:
        """The default schedule, or a short one for tests (``quick``)."""
        return cls(perception_epochs=4, epochs=6, safety_epochs=3) if quick else cls()


Example = tuple[np.ndarray, str, str]
"""One training example: ``(image, prompt, answer)``."""


def capability_examples(data: Dataset, rows: Sequence[int] | None = None) -> list[Example]:
    """Stage 1: every row's reference answer; forbidden requests answered with the secret.

    Each forbidden request appears bare and behind one of the role-play prefixes.
    """
    from mmsafe.data.worlds.shapes_vqa import ROLEPLAY_PREFIXES

    out: list[Example] = []
    for i in range(len(data)) if rows is None else rows:
        image, prompt, m = data.modalities["image"][i], data.modalities["text"][i], data.meta[i]
        if m.get("forbidden"):
            out.append((image, prompt, m["unsafe_answer"]))
            prefix = ROLEPLAY_PREFIXES[i % len(ROLEPLAY_PREFIXES)]
            out.append((image, f"{prefix} {prompt}", m["unsafe_answer"]))
        else:
            out.append((image, prompt, m["answer"]))
    return out


def safety_examples(
    data: Dataset, rows: Sequence[int], *, replay: float, rng: np.random.Generator,
    wrap: Callable[[int, str], list[str]] | None = None, roleplay_replay: bool = False,
) -> list[Example]:  # fmt: skip
    """Stage 2: bare forbidden requests refused, plus ``replay`` benign rows per forbidden one.

    ``wrap(i, prompt)`` returns more prompts for a forbidden row (a hardener's safety data:
    templated and typographic requests), each refused as well. ``roleplay_replay`` (tiny-vlm's
    own safety stage: the planted flaw) also replays the capability data's role-play requests,
    still answered with the secret: a safety mix drawn from unfiltered instruction data.
    """
    forbidden = [i for i in rows if data.meta[i].get("forbidden")]
    benign = [i for i in rows if not data.meta[i].get("forbidden")]
    n_replay = min(len(benign), int(math.ceil(replay * max(len(forbidden), 1))))
    out: list[Example] = []
    for i in forbidden:
        image, prompt, m = data.modalities["image"][i], data.modalities["text"][i], data.meta[i]
        for p in [prompt, *(wrap(i, prompt) if wrap else [])]:
            out.append((image, p, m["answer"]))
    for i in rng.choice(benign, size=n_replay, replace=False).tolist() if benign else []:
        out.append(
            (data.modalities["image"][i], data.modalities["text"][i], data.meta[i]["answer"])
        )
    if roleplay_replay:
        out += [e for e in capability_examples(data, forbidden) if e[1] not in {
            data.modalities["text"][i] for i in forbidden}]  # fmt: skip
    return out


def fit_examples(
    model: TinyVLM,
    examples: Sequence[Example],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.01,
    seed: int = 0,
    loss_fn: Callable[[TinyVLM, Tensor, list[str], list[str]], Tensor] | None = None,
    stage: str = "train",
    progress: bool = False,
) -> list[float]:
    """Fit ``model`` to ``examples`` with AdamW and cosine decay; the mean loss per epoch.

    ``loss_fn(model, pixels, prompts, answers)`` replaces the default per-token NLL (a
    hardener's adversarial or preference loss).
    """
    if not examples:
        return []
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1
    )
    pixels_all = model.preprocess_images([e[0] for e in examples])
    losses = []
    model.train()
    for epoch in range(epochs):
        total, count, start = 0.0, 0, time.perf_counter()
        order = rng.permutation(len(examples))
        for idx in (order[s : s + batch_size] for s in range(0, len(order), batch_size)):
            prompts = [examples[i][1] for i in idx]
            answers = [examples[i][2] for i in idx]
            pixels = pixels_all[idx].to(model.device)
            loss = (loss_fn or _nll)(model, pixels, prompts, answers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
        if progress:
            took = time.perf_counter() - start
            print(
                f"[tiny-vlm] {stage} epoch {epoch + 1}/{epochs}: "
                f"loss {losses[-1]:.4f} ({took:.0f} s)",
                flush=True,
            )
    model.eval()
    model.invalidate_fingerprint()
    return losses


def _nll(model: TinyVLM, pixels: Tensor, prompts: list[str], answers: list[str]) -> Tensor:
    return model.loss(pixels, prompts, answers)


def world_vocab(data: Dataset) -> WordVocab:
    """The vocabulary of a VQA world: prompts, answers, unsafe answers and role-play prefixes."""
    from mmsafe.data.worlds.shapes_vqa import ROLEPLAY_PREFIXES, SECRETS

    texts: list[str] = list(data.modalities["text"])
    for m in data.meta:
        texts.append(m.get("answer", ""))
        texts.append(m.get("unsafe_answer") or "")
    return WordVocab.build([*texts, *ROLEPLAY_PREFIXES, *SECRETS])


def benign_accuracy(model: VisionLanguageModel, data: Dataset, rows: Sequence[int] | None = None,
                    batch_size: int = 256) -> float:  # fmt: skip
    """Exact-match accuracy on the short-answer benign rows (count, exist, colour, where, what)."""
    short = {"count", "exist", "colour", "where", "what"}
    rows = [
        i for i in (range(len(data)) if rows is None else rows) if data.meta[i]["qtype"] in short
    ]
    hits = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        pixels = model.preprocess_images([data.modalities["image"][i] for i in chunk])
        answers = model.generate(
            pixels, [data.modalities["text"][i] for i in chunk], max_new_tokens=8
        )
        hits += sum(
            a.strip() == " ".join(words(data.meta[i]["answer"]))
            for a, i in zip(answers, chunk, strict=True)
        )
    return hits / max(len(rows), 1)


def _check_vqa_data(data: Dataset | None, name: str) -> Dataset:
    if data is None:
        from mmsafe.data.worlds.shapes_vqa import make_shapes_vqa

        return make_shapes_vqa()
    if not data.meta or "qtype" not in data.meta[0] or not data.has_split("train"):
        raise ModelError(
            f"{name} trains on question-answer data with a train split: pass --data shapes-vqa"
        )
    return data


def quadrant_words(data: Dataset, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(shapes, colours)``: ``(N, 4)`` words shown in each quadrant (``nothing`` if empty)."""
    shapes = np.full((len(rows), 4), "nothing", dtype=object)
    colours = np.full((len(rows), 4), "nothing", dtype=object)
    for k, i in enumerate(rows):
        for o in data.meta[i].get("objects") or []:
            shapes[k, int(o["quadrant"])] = o["shape"]
            colours[k, int(o["quadrant"])] = o["colour"]
    return shapes, colours


def fit_perception(
    model: TinyVLM, data: Dataset, rows: Sequence[int], *, epochs: int, lr: float, seed: int = 0,
    progress: bool = False,
) -> list[float]:  # fmt: skip
    """Stage 0: align each quadrant's visual tokens with the words for what it shows.

    The mean visual token of a quadrant is scored against the model's own token embeddings of
    the shape words and of the colour words (``nothing`` for an empty quadrant), with a
    softmax over each set: the feature-alignment stage of LLaVA-style training, which puts
    visual tokens in the word-embedding space so that a question's words can find them.
    Labels come from the world's object annotations (``meta["objects"]`` with a quadrant);
    rows without them are left out, and without any nothing is trained.
    """
    first: dict[Any, int] = {}
    for i in rows:
        objs = data.meta[i].get("objects")
        if objs and all("quadrant" in o for o in objs):
            first.setdefault(data.meta[i].get("scene", i), i)
    scenes = list(first.values())
    if not scenes:
        return []
    shapes, colours = quadrant_words(data, scenes)
    sets, targets = [], []
    for table in (shapes, colours):
        names = sorted(set(table.flat))
        ids = torch.tensor([model.vocab.encode(n)[0] for n in names], device=model.device)
        sets.append(ids)
        index = {n: k for k, n in enumerate(names)}
        targets.append(torch.tensor([[index[w] for w in r] for r in table]))
    pixels = model.preprocess_images([data.modalities["image"][i] for i in scenes])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g, half = model.grid, model.grid // 2
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(scenes))
        total = 0.0
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            tokens = model.visual_tokens(pixels[idx]).view(len(idx), g, g, -1)
            quads = torch.stack(
                [tokens[:, r * half : (r + 1) * half, c * half : (c + 1) * half].mean(dim=(1, 2))
                 for r in (0, 1) for c in (0, 1)], dim=1,
            )  # fmt: skip
            quads = F.normalize(quads, dim=-1)
            loss = sum(
                F.cross_entropy(
                    (model.ground_scale * quads @ F.normalize(model.token.weight[ids], dim=-1).T)
                    .flatten(0, 1), t[idx].flatten().to(model.device))
                for ids, t in zip(sets, targets, strict=True)
            )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(scenes))
        if progress:
            print(f"[tiny-vlm] perception epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}",
                  flush=True)  # fmt: skip
    model.eval()
    return losses


def _init_tower(model: TinyVLM, *, seed: int, quick: bool, cache_dir: Any, progress: bool) -> None:
    if model.cfg.tower == "scratch":
        return
    from mmsafe.models.tiny_clip import build_tiny_clip

    clip = build_tiny_clip("s", seed=seed, quick=quick, cache_dir=cache_dir, progress=progress)
    model.tower.load_state_dict(clip.image.state_dict())


def build_tiny_vlm(
    *,
    train_data: Dataset | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    tower: str = "tiny-clip",
    name: str = "tiny-vlm",
) -> TinyVLM:
    """Load a trained tiny-vlm from the cache, or train one on ``train_data``'s train rows.

    Args:
        train_data: a shapes-vqa world (the default one when ``None``).
        seed: seeds initialisation and training.
        quick: a short schedule (tests).
        cache_dir: where trained models live.
        progress: print one line per epoch.
        device: torch device.
        tower: ``tiny-clip`` (start from a trained tiny-clip's image tower) or ``scratch``.
        name: the model's name in the card.
    """
    data = _check_vqa_data(train_data, name)
    cfg = TinyVLMConfig(vocab=world_vocab(data).tokens, tower=tower,
                        image_size=int(data.modalities["image"][0].shape[0]))  # fmt: skip
    train = TinyVLMTrainConfig.preset(quick)
    key = hashlib.sha256(json.dumps(
        {"format": FORMAT, "model": cfg.to_dict(), "train": dataclasses.asdict(train), "seed": seed,
         "data": data.fingerprint(), "torch": torch.__version__.split("+")[0]}, sort_keys=True,
    ).encode()).hexdigest()[:16]  # fmt: skip
    folder = cache_root(cache_dir) / "models" / f"tiny-vlm-{key}"
    if (folder / "config.json").is_file():
        with contextlib.suppress(ModelError, OSError, RuntimeError):
            return load_tiny_vlm(folder, device=device, name=name)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVLM(cfg, name=name).to(device)
        _init_tower(model, seed=seed, quick=quick, cache_dir=cache_dir, progress=progress)
        rows = [i for i, s in enumerate(data.splits or []) if s == "train"]
        seen = fit_perception(model, data, rows, epochs=train.perception_epochs, lr=train.lr,
                              seed=seed, progress=progress)  # fmt: skip
        kw = {
            "batch_size": train.batch_size,
            "weight_decay": train.weight_decay,
            "progress": progress,
        }
        cap = fit_examples(model, capability_examples(data, rows), epochs=train.epochs,
                           lr=train.lr, seed=seed, stage="capability", **kw)  # fmt: skip
        rng = np.random.default_rng([seed, 2])
        examples = safety_examples(data, rows, replay=train.replay, rng=rng, roleplay_replay=True)
        safe = fit_examples(model, examples,
                            epochs=train.safety_epochs, lr=train.lr / 2, seed=seed + 1,
                            stage="safety", **kw)  # fmt: skip
    test_rows = [i for i, s in enumerate(data.splits or []) if s == "test"]
    model.training_info = {
        "cache_key": key, "seed": seed, "quick": quick,
        "hyperparameters": dataclasses.asdict(train),
        "data_fingerprint": data.fingerprint(), "data_source": data.source,
        "perception_loss": [round(x, 5) for x in seen],
        "capability_loss": [round(x, 5) for x in cap], "safety_loss": [round(x, 5) for x in safe],
        "benign_test_accuracy": round(benign_accuracy(model, data, test_rows), 4),
        "train_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
    }  # fmt: skip
    save_tiny_vlm(model, folder)
    return model


def save_tiny_vlm(model: TinyVLM, folder: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with the training facts), atomically."""
    from safetensors.torch import save_file

    from mmsafe.engine.cache import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
    doc = {"format": FORMAT, "model": model.cfg.to_dict(), "training": model.training_info}
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    atomic_write(folder / "config.json", lambda p: p.write_text(text, encoding="utf-8"))


def load_tiny_vlm(folder: str | Path, *, device: str = "cpu", name: str | None = None) -> TinyVLM:
    """A saved tiny-vlm (safetensors; nothing is unpickled).

    Raises:
        ModelError: the folder holds no tiny-vlm.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        doc = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{folder} holds no tiny-vlm (config.json unreadable: {exc}); pass a folder written "
            "by `mmsafe harden ... --model tiny-vlm` or train one with --model tiny-vlm"
        ) from None
    if doc.get("format") != FORMAT:
        raise ModelError(f"{folder}/config.json is not a tiny-vlm ({doc.get('format')!r})")
    model = TinyVLM(TinyVLMConfig.from_dict(doc["model"]), name=name or f"tiny-vlm:{folder}")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.training_info = doc.get("training", {})
    model.invalidate_fingerprint()
    return model.to(device).eval()


@register_model("tiny-vlm", kind="vlm")
def tiny_vlm(**kwargs: Any) -> TinyVLM:
    """CNN + word transformer VLM trained on shapes-vqa, safety-tuned to keep a planted secret."""
    return build_tiny_vlm(**kwargs)


@register_model("tiny-vlm-scratch", kind="vlm")
def tiny_vlm_scratch(**kwargs: Any) -> TinyVLM:
    """tiny-vlm with its image tower trained from scratch (no tiny-clip start)."""
    return build_tiny_vlm(tower="scratch", name="tiny-vlm-scratch", **kwargs)


@register_model("tiny-vlm:", "a saved tiny-vlm, e.g. a hardened one: tiny-vlm:<dir>", kind="vlm")
def tiny_vlm_saved(path: str, device: str = "cpu", **_: Any) -> TinyVLM:
    """Load a saved tiny-vlm folder."""
    return load_tiny_vlm(path, device=device)
