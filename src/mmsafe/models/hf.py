"""Hugging Face CLIP and SigLIP dual encoders behind the ``hf:`` prefix.

``create_model("hf:<local-dir-or-hub-id>")`` loads a ``CLIPModel`` or ``SiglipModel`` checkpoint
(the ``model_type`` in its ``config.json`` picks which) with its tokenizer and image processor
settings, and wraps it in the :class:`~mmsafe.models.base.EncoderModel` protocol::

    model = create_model("hf:/models/clip-vit-base-patch32")
    emb = model.encode({"image": model.preprocess("image", images)})

Images go through the checkpoint's own image pipeline: the size, resize filter, crop and pixel
mean/std of its ``preprocessor_config.json`` (or the ``image_processor`` entry of the
``processor_config.json`` that transformers 5 writes), validated field by field. A checkpoint
without either is an error, not a silent fallback to CLIP's constants; ``default_preprocessing``
opts in to the standard ones.

Weights are read from ``model.safetensors`` whenever the checkpoint has one; a checkpoint with
only ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, which refuses pickled
objects other than tensors and plain containers, so loading never runs code from the file.

Loading never waits long on a network that is not there: a local directory is checked first, a
hub id is looked up in the local Hugging Face cache first, and the network is only tried when
``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is not set. Every failure is a
:class:`~mmsafe.models.base.ModelError` whose message says what to do.

``transformers`` is imported lazily, so importing this module (and registering ``hf:``) is cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.models.base import (
    Batch,
    EncoderModel,
    ModelError,
    images_to_tensor,
    register_model,
    tokenize_texts,
)
from mmsafe.models.tokens import TextTokens

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's pixel mean (of the standard pipeline, :func:`default_preprocessor_config`)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's pixel standard deviation."""
SIGLIP_MEAN = (0.5, 0.5, 0.5)
"""SigLIP's pixel mean (maps ``[0, 1]`` to ``[-1, 1]``)."""
SIGLIP_STD = (0.5, 0.5, 0.5)
"""SigLIP's pixel standard deviation."""

SUPPORTED_TYPES = ("clip", "siglip")
"""The ``model_type`` values of ``config.json`` that ``hf:`` can load."""

PREPROCESSOR_FILE = "preprocessor_config.json"
"""A hub checkpoint's image settings (what ``ImageProcessor.save_pretrained`` writes)."""
PROCESSOR_FILE = "processor_config.json"
"""What transformers 5's ``Processor.save_pretrained`` writes (images: ``image_processor``)."""
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
"""Weight files read with safetensors (no pickle), preferred whenever one is there."""
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
"""Legacy weight files, read only with ``torch.load(weights_only=True)``."""

