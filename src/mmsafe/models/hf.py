"""Hugging Face CLIP and SigLIP dual encoders behind the ``hf:`` prefix.

``create_model("hf:<local-dir-or-hub-id>")`` loads a ``CLIPModel`` or ``SiglipModel`` checkpoint
(the ``model_type`` in its ``config.json`` picks which) with its tokenizer, and wraps it in the
:class:`~mmsafe.models.base.EncoderModel` protocol::

    model = create_model("hf:/models/clip-vit-base-patch32")
    emb = model.encode({"image": model.preprocess("image", images)})

Loading never waits long on a network that is not there: a local directory is checked first, a
hub id is looked up in the local Hugging Face cache first, and the network is only tried when
``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is not set. Every failure is a
:class:`~mmsafe.models.base.ModelError` whose message says what to do.

``transformers`` is imported lazily, so importing this module (and registering ``hf:``) is cheap.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

from mmsafe.models.base import (
    Batch,
    EncoderModel,
    ModelError,
    images_to_tensor,
    register_model,
)
from mmsafe.models.tokens import TextTokens

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's pixel mean (used when a checkpoint ships no ``preprocessor_config.json``)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's pixel standard deviation."""
SIGLIP_MEAN = (0.5, 0.5, 0.5)
"""SigLIP's pixel mean (maps ``[0, 1]`` to ``[-1, 1]``)."""
SIGLIP_STD = (0.5, 0.5, 0.5)
"""SigLIP's pixel standard deviation."""

SUPPORTED_TYPES = ("clip", "siglip")
"""The ``model_type`` values of ``config.json`` that ``hf:`` can load."""

_DEFAULT_NORM = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_TRUE = {"1", "on", "yes", "true"}


# --------------------------------------------------------------------------- pure helpers


def hub_offline(environ: dict[str, str] | None = None) -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbids hub downloads.

    Read on every call (``huggingface_hub`` reads it once at import).

    Example:
        >>> hub_offline({"HF_HUB_OFFLINE": "1"}), hub_offline({})
        (True, False)
    """
    env = os.environ if environ is None else environ
    return any(
        env.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the shape of a hub id (``name`` or ``org/name``) rather than a path.

    Example:
        >>> looks_like_hub_id("openai/clip-vit-base-patch32"), looks_like_hub_id("/models/clip")
        (True, False)
        >>> looks_like_hub_id("./clip"), looks_like_hub_id("a/b/c")
        (False, False)
    """
    return bool(_HUB_ID.match(ref)) and ".." not in ref


