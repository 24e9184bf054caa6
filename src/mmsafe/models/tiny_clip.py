"""tiny-clip: a small CLIP-style dual encoder trained in about a minute on the shapes world.

The image tower is a small CNN on 32x32 pixels; the text tower is a small pre-norm transformer
over a byte-level tokenizer (every UTF-8 string works, no vocabulary file). Both project into a
shared embedding space and are trained with the symmetric contrastive (InfoNCE) loss on the
(image, caption) pairs of a dataset's ``train`` split.

Sizes form a family (``xs`` < ``s`` < ``m``) with the same recipe, for scaling studies. Trained
weights are cached as ``model.safetensors`` + ``config.json`` under
``<cache>/models/tiny-clip-<size>-<hash>/``, keyed on the architecture, the training
hyper-parameters, the seed and the training data's fingerprint.

Example:
    >>> model = TinyClip(TinyClipConfig.for_size("xs"))
    >>> emb = model.encode({"text": model.preprocess("text", ["a red circle", "ü"])})
    >>> tuple(emb["text"].shape)
    (2, 64)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.engine.cache import atomic_write, default_cache_dir
from mmsafe.models.base import (
    Batch,
    EncoderModel,
    ModelError,
    images_to_tensor,
    register_model,
    to_device,
)
from mmsafe.models.tokens import TextTokens, Words

FORMAT = "mmsafe.tiny-clip/1"
BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
MAX_LOGIT_SCALE = 100.0

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a {} shape.",
    "{}",
)
"""Prompts used to augment captions in training (they include the zero-shot default prompts)."""

EVAL_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "an image of a {}.")
"""The zero-shot prompts used for the held-out accuracy recorded with the weights."""


# --------------------------------------------------------------------------- tokenizer


def tokenize(texts: Sequence[str], max_length: int = 77) -> dict[str, Tensor]:
    """Byte-level tokens: ``BOS`` + UTF-8 bytes + ``EOS``, padded to the longest in the batch.

    Text longer than ``max_length - 2`` bytes is truncated (the ``EOS`` is kept).

    Args:
        texts: the strings.
        max_length: the most tokens per string, ``BOS`` and ``EOS`` included.

    Returns:
        ``{"input_ids", "attention_mask"}``, both ``int64`` of shape ``(B, L)``.

    Example:
        >>> tokenize(["hé"])["input_ids"].tolist()
        [[256, 104, 195, 169, 257]]
        >>> tokenize(["x" * 500, ""], max_length=8)["attention_mask"].sum(1).tolist()
        [8, 2]
    """
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for text (need >= 3)")
    rows = [[BOS, *str(t).encode("utf-8")[: max_length - 2], EOS] for t in texts]
    length = max((len(r) for r in rows), default=2)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class TinyClipConfig:
    """The architecture of one tiny-clip.

    Attributes:
        size: the family member's name (``xs``, ``s`` or ``m``).
        image_size: input side in pixels.
        channels: CNN width of each stage (each stage but the last halves the resolution).
        convs_per_stage: 3x3 convolutions per stage.
        text_width: transformer width.
        text_layers: transformer blocks.
        text_heads: attention heads.
        max_length: the most byte tokens per text, ``BOS``/``EOS`` included.
        embed_dim: shared embedding dimension.
        mean: per-channel pixel mean used to normalise images inside the image tower.
        std: per-channel pixel std.
    """

    size: str = "s"
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_stage: int = 1
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 77
    embed_dim: int = 64
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.3, 0.3, 0.3)

    @classmethod
    def for_size(cls, size: str) -> TinyClipConfig:
        """The config of a named family member.

        Example:
            >>> TinyClipConfig.for_size("m").channels
            (24, 48, 96, 192)
        """
        if size not in SIZES:
            raise ModelError(f"Unknown tiny-clip size {size!r}; choose one of {', '.join(SIZES)}")
        return cls(size=size, **SIZES[size])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyClipConfig:
        """Rebuild from :meth:`TinyClip.config` output (lists become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        )


