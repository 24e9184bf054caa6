"""Invisible watermarks of generated images: dwtDct, RivaGAN and Tree-Ring, under attack.

The watermarks of the ``generative.watermark`` check, and how well each survives edits:

1. **dwtDct**, **dwtDctSvd** and **RivaGAN** (post-hoc, on the pixels) through the
   ``invisible-watermark`` package (the one Stable Diffusion's reference scripts use):
   :func:`embed_watermark` writes a bit string into finished images, :func:`decode_watermark`
   reads it back, and the detection score of an image is its **bit accuracy** against the key
   (:func:`bit_accuracy`). dwtDct and dwtDctSvd carry any number of bits (32 or 48 here);
   RivaGAN (Zhang et al., 2019, "Robust Invisible Video Watermarking with Attention"; an ONNX
   encoder and decoder shipped in the wheel, run by onnxruntime) exactly 32.
2. **Tree-Ring** (Wen et al., NeurIPS 2023, "Tree-Ring Watermarks: Fingerprints for Diffusion
   Images that are Invisible and Robust"; in the generation itself): a pattern of concentric
   rings written into the centred 2-D Fourier transform of one channel of the *initial noise*
   (:func:`tree_ring_key`, :func:`tree_ring_mask`, :func:`embed_tree_ring`). Detection inverts
   the image back to its initial noise with the generator's deterministic inversion (DDIM, or the
   reverse ODE of a flow) and measures the mean L1 distance between the key and the Fourier
   transform of the recovered noise inside the mask (:func:`tree_ring_distance`); the detection
   score is the *negative* distance. :func:`tree_ring_detect` runs embed -> generate ->
   transform -> invert -> distance for a generator (``mmsafe.models.generator``'s protocol:
   ``initial_noise``, ``generate(..., noise=)``, ``invert``).

**Image size.** ``invisible-watermark`` refuses images with fewer than ``256 x 256`` pixels (a
check in ``WatermarkEncoder.encode`` / ``WatermarkDecoder.decode``), so :data:`MIN_SIZE` is 256
for every post-hoc method, and images whose shorter side is below it (the tiny generator's 32 px
ones) are first **upscaled** (bicubic, aspect kept, the shorter side to ``min_size``): the
watermarked, delivered image is the upscaled one, and :class:`EmbedInfo` says which happened.
Larger images are embedded as delivered. Below the gate, calling the library's internals on
bicubic-upscaled 32 px shapes-world images: RivaGAN decodes 0.76 of the bits at 64 px, 0.90 at
128 px, 0.98 at 256 px (8 images), so it needs the 256; dwtDct decodes 0.91-0.95 of them at any
size from 64 to 512 px (60 images), so 256 costs it nothing.

**dwtDct is content-dependent.** It moves the largest coefficient of each 4x4 block of the chroma
channels' Haar LL band onto a quantisation lattice; in a flat block another, nearly equal,
coefficient then becomes the largest and is read instead. On images with flat chroma (a small
red, orange or green shape on a dark ground) its bit accuracy stays near chance even unattacked:
at 256 px it misses 7 of 60 shapes-world images at 1 % FPR (TPR 0.88, AUROC 0.995), and 1 of 24
256 px crops of photographs. dwtDctSvd (the largest singular value of each block's DCT) has no
such failure: all 60 detected, bit accuracy 1.000.

**Attacks** (:data:`TRANSFORMS`, :func:`apply_transform`) act on uint8 RGB images as delivered
(the upscaled ones for the post-hoc methods, the generator's size for Tree-Ring), at graded
strengths from weak to strong, deterministically for a seed: JPEG quality, resize down and back
up, centre crop and resize back, rotation (black corners), Gaussian noise, Gaussian blur,
brightness; plus ``"regenerate"``, a caller's callable (regeneration by a model, e.g.
:func:`model_regenerator`: SDEdit through a generator's ``regenerate``, at the generator's own
size, images of another size resized to it and back). Tree-Ring's images are always quantised
to uint8 before inversion, as a delivered image is.

**Metrics** (:func:`detection_metrics`, :class:`WatermarkRow`): watermarked images are the
positives, the same images (or the same prompts and seeds) without the watermark the negatives.

* **TPR at 1 % FPR** from the clean images' scores: let ``k = floor(fpr * n_clean)``; an image is
  detected when its score is *strictly above* the ``(k + 1)``-th largest clean score, so at most
  ``k`` clean images are flagged. This is the largest TPR of a point of the full ROC curve whose
  FPR is at most ``fpr`` (``max(tpr[fpr_curve <= fpr])`` with scikit-learn's
  ``roc_curve(drop_intermediate=False)``). With fewer than ``1 / fpr`` (100) clean images ``k`` is
  0: the threshold is the highest clean score, the FPR achieved on the sample is 0, and the
  claim "1 % FPR" rests on the sample alone (read its Wilson interval, and prefer 100+ clean
  images). For the bit-accuracy detectors a threshold that needs no clean images is also given
  (``tpr_binomial``): with a key independent of the image, the matching bits of an unmarked image
  are ``Binomial(n_bits, 1/2)``, so flagging bit accuracy ``>= k/n`` with ``P(X >= k) <= fpr``
  (:func:`binomial_threshold`: 24/32 or 33/48 at 1 %) keeps the FPR at most ``fpr`` exactly.
* **AUROC** of watermarked vs clean scores (= ``sklearn.metrics.roc_auc_score``), with a
  percentile bootstrap interval resampling each population on its own
  (:func:`mmsafe.metrics.ood.auroc_bootstrap_ci`); TPRs get Wilson intervals, mean bit accuracy
  a percentile bootstrap one.

:func:`evaluate_watermark` (a post-hoc method on given images), :func:`evaluate_tree_ring` (a
generator) and :func:`watermark_table` (all of them) return one :class:`WatermarkRow` per method x
transform x strength.

Example:
    >>> key, mask = tree_ring_key((3, 16, 16), seed=0), tree_ring_mask((3, 16, 16), radius=3)
    >>> noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    >>> marked = embed_tree_ring(noise, key, mask)
    >>> d = tree_ring_distance(marked, key, mask), tree_ring_distance(noise, key, mask)
    >>> bool(d[0].max() < 1e-4), bool(d[1].min() > 1)  # float32 noise: exact to rounding
    (True, True)
    >>> images = np.full((1, 32, 32, 3), 128, np.uint8)
    >>> marked, info = embed_watermark(images, watermark_bits(32, seed=0), "dwtDct")
    >>> marked.shape, info.upscaled
    ((1, 256, 256, 3), True)
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image
from scipy import stats
from torch import Tensor

from mmsafe.methods.hallucination import wilson_interval
from mmsafe.metrics.bootstrap import mean_ci
from mmsafe.metrics.ood import auroc, auroc_bootstrap_ci

if TYPE_CHECKING:
    from mmsafe.models.generator import ImageGenerator

__all__ = [
    "IMAGE_METHODS",
    "METHODS",
    "MIN_SIZE",
    "TRANSFORMS",
    "DetectionMetrics",
    "EmbedInfo",
    "WatermarkRow",
    "apply_transform",
    "as_float_images",
    "as_uint8_images",
    "binomial_threshold",
    "bit_accuracy",
    "decode_watermark",
    "detection_metrics",
    "embed_tree_ring",
    "embed_watermark",
    "evaluate_tree_ring",
    "evaluate_watermark",
    "model_regenerator",
    "tpr_at_fpr",
    "tree_ring_detect",
    "tree_ring_distance",
    "tree_ring_key",
    "tree_ring_mask",
    "upscale_images",
    "watermark_bits",
    "watermark_table",
]

METHODS: tuple[str, ...] = ("dwtDct", "dwtDctSvd", "rivaGan", "treeRing")
"""Every watermark: the two post-hoc ones of ``invisible-watermark``, then Tree-Ring."""

IMAGE_METHODS: tuple[str, ...] = ("dwtDct", "dwtDctSvd", "rivaGan")
"""The post-hoc watermarks (``invisible-watermark``'s names), scored by bit accuracy."""

MIN_SIZE = 256
"""``invisible-watermark`` refuses images with fewer than ``256 * 256`` pixels."""

RIVAGAN_BITS = 32

TRANSFORMS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "jpeg": (90, 70, 50, 30),  # quality (lower is stronger); Tree-Ring's paper uses 25
        "resize": (0.75, 0.5, 0.25),  # side scale down (area), then back up (bicubic)
        "crop": (0.9, 0.75, 0.5),  # centre crop keeping this share of each side, resized back
        "rotate": (5, 15, 45),  # degrees counter-clockwise, black corners; the paper uses 75
        "noise": (0.02, 0.05, 0.1),  # Gaussian std in [0, 1] pixel units; the paper uses 0.1
        "blur": (0.004, 0.008, 0.016),  # Gaussian sigma / shorter side: 1, 2, 4 px at 256 px
        "brightness": (1.25, 1.5, 2.0),  # pixel values times this factor, clipped
    }
)
"""Named attacks with strengths from weak to strong (see :func:`apply_transform`)."""