def normalisation_constants(
    model_type: str, preprocessor: dict[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pixel ``(mean, std)``: from the image processor config if it has them, else the defaults.

    Example:
        >>> normalisation_constants("siglip")
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> normalisation_constants("clip", {"image_mean": [0.1, 0.2, 0.3], "image_std": 0.5})
        ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    """
    mean, std = _DEFAULT_NORM.get(model_type, _DEFAULT_NORM["clip"])
    pre = preprocessor or {}

    def triple(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
        if value is None:
            return default
        vals = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
        return tuple(vals * 3) if len(vals) == 1 else tuple(vals)

    return triple(pre.get("image_mean"), mean), triple(pre.get("image_std"), std)


def square_size(image_size: int | Sequence[int]) -> int:
    """The side of the square input from a vision config's ``image_size`` (int or ``(H, W)``).

    Example:
        >>> square_size(224), square_size([384, 384])
        (224, 384)
    """
    if isinstance(image_size, int):
        return image_size
    sizes = [int(s) for s in image_size]
    if len(set(sizes)) != 1:
        raise ModelError(f"Only square image inputs are supported, the model wants {sizes}.")
    return sizes[0]


def pooled_embedding(output: Any) -> Tensor:
    """The projected embedding from ``get_image_features`` / ``get_text_features``.

    transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the
    projected embedding (CLIP: after ``visual_projection`` / ``text_projection``; SigLIP: after
    the attention-pooling / text ``head``); older versions return the tensor itself.

    Example:
        >>> import torch
        >>> pooled_embedding(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], Tensor):
        return output[1]  # (last_hidden_state, pooler_output, ...)
    raise ModelError(f"Cannot find the projected embedding in a {type(output).__name__}.")


def endpoint_reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout`` seconds.

    A quick probe before a hub download: ``huggingface_hub`` retries a refused connection with
    back-off for about half a minute, this fails in one attempt.

    Example:
        >>> endpoint_reachable("http://127.0.0.1:9", timeout=1.0)  # the discard port, closed
        False
    """
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return "https://huggingface.co"


def _uses_proxy() -> bool:
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(os.environ.get(n) or os.environ.get(n.lower()) for n in names)


def download_hint(ref: str) -> str:
    """How to get a hub checkpoint onto an offline machine."""
    name = ref.rstrip("/").split("/")[-1] or "model"
    return (
        f"On a machine with network run `hf download {ref} --local-dir {name}` "
        f"(`huggingface-cli download` with huggingface_hub < 1.0), copy the folder here and pass "
        f"`--model hf:/path/to/{name}`; or fill the Hugging Face cache (HF_HOME) there and copy it."
    )


# --------------------------------------------------------------------------- the adapter


class HFClip(EncoderModel):
    """A transformers ``CLIPModel`` or ``SiglipModel`` as an :class:`EncoderModel`.

    Images are preprocessed to ``[0, 1]`` pixels at the vision tower's ``image_size`` (resized,
    not cropped); the mean/std normalisation happens in :meth:`encode_modality`. Text is
    tokenised with the checkpoint's tokenizer, truncated to the text tower's maximum length
    (SigLIP: padded to that length and encoded without an attention mask, as it was trained).

    Attributes:
        model: The wrapped transformers model (in eval mode).
        tokenizer: The checkpoint's tokenizer.
        model_type: ``"clip"`` or ``"siglip"`` (the target kind, ``kind``, is ``"encoder"``).
        source: The local directory (absolute) or hub id it was loaded from.
        image_size: Side of the square pixel input.
        max_length: Token length text is truncated (SigLIP: padded) to.
        image_mean: Pixel mean used to normalise images.
        image_std: Pixel standard deviation used to normalise images.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        source: str,
        image_mean: Sequence[float],
        image_std: Sequence[float],
    ) -> None:
        super().__init__()
        cfg = model.config
        kind = str(cfg.model_type)
        if kind not in SUPPORTED_TYPES:
            raise ModelError(
                f"hf: supports {', '.join(SUPPORTED_TYPES)} checkpoints, not model_type {kind!r}."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_type = kind
        self.source = source
        self.name = f"hf:{source}"
        self.image_size = square_size(cfg.vision_config.image_size)
        max_len = int(cfg.text_config.max_position_embeddings)
        tok_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < max_len:
            max_len = tok_max
        self.max_length = max_len
        if kind == "clip":
            self.embed_dim = int(model.visual_projection.out_features)
        else:
            self.embed_dim = int(model.text_model.head.out_features)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ModelError(f"image_mean/image_std need 3 values, got {image_mean}, {image_std}.")
        self.register_buffer(
            "pixel_mean", torch.tensor(list(image_mean), dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.register_buffer(
            "pixel_std", torch.tensor(list(image_std), dtype=torch.float32).view(1, 3, 1, 1)
        )

    # -- protocol ----------------------------------------------------------------------------

    def preprocess(self, modality: str, values: Sequence[Any]) -> Batch:
        """Images to ``(B, 3, S, S)`` pixels in ``[0, 1]``; text to ids and attention mask.

        Args:
            modality: ``"image"`` or ``"text"``.
            values: uint8 ``(H, W, 3)`` arrays, or strings.

        Returns:
            A CPU tensor (images) or ``{"input_ids", "attention_mask"}`` LongTensors (text).
        """
        if modality == "image":
            return images_to_tensor(values, self.image_size)
        if modality == "text":
            texts = list(values)
            bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
            if bad:
                raise ModelError(f"Text inputs must be strings, got {bad[0]}.")
            if not texts:
                empty = torch.zeros(0, self.max_length, dtype=torch.long)
                return {"input_ids": empty, "attention_mask": empty.clone()}
            enc = self.tokenizer(
                texts,
                padding="max_length" if self.model_type == "siglip" else True,
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=True,
                return_tensors="pt",
            )
            return {
                "input_ids": enc["input_ids"].long(),
                "attention_mask": enc["attention_mask"].long(),
            }
        raise ModelError(f"{self.name} has modalities image and text, not {modality!r}.")

    def _pixels(self, batch: Batch) -> Tensor:
        if not isinstance(batch, Tensor):
            raise ModelError("An image batch must be a (B, 3, S, S) tensor from preprocess().")
        x = batch.to(self.pixel_mean.device, torch.float32)
        return ((x - self.pixel_mean) / self.pixel_std).to(self._dtype)

    def _text_args(self, batch: Batch) -> dict[str, Tensor | None]:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ModelError(
                "A text batch must be {'input_ids', 'attention_mask'} from preprocess()."
            )
        ids = batch["input_ids"].to(self.pixel_mean.device)
        mask = batch.get("attention_mask")
        # SigLIP was trained on max-length padded text without an attention mask.
        use_mask = self.model_type == "clip" and mask is not None
        return {"input_ids": ids, "attention_mask": mask.to(ids.device) if use_mask else None}

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode_modality(self, modality: str, batch: Batch) -> Tensor:
        """Projected (unnormalised) embeddings ``(B, embed_dim)`` of one modality."""
        if modality == "image":
            pixels = self._pixels(batch)
            if pixels.shape[0] == 0:
                return pixels.new_zeros(0, self.embed_dim)
            return pooled_embedding(self.model.get_image_features(pixel_values=pixels))
        if modality == "text":
            args = self._text_args(batch)
            if args["input_ids"].shape[0] == 0:
                return torch.zeros(0, self.embed_dim, device=self.pixel_mean.device)
            return pooled_embedding(self.model.get_text_features(**args))
        raise ModelError(f"{self.name} has modalities image and text, not {modality!r}.")

    def text_tokens(self) -> TextTokens:
        """Token facts from the tokenizer and text config (see :class:`TextTokens`)."""
        return TextTokens(self)

    def hidden_states(self, modality: str, batch: Batch) -> list[Tensor]:
        """Hidden states of one tower: the embeddings output then one per layer (``L + 1``)."""
        if modality == "image":
            out = self.model.vision_model(
                pixel_values=self._pixels(batch), output_hidden_states=True
            )
        elif modality == "text":
            out = self.model.text_model(**self._text_args(batch), output_hidden_states=True)
        else:
            raise ModelError(f"{self.name} has modalities image and text, not {modality!r}.")
        return list(out.hidden_states)

    @property
    def input_size(self) -> int:  # noqa: D102
        return self.image_size

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint (CLIP and SigLIP alike)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def logit_bias(self) -> float:
        """SigLIP's additive logit bias (``0.0`` for CLIP)."""
        bias = getattr(self.model, "logit_bias", None)
        return float(bias.detach().float().reshape(-1)[0]) if bias is not None else 0.0

    def config(self) -> dict[str, Any]:
        """Model type, source, dims and preprocessing: JSON-able, shown in the safety card."""
        cfg = self.model.config
        vis, txt = cfg.vision_config, cfg.text_config
        return {
            "type": "hf",
            "model_type": self.model_type,
            "source": self.source,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "patch_size": int(vis.patch_size),
            "max_length": self.max_length,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "vision": {"hidden_size": int(vis.hidden_size), "layers": int(vis.num_hidden_layers)},
            "text": {
                "hidden_size": int(txt.hidden_size),
                "layers": int(txt.num_hidden_layers),
                "vocab_size": int(txt.vocab_size),
            },
            "tokenizer": type(self.tokenizer).__name__,
        }


# --------------------------------------------------------------------------- loading


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def _load(ref: str, *, local_only: bool) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """Load config-dispatched model, tokenizer and preprocessor config (may raise anything)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

    config = AutoConfig.from_pretrained(ref, local_files_only=local_only)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise ModelError(
            f"{ref!r} is a {kind!r} checkpoint; hf: loads CLIP and SigLIP dual encoders "
            f"(config.json model_type one of {', '.join(SUPPORTED_TYPES)})."
        )
    cls = CLIPModel if kind == "clip" else SiglipModel
    model = cls.from_pretrained(
        ref, config=config, dtype=torch.float32, local_files_only=local_only
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
    except ImportError as err:
        raise ModelError(
            f"The tokenizer of {ref!r} needs a package that is not installed ({_first_line(err)}). "
            "SigLIP's SentencePiece tokenizer needs `pip install sentencepiece`."
        ) from err
    return model, tokenizer, _preprocessor_config(ref, local_only=local_only)


def _preprocessor_config(ref: str, *, local_only: bool) -> dict[str, Any] | None:
    """``preprocessor_config.json`` of a local dir or hub id, or ``None`` if there is none."""
    path: Path | None = Path(ref) / "preprocessor_config.json"
    if not path.is_file():
        path = None
        if looks_like_hub_id(ref) and not Path(ref).exists():
            try:
                from huggingface_hub import hf_hub_download

                path = Path(
                    hf_hub_download(ref, "preprocessor_config.json", local_files_only=local_only)
                )
            except Exception:  # noqa: BLE001 - optional file: fall back to the defaults
                path = None
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _local_dir(ref: str) -> Path:
    """Validate a local checkpoint directory (exists, is a directory, has config.json)."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"hf:{ref} is a file, not a checkpoint directory. Pass the folder that holds "
            "config.json, the weights (model.safetensors) and the tokenizer files."
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"hf:{ref} exists but has no config.json, so it is not a Hugging Face checkpoint. "
            "Pass the folder that holds config.json, the weights and the tokenizer files (as "
            "written by `hf download <id> --local-dir DIR` or `save_pretrained`)."
        )
    return path.resolve()


def _wrap(model: nn.Module, tokenizer: Any, pre: dict[str, Any] | None, source: str) -> HFClip:
    mean, std = normalisation_constants(str(model.config.model_type), pre)
    return HFClip(model, tokenizer, source=source, image_mean=mean, image_std=std)


@register_model("hf:", "Hugging Face CLIP / SigLIP: hf:<local-dir> or hf:<hub-id>")
def build_hf(id_or_path: str = "", *, device: str = "cpu", **_: Any) -> HFClip:
    """Hugging Face CLIP / SigLIP from a local directory or a hub id.

    Args:
        id_or_path: A checkpoint directory (with ``config.json``) or a hub id such as
            ``openai/clip-vit-base-patch32``.
        device: Torch device to put the model on.

    Returns:
        The wrapped model in eval mode.

    Raises:
        ModelError: The path does not exist or is not a checkpoint, the hub id is neither cached
            nor downloadable (offline), or the checkpoint is not CLIP / SigLIP.
    """
    ref = id_or_path.strip()
    if not ref:
        raise ModelError(
            "hf: needs a checkpoint directory or a hub id, e.g. hf:/models/clip-vit-base-patch32 "
            "or hf:openai/clip-vit-base-patch32."
        )
    if Path(ref).expanduser().exists():
        path = _local_dir(ref)
        try:
            model, tokenizer, pre = _load(str(path), local_only=True)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear message
            raise ModelError(
                f"Could not load the checkpoint in {str(path)!r} ({_first_line(err)}). It needs "
                "config.json, the weights (model.safetensors or pytorch_model.bin) and the "
                "tokenizer files; re-download it with `hf download <id> --local-dir "
                f"{str(path)!r}`."
            ) from err
        source = str(path)
    elif not looks_like_hub_id(ref):
        raise ModelError(
            f"hf:{ref}: the path {ref!r} does not exist on this machine (and it is not a hub id "
            "of the form org/name). Check the path, or download the checkpoint on a machine with "
            "network with `hf download <org/name> --local-dir DIR` and pass "
            "`--model hf:DIR`."
        )
    else:
        model, tokenizer, pre = _load_hub(ref)
        source = ref
    return _wrap(model, tokenizer, pre, source).to(device)


def _load_hub(ref: str) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """A hub id: the local cache first, then (unless offline) the network."""
    try:
        return _load(ref, local_only=True)
    except ModelError:
        raise
    except Exception as cached_err:  # noqa: BLE001 - not (fully) in the cache
        if hub_offline():
            raise ModelError(
                f"hf:{ref}: there is no local directory {ref!r} and the hub id is not in the "
                "Hugging Face cache; downloads are off because HF_HUB_OFFLINE (or "
                "TRANSFORMERS_OFFLINE) is set, and a hub download needs network anyway. "
                + download_hint(ref)
            ) from cached_err
    endpoint = _hub_endpoint()
    if not _uses_proxy() and not endpoint_reachable(endpoint):
        raise ModelError(
            f"hf:{ref}: there is no local directory {ref!r}, the hub id is not in the Hugging "
            f"Face cache, and the hub ({endpoint}) cannot be reached from this machine: a hub "
            "download needs network. " + download_hint(ref)
        )
    try:
        return _load(ref, local_only=False)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - network or unknown id
        raise ModelError(
            f"hf:{ref}: there is no local directory {ref!r}, the hub id is not in the Hugging "
            f"Face cache, and downloading it failed ({_first_line(err)}). A hub download needs "
            "network and an existing repository id (check the spelling). " + download_hint(ref)
        ) from err


def logits(model: HFClip, image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Image-text logits ``scale * cos + bias`` as the checkpoint computes them.

    Example:
        >>> import torch
        >>> class M:
        ...     logit_scale, logit_bias = 10.0, -1.0
        >>> logits(M(), torch.eye(2), torch.eye(2)).tolist()
        [[9.0, -1.0], [-1.0, 9.0]]
    """
    return model.logit_scale * image_emb @ text_emb.T + model.logit_bias


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "SUPPORTED_TYPES",
    "HFClip",
    "build_hf",
    "download_hint",
    "endpoint_reachable",
    "hub_offline",
    "logits",
    "looks_like_hub_id",
    "normalisation_constants",
    "pooled_embedding",
    "square_size",
]
