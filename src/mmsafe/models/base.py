"""The model protocol every adapter implements, and the registry that builds them by name.

An :class:`EncoderModel` turns a batch of raw values per modality into L2-normalised embeddings
in one shared space::

    batch = {m: model.preprocess(m, values) for m, values in raw.items()}
    emb = model.encode(batch)            # {"image": (B, D), "text": (B, D)}, unit norm
    logits = model.logit_scale * emb["image"] @ emb["text"].T

Images are preprocessed to float pixels in ``[0, 1]`` of shape ``(B, 3, S, S)``; normalisation
by the tower's mean and std happens inside ``encode``, so attacks and corruptions work in pixel
space. Text is preprocessed to ``{"input_ids", "attention_mask"}``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mmsafe.models.tokens import TextTokens

Batch = Tensor | dict[str, Tensor]
"""A preprocessed batch of one modality: a tensor, or a dict of tensors (text ids + mask)."""


class ModelError(ValueError):
    """A model cannot be built or loaded; the message says what to do."""


class EncoderModel(nn.Module, ABC):
    """A dual (or multi) encoder mapping each modality into one shared embedding space.

    Subclasses set ``name``, ``modalities`` and ``embed_dim`` and implement ``preprocess``,
    ``encode_modality`` and ``config``.

    ``kind`` names the target kind (the protocol a model follows; checks declare the kinds they
    run on). What an adapter can do beyond the protocol is a method it overrides, listed by
    :meth:`capabilities`: ``hidden_states`` (per-layer features, for side adapters and patch
    features), ``text_tokens`` (token facts for gradient text attacks and token attributions),
    ``train_shadow`` (train a fresh copy on other rows, for LiRA shadow models).
    """

    kind: ClassVar[str] = "encoder"
    locked_towers: ClassVar[tuple[str, ...]] = ()
    """Towers whose weights are fixed by design (LiT's locked towers): hardeners that would
    fine-tune one refuse, since the model neither trains nor saves it."""
    name: str = "encoder"
    modalities: tuple[str, ...] = ("image", "text")
    embed_dim: int = 0
    patch_layers: ClassVar[tuple[int, ...]] = (1,)
    """Which of ``hidden_states("image", ...)`` a patch memory bank reads by default.

    ``monitoring.anomaly``'s ``patch_layers=None`` means this. ``(1,)`` is tiny-clip's second
    CNN stage (32 channels on a 16x16 grid of a 32-px input: a few pixels per position).
    Adapters override it with their own mid-level layers (a CLIP ViT's mid blocks, a
    MobileNet's mid stages); it is read only when the model has the ``hidden_states``
    capability.
    """

    min_input_size: ClassVar[int | None] = None
    """``None``: the image tower takes exactly :attr:`input_size` pixels (a ViT's position grid,
    tiny-clip). An int: it also takes any square side of at least this many pixels (a fully
    convolutional tower with global pooling, e.g. lit-mini's MobileNetV2), so
    ``monitoring.anomaly`` encodes a window crop at the pixel density of the whole image
    instead of enlarging it to the input size."""

    @abstractmethod
    def preprocess(self, modality: str, values: Sequence[Any]) -> Batch:
        """Turn raw values (uint8 ``(H, W, 3)`` images, strings) into a CPU batch."""

    @abstractmethod
    def encode_modality(self, modality: str, batch: Batch) -> Tensor:
        """Unnormalised embeddings ``(B, D)`` of one modality."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-able description: enough to rebuild the architecture and to show in a card."""

    @property
    def input_size(self) -> int | None:
        """The side of the square pixel tensor ``preprocess("image", ...)`` produces.

        ``None`` for a model without an image tower. Checks scale windows, patch grids and
        corruption lengths with the image instead of assuming a resolution.
        """
        if "image" not in self.modalities:
            return None
        probe = self.preprocess("image", [np.zeros((8, 8, 3), np.uint8)])
        assert isinstance(probe, Tensor)
        return int(probe.shape[-1])

    @property
    def logit_scale(self) -> float:
        """The temperature that turns cosine similarities into logits."""
        return 100.0

    def encode(self, inputs: Mapping[str, Batch]) -> dict[str, Tensor]:
        """L2-normalised embeddings for every modality in ``inputs``."""
        return {
            m: nn.functional.normalize(self.encode_modality(m, b).float(), dim=-1)
            for m, b in inputs.items()
        }

    def hidden_states(self, modality: str, batch: Batch) -> list[Tensor]:
        """Per-layer hidden states of one tower (for side adapters); optional."""
        raise NotImplementedError(f"{type(self).__name__} does not expose hidden states")

    def text_tokens(self) -> TextTokens:
        """Token facts of the text tower (embedding layer, special ids, decoding, words).

        The default reads a Hugging Face-style ``tokenizer`` attribute and text config; adapters
        with another tokenizer override it.
        """
        from mmsafe.models.tokens import TextTokens

        return TextTokens(self)

    def train_shadow(self, data: Any, *, seed: int, quick: bool | None = True,
                     size: str | None = None, recipe: Any = None) -> EncoderModel:  # fmt: skip
        """A fresh model of this architecture trained from scratch on ``data``; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot train shadow copies of itself")

    def capabilities(self) -> frozenset[str]:
        """The optional methods this adapter implements (see the class docstring).

        Example:
            >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
            >>> sorted(TinyClip(TinyClipConfig.for_size("xs")).capabilities())
            ['hidden_states', 'text_tokens', 'train_shadow']
        """
        own = {
            n for n in OPTIONAL_METHODS if getattr(type(self), n) is not getattr(EncoderModel, n)
        }
        return frozenset(own)

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (CPU when there are none)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def fingerprint(self) -> str:
        """A hash of the config and every weight; the engine keys cached outputs on it."""
        return module_fingerprint(self, self.config())

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint (call after changing weights, e.g. in a hardener)."""
        object.__setattr__(self, "_fingerprint_cache", None)


def module_fingerprint(module: nn.Module, config: Mapping[str, Any]) -> str:
    """A hash of ``config`` and every weight of ``module``, memoised on the module.

    Call ``invalidate_fingerprint`` (or clear ``_fingerprint_cache``) after changing weights.
    """
    cached = getattr(module, "_fingerprint_cache", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    fp = h.hexdigest()[:16]
    object.__setattr__(module, "_fingerprint_cache", fp)
    return fp


OPTIONAL_METHODS: tuple[str, ...] = ("hidden_states", "text_tokens", "train_shadow")
"""Methods of :class:`EncoderModel` that an adapter may implement (its capabilities)."""


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a tensor, or every tensor of a dict, to ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def images_to_tensor(images: Sequence[np.ndarray], size: int) -> Tensor:
    """Stack uint8 ``(H, W, 3)`` images into float ``(B, 3, size, size)`` pixels in ``[0, 1]``.

    Images of another size are resized bilinearly (with antialiasing when shrinking).

    Example:
        >>> import numpy as np
        >>> images_to_tensor([np.zeros((8, 8, 3), np.uint8)], 4).shape
        torch.Size([1, 3, 4, 4])
    """
    out = []
    for img in images:
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        t = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).float() / 255.0
        if t.shape[-2:] != (size, size):
            t = nn.functional.interpolate(
                t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )[0]
        out.append(t)
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def tokenize_texts(
    tokenizer: Any,
    texts: Sequence[Any],
    max_length: int,
    *,
    padding: bool | str = True,
    empty_width: int = 0,
) -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask"}`` int64 ``(B, L)`` of strings, by a HF tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the strings; anything else is a :class:`ModelError`.
        max_length: longer texts are truncated.
        padding: the tokenizer's ``padding`` (``True``: to the longest text).
        empty_width: ``L`` of the ``(0, L)`` tensors returned for no texts.
    """
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ModelError(f"Text inputs must be strings, got {bad[0]}.")
    if not texts:
        empty = torch.zeros(0, empty_width, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    enc = tokenizer(
        texts,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


# --------------------------------------------------------------------------- registry

ModelBuilder = Callable[..., EncoderModel]
_REGISTRY: dict[str, tuple[ModelBuilder, str, str]] = {}


def register_model(
    name: str, description: str = "", kind: str = "encoder"
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under ``name``, for models of target ``kind``.

    A name ending in ``:`` is a prefix: ``hf:`` builds ``hf:<id-or-path>`` and receives the part
    after the colon as its first argument.
    """

    def deco(fn: ModelBuilder) -> ModelBuilder:
        doc = description or (fn.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = (fn, doc, kind)
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_descriptions() -> dict[str, tuple[str, str]]:
    """``{name: (target kind, one-line description)}`` for ``mmsafe list-models``."""
    return {n: (k, d) for n, (_, d, k) in sorted(_REGISTRY.items())}


def create_model(name: str, **kwargs: Any) -> EncoderModel:
    """Build a registered model by name (``tiny-clip``, ``hf:<id-or-path>``, ...)."""
    if name in _REGISTRY:
        return _REGISTRY[name][0](**kwargs)
    prefix, sep, rest = name.partition(":")
    if sep and f"{prefix}:" in _REGISTRY:
        return _REGISTRY[f"{prefix}:"][0](rest, **kwargs)
    known = ", ".join(list_models()) or "(none)"
    raise ModelError(f"Unknown model {name!r}. Known models: {known}. See `mmsafe list-models`.")