Regenerate = Callable[[np.ndarray, float], np.ndarray]
"""``regenerate(images, strength) -> images``: uint8 ``(N, H, W, 3)`` in, the same shape out."""


# ------------------------------------------------------------------------------ images
def as_uint8_images(images: Any) -> np.ndarray:
    """Images as uint8 RGB ``(N, H, W, 3)``.

    Args:
        images: uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]`` (numpy or torch);
            floats are rounded to the nearest of the 256 levels.

    Raises:
        ValueError: another shape or dtype, or float pixels outside ``[0, 1]``.

    Example:
        >>> as_uint8_images(torch.full((1, 3, 2, 2), 0.5))[0, 0, 0].tolist()
        [128, 128, 128]
    """
    x = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if x.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W), got shape {x.shape}."
        )
    if x.dtype == np.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {x.shape}.")
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or floating point, got {x.dtype}.")
    if x.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W), got {x.shape}.")
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("float images must be finite pixels in [0, 1].")
    return np.ascontiguousarray(np.rint(x.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8))


def as_float_images(images: Any) -> Tensor:
    """Images as float32 ``(N, 3, H, W)`` in ``[0, 1]`` (the generators' format).

    Example:
        >>> as_float_images(np.full((1, 2, 2, 3), 255, np.uint8)).shape
        torch.Size([1, 3, 2, 2])
    """
    x = as_uint8_images(images)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def upscale_images(images: Any, min_size: int = MIN_SIZE) -> np.ndarray:
    """Bicubic upscaling so the shorter side is ``min_size``; larger images are left as they are.

    The aspect ratio is kept (the longer side is rounded). Returns uint8 ``(N, H', W', 3)``.

    Example:
        >>> upscale_images(np.zeros((2, 32, 64, 3), np.uint8), 256).shape
        (2, 256, 512, 3)
    """
    x = as_uint8_images(images)
    _check_int(min_size, "min_size")
    h, w = x.shape[1:3]
    if min(h, w) >= min_size or x.shape[0] == 0:
        return x
    scale = min_size / min(h, w)
    size = (max(min_size, round(w * scale)), max(min_size, round(h * scale)))  # cv2: (w, h)
    return np.stack([cv2.resize(im, size, interpolation=cv2.INTER_CUBIC) for im in x])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR in dB (``inf`` for an unchanged image)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return float(np.mean(10.0 * np.log10(255.0**2 / mse)))


# ------------------------------------------------------------------------------ dwtDct, RivaGAN
@dataclass(frozen=True)
class EmbedInfo:
    """How :func:`embed_watermark` marked a batch.

    Attributes:
        method: one of :data:`IMAGE_METHODS`.
        n_bits: length of the key.
        delivered_size: ``(H, W)`` of the images given.
        embedded_size: ``(H, W)`` of the watermarked images returned (the size to attack).
        upscaled: whether the images were upscaled (bicubic) to reach ``min_size``.
        psnr: mean PSNR (dB) of the watermarked images against the (upscaled) originals.
    """

    method: str
    n_bits: int
    delivered_size: tuple[int, int]
    embedded_size: tuple[int, int]
    upscaled: bool
    psnr: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def _check_method(method: Any, allowed: Sequence[str] = IMAGE_METHODS) -> str:
    if method not in allowed:
        raise ValueError(f"unknown watermark method {method!r}; use one of {list(allowed)}.")
    return str(method)


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def _check_bits(bits: Any, method: str) -> list[int]:
    b = np.asarray(bits)
    if b.ndim != 1 or b.size == 0 or not np.isin(b, (0, 1)).all():
        raise ValueError(f"`bits` must be a non-empty 1-D sequence of 0 / 1, got {bits!r}.")
    if method == "rivaGan" and b.size != RIVAGAN_BITS:
        raise ValueError(f"rivaGan embeds exactly {RIVAGAN_BITS} bits, got {b.size}.")
    return [int(v) for v in b]


def _check_min_size(min_size: Any) -> int:
    _check_int(min_size, "min_size")
    if min_size < MIN_SIZE:
        raise ValueError(
            f"`min_size` must be >= {MIN_SIZE}: invisible-watermark refuses images with fewer "
            f"than {MIN_SIZE}x{MIN_SIZE} pixels, got {min_size}."
        )
    return int(min_size)


