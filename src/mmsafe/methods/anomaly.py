"""WinCLIP-style zero-shot and few-shot (WinCLIP+) anomaly detection with pixel maps.

The method (Jeong et al., CVPR 2023; see ``docs/anomaly.md``) on any :class:`EncoderModel`:

* **Compositional prompt ensemble**: state words (normal / anomalous) x templates, filled with
  the object name; the text embeddings of each state class are averaged into two prototypes.
* **Zero-shot score** of an image embedding ``e``:
  ``softmax(logit_scale * [<e, t_normal>, <e, t_anomalous>])[anomalous]``.
* **Windows**: square crops at a small and a mid size with a stride, each resized to the model's
  input size and encoded like a whole image. Sizes and stride are fractions of the image side
  (:data:`WINDOWS`, :data:`STRIDE`: 12 and 20 px with stride 4 px on a 32-px image), so an image
  has the same windows at any resolution. A pixel's score at one scale is the *harmonic mean* of
  the scores of the windows that cover it; the map is the mean over scales, at the image's own
  resolution.
* **Few-shot (WinCLIP+)**: a memory bank of the window embeddings of ``k`` normal reference
  images; a query window scores ``1 - max cosine similarity`` to the bank windows of the same
  scale. Window scores become a map the same way and the image score is the map's maximum; the
  fused score (map and image) is the average of the zero-shot and the memory-bank scores.
* **Patch memory bank** (PatchCore-style, the WinCLIP+ patch level): the intermediate feature
  maps of the image tower (``model.hidden_states("image", ...)``; by default the second CNN stage
  of tiny-clip) of ``k`` normal reference images, every spatial position one bank row. A query
  position scores its Euclidean distance to the nearest bank row; the map is that distance
  upsampled to the image, and the image score is the map's maximum.

Everything here is a small function over tensors; the check ``monitoring.anomaly`` wires them up.

Example:
    >>> [len(scaled_window_boxes(side, 12 / 32, 4 / 32)) for side in (32, 100, 250)]
    [36, 36, 36]
    >>> boxes = window_boxes(8, window=4, stride=2)
    >>> boxes.shape
    (9, 4)
    >>> cover = window_coverage(boxes, 8)
    >>> maps = harmonic_aggregate(torch.full((1, 9), 0.5), cover)
    >>> float(maps.min()), float(maps.max())
    (0.5, 0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mmsafe.methods.resolution import to_pixels
from mmsafe.models.base import images_to_tensor

if TYPE_CHECKING:
    from mmsafe.models.base import EncoderModel

WINCLIP_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
"""WinCLIP's normal state words, exactly (``{}`` is the object name)."""

WINCLIP_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
"""WinCLIP's anomalous state words, exactly."""

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "normal {}",
    "clean {}",
)
"""Default normal states: WinCLIP's *affirmative* ones plus ``normal`` and ``clean``.

WinCLIP's negated states ("{} without flaw") are left out by default: contrastive text encoders
read negation poorly and put "without defect" next to "with defect". On the shapes world with a
quick tiny-clip that knows the defect words, the paper's exact lists give zero-shot image AUROC
0.68, without the negations 0.82, and these defaults 0.85 (``docs/anomaly.md``).
"""

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "scratched {}",
    "broken {}",
    "defective {}",
    "{} with a hole",
    "{} with a scratch",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
"""Default anomalous states: WinCLIP's four plus scratch/hole/broken words."""

PROMPT_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": (NORMAL_STATES, ANOMALOUS_STATES),
    "winclip": (WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES),
}
"""Named ``(normal, anomalous)`` state-word lists for the check's ``prompts`` option."""

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of the {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "an image of a {}.",
    "a {}.",
)
"""Prompt templates (a subset of WinCLIP's 21, plus the zero-shot prompts tiny-clip knows)."""

EPS = 1e-6

WINDOWS: tuple[float, ...] = (12 / 32, 20 / 32)
"""Default window sizes as fractions of the image side: 12 and 20 px of a 32-px image."""
STRIDE: float = 4 / 32
"""Default window stride as a fraction of the image side: 4 px of a 32-px image."""
CROP_BUDGET = 1 << 24
"""At most this many crop values (64 MiB of float32) are held per chunk of images."""