SIZES: dict[str, dict[str, Any]] = {
    "xs": {"channels": (8, 16, 32, 64), "convs_per_stage": 1, "text_width": 32, "text_layers": 1,
           "text_heads": 2},
    "s": {"channels": (16, 32, 64, 128), "convs_per_stage": 1, "text_width": 64, "text_layers": 2,
          "text_heads": 4},
    "m": {"channels": (24, 48, 96, 192), "convs_per_stage": 2, "text_width": 96, "text_layers": 3,
          "text_heads": 4},
}  # fmt: skip
"""Widths and depths of each family member."""


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()
    )


class ImageTower(nn.Module):
    """A small CNN: stages of 3x3 conv + batch norm + GELU, max pooling between stages.

    The last stage is pooled globally (mean and max, concatenated) and projected.
    """

    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        stages, c_prev = [], 3
        for i, c in enumerate(cfg.channels):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            for _ in range(cfg.convs_per_stage):
                layers.append(_conv(c_prev, c))
                c_prev = c
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Linear(2 * c_prev, cfg.embed_dim)

    def blocks(self, pixels: Tensor) -> list[Tensor]:
        """Each stage's output ``(B, C_i, H_i, W_i)``, from pixels in ``[0, 1]``."""
        x = (pixels - self.mean) / self.std
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, pixels: Tensor) -> Tensor:
        """Unnormalised embeddings ``(B, D)``."""
        last = self.blocks(pixels)[-1]
        return self.proj(torch.cat([last.mean(dim=(2, 3)), last.amax(dim=(2, 3))], dim=1))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``keep``: ``(B, L)`` real keys, or a ``(B, L, L)`` query-by-key mask (causal)."""
        b, length, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, length, w))
        return x + self.mlp(self.ln2(x))


class TextTower(nn.Module):
    """A pre-norm transformer over byte tokens, mean-pooled over real tokens."""

    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(VOCAB_SIZE, cfg.text_width)
        self.position = nn.Parameter(torch.randn(cfg.max_length, cfg.text_width) * 0.02)
        self.layers = nn.ModuleList(
            _Block(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_layers)
        )
        self.ln = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim)

    def blocks(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Each transformer block's output ``(B, L, width)``."""
        keep = attention_mask.bool()
        x = self.token(input_ids) + self.position[: input_ids.shape[1]]
        out = []
        for layer in self.layers:
            x = layer(x, keep)
            out.append(x)
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unnormalised embeddings ``(B, D)``."""
        x = self.ln(self.blocks(input_ids, attention_mask)[-1])
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.proj((x * m).sum(1) / m.sum(1).clamp_min(1.0))


class ByteTokens(TextTokens):
    """tiny-clip's byte tokens: bytes 0-255 plus BOS/EOS/PAD; attacks write printable ASCII.

    Example:
        >>> tokens = ByteTokens(TinyClip(TinyClipConfig.for_size("xs")))
        >>> b = tokenize(["a red  cat"])
        >>> tokens.decode(b["input_ids"], b["attention_mask"])
        ['a red  cat']
        >>> tokens.words(b["input_ids"][0].tolist(), range(1, 11))
        [('a', [1]), ('red', [3, 4, 5]), ('cat', [8, 9, 10])]
    """

    def embedding(self) -> nn.Embedding | None:  # noqa: D102
        return self.model.text.token

    def special_ids(self) -> list[int]:  # noqa: D102
        return [BOS, EOS, PAD]

    def candidates(self, vocab_size: int) -> Tensor:  # noqa: D102
        return torch.arange(32, 127)

    def editable(self, ids: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        return mask.bool() & (ids < 128)

    def pad_ids(self) -> tuple[int | None, set[int]]:  # noqa: D102
        return PAD, {EOS}

    def decode(self, ids: Tensor, mask: Tensor) -> list[str]:  # noqa: D102
        return [
            bytes(int(t) for t in row[m] if int(t) < 256).decode("utf-8", errors="replace")
            for row, m in zip(ids.cpu(), mask.cpu().bool(), strict=True)
        ]

    def words(self, row: Sequence[int], positions: Sequence[int]) -> Words:  # noqa: D102
        groups: list[list[int]] = []
        prev = -2
        for j in positions:
            if row[j] in _WHITESPACE:
                prev = -2
                continue
            if prev == j - 1 and groups:
                groups[-1].append(j)
            else:
                groups.append([j])
            prev = j
        words = [
            bytes(row[j] for j in g if row[j] < 256).decode("utf-8", "replace") for g in groups
        ]
        return list(zip(words, groups, strict=True))


_WHITESPACE = frozenset(b" \t\n\r\f\v")


class TinyClip(EncoderModel):
    """A tiny CLIP: CNN image tower + byte-level transformer text tower, shared space."""

    name = "tiny-clip"
    modalities = ("image", "text")

    def __init__(self, cfg: TinyClipConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TinyClipConfig()
        self.name = "tiny-clip" if self.cfg.size == "s" else f"tiny-clip-{self.cfg.size}"
        self.embed_dim = self.cfg.embed_dim
        self.image = ImageTower(self.cfg)
        self.text = TextTower(self.cfg)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.training_info: dict[str, Any] = {}

    @property
    def input_size(self) -> int:  # noqa: D102
        return self.cfg.image_size

    @property
    def logit_scale(self) -> float:
        """``exp`` of the learned log temperature, clamped to at most 100."""
        return float(self.log_logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))

    def preprocess(self, modality: str, values: Sequence[Any]) -> Batch:
        """Images to ``(B, 3, S, S)`` pixels in ``[0, 1]``; texts to byte tokens."""
        if modality == "image":
            return images_to_tensor(values, self.cfg.image_size)
        if modality == "text":
            return tokenize([str(v) for v in values], self.cfg.max_length)
        raise ModelError(f"{self.name} has no {modality!r} tower (it has image and text)")

    def encode_modality(self, modality: str, batch: Batch) -> Tensor:
        """Unnormalised ``(B, embed_dim)`` embeddings of one modality."""
        batch = to_device(batch, self.device)
        if modality == "image" and isinstance(batch, Tensor):
            return self.image(batch)
        if modality == "text" and isinstance(batch, dict):
            return self.text(batch["input_ids"], batch["attention_mask"])
        raise ModelError(f"{self.name}: bad batch for modality {modality!r}; use preprocess()")

    def text_tokens(self) -> TextTokens:
        """Byte-level token facts (:class:`ByteTokens`)."""
        return ByteTokens(self)

    def train_shadow(self, data: Any, *, seed: int, quick: bool | None = True,
                     size: str | None = None, recipe: Any = None) -> TinyClip:  # fmt: skip
        """A fresh tiny-clip of ``size`` (default: this one's) trained from scratch on ``data``.

        The recipe is ``recipe`` when given; else the quick (True) or full (False) preset; else
        (``quick=None``) the one recorded in :attr:`training_info`, falling back to quick.
        Training is in process and uncached (shadow models for LiRA).
        """
        if recipe is None and quick is None:
            recipe = _recorded_recipe(self.training_info) or TrainConfig.preset(True)
        elif recipe is None:
            recipe = TrainConfig.preset(bool(quick))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            shadow = TinyClip(TinyClipConfig.for_size(size or self.cfg.size)).to(self.device)
            train_tiny_clip(shadow, data, recipe, seed=seed, progress=False)
        shadow.training_info = {"seed": seed, "hyperparameters": dataclasses.asdict(recipe)}
        return shadow

    def hidden_states(self, modality: str, batch: Batch) -> list[Tensor]:
        """Per-block outputs of one tower.

        Image: one ``(B, C_i, H_i, W_i)`` map per CNN stage. Text: one ``(B, L, width)`` tensor
        per transformer block (padding positions included; use the attention mask).
        """
        batch = to_device(batch, self.device)
        if modality == "image" and isinstance(batch, Tensor):
            return self.image.blocks(batch)
        if modality == "text" and isinstance(batch, dict):
            return self.text.blocks(batch["input_ids"], batch["attention_mask"])
        raise ModelError(f"{self.name}: bad batch for modality {modality!r}; use preprocess()")

    def config(self) -> dict[str, Any]:
        """The architecture as a JSON-able dict (``TinyClipConfig.from_dict`` rebuilds it)."""
        return {"name": self.name, **dataclasses.asdict(self.cfg)}

    def save_pretrained(self, path: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` under ``path``, each atomically."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p)))
        doc = {"format": FORMAT, "model": self.config(), "training": training or self.training_info}
        text = json.dumps(doc, indent=2, sort_keys=True, default=str)
        atomic_write(out / "config.json", lambda p: p.write_text(text, encoding="utf-8"))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> TinyClip:
        """Load a model written by :meth:`save_pretrained`.

        Raises:
            ModelError: missing files, another format, or weights that do not fit the config.
        """
        from safetensors.torch import load_file

        folder = Path(path)
        cfg_path, weights = folder / "config.json", folder / "model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise ModelError(
                f"{folder} is not a saved tiny-clip (needs config.json and model.safetensors)"
            )
        try:
            doc = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ModelError(f"{cfg_path} is not valid JSON ({err}); delete the folder") from err
        if doc.get("format") != FORMAT:
            raise ModelError(f"{cfg_path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        model = cls(TinyClipConfig.from_dict(doc["model"]))
        try:
            model.load_state_dict(load_file(str(weights)))
        except (RuntimeError, OSError, ValueError) as err:
            raise ModelError(f"{weights} does not match its config.json: {err}") from err
        model.training_info = doc.get("training") or {}
        return model.to(device).eval()


# --------------------------------------------------------------------------- training


def _recorded_recipe(info: dict[str, Any]) -> TrainConfig | None:
    """The :class:`TrainConfig` recorded in a model's ``training_info``, if any."""
    hp = info.get("hyperparameters")
    if not isinstance(hp, dict):
        return None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in hp.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (part of the cache key).

    Attributes:
        steps: optimisation steps.
        batch_size: (image, caption) pairs per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        weight_decay: AdamW weight decay (not applied to norms, biases and the temperature).
        warmup: warm-up steps.
        prompt_prob: probability of replacing a caption that names exactly one class by a
            prompt template filled with that class word (teaches zero-shot prompts).
        shift: the most pixels of random translation applied to training images.
    """

    steps: int = 900
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    prompt_prob: float = 0.5
    shift: int = 2

    @classmethod
    def preset(cls, quick: bool) -> TrainConfig:
        """The full recipe, or a short one for tests (``quick``)."""
        return cls(steps=200, warmup=20) if quick else cls()


@contextlib.contextmanager
def _threads(n: int | None = None) -> Iterator[int]:
    """Use ``n`` (default: available cores, at most 8) torch threads, restoring them after."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = n or max(1, min(cores or 1, 8))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def class_word_in(text: str, classes: Sequence[str]) -> str | None:
    """The one class name that ``text`` mentions as a whole word, or None (none or several).

    Example:
        >>> class_word_in("a small red circle at the top", ["circle", "square"])
        'circle'
        >>> class_word_in("a red object", ["circle", "square"]) is None
        True
    """
    found = [c for c in classes if re.search(rf"\b{re.escape(c)}\b", text, flags=re.IGNORECASE)]
    return found[0] if len(found) == 1 else None


def _random_shift(pixels: Tensor, shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``shift`` pixels (edge padding)."""
    if shift <= 0:
        return pixels
    b, _, h, w = pixels.shape
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, 3, h, w + 2 * shift)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, 3, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "position" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


def contrastive_loss(img: Tensor, txt: Tensor, scale: Tensor, texts: Sequence[str]) -> Tensor:
    """Symmetric InfoNCE; pairs whose captions are identical count as positives for each other.

    Example:
        >>> e = torch.eye(3)
        >>> float(contrastive_loss(e, e, torch.tensor(100.0), ["a", "b", "c"])) < 1e-6
        True
    """
    logits = scale * img @ txt.T
    same = np.asarray(texts, dtype=object)
    target = torch.from_numpy((same[:, None] == same[None, :]).astype(np.float32))
    target = (target / target.sum(1, keepdim=True)).to(logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def encode_texts_bucketed(model: TinyClip, texts: Sequence[str], bucket: int = 32) -> Tensor:
    """Text embeddings of ``texts``, encoding each distinct text once, in length-sorted buckets.

    Same result as ``model.text`` on the whole padded batch (padding is masked out), with less
    work spent on repeated prompts and padding.
    """
    unique = list(dict.fromkeys(texts))
    lengths = [len(t.encode("utf-8")) for t in unique]
    order = sorted(range(len(unique)), key=lambda i: lengths[i])
    parts = []
    for lo in range(0, len(order), bucket):
        tok = tokenize([unique[i] for i in order[lo : lo + bucket]], model.cfg.max_length)
        tok = {k: v.to(model.device) for k, v in tok.items()}
        parts.append(model.text(tok["input_ids"], tok["attention_mask"]))
    emb = torch.cat(parts)
    rank = {unique[i]: r for r, i in enumerate(order)}
    return emb[torch.tensor([rank[t] for t in texts], device=emb.device)]


def train_tiny_clip(
    model: TinyClip,
    data: Dataset,
    train: TrainConfig,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on the (image, caption) pairs of ``data``'s ``train`` split.

    Captions that name exactly one of ``data.classes`` are sometimes replaced by a prompt
    template filled with that word (the caption's word, not the row's label, which may be noisy).

    Args:
        model: the model to train (its device is used).
        data: a dataset with ``image`` and ``text`` columns and a ``train`` split.
        train: the hyper-parameters.
        seed: seeds the data order, augmentation and prompt choices.
        progress: show a progress bar.
        callback: called as ``callback(step, loss)`` after every step.

    Returns:
        Training statistics: seconds, final loss (mean of the last 20 steps), steps, threads.
    """
    from tqdm.auto import tqdm

    rows = data.split("train")
    pixels = images_to_tensor(rows.modalities["image"], model.cfg.image_size)
    captions = [str(t) for t in rows.modalities["text"]]
    words = [class_word_in(t, data.classes) for t in captions]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    opt = torch.optim.AdamW(_param_groups(model, train.weight_decay), lr=train.lr)

    def lr_at(step: int) -> float:
        if step < train.warmup:
            return train.lr * (step + 1) / train.warmup
        t = (step - train.warmup) / max(1, train.steps - train.warmup)
        return train.lr * 0.5 * (1 + math.cos(math.pi * t))

    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    with _threads() as n_threads:
        tty = sys.stderr.isatty()  # a log or a pipe gets one line per stage, not a bar
        bar = tqdm(total=train.steps, desc=f"training {model.name}", disable=not (progress and tty))
        if progress and not tty:
            print(f"training {model.name}: {train.steps} steps", file=sys.stderr, flush=True)
        for step in range(train.steps):
            while len(order) < train.batch_size:
                order.extend(rng.permutation(len(captions)).tolist())
            idx, order = order[: train.batch_size], order[train.batch_size :]
            swap = rng.random(len(idx)) < train.prompt_prob
            pick = rng.integers(0, len(PROMPT_TEMPLATES), len(idx))
            texts = [
                PROMPT_TEMPLATES[p].format(words[i]) if s and words[i] else captions[i]
                for i, s, p in zip(idx, swap, pick, strict=True)
            ]
            images = _random_shift(pixels[idx], train.shift, gen).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            img = F.normalize(model.image(images), dim=-1)
            txt = F.normalize(encode_texts_bucketed(model, texts), dim=-1)
            scale = model.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            loss = contrastive_loss(img, txt, scale, texts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.log_logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        if progress and not tty and losses:
            done = f"trained {model.name}: final loss {losses[-1]:.3f}"
            print(f"{done} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    model.invalidate_fingerprint()
    return {
        "train_seconds": round(time.perf_counter() - start, 2),
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "steps": train.steps,
        "threads": n_threads,
        "n_train_rows": len(captions),
    }


@torch.no_grad()
def heldout_zero_shot_accuracy(
    model: EncoderModel,
    data: Dataset,
    split: str = "test",
    templates: Sequence[str] = EVAL_TEMPLATES,
) -> float | None:
    """Zero-shot accuracy on the labelled rows of ``split`` (None when there are none).

    Class embeddings are the renormalised mean of the prompt embeddings of each class name.
    """
    if not data.has_split(split):
        return None
    rows = data.split(split)
    keep = np.flatnonzero(rows.labelled)
    if len(keep) == 0 or not data.classes:
        return None
    model.eval()
    class_emb = []
    for name in data.classes:
        prompts = [t.format(name) for t in templates]
        e = model.encode({"text": model.preprocess("text", prompts)})["text"].mean(0)
        class_emb.append(F.normalize(e, dim=-1))
    classes = torch.stack(class_emb)
    correct = 0
    for lo in range(0, len(keep), 256):
        part = keep[lo : lo + 256]
        images = [rows.modalities["image"][i] for i in part]
        emb = model.encode({"image": model.preprocess("image", images)})["image"]
        pred = (emb @ classes.T).argmax(1).cpu().numpy()
        correct += int((pred == rows.labels[part]).sum())
    return correct / len(keep)


# --------------------------------------------------------------------------- builders & cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MMSAFE_CACHE_DIR``, else the platform's user cache for mmsafe."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def cache_key(cfg: TinyClipConfig, train: TrainConfig, seed: int, data_fingerprint: str) -> str:
    """``<size>-<hash>`` of everything that determines the trained weights."""
    doc = {
        "format": FORMAT,
        "model": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(train),
        "seed": seed,
        "data": data_fingerprint,
        "torch": torch.__version__.split("+")[0],
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.size}-{digest}"


def _check_train_data(data: Dataset) -> None:
    missing = {"image", "text"} - set(data.modality_names)
    if missing:
        raise ModelError(
            f"tiny-clip trains on image-caption pairs, but {data.name!r} lacks {sorted(missing)}"
        )
    if not data.has_split("train"):
        raise ModelError(
            f"tiny-clip trains on the rows with split 'train', and {data.name!r} has none; "
            "add a split column or pass a world such as 'shapes'"
        )


def build_tiny_clip(
    size: str = "s",
    *,
    train_data: Dataset | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> TinyClip:
    """Load a trained tiny-clip from the cache, or train one (and cache it).

    Args:
        size: ``xs``, ``s`` or ``m``.
        train_data: the dataset whose ``train`` rows train the model; None = the default shapes
            world.
        seed: seeds initialisation and training.
        quick: a short schedule (for tests; still well above chance on shapes).
        cache_dir: where trained models live (see :func:`cache_root`).
        progress: show a progress bar while training.
        device: torch device to train and run on.

    Raises:
        ModelError: unknown size, or training data without image-caption pairs in a train split.
    """
    cfg = TinyClipConfig.for_size(size)
    if train_data is None:
        from mmsafe.data.worlds.shapes import make_shapes

        train_data = make_shapes()
    _check_train_data(train_data)
    train = TrainConfig.preset(quick)
    key = cache_key(cfg, train, seed, train_data.fingerprint())
    folder = cache_root(cache_dir) / "models" / f"tiny-clip-{key}"
    if (folder / "config.json").is_file():
        with contextlib.suppress(ModelError):
            return TinyClip.from_pretrained(folder, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyClip(cfg).to(device)
        stats = train_tiny_clip(model, train_data, train, seed=seed, progress=progress)
    accuracy = heldout_zero_shot_accuracy(model, train_data)
    model.training_info = {
        "cache_key": key,
        "seed": seed,
        "quick": quick,
        "hyperparameters": dataclasses.asdict(train),
        "data_fingerprint": train_data.fingerprint(),
        "data_source": train_data.source,
        "zero_shot_test_accuracy": None if accuracy is None else round(accuracy, 4),
        "zero_shot_templates": list(EVAL_TEMPLATES),
        "torch": torch.__version__,
        **stats,
    }
    model.save_pretrained(folder)
    return model


@register_model("tiny-clip")
def tiny_clip(**kwargs: Any) -> TinyClip:
    """tiny-clip (size s): CNN + byte transformer CLIP trained on the shapes world (~1 min CPU)."""
    return build_tiny_clip("s", **kwargs)


@register_model("tiny-clip-xs")
def tiny_clip_xs(**kwargs: Any) -> TinyClip:
    """tiny-clip, extra-small member of the family (for scaling fits)."""
    return build_tiny_clip("xs", **kwargs)


@register_model("tiny-clip-m")
def tiny_clip_m(**kwargs: Any) -> TinyClip:
    """tiny-clip, medium member of the family (for scaling fits)."""
    return build_tiny_clip("m", **kwargs)


@register_model("tiny-clip:", "a saved tiny-clip, e.g. a hardened one: tiny-clip:<dir>")
def tiny_clip_from_dir(path: str, device: str = "cpu") -> TinyClip:
    """A tiny-clip written by :meth:`TinyClip.save_pretrained` (``mmsafe harden adversarial``)."""
    if not path:
        raise ModelError("tiny-clip:<dir> needs the folder of a saved tiny-clip after the colon")
    return TinyClip.from_pretrained(path, device=device)