def _bgr(image: np.ndarray) -> np.ndarray:
    """RGB <-> BGR (``invisible-watermark`` works on OpenCV's BGR images)."""
    return np.ascontiguousarray(image[..., ::-1])


def watermark_bits(n_bits: int = 32, seed: int = 0) -> np.ndarray:
    """A random key of ``n_bits`` bits (uint8 0 / 1) from ``np.random.default_rng(seed)``.

    Example:
        >>> watermark_bits(8, seed=0).tolist()
        [1, 1, 1, 0, 0, 0, 0, 0]
    """
    _check_int(n_bits, "n_bits")
    return np.random.default_rng(seed).integers(0, 2, n_bits).astype(np.uint8)


def embed_watermark(
    images: Any, bits: Any, method: str = "dwtDct", *, min_size: int = MIN_SIZE
) -> tuple[np.ndarray, EmbedInfo]:
    """Watermark every image with the same key through ``invisible-watermark``.

    Images whose shorter side is below ``min_size`` are upscaled first (:func:`upscale_images`);
    the returned (upscaled) images are the delivered, watermarked ones.

    Args:
        images: uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]``, RGB.
        bits: the key, 0 / 1 (any length for dwtDct and dwtDctSvd, 32 for RivaGAN).
        method: one of :data:`IMAGE_METHODS`.
        min_size: the shorter side to upscale to, at least :data:`MIN_SIZE`.

    Returns:
        ``(watermarked uint8 (N, H', W', 3) RGB, EmbedInfo)``.

    Raises:
        ValueError: bad images, key, method or ``min_size``.

    Example:
        >>> marked, info = embed_watermark(np.full((1, 256, 256, 3), 90, np.uint8), [1, 0] * 16)
        >>> info.upscaled, info.embedded_size
        (False, (256, 256))
    """
    method = _check_method(method)
    key = _check_bits(bits, method)
    min_size = _check_min_size(min_size)
    x = as_uint8_images(images)
    covers = upscale_images(x, min_size)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", key)
    if method == "rivaGan":
        WatermarkEncoder.loadModel()
    marked = np.stack([_bgr(encoder.encode(_bgr(im), method)) for im in covers]) if len(x) else x
    info = EmbedInfo(
        method=method,
        n_bits=len(key),
        delivered_size=(int(x.shape[1]), int(x.shape[2])),
        embedded_size=(int(covers.shape[1]), int(covers.shape[2])),
        upscaled=covers.shape[1:3] != x.shape[1:3],
        psnr=_psnr(covers, marked) if len(x) else math.nan,
    )
    return marked, info


def decode_watermark(
    images: Any, n_bits: int, method: str = "dwtDct", *, min_size: int = MIN_SIZE
) -> np.ndarray:
    """The bits ``invisible-watermark`` reads from each image, uint8 ``(N, n_bits)``.

    Images smaller than ``min_size`` (e.g. a watermarked image downscaled by an attacker) are
    upscaled the way :func:`embed_watermark` does before decoding; decode images at the size
    they were delivered otherwise.

    Example:
        >>> key = watermark_bits(32, seed=1)
        >>> marked, _ = embed_watermark(np.full((1, 32, 32, 3), 128, np.uint8), key)
        >>> bit_accuracy(decode_watermark(marked, 32), key).tolist()
        [1.0]
    """
    method = _check_method(method)
    n_bits = _check_int(n_bits, "n_bits")
    if method == "rivaGan" and n_bits != RIVAGAN_BITS:
        raise ValueError(f"rivaGan decodes exactly {RIVAGAN_BITS} bits, got n_bits={n_bits}.")
    x = upscale_images(images, _check_min_size(min_size))
    if method == "rivaGan":
        WatermarkDecoder.loadModel()
    decoder = WatermarkDecoder("bits", n_bits)
    out = np.zeros((len(x), n_bits), np.uint8)
    for i, im in enumerate(x):
        out[i] = np.asarray(decoder.decode(_bgr(im), method), dtype=np.uint8)
    return out


def bit_accuracy(decoded: Any, bits: Any) -> np.ndarray:
    """Share of each row's bits equal to the key, ``(N,)`` float64.

    Example:
        >>> bit_accuracy([[1, 0, 1, 1], [0, 1, 0, 0]], [1, 0, 1, 0]).tolist()
        [0.75, 0.25]
    """
    d, b = np.atleast_2d(np.asarray(decoded)), np.asarray(bits)
    if b.ndim != 1 or d.shape[1] != b.size:
        raise ValueError(f"decoded bits {d.shape} do not match a key of {b.shape} bits.")
    return (d == b[None, :]).mean(axis=1).astype(np.float64)


# ------------------------------------------------------------------------------ transforms
def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _resize(image: np.ndarray, size: tuple[int, int], down: bool) -> np.ndarray:
    interp = cv2.INTER_AREA if down else cv2.INTER_CUBIC
    return cv2.resize(image, (size[1], size[0]), interpolation=interp)


def _check_strength(name: str, s: float) -> float:
    bounds = {
        "jpeg": (1, 100),
        "resize": (1e-9, 1),
        "crop": (1e-9, 1),
        "noise": (0, math.inf),
        "blur": (0, math.inf),
        "brightness": (0, math.inf),
        "rotate": (-math.inf, math.inf),
    }
    lo, hi = bounds[name]
    if not (isinstance(s, numbers.Real) and not isinstance(s, bool)) or not lo <= s <= hi:
        raise ValueError(
            f"transform {name!r}: strength must be a number in [{lo}, {hi}], got {s!r}."
        )
    return float(s)