IMAGE_PROCESSORS = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}
"""The transformers image processor of each model type (used when the file names none)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_TRUE = {"1", "on", "yes", "true"}
_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_TYPE_KEYS = ("image_processor_type", "feature_extractor_type")


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


def default_preprocessor_config(model_type: str, image_size: int) -> dict[str, Any]:
    """The standard image pipeline of CLIP or SigLIP at ``image_size``, as preprocessor_config.json.

    CLIP: resize the shortest edge to ``image_size`` (bicubic), centre-crop a square, normalise
    with OpenAI's mean/std. SigLIP: resize to ``image_size`` square (bicubic), normalise to
    ``[-1, 1]``. This is what ``default_preprocessing=True`` uses for a checkpoint without a
    preprocessing file, and what the missing-file error tells you to write.

    Example:
        >>> default_preprocessor_config("siglip", 224)["size"]
        {'height': 224, 'width': 224}
        >>> default_preprocessor_config("clip", 224)["crop_size"]
        {'height': 224, 'width': 224}
    """
    if model_type == "siglip":
        return {
            "image_processor_type": IMAGE_PROCESSORS["siglip"],
            "size": {"height": image_size, "width": image_size},
            "resample": 3,
            "image_mean": list(SIGLIP_MEAN),
            "image_std": list(SIGLIP_STD),
        }
    return {
        "image_processor_type": IMAGE_PROCESSORS["clip"],
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "resample": 3,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_preprocessor_fields(data: Any, where: str, model_type: str = "clip") -> str:
    """Validate image processor settings field by field; return the image processor's name.

    Args:
        data: The parsed JSON (the whole ``preprocessor_config.json``, or the ``image_processor``
            entry of ``processor_config.json``).
        where: How to name the file (and entry) in error messages.
        model_type: ``clip`` or ``siglip``: picks the processor when the file names none.

    Returns:
        ``"CLIPImageProcessor"`` or ``"SiglipImageProcessor"``.

    Raises:
        ModelError: Naming ``where`` and the field: a missing ``image_mean`` / ``image_std``, a
            value of the wrong type or range, or an image processor ``hf:`` does not support.

    Example:
        >>> check_preprocessor_fields({"image_mean": 0.5, "image_std": 0.5}, "p.json", "siglip")
        'SiglipImageProcessor'
        >>> check_preprocessor_fields({"image_mean": [0.5] * 3}, "p.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mmsafe.models.base.ModelError: p.json has no field image_std: ...pixel std...
    """
    if not isinstance(data, dict):
        raise ModelError(
            f"{where} must be a JSON object of image processor settings (image_mean, image_std, "
            f"size, ...), not a JSON {type(data).__name__}."
        )

    def bad(field: str, want: str) -> ModelError:
        return ModelError(
            f"{where}: field {field} is {json.dumps(data[field])}; it must be {want}. Fix the "
            f"field, or copy {PREPROCESSOR_FILE} again from where the checkpoint came from."
        )

    for flag in _FLAGS:
        if flag in data and not isinstance(data[flag], bool):
            raise bad(flag, "true or false")
    if data.get("do_normalize", True):
        clip = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        for field in ("image_mean", "image_std"):
            if field not in data:
                raise ModelError(
                    f"{where} has no field {field}: the per-channel pixel {field[6:]} the "
                    "checkpoint was trained with, which hf: does not guess. Add it (e.g. "
                    f'"{field}": {json.dumps(list(clip[field]))} for OpenAI CLIP, '
                    f"{json.dumps([0.5] * 3)} for SigLIP), or copy "
                    f"{PREPROCESSOR_FILE} again from where the checkpoint came from."
                )
            value = data[field]
            values = value if isinstance(value, list) else [value]
            if len(values) not in (1, 3) or not all(_is_number(v) for v in values):
                raise bad(field, "a number or a list of 3 numbers (one per RGB channel)")
            if field == "image_std" and not all(v > 0 for v in values):
                raise bad(field, "positive (it divides the pixels)")
    if "rescale_factor" in data and not (
        _is_number(data["rescale_factor"]) and data["rescale_factor"] > 0
    ):
        raise bad("rescale_factor", "a positive number (1/255 maps 0-255 pixels to [0, 1])")
    if "resample" in data and not (
        isinstance(data["resample"], int)
        and not isinstance(data["resample"], bool)
        and data["resample"] in _RESAMPLE
    ):
        names = ", ".join(f"{k} ({v})" for k, v in _RESAMPLE.items())
        raise bad("resample", f"a PIL resampling filter number: {names}")
    for field, keys in (("size", ("shortest_edge", "height")), ("crop_size", ("height",))):
        if field not in data:
            continue
        value = data[field]
        ok = _is_side(value) or (
            isinstance(value, list) and len(value) == 2 and all(_is_side(v) for v in value)
        )
        if isinstance(value, dict):
            shape = set(value)
            ok = (
                shape == {"height", "width"}
                or ("shortest_edge" in keys and shape == {"shortest_edge"})
            ) and all(_is_side(v) for v in value.values())
        if not ok:
            forms = '{"height": H, "width": W}'
            if "shortest_edge" in keys:
                forms = '{"shortest_edge": S}, ' + forms
            raise bad(field, f"a positive integer, {forms} or [H, W]")
    for key in _TYPE_KEYS:
        if key in data:
            name = data[key]
            base = name.removesuffix("Fast").removesuffix("Pil") if isinstance(name, str) else ""
            if base.endswith("FeatureExtractor"):  # the name before transformers 4.27
                base = base.removesuffix("FeatureExtractor") + "ImageProcessor"
            if base not in IMAGE_PROCESSORS.values():
                raise bad(key, f"one of {', '.join(IMAGE_PROCESSORS.values())} (hf: loads CLIP "
                          "and SigLIP image pipelines)")  # fmt: skip
            return base
    return IMAGE_PROCESSORS.get(model_type, IMAGE_PROCESSORS["clip"])


@dataclass(frozen=True)
class ImagePreprocessing:
    """A checkpoint's image pipeline: its image processor resizes and crops, then we normalise.

    ``preprocess`` runs ``processor`` with normalisation off (pixels in ``[0, 1]``, the side
    ``side``), and ``encode`` computes ``(pixels * pixel_scale - image_mean) / image_std``: the
    same numbers the checkpoint's processor feeds the model, split where attacks need pixels.

    Attributes:
        processor: The transformers image processor (PIL backend) built from the file.
        side: Side of the square it produces (the vision tower's ``image_size``).
        image_mean: Per-channel mean (``0`` when the file turns normalisation off).
        image_std: Per-channel standard deviation (``1`` when normalisation is off).
        pixel_scale: ``255 * rescale_factor`` (``255`` when the file turns rescaling off).
        source: The file it came from (``preprocessor_config.json``, ``processor_config.json``)
            or ``"default"`` (``default_preprocessing=True`` on a checkpoint without one).
    """

    processor: Any
    side: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pixel_scale: float
    source: str

    def describe(self) -> dict[str, Any]:
        """JSON-able settings for the model's ``config()`` (and so its fingerprint)."""
        proc = self.processor
        size = {k: v for k, v in dict(proc.size or {}).items() if v is not None}
        return {
            "source": self.source,
            "processor": type(proc).__name__,
            "resize": size,
            "resample": _RESAMPLE[int(proc.resample)],
            "center_crop": bool(getattr(proc, "do_center_crop", False)),
            "side": self.side,
            "pixel_scale": self.pixel_scale,
        }

    def __call__(self, arrays: list[np.ndarray]) -> Tensor:
        """Resize and crop uint8 RGB arrays with the processor: ``(B, 3, side, side)`` in [0, 1]."""
        if not arrays:
            return torch.zeros(0, 3, self.side, self.side)
        out = self.processor(
            images=arrays,
            do_normalize=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            return_tensors="pt",
            input_data_format="channels_last",
        )
        return out["pixel_values"].float()


def _image_processor_class(name: str) -> Any:
    """The PIL-backed transformers class of ``name`` (no torchvision needed)."""
    import transformers

    # transformers 5: <Name>Pil is the PIL backend, <Name> the torchvision one; 4.x: <Name> is PIL.
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def image_preprocessing(
    data: dict[str, Any], *, where: str, model_type: str, image_size: int, source: str
) -> ImagePreprocessing:
    """Validate image processor settings and build the pipeline, checked against the model.

    Args:
        data: The settings (see :func:`check_preprocessor_fields`).
        where: The file (and entry) to name in error messages.
        model_type: ``clip`` or ``siglip``.
        image_size: ``vision_config.image_size`` of the checkpoint's ``config.json``.
        source: What :attr:`ImagePreprocessing.source` records.

    Raises:
        ModelError: A field is invalid, the pipeline does not make square inputs, or their side
            is not the vision tower's ``image_size``.
    """
    name = check_preprocessor_fields(data, where, model_type)
    try:
        proc = _image_processor_class(name).from_dict(dict(data))
    except Exception as err:  # noqa: BLE001 - transformers' own validation, named
        raise ModelError(
            f"{where}: transformers cannot build a {name} from it ({_first_line(err)}). Fix the "
            f"file, or copy {PREPROCESSOR_FILE} again from where the checkpoint came from."
        ) from err
    if not proc.do_resize:
        raise ModelError(
            f"{where}: field do_resize is false, so images would reach the model at whatever "
            f"size they have; hf: needs them at the vision tower's {image_size}x{image_size}. "
            "Set do_resize to true with a size."
        )
    # transformers 5 keeps sizes in a SizeDict, 4.x in a dict: read both as dicts.
    size, crop = dict(proc.size or {}), dict(getattr(proc, "crop_size", None) or {})
    if getattr(proc, "do_center_crop", False):
        field, height, width = "crop_size", crop.get("height"), crop.get("width")
    elif size.get("height") is not None and size.get("width") is not None:
        field, height, width = "size", size["height"], size["width"]
    else:
        raise ModelError(
            f"{where}: field size {json.dumps(data.get('size'))} without a centre crop keeps each "
            "image's aspect ratio, so the inputs would not be square; set do_center_crop to "
            'true with a square crop_size, or size to {"height": S, "width": S}.'
        )
    if height is None or width is None:
        raise ModelError(
            f"{where}: field do_center_crop is true but there is no crop_size; add "
            f'"crop_size": {{"height": {image_size}, "width": {image_size}}}.'
        )
    if height != width:
        raise ModelError(
            f"{where}: field {field} is {height}x{width} (height x width); hf: supports square "
            f"inputs only, and this model's vision tower takes {image_size}x{image_size}."
        )
    if height != image_size:
        raise ModelError(
            f"{where}: field {field} makes {height}x{height} inputs, but config.json's "
            f"vision_config.image_size is {image_size} (the side its position embeddings fit). "
            "The two files come from different checkpoints: copy them from the same one."
        )

    def triple(value: Any) -> tuple[float, float, float]:
        vals = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
        a, b, c = vals * 3 if len(vals) == 1 else vals
        return a, b, c

    norm = proc.do_normalize
    return ImagePreprocessing(
        processor=proc,
        side=int(height),
        image_mean=triple(proc.image_mean) if norm else (0.0, 0.0, 0.0),
        image_std=triple(proc.image_std) if norm else (1.0, 1.0, 1.0),
        pixel_scale=255.0 * float(proc.rescale_factor) if proc.do_rescale else 255.0,
        source=source,
    )


def rgb_uint8(image: Any) -> np.ndarray:
    """One image as a ``(H, W, 3)`` uint8 array: grey is repeated, alpha dropped.

    Non-uint8 values are taken to be on the 0-255 scale (as :func:`images_to_tensor` does), then
    rounded and clipped, so the image processor never guesses their range.

    Example:
        >>> rgb_uint8(np.full((2, 2), 7.6)).shape, int(rgb_uint8(np.full((2, 2), 7.6))[0, 0, 0])
        ((2, 2, 3), 8)
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ModelError(f"An image must be an (H, W, 3) array, got shape {tuple(arr.shape)}.")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


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

    Images are preprocessed to ``[0, 1]`` pixels at the vision tower's ``image_size`` by the
    checkpoint's own image pipeline (``preprocessing``: its resize filter, size and crop); the
    mean/std normalisation happens in :meth:`encode_modality`. Built without ``preprocessing``
    (random test models), images are resized bilinearly, not cropped, and normalised with the
    given ``image_mean`` / ``image_std``. Text is tokenised with the checkpoint's tokenizer,
    truncated to the text tower's maximum length (SigLIP: padded to that length and encoded
    without an attention mask, as it was trained).

    Attributes:
        model: The wrapped transformers model (in eval mode).
        tokenizer: The checkpoint's tokenizer.
        model_type: ``"clip"`` or ``"siglip"`` (the target kind, ``kind``, is ``"encoder"``).
        source: The local directory (absolute) or hub id it was loaded from.
        image_size: Side of the square pixel input.
        max_length: Token length text is truncated (SigLIP: padded) to.
        image_mean: Pixel mean used to normalise images.
        image_std: Pixel standard deviation used to normalise images.
        preprocessing: The checkpoint's image pipeline, or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        source: str,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        preprocessing: ImagePreprocessing | None = None,
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
        self.preprocessing = preprocessing
        if preprocessing is not None:
            if image_mean is not None or image_std is not None:
                raise ModelError("Pass image_mean/image_std or preprocessing, not both.")
            if preprocessing.side != self.image_size:
                raise ModelError(
                    f"The image pipeline makes {preprocessing.side}-pixel inputs, the vision "
                    f"tower takes {self.image_size}."
                )
            image_mean, image_std = preprocessing.image_mean, preprocessing.image_std
        if image_mean is None or image_std is None:
            raise ModelError("HFClip needs image_mean and image_std, or preprocessing.")
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ModelError(f"image_mean/image_std need 3 values, got {image_mean}, {image_std}.")
        self.pixel_scale = 1.0 if preprocessing is None else float(preprocessing.pixel_scale)
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
            if self.preprocessing is None:
                return images_to_tensor(values, self.image_size)
            return self.preprocessing([rgb_uint8(v) for v in values])
        if modality == "text":
            pad, width = ("max_length" if self.model_type == "siglip" else True), self.max_length
            return tokenize_texts(self.tokenizer, values, width, padding=pad, empty_width=width)
        raise ModelError(f"{self.name} has modalities image and text, not {modality!r}.")

    def _pixels(self, batch: Batch) -> Tensor:
        if not isinstance(batch, Tensor):
            raise ModelError("An image batch must be a (B, 3, S, S) tensor from preprocess().")
        x = batch.to(self.pixel_mean.device, torch.float32)
        if self.pixel_scale != 1.0:
            x = x * self.pixel_scale
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
            "preprocessing": (
                None if self.preprocessing is None else self.preprocessing.describe()
            ),
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


class _NotCached(FileNotFoundError):
    """A hub checkpoint's image settings are not in the local cache (try the network next)."""


def _read_json(path: Path, where: str) -> Any:
    """Parse a JSON file; every failure is a ModelError naming ``where`` and what to do."""
    again = "copy it again from where the checkpoint came from"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelError(
            f"{where} is not UTF-8 text ({err.reason} at byte {err.start}), so not JSON; {again}."
        ) from err
    except OSError as err:
        raise ModelError(
            f"{where} cannot be read ({_first_line(err)}). Check that it is a readable file, or "
            f"{again}."
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(
            f"{where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). "
            f"Fix it, or {again}."
        ) from err


def _hub_file(ref: str, name: str, *, local_only: bool) -> Path | None:
    """A file of hub repo ``ref`` from the cache (or the hub); ``None`` when it is not there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(ref, name, local_files_only=local_only))
    except EntryNotFoundError:  # not in the repo, or (LocalEntryNotFoundError) not cached
        return None


def _missing_preprocessing(ref: str, local_dir: Path | None, model_type: str, side: int) -> str:
    standard = json.dumps(default_preprocessor_config(model_type, side))
    family = "SigLIP" if model_type == "siglip" else "OpenAI CLIP"
    if local_dir is not None:
        where, folder = str(local_dir), str(local_dir)
        fetch = f"`hf download <org/name> {PREPROCESSOR_FILE} --local-dir {folder}`"
    else:
        where, folder = f"The hub repository {ref}", "DIR"
        fetch = f"`hf download {ref} --local-dir DIR`, then pass `--model hf:DIR`"
    return (
        f"{where} has no {PREPROCESSOR_FILE} (nor a {PROCESSOR_FILE} with an image_processor "
        "entry), so the image size, resize filter, crop and pixel mean/std the checkpoint was "
        "trained with are unknown; hf: does not guess them, since wrong ones quietly skew every "
        f"metric. Copy the file from where the checkpoint came from ({fetch}). If the checkpoint "
        f"was trained with the standard {family} preprocessing, save this as "
        f"{folder}/{PREPROCESSOR_FILE}: {standard} (from Python, "
        "`create_model(..., default_preprocessing=True)` uses it without the file)."
    )


def _preprocessing(
    ref: str,
    *,
    local_dir: Path | None,
    local_only: bool,
    model_type: str,
    image_size: int,
    default: bool,
) -> ImagePreprocessing:
    """The checkpoint's image pipeline, read as transformers does; no silent fallback.

    transformers 5 reads the ``image_processor`` entry of ``processor_config.json`` first, then
    ``preprocessor_config.json`` (which hub checkpoints ship); so does this.
    """
    names = (PROCESSOR_FILE, PREPROCESSOR_FILE)
    if local_dir is not None:
        files = [local_dir / n if (local_dir / n).exists() else None for n in names]
    else:
        files = [_hub_file(ref, n, local_only=local_only) for n in names]

    def name(path: Path, file: str) -> str:
        return str(path) if local_dir is not None else f"{file} of the hub repository {ref}"

    kwargs = {"model_type": model_type, "image_size": image_size}
    proc_file, pre_file = files
    if proc_file is not None:
        where = name(proc_file, PROCESSOR_FILE)
        data = _read_json(proc_file, where)
        if not isinstance(data, dict):
            raise ModelError(
                f"{where} must be a JSON object (with an image_processor entry), not a JSON "
                f"{type(data).__name__}; copy it again from where the checkpoint came from."
            )
        if "image_processor" in data:
            return image_preprocessing(
                data["image_processor"],
                where=f"{where}, entry image_processor",
                source=PROCESSOR_FILE,
                **kwargs,
            )
    if pre_file is not None:
        where = name(pre_file, PREPROCESSOR_FILE)
        return image_preprocessing(
            _read_json(pre_file, where), where=where, source=PREPROCESSOR_FILE, **kwargs
        )
    if default:
        return image_preprocessing(
            default_preprocessor_config(model_type, image_size),
            where="the default preprocessing",
            source="default",
            **kwargs,
        )
    if local_dir is None and local_only:
        raise _NotCached(f"the cache holds no {PREPROCESSOR_FILE} of {ref}")
    raise ModelError(_missing_preprocessing(ref, local_dir, model_type, image_size))


def _torch_version() -> tuple[int, int]:
    major, minor = (int(re.match(r"\d+", p)[0]) for p in torch.__version__.split(".")[:2])
    return major, minor


def _weight_kwargs(cls: Any, local_dir: Path | None) -> dict[str, Any]:
    """How ``from_pretrained`` reads the weights: safetensors first, a ``.bin`` weights-only.

    A local directory with ``model.safetensors`` (or its shard index) is read with safetensors
    only (``use_safetensors=True``), even when a ``pytorch_model.bin`` lies beside it. Without
    one, and for hub ids (where transformers itself prefers safetensors), a ``.bin`` is read
    with ``torch.load(weights_only=True)``, which transformers 5 passes through; torch >= 2.6
    is needed for that to be safe (CVE-2025-32434).
    """
    if local_dir is not None:
        if any((local_dir / n).is_file() for n in SAFE_WEIGHTS):
            return {"use_safetensors": True}
        if not any((local_dir / n).is_file() for n in PICKLE_WEIGHTS):
            raise ModelError(
                f"{local_dir} has no weights: hf: reads {SAFE_WEIGHTS[0]} (or the shards listed "
                f"in {SAFE_WEIGHTS[1]}), or a legacy {PICKLE_WEIGHTS[0]}. Copy the weight files "
                "from where the checkpoint came from (`hf download <org/name> --local-dir "
                f"{local_dir}`)."
            )
    import inspect

    import transformers

    if "weights_only" not in inspect.signature(cls.from_pretrained).parameters:
        raise ModelError(
            f"transformers {transformers.__version__} cannot be told to load {PICKLE_WEIGHTS[0]} "
            "weights-only; upgrade it (`pip install -U transformers`), or use a checkpoint with "
            f"{SAFE_WEIGHTS[0]}."
        )
    if _torch_version() < (2, 6):
        raise ModelError(
            f"torch {torch.__version__} cannot load {PICKLE_WEIGHTS[0]} safely even weights-only "
            f"(CVE-2025-32434); upgrade torch to 2.6 or later, or use {SAFE_WEIGHTS[0]}."
        )
    kwargs: dict[str, Any] = {"weights_only": True}
    if local_dir is not None:
        kwargs["use_safetensors"] = False
    return kwargs


def _unpickling_error(err: BaseException) -> BaseException | None:
    import pickle

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, pickle.UnpicklingError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _load(
    ref: str, *, local_dir: Path | None, local_only: bool, default_preprocessing: bool = False
) -> tuple[nn.Module, Any, ImagePreprocessing]:
    """Config-dispatched model, tokenizer and image pipeline (may raise anything)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

    config = AutoConfig.from_pretrained(ref, local_files_only=local_only, trust_remote_code=False)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise ModelError(
            f"{ref!r} is a {kind!r} checkpoint; hf: loads CLIP and SigLIP dual encoders "
            f"(config.json model_type one of {', '.join(SUPPORTED_TYPES)})."
        )
    preprocessing = _preprocessing(  # before the weights: a bad file fails fast
        ref,
        local_dir=local_dir,
        local_only=local_only,
        model_type=str(kind),
        image_size=square_size(config.vision_config.image_size),
        default=default_preprocessing,
    )
    cls = CLIPModel if kind == "clip" else SiglipModel
    weights = _weight_kwargs(cls, local_dir)
    try:
        model = cls.from_pretrained(
            ref, config=config, dtype=torch.float32, local_files_only=local_only, **weights
        )
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a refused pickle
        refused = _unpickling_error(err)
        if refused is None:
            raise
        where = str(local_dir / PICKLE_WEIGHTS[0]) if local_dir else f"the weights of {ref}"
        raise ModelError(
            f"{where} holds pickled objects other than tensors ({_first_line(refused)[:200]}), "
            "and hf: loads .bin weights only with torch.load(weights_only=True): unpickling "
            f"anything else can run code. Get the checkpoint as {SAFE_WEIGHTS[0]} from a source "
            "you trust (the hub converts most repositories), or convert the file on a machine "
            "where you trust it."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref, local_files_only=local_only, trust_remote_code=False
        )
    except ImportError as err:
        raise ModelError(
            f"The tokenizer of {ref!r} needs a package that is not installed ({_first_line(err)}). "
            "SigLIP's SentencePiece tokenizer needs `pip install sentencepiece protobuf`."
        ) from err
    return model, tokenizer, preprocessing


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


@register_model("hf:", "Hugging Face CLIP / SigLIP: hf:<local-dir> or hf:<hub-id>")
def build_hf(
    id_or_path: str = "",
    *,
    device: str = "cpu",
    default_preprocessing: bool = False,
    **_: Any,
) -> HFClip:
    """Hugging Face CLIP / SigLIP from a local directory or a hub id.

    Args:
        id_or_path: A checkpoint directory (with ``config.json``) or a hub id such as
            ``openai/clip-vit-base-patch32``.
        device: Torch device to put the model on.
        default_preprocessing: For a checkpoint without ``preprocessor_config.json`` (or a
            ``processor_config.json`` with an ``image_processor`` entry): use the standard CLIP
            / SigLIP image pipeline (:func:`default_preprocessor_config`) instead of failing.
            A checkpoint that has the file always uses it.

    Returns:
        The wrapped model in eval mode.

    Raises:
        ModelError: The path does not exist or is not a checkpoint, the hub id is neither cached
            nor downloadable (offline), the checkpoint is not CLIP / SigLIP, its image settings
            are missing or invalid (the message names the file and field), or its ``.bin``
            weights hold pickled objects other than tensors.
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
            model, tokenizer, pre = _load(
                str(path),
                local_dir=path,
                local_only=True,
                default_preprocessing=default_preprocessing,
            )
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
        model, tokenizer, pre = _load_hub(ref, default_preprocessing=default_preprocessing)
        source = ref
    return HFClip(model, tokenizer, source=source, preprocessing=pre).to(device)


def _load_hub(
    ref: str, *, default_preprocessing: bool = False
) -> tuple[nn.Module, Any, ImagePreprocessing]:
    """A hub id: the local cache first, then (unless offline) the network."""
    kwargs = {"local_dir": None, "default_preprocessing": default_preprocessing}
    try:
        return _load(ref, local_only=True, **kwargs)
    except ModelError:
        raise
    except Exception as cached_err:  # noqa: BLE001 - not (fully) in the cache
        if hub_offline():
            what = (
                f"the Hugging Face cache holds the model but not its {PREPROCESSOR_FILE}"
                if isinstance(cached_err, _NotCached)
                else "the hub id is not in the Hugging Face cache"
            )
            raise ModelError(
                f"hf:{ref}: there is no local directory {ref!r} and {what}; downloads are off "
                "because HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, and a hub download "
                "needs network anyway. " + download_hint(ref)
            ) from cached_err
    endpoint = _hub_endpoint()
    if not _uses_proxy() and not endpoint_reachable(endpoint):
        raise ModelError(
            f"hf:{ref}: there is no local directory {ref!r}, the hub id is not in the Hugging "
            f"Face cache, and the hub ({endpoint}) cannot be reached from this machine: a hub "
            "download needs network. " + download_hint(ref)
        )
    try:
        return _load(ref, local_only=False, **kwargs)
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
    "IMAGE_PROCESSORS",
    "PICKLE_WEIGHTS",
    "PREPROCESSOR_FILE",
    "PROCESSOR_FILE",
    "SAFE_WEIGHTS",
    "HFClip",
    "ImagePreprocessing",
    "build_hf",
    "check_preprocessor_fields",
    "default_preprocessor_config",
    "download_hint",
    "endpoint_reachable",
    "hub_offline",
    "logits",
    "looks_like_hub_id",
    "image_preprocessing",
    "pooled_embedding",
    "rgb_uint8",
    "square_size",
]