# --------------------------------------------------------------------------- prompts


def prompt_ensemble(
    object_name: str,
    normal_states: Sequence[str] = NORMAL_STATES,
    anomalous_states: Sequence[str] = ANOMALOUS_STATES,
    templates: Sequence[str] = TEMPLATES,
) -> tuple[list[str], list[str]]:
    """Every ``template x state`` prompt for one object, split into normal and anomalous.

    Example:
        >>> normal, anomalous = prompt_ensemble("circle", ["flawless {}"], ["damaged {}"],
        ...                                     ["a photo of a {}."])
        >>> normal, anomalous
        (['a photo of a flawless circle.'], ['a photo of a damaged circle.'])
    """

    def fill(states: Sequence[str]) -> list[str]:
        return [t.format(s.format(object_name)) for s in states for t in templates]

    return fill(normal_states), fill(anomalous_states)


def text_prototypes(
    model: EncoderModel,
    object_name: str = "object",
    normal_states: Sequence[str] = NORMAL_STATES,
    anomalous_states: Sequence[str] = ANOMALOUS_STATES,
    templates: Sequence[str] = TEMPLATES,
    encode: Callable[[list[str]], Tensor] | None = None,
) -> Tensor:
    """``(2, D)`` unit-norm prototypes ``[normal, anomalous]``: the mean prompt embedding of each.

    Each prompt embedding is unit-norm; the mean of each state class is renormalised.
    ``encode(prompts) -> (N, D)`` embeds the prompts (e.g. through the engine); by default
    ``model.encode`` in one batch.
    """
    normal, anomalous = prompt_ensemble(object_name, normal_states, anomalous_states, templates)
    device = model.device

    def direct(prompts: list[str]) -> Tensor:
        batch = model.preprocess("text", prompts)
        batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch
        return model.encode({"text": batch})["text"]

    with torch.inference_mode():
        protos = []
        for prompts in (normal, anomalous):
            emb = (encode or direct)(list(prompts)).float().cpu()
            protos.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(protos)


def zero_shot_scores(embeddings: Tensor, prototypes: Tensor, logit_scale: float) -> Tensor:
    """Anomaly probability ``softmax(logit_scale * e @ [t_n, t_a].T)[..., 1]`` per embedding.

    Works on any leading shape ``(..., D)``.

    Example:
        >>> protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> zero_shot_scores(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), protos, 1.0).round(decimals=3)
        tensor([0.7310, 0.2690])
    """
    logits = logit_scale * embeddings.float() @ prototypes.float().T
    return torch.softmax(logits, dim=-1)[..., 1]


# --------------------------------------------------------------------------- windows


def window_boxes(image_size: int, window: int, stride: int) -> np.ndarray:
    """``(W, 4)`` int boxes ``[top, left, height, width]`` of square windows covering the image.

    Windows start every ``stride`` pixels; a last window flush with the far border is added when
    the stride does not land on it, so every pixel is covered. A window at least as large as the
    image gives one box over the whole image.

    Example:
        >>> window_boxes(10, 4, 4)[:, 0].tolist()  # top edges: 0, 4, then 6 flush with the border
        [0, 0, 0, 4, 4, 4, 6, 6, 6]
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    window = min(window, image_size)
    starts = list(range(0, image_size - window + 1, stride))
    if starts[-1] != image_size - window:
        starts.append(image_size - window)
    return np.array([[t, left, window, window] for t in starts for left in starts], dtype=np.int64)


def window_starts(window: float, stride: float) -> list[float]:
    """Window start positions as fractions of the side: every ``stride``, last one flush.

    The scale-free form of :func:`window_boxes`'s starts, so the number of windows per side
    depends on the fractions only, never on the resolution.

    Example:
        >>> window_starts(0.375, 0.125)
        [0.0, 0.125, 0.25, 0.375, 0.5, 0.625]
        >>> window_starts(0.5, 0.2)  # 0, 0.2, 0.4, then flush with the border at 0.5
        [0.0, 0.2, 0.4, 0.5]
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    span = 1.0 - min(float(window), 1.0)
    n = int(np.floor(span / stride + 1e-9)) + 1
    starts = [i * float(stride) for i in range(n)]
    if span - starts[-1] > 1e-9:
        starts.append(span)
    return starts