def apply_transform(
    images: Any,
    name: str,
    strength: float | None = None,
    *,
    seed: int = 0,
    regenerate: Regenerate | None = None,
) -> np.ndarray:
    """Attack images with one named transform at one strength (see :data:`TRANSFORMS`).

    * ``jpeg``: JPEG at this quality (Pillow, 4:2:0 chroma subsampling);
    * ``resize``: down to this share of each side (area), back up (bicubic);
    * ``crop``: keep the centred share of each side, resize back (bicubic);
    * ``rotate``: by this many degrees counter-clockwise about the centre, same size, black
      corners (bilinear);
    * ``noise``: add Gaussian noise of this std (pixels in ``[0, 1]``), from
      ``np.random.default_rng(seed)``;
    * ``blur``: Gaussian blur of sigma = strength x the shorter side (1 px at 256 px for 0.004);
    * ``brightness``: multiply the pixels by this factor (Pillow's ``Brightness``), clip;
    * ``regenerate``: ``regenerate(images, strength)``, e.g. noise the image to some level and
      denoise it with a generator;
    * ``none``: the images unchanged.

    Every transform is deterministic given ``seed`` and keeps the images' size.

    Args:
        images: uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]``, RGB.
        name: the transform.
        strength: its strength (ignored by ``none``).
        seed: seed of the random noise.
        regenerate: the callable behind ``"regenerate"``.

    Returns:
        uint8 ``(N, H, W, 3)`` RGB.

    Raises:
        ValueError: an unknown transform, a strength out of range, or ``"regenerate"`` without a
            callable (or one returning another shape).

    Example:
        >>> x = np.full((1, 8, 8, 3), 100, np.uint8)
        >>> int(apply_transform(x, "brightness", 1.5)[0, 0, 0, 0])
        150
    """
    x = as_uint8_images(images)
    if name == "none":
        return x.copy()
    if name == "regenerate":
        if regenerate is None:
            raise ValueError("transform 'regenerate' needs a `regenerate(images, strength)`.")
        out = as_uint8_images(regenerate(x.copy(), strength))  # type: ignore[arg-type]
        if out.shape != x.shape:
            raise ValueError(f"`regenerate` returned shape {out.shape}, expected {x.shape}.")
        return out
    if name not in TRANSFORMS:
        raise ValueError(
            f"unknown transform {name!r}; use one of {[*TRANSFORMS, 'regenerate', 'none']}."
        )
    s = _check_strength(name, strength)  # type: ignore[arg-type]
    h, w = x.shape[1:3]
    if name == "jpeg":
        return np.stack([_jpeg(im, round(s)) for im in x]) if len(x) else x.copy()
    if name in ("resize", "crop"):
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        out = []
        for im in x:
            if name == "resize":
                small = _resize(im, (sh, sw), down=True)
            else:
                top, left = (h - sh) // 2, (w - sw) // 2
                small = im[top : top + sh, left : left + sw]
            out.append(_resize(small, (h, w), down=False))
        return np.stack(out) if out else x.copy()
    if name == "rotate":
        m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), s, 1.0)
        flags, border = cv2.INTER_LINEAR, cv2.BORDER_CONSTANT
        rot = [cv2.warpAffine(im, m, (w, h), flags=flags, borderMode=border) for im in x]
        return np.stack(rot) if rot else x.copy()
    if name == "blur":
        sigma = s * min(h, w)
        if sigma == 0:
            return x.copy()
        blur = [cv2.GaussianBlur(im, (0, 0), sigmaX=sigma, sigmaY=sigma) for im in x]
        return np.stack(blur) if blur else x.copy()
    xf = x.astype(np.float64)
    if name == "noise":
        xf = xf + np.random.default_rng(seed).normal(0.0, s * 255.0, size=x.shape)
    else:  # brightness
        xf = xf * s
    return np.clip(np.rint(xf), 0, 255).astype(np.uint8)


RegenerateFloat = Callable[[Tensor, Sequence[str], float, Sequence[int]], Tensor]
"""``(images (N, 3, S, S) in [0, 1], prompts, strength, seeds) -> images``: a generator's
``regenerate`` (or an engine's ``regenerate_images`` bound to the model)."""