def scaled_window_boxes(image_size: int, window: float, stride: float) -> np.ndarray:
    """:func:`window_boxes` with the window and the stride as fractions of the side.

    The window is ``to_pixels(window, image_size)`` pixels; the starts of
    :func:`window_starts` are spread evenly over ``[0, image_size - window px]`` and rounded,
    the last one flush with the border. When the fractions are whole pixels of the image
    (``12/32`` of 32 px) the boxes are exactly :func:`window_boxes`'s; at any other size there
    are just as many (a 250-px image has the 36 + 16 windows of a 32-px one, not thousands).
    Boxes that coincide on a tiny image are kept once.

    Example:
        >>> bool((scaled_window_boxes(32, 12 / 32, 4 / 32) == window_boxes(32, 12, 4)).all())
        True
        >>> scaled_window_boxes(100, 12 / 32, 4 / 32)[:6, 0].tolist()  # 38-px windows
        [0, 0, 0, 0, 0, 0]
        >>> sorted(set(scaled_window_boxes(100, 12 / 32, 4 / 32)[:, 1].tolist()))
        [0, 12, 25, 37, 50, 62]
    """
    size = int(image_size)
    win = min(to_pixels(window, size), size)
    fracs = window_starts(window, stride)
    span = 1.0 - min(float(window), 1.0)
    if win >= size or span <= 0:
        return np.array([[0, 0, size, size]], dtype=np.int64)
    starts = sorted({to_pixels(f / span * (size - win), 1, minimum=0) for f in fracs})
    return np.array([[t, left, win, win] for t in starts for left in starts], dtype=np.int64)


def window_coverage(boxes: np.ndarray, image_size: int) -> Tensor:
    """``(W, H, W)`` boolean tensor: which pixels each window covers."""
    cover = torch.zeros(len(boxes), image_size, image_size, dtype=torch.bool)
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        cover[i, t : t + h, left : left + w] = True
    return cover


def crop_windows(pixels: Tensor, boxes: np.ndarray, out_size: int) -> Tensor:
    """Crop every box from every image and resize to ``out_size``: ``(B * W, C, S, S)``.

    Rows are image-major (all windows of image 0 first). Boxes of one call must share a size, so
    the resize is one batched bilinear interpolation (antialiased when shrinking).

    Example:
        >>> crop_windows(torch.rand(2, 3, 8, 8), window_boxes(8, 4, 4), 6).shape
        torch.Size([8, 3, 6, 6])
    """
    sizes = {(int(h), int(w)) for h, w in boxes[:, 2:]}
    if len(sizes) != 1:
        raise ValueError(f"crop_windows needs boxes of one size, got {sorted(sizes)}")
    crops = torch.stack([pixels[:, :, t : t + h, lf : lf + w] for t, lf, h, w in boxes.tolist()], 1)
    b, n, c, h, w = crops.shape
    crops = crops.reshape(b * n, c, h, w)
    if (h, w) != (out_size, out_size):
        crops = F.interpolate(
            crops,
            size=(out_size, out_size),
            mode="bilinear",
            align_corners=False,
            antialias=out_size < h,
        )
    return crops