def model_regenerator(
    generator: ImageGenerator,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    run: RegenerateFloat | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> Regenerate:
    """A ``regenerate(images, strength)`` for :func:`apply_transform`: SDEdit by a generator.

    Row ``i`` of the images is regenerated with ``prompts[i]`` and the noise of ``seeds[i]``
    (the rows of :func:`watermark_table` are in the order of its prompts and seeds, marked and
    unmarked alike). The generator works at ``generator.image_size``: images of another size
    (the post-hoc marks' 256 px deliveries) are resized to it (area), regenerated and resized
    back (bicubic), so the attack includes that resize; strength 0 is that round trip alone
    (no model call), the control that tells the resize's damage from the regeneration's.

    Args:
        generator: an ``ImageGenerator`` with ``regenerate`` (or any, with ``run``).
        prompts: one prompt per image row.
        seeds: one seed per row (default ``0, 1, ...``).
        run: what regenerates float images (default ``generator.regenerate``; the check passes
            its engine's ``regenerate_images``).
        steps: the sampler's steps of a full run (the generator's default when None).
        guidance: classifier-free guidance scale (the generator's default when None).

    Returns:
        ``regenerate(images uint8 (N, H, W, 3), strength) -> uint8 (N, H, W, 3)``.

    Example:
        >>> class Blank:  # a stand-in whose "regeneration" is a grey image
        ...     image_size = 8
        >>> grey = lambda x, prompts, strength, seeds: torch.full_like(x, 0.5)
        >>> regen = model_regenerator(Blank(), ["a"], [0], run=grey)
        >>> out = regen(np.zeros((1, 16, 16, 3), np.uint8), 0.3)
        >>> out.shape, int(out.min()), int(out.max())
        ((1, 16, 16, 3), 128, 128)
    """
    prompts = [str(p) for p in prompts]
    seeds = list(range(len(prompts))) if seeds is None else [int(x) for x in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"model_regenerator: {len(seeds)} seeds for {len(prompts)} prompts.")
    side = int(generator.image_size)

    def _default(x: Tensor, p: Sequence[str], strength: float, s: Sequence[int]) -> Tensor:
        with torch.no_grad():
            return generator.regenerate(x, p, strength, s, steps=steps, guidance=guidance)

    call = run if run is not None else _default

    def regenerate(images: np.ndarray, strength: float) -> np.ndarray:
        x = as_uint8_images(images)
        n, h, w = x.shape[:3]
        if n != len(prompts):
            raise ValueError(f"regenerate: {n} images for {len(prompts)} prompts and seeds.")
        small = x if (h, w) == (side, side) else _resize_all(x, (side, side))
        if float(strength) <= 0.0:  # the control: the resize round trip alone, no model
            out = small
        else:
            out = as_uint8_images(call(as_float_images(small), prompts, float(strength), seeds))
        return out if (h, w) == (side, side) else _resize_all(out, (h, w))

    return regenerate


def _resize_all(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` to ``size``: area down, bicubic up (as the ``resize`` attack)."""
    down = size[0] * size[1] < images.shape[1] * images.shape[2]
    out = [_resize(im, size, down=down) for im in images]
    return np.stack(out) if out else np.zeros((0, *size, 3), np.uint8)


def _conditions(
    transforms: Mapping[str, Sequence[float]] | None, regenerate: Regenerate | None
) -> list[tuple[str, float | None]]:
    """``("none", None)`` then every ``(name, strength)``, validated up front."""
    transforms = TRANSFORMS if transforms is None else transforms
    out: list[tuple[str, float | None]] = [("none", None)]
    for name, strengths in transforms.items():
        if name == "regenerate":
            if regenerate is None:
                raise ValueError("transform 'regenerate' needs a `regenerate(images, strength)`.")
            out += [(name, float(s)) for s in strengths]
            continue
        if name not in TRANSFORMS:
            raise ValueError(
                f"unknown transform {name!r}; use one of {[*TRANSFORMS, 'regenerate']}."
            )
        out += [(name, _check_strength(name, s)) for s in strengths]
    return out


# ------------------------------------------------------------------------------ metrics
def binomial_threshold(n_bits: int, fpr: float = 0.01) -> float:
    """The smallest bit accuracy ``k / n`` with ``P(Binomial(n, 1/2) >= k) <= fpr``.

    An unmarked image read with a key independent of it matches each bit with probability 1/2,
    so flagging bit accuracy ``>= k / n`` keeps its false-positive rate at most ``fpr``.
    ``inf`` when no ``k <= n`` is rare enough (``2 ** -n > fpr``).

    Example:
        >>> binomial_threshold(32), binomial_threshold(48)
        (0.75, 0.6875)
    """
    n = _check_int(n_bits, "n_bits")
    _check_fpr(fpr)
    ks = np.arange(n + 1)
    ok = stats.binom.sf(ks - 1, n, 0.5) <= fpr
    return float(ks[ok][0] / n) if ok.any() else math.inf


def _check_fpr(fpr: Any) -> float:
    if not (isinstance(fpr, numbers.Real) and 0.0 <= float(fpr) < 1.0):
        raise ValueError(f"`fpr` must be in [0, 1), got {fpr!r}.")
    return float(fpr)


def _scores(x: Any, name: str) -> np.ndarray:
    s = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"`{name}` must be a non-empty 1-D array of finite scores.")
    return s


def _threshold(scores_clean: np.ndarray, fpr: float) -> float:
    """The clean score to beat: the ``(floor(fpr * n) + 1)``-th largest (``-inf`` if none)."""
    k = math.floor(fpr * scores_clean.size + 1e-9)
    if k >= scores_clean.size:
        return -math.inf
    return float(np.sort(scores_clean)[::-1][k])


def tpr_at_fpr(scores_watermarked: Any, scores_clean: Any, fpr: float = 0.01) -> float:
    """Share of watermarked images detected at a threshold flagging at most ``fpr`` clean ones.

    Detected = score strictly above the ``(floor(fpr * n_clean) + 1)``-th largest clean score;
    equal to ``max(tpr[fpr_curve <= fpr])`` on scikit-learn's
    ``roc_curve(y, s, drop_intermediate=False)`` (watermarked = 1). Higher score = watermarked.

    Example:
        >>> tpr_at_fpr([0.9, 0.8, 0.6, 0.5], [0.7, 0.5, 0.4, 0.3])
        0.5
    """
    pos, neg = (
        _scores(scores_watermarked, "scores_watermarked"),
        _scores(scores_clean, "scores_clean"),
    )
    return float((pos > _threshold(neg, _check_fpr(fpr))).mean())


@dataclass(frozen=True)
class DetectionMetrics:
    """Detection of watermarked (positive) against clean (negative) images by a score.

    Attributes:
        tpr: TPR at the threshold (:func:`tpr_at_fpr`), with ``tpr_ci`` its Wilson interval.
        threshold: the clean score a watermarked one must exceed.
        fpr_observed: share of clean images above the threshold (at most ``fpr``).
        auroc: area under the ROC, with ``auroc_ci`` its percentile bootstrap interval.
        n_watermarked, n_clean: the two sample sizes.
    """

    tpr: float
    tpr_ci: tuple[float, float]
    threshold: float
    fpr_observed: float
    auroc: float
    auroc_ci: tuple[float, float]
    n_watermarked: int
    n_clean: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def detection_metrics(
    scores_watermarked: Any,
    scores_clean: Any,
    *,
    fpr: float = 0.01,
    level: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
) -> DetectionMetrics:
    """TPR at ``fpr`` (Wilson CI) and AUROC (bootstrap CI) of a watermark detector's scores.

    Args:
        scores_watermarked: ``(N_w,)`` scores of watermarked images (higher = watermarked).
        scores_clean: ``(N_c,)`` scores of the same kind of images without the watermark.
        fpr: the false-positive rate to hold (see :func:`tpr_at_fpr` for small ``N_c``).
        level: confidence level of the intervals.
        n_boot: bootstrap resamples for the AUROC interval.
        seed: bootstrap seed.

    Example:
        >>> m = detection_metrics([0.9, 0.8, 0.6, 0.5], [0.7, 0.5, 0.4, 0.3], n_boot=50)
        >>> m.tpr, m.threshold, m.auroc
        (0.5, 0.7, 0.84375)
    """
    pos, neg = (
        _scores(scores_watermarked, "scores_watermarked"),
        _scores(scores_clean, "scores_clean"),
    )
    thr = _threshold(neg, _check_fpr(fpr))
    hits = int((pos > thr).sum())
    return DetectionMetrics(
        tpr=hits / pos.size,
        tpr_ci=wilson_interval(hits, pos.size, level),
        threshold=thr,
        fpr_observed=float((neg > thr).mean()),
        auroc=auroc(pos, neg),
        auroc_ci=auroc_bootstrap_ci(pos, neg, n_boot=n_boot, level=level, seed=seed),
        n_watermarked=int(pos.size),
        n_clean=int(neg.size),
    )


@dataclass(frozen=True)
class WatermarkRow:
    """One line of the robustness table: a method under one transform at one strength.

    Attributes:
        method: one of :data:`METHODS`.
        transform: a :data:`TRANSFORMS` name, ``"regenerate"`` or ``"none"``.
        strength: the transform's strength (``None`` for ``"none"``).
        n: number of watermarked images (as many clean ones).
        bit_acc: mean bit accuracy of the watermarked images (NaN for Tree-Ring), with
            ``bit_acc_ci`` its percentile bootstrap interval.
        tpr: TPR at ``fpr`` against the clean images' scores, with ``tpr_ci`` (Wilson).
        auroc: AUROC watermarked vs clean, with ``auroc_ci`` (bootstrap).
        tpr_binomial: share of watermarked images at or above :func:`binomial_threshold` (NaN
            for Tree-Ring).
        fpr: the false-positive rate held.
        size: ``(H, W)`` of the images attacked.
        upscaled: whether they were upscaled before embedding.
    """

    method: str
    transform: str
    strength: float | None
    n: int
    bit_acc: float
    bit_acc_ci: tuple[float, float]
    tpr: float
    tpr_ci: tuple[float, float]
    auroc: float
    auroc_ci: tuple[float, float]
    tpr_binomial: float
    fpr: float
    size: tuple[int, int]
    upscaled: bool

    def to_dict(self) -> dict[str, Any]:
        """A dict of plain Python values (NaN where a metric does not apply)."""
        return asdict(self)


def _row(
    method: str,
    condition: tuple[str, float | None],
    scores_wm: np.ndarray,
    scores_clean: np.ndarray,
    *,
    n_bits: int | None,
    size: tuple[int, int],
    upscaled: bool,
    fpr: float,
    level: float,
    n_boot: int,
    seed: int,
) -> WatermarkRow:
    m = detection_metrics(scores_wm, scores_clean, fpr=fpr, level=level, n_boot=n_boot, seed=seed)
    nan = (math.nan, math.nan)
    if n_bits is None:
        bit_acc, bit_ci, tpr_binomial = math.nan, nan, math.nan
    else:
        bit_acc = float(scores_wm.mean())
        bit_ci = mean_ci(scores_wm, n_boot=n_boot, level=level, seed=seed)
        tpr_binomial = float((scores_wm >= binomial_threshold(n_bits, fpr) - 1e-12).mean())
    return WatermarkRow(
        method=method,
        transform=condition[0],
        strength=condition[1],
        n=int(scores_wm.size),
        bit_acc=bit_acc,
        bit_acc_ci=bit_ci,
        tpr=m.tpr,
        tpr_ci=m.tpr_ci,
        auroc=m.auroc,
        auroc_ci=m.auroc_ci,
        tpr_binomial=tpr_binomial,
        fpr=fpr,
        size=size,
        upscaled=upscaled,
    )


def evaluate_watermark(
    images: Any,
    method: str = "dwtDct",
    *,
    n_bits: int = 32,
    key_seed: int = 0,
    transforms: Mapping[str, Sequence[float]] | None = None,
    regenerate: Regenerate | None = None,
    min_size: int = MIN_SIZE,
    fpr: float = 0.01,
    level: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
) -> list[WatermarkRow]:
    """Robustness of a post-hoc watermark on some images: one row per transform and strength.

    Every image is watermarked with one key (:func:`watermark_bits` of ``key_seed``, as a
    deployment marks all its images with its own message). Positives are the watermarked images,
    negatives the same images unmarked (upscaled alike); both get the same transform, and each
    image's score is its bit accuracy against the key.

    Args:
        images: the clean images, uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1].
        method: one of :data:`IMAGE_METHODS` (``"rivaGan"`` needs ``n_bits=32``).
        n_bits: key length.
        key_seed: seed of the key.
        transforms: ``{name: strengths}`` (default :data:`TRANSFORMS`); a row without transform
            (``"none"``) always comes first.
        regenerate: the callable behind a ``"regenerate"`` entry.
        min_size: the shorter side images are upscaled to (see :func:`embed_watermark`).
        fpr: the false-positive rate of the TPR (see :func:`tpr_at_fpr`).
        level: confidence level of the intervals.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap and of the ``noise`` transform.

    Returns:
        One :class:`WatermarkRow` per condition, ``"none"`` first.
    """
    method = _check_method(method)
    conditions = _conditions(transforms, regenerate)
    key = watermark_bits(n_bits, key_seed)
    marked, info = embed_watermark(images, key, method, min_size=min_size)
    clean = upscale_images(images, min_size)
    if len(marked) == 0:
        raise ValueError("`images` is empty; evaluate_watermark needs at least one image.")
    rows = []
    for cond in conditions:
        pair = [
            apply_transform(x, *cond, seed=seed, regenerate=regenerate) for x in (marked, clean)
        ]
        s_wm, s_clean = (bit_accuracy(decode_watermark(x, n_bits, method), key) for x in pair)
        rows.append(
            _row(method, cond, s_wm, s_clean, n_bits=n_bits, size=info.embedded_size,
                 upscaled=info.upscaled, fpr=fpr, level=level, n_boot=n_boot, seed=seed)
        )  # fmt: skip
    return rows


# ------------------------------------------------------------------------------ Tree-Ring
def _check_shape(shape: Any) -> tuple[int, int, int]:
    s = tuple(int(v) for v in shape)
    if len(s) != 3 or min(s) < 1:
        raise ValueError(f"`shape` must be one noise row's (C, H, W), got {tuple(shape)!r}.")
    return s  # type: ignore[return-value]


def _radius(shape: tuple[int, int, int], radius: int | None) -> int:
    side = min(shape[1:])
    r = max(1, round(side * 10 / 64)) if radius is None else _check_int(radius, "radius")
    if 2 * r + 1 > side:
        raise ValueError(f"`radius` {r} does not fit a {shape[1]}x{shape[2]} noise (2r+1 <= side).")
    return r


def _distance_from_centre(h: int, w: int) -> Tensor:
    y = torch.arange(h, dtype=torch.float64)[:, None] - h // 2
    x = torch.arange(w, dtype=torch.float64)[None, :] - w // 2
    return torch.sqrt(y**2 + x**2)


def tree_ring_mask(shape: Sequence[int], radius: int | None = None, channel: int = -1) -> Tensor:
    """Where the key lives: a disc of ``radius`` about the centre of one channel's shifted FFT.

    Args:
        shape: one noise row's ``(C, H, W)``.
        radius: disc radius in frequency bins (default ``round(min(H, W) * 10 / 64)``, the
            paper's 10 for 64x64 latents, at least 1); ``2 * radius + 1 <= min(H, W)``.
        channel: the channel carrying the key (default the last, as the paper's channel 3 of
            Stable Diffusion's 4 latent channels).

    Returns:
        bool ``(C, H, W)``, centred on the zero frequency of ``torch.fft.fftshift``.

    Example:
        >>> m = tree_ring_mask((2, 8, 8), radius=1)
        >>> int(m[1].sum()), int(m[0].sum())
        (5, 0)
    """
    c, h, w = _check_shape(shape)
    r = _radius((c, h, w), radius)
    if not -c <= channel < c:
        raise ValueError(f"`channel` {channel} is out of range for {c} channels.")
    mask = torch.zeros((c, h, w), dtype=torch.bool)
    mask[channel] = _distance_from_centre(h, w) <= r
    return mask


def tree_ring_key(shape: Sequence[int], seed: int = 0, radius: int | None = None) -> Tensor:
    """The Tree-Ring "ring" key: constant values on concentric rings of the shifted FFT.

    As in the paper's code: the centred FFT ``F`` of a seeded standard Gaussian of ``shape`` is
    drawn, and for ``i = radius .. 1`` the disc of radius ``i`` of every channel is set to
    ``F[c, 0, i]``, so ring ``i`` (distances in ``(i - 1, i]``, the centre with ring 1) holds one
    value per channel. Unlike the paper's code the values are real (``F``'s real part) and the
    disc is centred exactly on the zero frequency: the pattern is then Hermitian-symmetric, the
    inverse FFT of the marked noise is real, and :func:`embed_tree_ring` writes the key exactly
    (the paper takes the real part of a complex pattern and loses half of it).

    Args:
        shape: one noise row's ``(C, H, W)``.
        seed: seed of the key (``torch.Generator().manual_seed(seed)``).
        radius: the outermost ring (default as in :func:`tree_ring_mask`).

    Returns:
        complex128 ``(C, H, W)``; zero outside the disc.

    Example:
        >>> k = tree_ring_key((1, 8, 8), seed=0, radius=2)
        >>> bool(k[0, 4, 4] == k[0, 4, 5]), bool(k[0, 4, 6] != k[0, 4, 5]), float(k[0, 0, 0].abs())
        (True, True, 0.0)
    """
    c, h, w = _check_shape(shape)
    r = _radius((c, h, w), radius)
    g = torch.randn(
        (c, h, w), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64
    )
    f = torch.fft.fftshift(torch.fft.fft2(g), dim=(-2, -1))
    dist = _distance_from_centre(h, w)
    key = torch.zeros((c, h, w), dtype=torch.complex128)
    for i in range(r, 0, -1):
        key[:, dist <= i] = f[:, 0, i].real.to(torch.complex128)[:, None]
    return key


def _check_noise(noise: Any, key: Tensor, mask: Tensor) -> Tensor:
    if not isinstance(noise, Tensor) or noise.ndim != 4:
        raise ValueError(
            f"`noise` must be a (B, C, H, W) tensor, got {getattr(noise, 'shape', noise)!r}."
        )
    if tuple(key.shape) != tuple(noise.shape[1:]) or tuple(mask.shape) != tuple(noise.shape[1:]):
        raise ValueError(
            f"key {tuple(key.shape)} and mask {tuple(mask.shape)} must match one noise row "
            f"{tuple(noise.shape[1:])}."
        )
    if mask.dtype != torch.bool or not bool(mask.any()):
        raise ValueError("`mask` must be a non-empty bool tensor (see tree_ring_mask).")
    return noise


def _shifted_fft(noise: Tensor) -> Tensor:
    return torch.fft.fftshift(torch.fft.fft2(noise.to(torch.float64)), dim=(-2, -1))


def embed_tree_ring(noise: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    """Write the key into the initial noise: ``FFT(noise)[mask] = key[mask]``, back to real.

    Args:
        noise: ``(B, C, H, W)`` initial noise (a generator's ``initial_noise``).
        key: complex ``(C, H, W)`` (:func:`tree_ring_key`).
        mask: bool ``(C, H, W)`` (:func:`tree_ring_mask`).

    Returns:
        The marked noise, same shape, dtype and device as ``noise``.

    Example:
        >>> z = torch.zeros(1, 1, 8, 8)
        >>> bool(embed_tree_ring(z, tree_ring_key((1, 8, 8)), tree_ring_mask((1, 8, 8))).any())
        True
    """
    _check_noise(noise, key, mask)
    f = _shifted_fft(noise)
    m = mask.to(f.device)
    f[:, m] = key.to(f.device, torch.complex128)[m]
    out = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real
    return out.to(noise.dtype)


def tree_ring_distance(noise: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    """Mean ``|FFT(noise) - key|`` over the mask, per row ``(B,)`` float64 (lower = marked).

    Example:
        >>> key, mask = tree_ring_key((1, 8, 8)), tree_ring_mask((1, 8, 8))
        >>> marked = embed_tree_ring(torch.zeros(1, 1, 8, 8, dtype=torch.float64), key, mask)
        >>> float(tree_ring_distance(marked, key, mask)[0]) < 1e-9
        True
    """
    _check_noise(noise, key, mask)
    f = _shifted_fft(noise)
    m = mask.to(f.device)
    return (f[:, m] - key.to(f.device, torch.complex128)[m]).abs().mean(dim=1).cpu()


def _tree_ring_images(
    generator: ImageGenerator, prompts: Sequence[str], seeds: Sequence[int], key: Tensor,
    mask: Tensor, steps: int | None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """uint8 images generated from the marked and from the unmarked noise of the seeds."""
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(
            f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds."
        )
    with torch.no_grad():
        noise = generator.initial_noise([int(s) for s in seeds])
        marked = embed_tree_ring(noise, key, mask)
        img_wm = generator.generate(list(prompts), noise=marked, steps=steps)
        img_clean = generator.generate(list(prompts), noise=noise, steps=steps)
    return as_uint8_images(img_wm), as_uint8_images(img_clean)


def _tree_ring_scores(
    generator: ImageGenerator, images: np.ndarray, key: Tensor, mask: Tensor,
    invert_prompts: Sequence[str] | None, steps: int | None,
) -> np.ndarray:  # fmt: skip
    """Negative key distance of the noise the generator inverts each image to."""
    prompts = [""] * len(images) if invert_prompts is None else list(invert_prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} invert_prompts for {len(images)} images.")
    with torch.no_grad():
        noise = generator.invert(as_float_images(images), prompts, steps=steps)
    return -tree_ring_distance(noise, key, mask).numpy()


def tree_ring_detect(
    generator: ImageGenerator,
    prompts: Sequence[str],
    seeds: Sequence[int],
    key: Tensor,
    mask: Tensor,
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    invert_prompts: Sequence[str] | None = None,
    steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tree-Ring end to end: embed -> generate -> transform -> invert -> distance.

    Each (prompt, seed) is generated twice, from its initial noise with and without the key;
    both images are quantised to uint8 (as delivered), transformed, inverted to noise with the
    generator's deterministic ``invert`` and scored by the negative key distance.

    Args:
        generator: an ``ImageGenerator`` with ``invert`` (``mmsafe.models.generator``).
        prompts: one prompt per image.
        seeds: one seed per prompt.
        key: :func:`tree_ring_key` of ``initial_noise``'s row shape.
        mask: :func:`tree_ring_mask` of the same shape.
        transform: ``uint8 (N, H, W, 3) -> uint8 (N, H, W, 3)`` attack, e.g.
            ``functools.partial(apply_transform, name="jpeg", strength=50)``.
        invert_prompts: the prompts given to ``invert`` (default ``""`` each: the detector does
            not know the prompt, as in the paper).
        steps: sampler and inversion steps (the generator's default when None).

    Returns:
        ``(scores_watermarked, scores_clean)``, ``(N,)`` each; higher = watermarked.
    """
    img_wm, img_clean = _tree_ring_images(generator, prompts, seeds, key, mask, steps)
    if transform is not None:
        img_wm, img_clean = (
            as_uint8_images(transform(img_wm)),
            as_uint8_images(transform(img_clean)),
        )
    return (
        _tree_ring_scores(generator, img_wm, key, mask, invert_prompts, steps),
        _tree_ring_scores(generator, img_clean, key, mask, invert_prompts, steps),
    )


def evaluate_tree_ring(
    generator: ImageGenerator,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    radius: int | None = None,
    channel: int = -1,
    key_seed: int = 0,
    transforms: Mapping[str, Sequence[float]] | None = None,
    regenerate: Regenerate | None = None,
    invert_prompts: Sequence[str] | None = None,
    steps: int | None = None,
    fpr: float = 0.01,
    level: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
) -> list[WatermarkRow]:
    """Robustness of Tree-Ring in a generator: one row per transform and strength.

    The images are generated once (marked and unmarked noise of each seed, see
    :func:`tree_ring_detect`); every condition then transforms, inverts and scores both.

    Args:
        generator: an ``ImageGenerator`` with ``invert``.
        prompts: one prompt per image.
        seeds: one seed per prompt (default ``0, 1, ...``).
        radius: the key's radius (:func:`tree_ring_mask`).
        channel: the channel carrying the key.
        key_seed: seed of the key.
        transforms: ``{name: strengths}`` (default :data:`TRANSFORMS`), after a ``"none"`` row.
        regenerate: the callable behind a ``"regenerate"`` entry.
        invert_prompts: prompts for ``invert`` (default ``""``, see :func:`tree_ring_detect`).
        steps: sampler and inversion steps (the generator's default when None).
        fpr: the false-positive rate of the TPR.
        level: confidence level of the intervals.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap and of the ``noise`` transform.

    Returns:
        One :class:`WatermarkRow` per condition (``bit_acc`` and ``tpr_binomial`` NaN).
    """
    conditions = _conditions(transforms, regenerate)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    with torch.no_grad():
        shape = tuple(generator.initial_noise(seeds[:1]).shape[1:])
    key, mask = tree_ring_key(shape, key_seed, radius), tree_ring_mask(shape, radius, channel)
    img_wm, img_clean = _tree_ring_images(generator, prompts, seeds, key, mask, steps)
    size = (int(img_wm.shape[1]), int(img_wm.shape[2]))
    rows = []
    for cond in conditions:
        s_wm, s_clean = (
            _tree_ring_scores(
                generator, apply_transform(x, *cond, seed=seed, regenerate=regenerate), key, mask,
                invert_prompts, steps,
            )
            for x in (img_wm, img_clean)
        )  # fmt: skip
        rows.append(
            _row("treeRing", cond, s_wm, s_clean, n_bits=None, size=size, upscaled=False,
                 fpr=fpr, level=level, n_boot=n_boot, seed=seed)
        )  # fmt: skip
    return rows


def watermark_table(
    images: Any = None,
    *,
    methods: Sequence[str] = METHODS,
    generator: ImageGenerator | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    transforms: Mapping[str, Sequence[float]] | None = None,
    regenerate: Regenerate | None = None,
    n_bits: int = 32,
    key_seed: int = 0,
    min_size: int = MIN_SIZE,
    radius: int | None = None,
    channel: int = -1,
    steps: int | None = None,
    fpr: float = 0.01,
    level: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
) -> list[WatermarkRow]:
    """The robustness table: method x transform x strength -> bit accuracy, TPR, AUROC.

    The post-hoc methods mark ``images`` (or, when None, the generator's images of ``prompts``
    and ``seeds``); Tree-Ring needs the generator. RivaGAN always carries 32 bits, dwtDct and
    dwtDctSvd ``n_bits``.

    Args:
        images: clean images for the post-hoc methods (None: generate them).
        methods: any of :data:`METHODS`.
        generator: the generator, for Tree-Ring and for ``images=None``.
        prompts: one prompt per image to generate.
        seeds: one seed per prompt (default ``0, 1, ...``).
        transforms: ``{name: strengths}`` (default :data:`TRANSFORMS`), after a ``"none"`` row.
        regenerate: the callable behind a ``"regenerate"`` entry.
        n_bits: dwtDct's and dwtDctSvd's key length.
        key_seed: seed of the keys.
        min_size: the shorter side the post-hoc methods upscale to.
        radius: Tree-Ring's radius (:func:`tree_ring_mask`).
        channel: Tree-Ring's channel.
        steps: sampler and inversion steps (the generator's default when None).
        fpr: the false-positive rate of the TPR.
        level: confidence level of the intervals.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap and of the ``noise`` transform.

    Returns:
        The rows of :func:`evaluate_watermark` / :func:`evaluate_tree_ring`, method by method.

    Raises:
        ValueError: an unknown method, or no generator and prompts where they are needed.
    """
    for m in methods:
        _check_method(m, METHODS)
    needs_generator = "treeRing" in methods or (images is None and bool(methods))
    if needs_generator and (generator is None or not prompts):
        raise ValueError("Tree-Ring, and generating the images, need a `generator` and `prompts`.")
    if seeds is None and prompts:
        seeds = list(range(len(prompts)))
    if images is None and any(m in IMAGE_METHODS for m in methods):
        assert generator is not None and prompts  # checked above
        with torch.no_grad():
            images = generator.generate(list(prompts), seeds=seeds, steps=steps)
    rows: list[WatermarkRow] = []
    for m in methods:
        if m == "treeRing":
            assert generator is not None and prompts  # checked above
            rows += evaluate_tree_ring(
                generator, prompts, seeds, radius=radius, channel=channel, key_seed=key_seed,
                transforms=transforms, regenerate=regenerate, steps=steps, fpr=fpr, level=level,
                n_boot=n_boot, seed=seed,
            )  # fmt: skip
        else:
            rows += evaluate_watermark(
                images, m, n_bits=RIVAGAN_BITS if m == "rivaGan" else n_bits, key_seed=key_seed,
                transforms=transforms, regenerate=regenerate, min_size=min_size, fpr=fpr,
                level=level, n_boot=n_boot, seed=seed,
            )  # fmt: skip
    return rows