def harmonic_aggregate(window_scores: Tensor, coverage: Tensor) -> Tensor:
    """Per-pixel harmonic mean of the scores of the windows covering it: ``(N, H, W)``.

    Args:
        window_scores: ``(N, W)`` positive scores (clamped below at ``1e-6``).
        coverage: ``(W, H, W)`` boolean window coverage (every pixel covered at least once).

    Example:
        >>> cover = window_coverage(np.array([[0, 0, 1, 2], [0, 1, 1, 1]]), 2)[:, :1]
        >>> harmonic_aggregate(torch.tensor([[0.5, 0.25]]), cover).round(decimals=4)  # 2/(2+4)
        tensor([[[0.5000, 0.3333]]])
    """
    cov = coverage.float().flatten(1)  # (W, P)
    count = cov.sum(dim=0)
    if bool((count == 0).any()):
        raise ValueError("some pixels are covered by no window")
    inv = 1.0 / window_scores.float().clamp_min(EPS)
    maps = count / (inv @ cov)
    return maps.reshape(window_scores.shape[0], *coverage.shape[1:])


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class WindowEmbeddings:
    """Whole-image and per-window embeddings of a set of images.

    Attributes:
        image: ``(N, D)`` unit-norm whole-image embeddings.
        windows: ``{window size: (N, W_s, D)}`` unit-norm window embeddings, keyed by the
            window's size as a fraction of the side.
        boxes: ``{window size: (W_s, 4)}`` the windows in pixels, ``[top, left, height, width]``.
        image_size: side of the (square) pixel grid the boxes refer to.
    """

    image: Tensor
    windows: Mapping[float, Tensor]
    boxes: Mapping[float, np.ndarray]
    image_size: int

    def subset(self, index: Sequence[int] | np.ndarray) -> WindowEmbeddings:
        """The rows at ``index``."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return WindowEmbeddings(
            self.image[idx],
            {s: w[idx] for s, w in self.windows.items()},
            dict(self.boxes),
            self.image_size,
        )


def _encode_pixels(model: EncoderModel, pixels: Tensor, batch_size: int) -> Tensor:
    out = []
    device = model.device
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size].to(device)
        out.append(model.encode({"image": chunk})["image"].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "embed_dim", 0))


def crop_side(window_px: int, image_size: int, input_size: int, min_side: int | None) -> int:
    """The side a window crop of ``window_px`` pixels (of an ``image_size`` image) is encoded at.

    ``min_side=None`` (a tower that takes only its own input size): ``input_size``, WinCLIP's
    crop-and-resize, which enlarges a small window to a whole input. An int (a tower that takes
    any side of at least ``min_side``): the window at the pixel density of the whole-image pass,
    ``window_px * input_size / image_size``, clipped to ``[min_side, input_size]``. This is the
    convolutional form of WinCLIP's window embeddings, which pass a window's own patch tokens
    through the ViT, at the whole image's scale; it costs ``(side / input_size)^2`` of a
    whole-image pass instead of one.

    Example:
        >>> crop_side(94, 250, 96, None), crop_side(94, 250, 96, 32), crop_side(156, 250, 96, 32)
        (96, 36, 60)
        >>> crop_side(12, 250, 96, 32), crop_side(250, 250, 96, 32)  # clipped both ways
        (32, 96)
    """
    if min_side is None:
        return int(input_size)
    native = round(window_px * input_size / image_size)
    return int(min(int(input_size), max(int(min_side), native)))


def rescale_boxes(boxes: np.ndarray, image_size: int, input_size: int, side: int) -> np.ndarray:
    """``boxes`` of an ``image_size`` grid moved to an ``input_size`` grid, ``side`` px each.

    Starts scale with the grid and are clipped so that every window stays inside it.

    Example:
        >>> rescale_boxes(np.array([[0, 156, 94, 94], [31, 62, 94, 94]]), 250, 96, 36).tolist()
        [[0, 60, 36, 36], [12, 24, 36, 36]]
    """
    starts = np.rint(np.asarray(boxes)[:, :2] * (input_size / image_size)).astype(np.int64)
    starts = np.clip(starts, 0, input_size - side)
    return np.concatenate([starts, np.full((len(starts), 2), side, dtype=np.int64)], axis=1)


def crop_chunk(boxes: Mapping[float, np.ndarray], input_size: int, batch_size: int) -> int:
    """How many images' window crops to make at once: bounded by count and by memory.

    At most ``batch_size`` crops of one scale and at most :data:`CROP_BUDGET` crop values (at
    the image's grid and at ``input_size``, whichever is larger) per chunk, at least one image.

    Example:
        >>> boxes = {w: scaled_window_boxes(32, w, STRIDE) for w in WINDOWS}
        >>> crop_chunk(boxes, 32, 512), crop_chunk(boxes, 224, 512)
        (14, 3)
    """
    per_image = max(len(b) for b in boxes.values())
    values = max(len(b) * 3 * max(int(b[0, 2]), int(input_size)) ** 2 for b in boxes.values())
    return max(1, min(int(batch_size) // per_image, CROP_BUDGET // values))


def embed_windows(
    model: EncoderModel,
    images: Sequence[np.ndarray],
    windows: Sequence[float] = WINDOWS,
    stride: float = STRIDE,
    batch_size: int = 512,
    image_size: int | None = None,
    encode_pixels: Callable[[Tensor], Tensor] | None = None,
    image_embeddings: Tensor | None = None,
    min_side: int | None = None,
) -> WindowEmbeddings:
    """Embed every image whole and every window of it, at each window size.

    Images are turned into ``[0, 1]`` pixels at their own resolution, ``image_size`` (default:
    the first image's height; others are resized to it). Window sizes and the stride are
    fractions of that side (:func:`scaled_window_boxes`), so the number of windows does not
    grow with the resolution. Windows are cropped there and resized to the model's input size
    in one batched interpolation per scale. With ``min_side`` (a tower that takes any side of
    at least ``min_side``), a window is encoded at the whole image's pixel density instead
    (:func:`crop_side`): it is sliced from the image at the input size, where it already has
    that side (:func:`rescale_boxes`), so no crop is resized. The crops are encoded with
    ``model.encode`` (or
    ``encode_pixels(pixels) -> (N, D)``, e.g. the engine). Images are processed in chunks
    (:func:`crop_chunk`), so memory is bounded whatever the number or the size of the images.
    ``image_embeddings``: the images' whole-image embeddings when already known (the engine's
    clean rows); they are then not encoded again.
    """
    if encode_pixels is None:

        def encode_pixels(px: Tensor) -> Tensor:
            return _encode_pixels(model, px, batch_size)

    if not len(images):
        raise ValueError("embed_windows needs at least one image")
    model.eval()
    size = image_size or int(np.asarray(images[0]).shape[0])
    input_size = int(model.input_size or size)
    scales = [float(w) for w in windows]
    boxes = {w: scaled_window_boxes(size, w, stride) for w in scales}
    sides = {w: crop_side(int(b[0, 2]), size, input_size, min_side) for w, b in boxes.items()}
    sliced = {  # native windows that are whole pixels of the input grid: slice, do not resize
        w: min_side is not None and sides[w] == round(int(b[0, 2]) * input_size / size)
        for w, b in boxes.items()
    }
    small_boxes = {w: rescale_boxes(b, size, input_size, sides[w]) for w, b in boxes.items()}
    win_emb: dict[float, list[Tensor]] = {w: [] for w in scales}
    whole: list[Tensor] = []
    per_chunk = crop_chunk(boxes, input_size, batch_size)
    with torch.inference_mode():
        for start in range(0, len(images), per_chunk):
            chunk = list(images[start : start + per_chunk])
            if image_embeddings is None:
                batch = model.preprocess("image", chunk)
                assert isinstance(batch, Tensor)
                whole.append(encode_pixels(batch))
            small = images_to_tensor(chunk, input_size) if any(sliced.values()) else None
            pixels = None if all(sliced.values()) else images_to_tensor(chunk, size)
            for w, b in boxes.items():
                if sliced[w]:
                    assert small is not None
                    crops = crop_windows(small, small_boxes[w], sides[w])
                else:
                    assert pixels is not None
                    crops = crop_windows(pixels, b, sides[w])
                emb = encode_pixels(crops)
                win_emb[w].append(emb.reshape(len(chunk), len(b), -1))
    return WindowEmbeddings(
        image=torch.cat(whole) if image_embeddings is None else image_embeddings.float(),
        windows={w: torch.cat(e) for w, e in win_emb.items()},
        boxes=boxes,
        image_size=size,
    )


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class AnomalyScores:
    """Image-level scores ``(N,)`` and pixel maps ``(N, H, W)`` of one method."""

    image: Tensor
    maps: Tensor


def windows_to_map(window_scores: Mapping[float, Tensor], emb: WindowEmbeddings) -> Tensor:
    """Harmonic aggregation per scale, then the mean over scales: ``(N, H, W)``.

    The scales are summed in place (no ``(S, N, H, W)`` stack: at 250 px that is a copy of
    every map), then divided by their number.
    """
    total: Tensor | None = None
    for w, s in window_scores.items():
        m = harmonic_aggregate(s, window_coverage(emb.boxes[w], emb.image_size))
        total = m if total is None else total.add_(m)
    if total is None:
        raise ValueError("windows_to_map needs at least one window scale")
    return total.div_(len(window_scores))


def zero_shot_anomaly(
    emb: WindowEmbeddings, prototypes: Tensor, logit_scale: float
) -> AnomalyScores:
    """WinCLIP zero-shot: image score on the whole image, map from the window scores."""
    image = zero_shot_scores(emb.image, prototypes, logit_scale)
    windows = {w: zero_shot_scores(e, prototypes, logit_scale) for w, e in emb.windows.items()}
    return AnomalyScores(image, windows_to_map(windows, emb))


@dataclass(frozen=True)
class MemoryBank:
    """Window embeddings of ``k`` normal reference images, pooled per scale: ``{s: (M_s, D)}``.

    Example:
        >>> refs = WindowEmbeddings(torch.eye(2), {4: torch.eye(2)[:, None]}, {}, 4)
        >>> MemoryBank.from_embeddings(refs).windows[4].shape
        torch.Size([2, 2])
    """

    windows: Mapping[float, Tensor]
    k: int

    @classmethod
    def from_embeddings(cls, refs: WindowEmbeddings) -> MemoryBank:
        """Every window embedding of every reference image."""
        banks = {w: e.reshape(-1, e.shape[-1]) for w, e in refs.windows.items()}
        return cls(banks, int(refs.image.shape[0]))


def nearest_neighbour_scores(queries: Tensor, bank: Tensor) -> Tensor:
    """``1 - max cosine similarity`` of each query (``(..., D)``, unit norm) to the bank rows.

    Example:
        >>> nearest_neighbour_scores(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.eye(2))
        tensor([0.0000, 0.2000])
    """
    sim = queries.float() @ bank.float().T
    return 1.0 - sim.max(dim=-1).values


def few_shot_anomaly(emb: WindowEmbeddings, bank: MemoryBank) -> AnomalyScores:
    """WinCLIP+ vision branch: memory-bank distances of the windows as a map; image = map max."""
    windows = {w: nearest_neighbour_scores(e, bank.windows[w]) for w, e in emb.windows.items()}
    maps = windows_to_map(windows, emb)
    return AnomalyScores(maps.flatten(1).max(dim=1).values, maps)


def fuse(a: AnomalyScores, b: AnomalyScores) -> AnomalyScores:
    """The average of two methods' image scores and maps (WinCLIP+ fusion)."""
    return AnomalyScores((a.image + b.image) / 2, (a.maps + b.maps) / 2)


# --------------------------------------------------------------------------- patch memory bank


def as_feature_map(hidden: Tensor) -> Tensor:
    """One hidden state as a ``(B, C, h, w)`` feature map.

    CNN maps pass through; ViT token sequences ``(B, 1 + h*w, D)`` lose their first ([CLS])
    token and are laid out on the square patch grid.

    Example:
        >>> as_feature_map(torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
    """
    if hidden.ndim == 4:
        return hidden
    if hidden.ndim == 3:
        n = hidden.shape[1] - 1
        side = int(round(n**0.5))
        if side * side == n and n > 0:
            return hidden[:, 1:].transpose(1, 2).reshape(hidden.shape[0], -1, side, side)
    raise ValueError(f"cannot lay out a hidden state of shape {tuple(hidden.shape)} as a map")


def combine_feature_maps(states: Sequence[Tensor]) -> Tensor:
    """One ``(B, C, h, w)`` float32 map from the hidden states of the chosen layers.

    Each state becomes a map (:func:`as_feature_map`); maps at another resolution than the
    first one's are resized bilinearly to it, then all are concatenated along channels.

    Example:
        >>> combine_feature_maps([torch.zeros(2, 4, 8, 8), torch.zeros(2, 1 + 16, 6)]).shape
        torch.Size([2, 10, 8, 8])
    """
    if not len(states):
        raise ValueError("combine_feature_maps needs at least one hidden state")
    maps = [as_feature_map(h).float() for h in states]
    size = maps[0].shape[-2:]
    maps = [
        m
        if m.shape[-2:] == size
        else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.cat(maps, dim=1)


def feature_maps(
    model: EncoderModel,
    images: Sequence[np.ndarray],
    layers: Sequence[int] = (1,),
    batch_size: int = 256,
) -> Tensor:
    """``(N, C, h, w)`` intermediate feature maps of the image tower, float32 on the CPU.

    ``layers`` index ``model.hidden_states("image", ...)`` (tiny-clip: one map per CNN stage;
    Hugging Face CLIP: the embedding output, then one per block). Several layers are resized
    bilinearly to the first one's resolution and concatenated along channels
    (:func:`combine_feature_maps`). Audits read the states through the engine instead
    (``Engine.hidden_states``: cached and counted); this is the same maps without one.

    Args:
        model: any encoder whose ``hidden_states("image", batch)`` returns maps or token grids.
        images: the images, as ``model.preprocess("image", ...)`` accepts them.
        layers: hidden-state indices to tap.
        batch_size: images per forward pass.

    Raises:
        NotImplementedError: the model exposes no hidden states.
        ValueError: a chosen hidden state is not a map or a square token grid.
    """
    if not len(images) or not len(layers):
        raise ValueError("feature_maps needs at least one image and one layer")
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = model.preprocess("image", list(images[start : start + batch_size]))
            states = model.hidden_states("image", batch)
            out.append(combine_feature_maps([states[i] for i in layers]).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class PatchMemoryBank:
    """Feature vectors of every spatial position of ``k`` normal reference images: ``(M, C)``.

    Example:
        >>> PatchMemoryBank.from_feature_maps(torch.zeros(2, 8, 4, 4)).features.shape
        torch.Size([32, 8])
    """

    features: Tensor
    k: int

    @classmethod
    def from_feature_maps(cls, maps: Tensor) -> PatchMemoryBank:
        """Every position of every reference map ``(k, C, h, w)``."""
        return cls(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).float(), int(maps.shape[0]))


def patch_distances(queries: Tensor, bank: PatchMemoryBank, chunk: int = 4096) -> Tensor:
    """``(N, h, w)`` Euclidean distance of each query position to its nearest bank row.

    Euclidean, not cosine: the magnitude of a post-activation CNN feature carries the signal (a
    flat background and a saturated defect point in similar directions), and cosine distances
    on tiny-clip's maps rank defects at chance (``docs/anomaly.md``).

    Example:
        >>> bank = PatchMemoryBank(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 1)
        >>> patch_distances(torch.tensor([[[[0.0]], [[1.0]]]]), bank).flatten().tolist()
        [1.0]
    """
    n, c, h, w = queries.shape
    flat = queries.permute(0, 2, 3, 1).reshape(-1, c).float()
    mem = bank.features.float()
    out = [
        torch.cdist(flat[i : i + chunk], mem).min(dim=1).values for i in range(0, len(flat), chunk)
    ]
    return torch.cat(out).reshape(n, h, w)


def patch_anomaly(queries: Tensor, bank: PatchMemoryBank, image_size: int) -> AnomalyScores:
    """Patch memory-bank scores: the distance map upsampled to the image; image = map max."""
    dist = patch_distances(queries, bank)
    maps = F.interpolate(
        dist[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )[:, 0]
    return AnomalyScores(maps.flatten(1).max(dim=1).values, maps)


def normal_reference_order(
    meta: Sequence[Mapping[str, Any]], seed: int, labels: Sequence[int] | None = None
) -> np.ndarray:
    """Rows whose ``meta["defect"]`` is ``None`` (labelled ones, given labels), shuffled.

    Take the first ``k`` as the references of a ``k``-shot bank, so smaller banks are nested in
    larger ones.

    Example:
        >>> meta = [{"defect": None}, {"defect": "hole"}, {"defect": None}, {}]
        >>> sorted(normal_reference_order(meta, seed=0).tolist())
        [0, 2]
    """
    ok = [
        i
        for i, m in enumerate(meta)
        if "defect" in m and m["defect"] is None and (labels is None or labels[i] >= 0)
    ]
    rng = np.random.default_rng(seed)
    return rng.permutation(np.array(ok, dtype=np.int64))
