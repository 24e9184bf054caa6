"""Image corruptions and text perturbations at five graded severities, seeded and batched.

Image corruptions follow ImageNet-C (Hendrycks & Dietterich, ICLR 2019): four families (noise,
blur, weather, digital), five severities each. They act on a batch of pixels ``(B, 3, H, W)``
in ``[0, 1]`` (what :meth:`~mmsafe.models.base.EncoderModel.preprocess` returns) as torch ops on
the batch's device, and return a tensor of the same shape and dtype in ``[0, 1]``. Parameters:

* pixel-wise corruptions (noise, brightness, contrast, JPEG, pixelate, fog, zoom) use the
  ImageNet-C values, which do not depend on the image size;
* spatial lengths in pixels (blur radii and widths, elastic displacement) use the CIFAR-10-C
  values, which the same authors set for 32-pixel images, scaled by ``side / 32``
  (:func:`spatial_lengths`; the ImageNet-C ones are for 224-pixel images and vanish on a
  32-pixel image), so a corruption covers the same part of the picture at any resolution;
* ``saturate`` only over-saturates (ImageNet-C's extra ``saturate`` first desaturates, so its
  change is not monotone in the severity) and ``elastic_transform`` is a smoothed random
  displacement field of fixed RMS size (no affine part).

Text perturbations act on a list of strings at a *rate* (severity ``s`` uses
``TEXT_RATES[s - 1]``): character typos (swap, drop, insert, keyboard neighbour), word drop,
word-order shuffle, case noise, punctuation noise and paraphrase-like rewrites. Every random
draw is made for every position before the rate is applied, so a higher rate perturbs a
superset of the positions a lower one does (same seed).

Everything is deterministic for a given ``seed``, and every row draws from its own stream: row
``i`` uses a CPU ``torch.Generator`` / ``numpy.random.Generator`` seeded by
:func:`row_seed` ``(seed, i)`` (or by a seed the caller gives per row, as the engine does from
row ids), and the numbers are moved to the batch's device. So a row's corruption is a pure
function of its pixels and its seed: the same for any batch size, batch position or device.

Example:
    >>> px = torch.rand(2, 3, 16, 16)
    >>> out = corrupt_images(px, "gaussian_noise", severity=3, seed=0)
    >>> out.shape == px.shape, bool(out.min() >= 0), bool(out.max() <= 1)
    (True, True, True)
    >>> perturb_texts(["a red circle"], "char_swap", severity=5, seed=0) != ["a red circle"]
    True
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from mmsafe.methods.resolution import length_scale

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
"""The five severities of every corruption and perturbation."""

ImageCorruption = Callable[[Tensor, int, Sequence[torch.Generator]], Tensor]
TextPerturbation = Callable[[str, float, np.random.Generator], str]

# --------------------------------------------------------------------------- parameters
# ImageNet-C (pixel-wise, size-free) ------------------------------------------------------
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)
ZOOM_BLUR = (0.11, 0.16, 0.21, 0.26, 0.31)  # largest zoom - 1 (ImageNet-C steps 0.01..0.03)
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (3.0, 1.5), (3.5, 1.4))  # ImageNet-C, c0 rising
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
SATURATE = ((2.0, 0.0), (3.0, 0.05), (5.0, 0.1), (10.0, 0.15), (20.0, 0.2))
# CIFAR-10-C (spatial, in pixels at side 32) ---------------------------------------------
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
MOTION_BLUR = ((10.0, 1.0), (10.0, 1.5), (10.0, 2.0), (10.0, 2.5), (12.0, 3.0))
ELASTIC = (0.5, 0.8, 1.1, 1.4, 1.8)  # RMS displacement in pixels, field smoothed by sigma 2
ELASTIC_SMOOTHING = 2.0  # sigma of the displacement field's smoothing, in pixels at side 32

TEXT_RATES: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
"""The perturbation rate of text severities 1..5."""


def _check_severity(severity: int) -> int:
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return int(severity) - 1


def row_seed(seed: int, row: int | str) -> int:
    """The seed of one row's random stream: a 63-bit hash of ``(seed, row)``.

    ``row`` is a row's position or its id; the result never depends on other rows.

    Example:
        >>> row_seed(0, 1) == row_seed(0, 1) != row_seed(0, 2)
        True
    """
    blob = f"{int(seed)}\x1f{type(row).__name__}\x1f{row}".encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def generators(row_seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per row seed."""
    return [torch.Generator().manual_seed(int(s)) for s in row_seeds]


def _per_row(gens: Sequence[torch.Generator], draw: Callable[[torch.Generator], Tensor]) -> Tensor:
    return torch.stack([draw(g) for g in gens])


def _rand(shape: Sequence[int], gens: Sequence[torch.Generator], like: Tensor) -> Tensor:
    one = tuple(shape[1:])
    return _per_row(gens, lambda g: torch.rand(one, generator=g)).to(like.device, like.dtype)


def _randn(shape: Sequence[int], gens: Sequence[torch.Generator], like: Tensor) -> Tensor:
    one = tuple(shape[1:])
    return _per_row(gens, lambda g: torch.randn(one, generator=g)).to(like.device, like.dtype)


def spatial_lengths(name: str, severity: int, side: int) -> dict[str, float]:
    """The pixel lengths corruption ``name`` uses at ``severity`` on images of ``side`` pixels.

    The CIFAR-10-C values are lengths at side 32; each is multiplied by
    :func:`~mmsafe.methods.resolution.length_scale` ``(side)``, so at 64 px a blur is twice as
    wide as at 32 px and covers the same part of the picture. Corruptions without a spatial
    length (noise, the digital ones; zoom and pixelate are relative already) give ``{}``.

    Example:
        >>> spatial_lengths("gaussian_blur", 5, 32), spatial_lengths("gaussian_blur", 5, 64)
        ({'sigma': 1.0}, {'sigma': 2.0})
        >>> spatial_lengths("contrast", 1, 224)
        {}
    """
    i = _check_severity(severity)
    s = length_scale(side)
    if name == "gaussian_blur":
        return {"sigma": GAUSSIAN_BLUR[i] * s}
    if name == "defocus_blur":
        return {"radius": DEFOCUS_BLUR[i][0] * s, "alias_sigma": DEFOCUS_BLUR[i][1] * s}
    if name == "motion_blur":
        return {"radius": MOTION_BLUR[i][0] * s, "sigma": MOTION_BLUR[i][1] * s}
    if name == "elastic_transform":
        return {"displacement": ELASTIC[i] * s, "smoothing_sigma": ELASTIC_SMOOTHING * s}
    if name not in IMAGE_CORRUPTIONS:
        raise ValueError(
            f"Unknown image corruption {name!r}; choose from {', '.join(IMAGE_CORRUPTIONS)}."
        )
    return {}


def _side(x: Tensor) -> int:
    """The side that spatial lengths scale with: the shorter one of the batch's images."""
    return int(min(x.shape[-2:]))


# --------------------------------------------------------------------------- colour spaces


def rgb_to_hsv(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` RGB in ``[0, 1]`` to HSV with every channel in ``[0, 1]``.

    Example:
        >>> rgb_to_hsv(torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)).flatten().tolist()
        [0.0833333358168602, 1.0, 1.0]
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        maxc == r,
        ((g - b) / safe) % 6,
        torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), maxc * 0)
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`.

    Example:
        >>> px = torch.rand(2, 3, 4, 4)
        >>> bool(torch.allclose(hsv_to_rgb(rgb_to_hsv(px)), px, atol=1e-5))
        True
    """
    h, s, v = x.unbind(1)
    h6 = (h % 1.0) * 6.0
    k = torch.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], 1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * f


# --------------------------------------------------------------------------- filters


def _gaussian_kernel1d(sigma: float, like: Tensor) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * max(sigma, 1e-6) ** 2))
    return (k / k.sum()).to(like.device, like.dtype)


def _conv_same(x: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 2-D convolution with one ``(kh, kw)`` kernel, or one per image ``(B, kh, kw)``.

    Borders are reflected (as scipy's and OpenCV's defaults do).
    """
    b, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    ph, pw = kh // 2, kw // 2
    mode = "reflect" if ph < h and pw < w else "replicate"
    xp = F.pad(x, (pw, kw - 1 - pw, ph, kh - 1 - ph), mode=mode)
    if kernel.ndim == 2:  # one kernel for the batch: C groups
        return F.conv2d(xp, kernel.expand(c, 1, kh, kw), groups=c)
    weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, kh, kw)
    out = F.conv2d(xp.reshape(1, b * c, *xp.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def gaussian_filter(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with standard deviation ``sigma`` pixels.

    Example:
        >>> x = torch.zeros(1, 1, 9, 9); x[..., 4, 4] = 1.0
        >>> round(float(gaussian_filter(x, 1.0).sum()), 4)
        1.0
    """
    if sigma <= 0:
        return x
    k = _gaussian_kernel1d(sigma, x)
    return _conv_same(_conv_same(x, k[None, :]), k[:, None])


def _disk_kernel(radius: float, alias_sigma: float, like: Tensor) -> Tensor:
    """A disk of ``radius`` pixels (area-weighted by 8x8 supersampling), Gaussian-smoothed."""
    r = max(1, math.ceil(radius + 3 * alias_sigma))
    sub = (torch.arange(8, dtype=torch.float64) + 0.5) / 8 - 0.5
    grid = torch.arange(-r, r + 1, dtype=torch.float64)
    yy = (grid[:, None, None, None] + sub[None, None, :, None]) ** 2
    xx = (grid[None, :, None, None] + sub[None, None, None, :]) ** 2
    disk = ((yy + xx) <= max(radius, 0.5) ** 2).double().mean(dim=(2, 3))
    g = torch.exp(-(grid**2) / (2 * max(alias_sigma, 1e-6) ** 2))
    g2 = torch.outer(g, g) / torch.outer(g, g).sum()
    k2 = F.conv2d(disk[None, None], g2[None, None], padding=r)[0, 0]
    return (k2 / k2.sum()).to(like.device, like.dtype)


# --------------------------------------------------------------------------- noise


def gaussian_noise(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Additive Gaussian noise with standard deviation ``GAUSSIAN_NOISE[severity - 1]``."""
    c = GAUSSIAN_NOISE[_check_severity(severity)]
    return (x + c * _randn(x.shape, gens, x)).clamp(0, 1)


def shot_noise(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Poisson (photon) noise: ``Poisson(x * c) / c`` with ``c = SHOT_NOISE[severity - 1]``."""
    c = SHOT_NOISE[_check_severity(severity)]
    rate = (x.detach().double().cpu() * c).clamp_min(0)
    counts = torch.stack([torch.poisson(r, generator=g) for r, g in zip(rate, gens, strict=True)])
    return (counts / c).to(x.device, x.dtype).clamp(0, 1)


def impulse_noise(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Salt-and-pepper noise on a fraction ``IMPULSE_NOISE[severity - 1]`` of the values."""
    amount = IMPULSE_NOISE[_check_severity(severity)]
    u = _rand(x.shape, gens, x)
    salt = _rand(x.shape, gens, x) < 0.5
    hit = u < amount
    return torch.where(hit, salt.to(x.dtype), x)


def speckle_noise(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Multiplicative noise ``x + x * N(0, c^2)`` with ``c = SPECKLE_NOISE[severity - 1]``."""
    c = SPECKLE_NOISE[_check_severity(severity)]
    return (x + x * c * _randn(x.shape, gens, x)).clamp(0, 1)


# --------------------------------------------------------------------------- blur


def gaussian_blur(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Gaussian blur with ``sigma = GAUSSIAN_BLUR[severity - 1]`` pixels at side 32."""
    return gaussian_filter(x, spatial_lengths("gaussian_blur", severity, _side(x))["sigma"]).clamp(
        0, 1
    )


def defocus_blur(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Convolution with a Gaussian-smoothed disk (``DEFOCUS_BLUR``: radius, smoothing sigma)."""
    ln = spatial_lengths("defocus_blur", severity, _side(x))
    return _conv_same(x, _disk_kernel(ln["radius"], ln["alias_sigma"], x)).clamp(0, 1)


def motion_blur(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """One-sided Gaussian line kernel at a random angle in ``[-45, 45]`` degrees per image.

    ``MOTION_BLUR`` gives ``(radius, sigma)`` at side 32 as in ImageMagick's motion blur: taps
    at distance ``d = 0..radius`` along the angle weigh ``exp(-d^2 / (2 sigma^2))``.
    """
    ln = spatial_lengths("motion_blur", severity, _side(x))
    radius, sigma = ln["radius"], ln["sigma"]
    b = x.shape[0]
    u = _per_row(gens, lambda g: torch.rand((), generator=g, dtype=torch.float64))
    angles = (u * 90 - 45) * math.pi / 180
    r = max(1, math.ceil(min(radius, 3 * sigma)))
    taps = torch.arange(0, r + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    size = 2 * r + 1
    kernel = torch.zeros(b, size, size, dtype=torch.float64)
    for sub in torch.linspace(-0.5, 0.5, 5, dtype=torch.float64):  # 5 sub-steps: fewer gaps
        d = (taps + sub).clamp(0, r)
        px = (r + d[None, :] * torch.cos(angles)[:, None]).round().long()
        py = (r + d[None, :] * torch.sin(angles)[:, None]).round().long()
        idx = (py * size + px).clamp(0, size * size - 1)
        kernel.view(b, -1).scatter_add_(1, idx, weights.expand(b, -1).clone())
    kernel = kernel / kernel.sum(dim=(1, 2), keepdim=True)
    return _conv_same(x, kernel.to(x.device, x.dtype)).clamp(0, 1)


def zoom_blur(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """The mean of the image and centre zooms up to ``1 + ZOOM_BLUR[severity - 1]``."""
    top = ZOOM_BLUR[_check_severity(severity)]
    factors = np.arange(1.01, 1.0 + top + 1e-9, 0.01 if top <= 0.16 else 0.02)
    b, c, h, w = x.shape
    inv = torch.as_tensor(1.0 / factors, dtype=x.dtype, device=x.device)
    theta = torch.zeros(len(factors), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = inv
    theta[:, 1, 1] = inv
    grid = F.affine_grid(theta, [len(factors), 1, h, w], align_corners=False)
    # every zoom of every image in one call: images as channels, zooms as the batch
    stacked = x.reshape(1, b * c, h, w).expand(len(factors), b * c, h, w)
    zooms = F.grid_sample(
        stacked, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    out = x + zooms.sum(0).reshape(b, c, h, w)
    return (out / (len(factors) + 1)).clamp(0, 1)


# --------------------------------------------------------------------------- weather


def _fractal(h: int, w: int, decay: float, gens: Sequence[torch.Generator], like: Tensor) -> Tensor:
    """Plasma-like fractal noise in ``[0, 1]`` per image.

    Octaves of bilinearly upsampled uniform noise, amplitude ``decay ** -k`` at octave ``k``
    (the same draws for every ``decay``).
    """
    size = 2 ** math.ceil(math.log2(max(h, w, 2)))
    out = torch.zeros(len(gens), 1, size, size, dtype=torch.float64)
    k, n = 0, 2
    while n <= size:
        noise = _per_row(gens, lambda g, n=n: torch.rand(1, n, n, generator=g, dtype=torch.float64))
        out += F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) * (
            decay**-k
        )
        k, n = k + 1, n * 2
    out = out[..., :h, :w]
    lo = out.amin(dim=(2, 3), keepdim=True)
    hi = out.amax(dim=(2, 3), keepdim=True)
    return ((out - lo) / (hi - lo).clamp_min(1e-12)).to(like.device, like.dtype)


def fog(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """ImageNet-C fog: ``(x + c0 * fractal(decay=c1)) * max(x) / (max(x) + c0)``."""
    c0, c1 = FOG[_check_severity(severity)]
    h, w = x.shape[-2:]
    f = _fractal(h, w, c1, gens, x)
    mx = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + c0 * f) * mx / (mx + c0)).clamp(0, 1)


# --------------------------------------------------------------------------- digital


def brightness(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Add ``BRIGHTNESS[severity - 1]`` to the HSV value channel."""
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + BRIGHTNESS[_check_severity(severity)]).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def contrast(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Shrink every pixel towards the image mean by the factor ``CONTRAST[severity - 1]``."""
    c = CONTRAST[_check_severity(severity)]
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


def saturate(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Over-saturate: HSV saturation ``s * c0 + c1`` with ``SATURATE[severity - 1]``."""
    c0, c1 = SATURATE[_check_severity(severity)]
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c0 + c1).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def pixelate(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Downsample to ``PIXELATE[severity - 1]`` of the side, then upsample to blocks.

    Antialiased bilinear down, ``nearest-exact`` up (centre-aligned blocks, so the error grows
    with the severity also when the ratio does not divide the side).
    """
    c = PIXELATE[_check_severity(severity)]
    h, w = x.shape[-2:]
    size = (max(1, int(h * c)), max(1, int(w * c)))
    small = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="nearest-exact").clamp(0, 1)


def jpeg_compression(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Encode and decode each image as JPEG (PIL) at quality ``JPEG_QUALITY[severity - 1]``."""
    from PIL import Image

    q = JPEG_QUALITY[_check_severity(severity)]
    arr = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for img in arr.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    back = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
    return back


def elastic_transform(x: Tensor, severity: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Warp by a smoothed random displacement field of RMS ``ELASTIC[severity - 1]`` pixels.

    The field is uniform noise smoothed by a Gaussian of sigma 2 px (both lengths at side 32);
    sampling is bilinear with replicated borders.
    """
    b, _, h, w = x.shape
    ln = spatial_lengths("elastic_transform", severity, _side(x))
    field = (_rand((b, 2, h, w), gens, x) * 2 - 1).to(x.device, x.dtype)
    field = gaussian_filter(field, ln["smoothing_sigma"])
    rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    disp = field / rms * ln["displacement"]  # pixels
    ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack(
        [gx + disp[:, 0] * 2 / max(w - 1, 1), gy + disp[:, 1] * 2 / max(h - 1, 1)], dim=-1
    )
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.clamp(0, 1)


IMAGE_CORRUPTIONS: dict[str, ImageCorruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "elastic_transform": elastic_transform,
}
"""Every image corruption by name, in ImageNet-C family order (noise, blur, weather, digital)."""


def corrupt_images(
    pixels: Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
) -> Tensor:
    """Apply the image corruption ``name`` at ``severity`` (1-5) to a batch of pixels.

    Args:
        pixels: ``(B, 3, H, W)`` floats in ``[0, 1]``, on any device.
        name: a key of :data:`IMAGE_CORRUPTIONS`.
        severity: 1 (mild) to 5 (severe).
        seed: row ``i`` draws from a CPU generator seeded by ``row_seed(seed, i)``.
        row_seeds: one seed per row instead (the engine derives them from row ids).

    Returns:
        The corrupted pixels, same shape, dtype and device, in ``[0, 1]``.

    Example:
        >>> px = torch.rand(3, 3, 8, 8)
        >>> a = corrupt_images(px, "shot_noise", 2, seed=1)
        >>> bool(torch.equal(a, corrupt_images(px, "shot_noise", 2, seed=1)))
        True
        >>> bool(torch.equal(a[2:], corrupt_images(px[2:], "shot_noise", 2, row_seeds=[
        ...     row_seed(1, 2)])))
        True
    """
    if name not in IMAGE_CORRUPTIONS:
        raise ValueError(
            f"Unknown image corruption {name!r}; choose from {', '.join(IMAGE_CORRUPTIONS)}."
        )
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    if row_seeds is None:
        row_seeds = [row_seed(seed, i) for i in range(len(pixels))]
    if len(row_seeds) != len(pixels):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(pixels)} rows")
    with torch.no_grad():
        if not len(pixels):
            return pixels.clone()
        return IMAGE_CORRUPTIONS[name](pixels, severity, generators(row_seeds)).to(pixels.dtype)


def augment_pixels(
    pixels: Tensor,
    gen: torch.Generator | Sequence[torch.Generator],
    max_shift: int = 2,
    brightness: float = 0.1,
    flip: bool = True,
) -> Tensor:
    """A small random augmentation of pixels in ``[0, 1]``, one draw per image.

    Random translation by up to ``max_shift`` pixels each way (edge-replicated), horizontal
    flip with probability 1/2 (when ``flip``), and brightness scaled by a factor uniform in
    ``[1 - brightness, 1 + brightness]``; the result is clipped to ``[0, 1]``. Random numbers
    come from the CPU generator ``gen`` (or one generator per image), so the draw is the same
    on any device.

    Example:
        >>> px = torch.rand(4, 3, 8, 8)
        >>> out = augment_pixels(px, torch.Generator().manual_seed(0))
        >>> out.shape == px.shape, bool(out.min() >= 0), bool(out.max() <= 1)
        (True, True, True)
    """
    b, _, h, w = pixels.shape

    def draws(g: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
        shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
        return shifts, flips, 1.0 + (2 * torch.rand(n, generator=g) - 1) * brightness

    if isinstance(gen, torch.Generator):
        shifts, flips, factors = draws(gen, b)
    else:
        per = [draws(g, 1) for g in gen]
        shifts, flips, factors = (torch.cat([p[k] for p in per]) for k in range(3))
    s = max_shift
    padded = F.pad(pixels, (s, s, s, s), mode="replicate") if s > 0 else pixels
    out = []
    for i in range(b):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        img = padded[i, :, s + dy : s + dy + h, s + dx : s + dx + w]
        if flips[i]:
            img = img.flip(-1)
        out.append(img)
    scaled = torch.stack(out) * factors.to(pixels.device, pixels.dtype).view(b, 1, 1, 1)
    return scaled.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- text

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_PUNCT = ".,;:!?-'"
_SYNONYMS = {
    "small": "little",
    "large": "big",
    "photo": "picture",
    "image": "picture",
    "background": "backdrop",
    "centre": "middle",
    "center": "middle",
    "top": "upper part",
    "bottom": "lower part",
    "dark": "dim",
    "light": "bright",
    "with": "featuring",
    "on": "against",
    "at": "in",
}
_FRAMES = (
    "{}",
    "there is {}",
    "this picture shows {}",
    "{}, as seen in a photo",
    "look: {}",
    "an image where we see {}",
)


def _neighbours() -> dict[str, str]:
    out: dict[str, str] = {}
    for r, row in enumerate(KEYBOARD_ROWS):
        for i, ch in enumerate(row):
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            for rr in (r - 1, r + 1):
                if 0 <= rr < len(KEYBOARD_ROWS):
                    other = KEYBOARD_ROWS[rr]
                    near += [other[j] for j in (i - 1, i) if 0 <= j < len(other)]
            out[ch] = "".join(sorted(set(near)))
    return out


KEYBOARD_NEIGHBOURS: dict[str, str] = _neighbours()
"""Letters next to each letter on a QWERTY keyboard."""
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _char_positions(text: str) -> np.ndarray:
    return np.array([i for i, ch in enumerate(text) if ch.isalpha()], dtype=np.int64)


def char_swap(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swap each letter with the next character with probability ``rate`` (no overlaps).

    Example:
        >>> char_swap("abcdef", 1.0, np.random.default_rng(0))
        'badcfe'
    """
    chars = list(text)
    u = rng.random(len(chars))
    i = 0
    while i < len(chars) - 1:
        if chars[i].isalpha() and u[i] < rate:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            i += 2
        else:
            i += 1
    return "".join(chars)


def char_drop(text: str, rate: float, rng: np.random.Generator) -> str:
    """Delete each letter with probability ``rate``.

    Example:
        >>> char_drop("a b", 1.0, np.random.default_rng(0))
        ' '
    """
    u = rng.random(len(text))
    return "".join(ch for ch, p in zip(text, u, strict=True) if not (ch.isalpha() and p < rate))


def char_insert(text: str, rate: float, rng: np.random.Generator) -> str:
    """Insert a random lower-case letter after each letter with probability ``rate``."""
    u = rng.random(len(text))
    extra = rng.integers(0, len(_LETTERS), len(text))
    out = []
    for ch, p, e in zip(text, u, extra, strict=True):
        out.append(ch)
        if ch.isalpha() and p < rate:
            out.append(_LETTERS[e])
    return "".join(out)


def char_keyboard(text: str, rate: float, rng: np.random.Generator) -> str:
    """Replace each letter by a QWERTY neighbour with probability ``rate`` (case kept)."""
    u = rng.random(len(text))
    pick = rng.random(len(text))
    out = []
    for ch, p, q in zip(text, u, pick, strict=True):
        near = KEYBOARD_NEIGHBOURS.get(ch.lower(), "")
        if near and p < rate:
            new = near[int(q * len(near))]
            out.append(new.upper() if ch.isupper() else new)
        else:
            out.append(ch)
    return "".join(out)


def word_drop(text: str, rate: float, rng: np.random.Generator) -> str:
    """Delete each word with probability ``rate`` (at least one word is kept).

    Example:
        >>> word_drop("a red circle", 0.0, np.random.default_rng(0))
        'a red circle'
    """
    words = text.split()
    u = rng.random(len(words))
    kept = [w for w, p in zip(words, u, strict=True) if p >= rate]
    if not kept and words:
        kept = [words[int(np.argmax(u))]]
    return " ".join(kept)


def word_shuffle(text: str, rate: float, rng: np.random.Generator) -> str:
    """Pick each word with probability ``rate`` and cycle the picked words one place on.

    The picked words are rotated (not shuffled), so every picked word moves when two or more
    are picked.

    Example:
        >>> word_shuffle("a b c", 1.0, np.random.default_rng(0))
        'c a b'
    """
    words = text.split()
    u = rng.random(len(words))
    idx = [i for i, p in enumerate(u) if p < rate]
    if len(idx) >= 2:
        moved = [words[i] for i in idx]
        moved = moved[-1:] + moved[:-1]
        for i, w in zip(idx, moved, strict=True):
            words[i] = w
    return " ".join(words)


def case_noise(text: str, rate: float, rng: np.random.Generator) -> str:
    """Flip the case of each letter with probability ``rate``.

    Example:
        >>> case_noise("Red", 1.0, np.random.default_rng(0))
        'rED'
    """
    u = rng.random(len(text))
    return "".join(
        ch.swapcase() if ch.isalpha() and p < rate else ch for ch, p in zip(text, u, strict=True)
    )


def punctuation_noise(text: str, rate: float, rng: np.random.Generator) -> str:
    """After each word, with probability ``rate``, insert a random punctuation mark."""
    words = text.split()
    u = rng.random(len(words))
    marks = rng.integers(0, len(_PUNCT), len(words))
    return " ".join(
        w + _PUNCT[m] if p < rate else w for w, p, m in zip(words, u, marks, strict=True)
    )


def paraphrase(text: str, rate: float, rng: np.random.Generator) -> str:
    """Template-based paraphrase of a caption.

    Each known word becomes a synonym with probability ``rate``, and with probability ``rate``
    the caption is wrapped in another frame ("there is ...").

    Example:
        >>> paraphrase("a small red circle", 1.0, np.random.default_rng(0))
        'look: a little red circle'

    """
    words = text.split()
    u = rng.random(len(words))
    frame_u, frame_pick = rng.random(), rng.integers(1, len(_FRAMES))
    out = []
    for w, p in zip(words, u, strict=True):
        core = w.rstrip(_PUNCT)
        syn = _SYNONYMS.get(core.lower())
        out.append(syn + w[len(core) :] if syn is not None and p < rate else w)
    new = " ".join(out)
    if frame_u < rate:
        new = _FRAMES[frame_pick].format(new.rstrip("."))
    return new


TEXT_PERTURBATIONS: dict[str, TextPerturbation] = {
    "char_swap": char_swap,
    "char_drop": char_drop,
    "char_insert": char_insert,
    "char_keyboard": char_keyboard,
    "word_drop": word_drop,
    "word_shuffle": word_shuffle,
    "case_noise": case_noise,
    "punctuation_noise": punctuation_noise,
    "paraphrase": paraphrase,
}
"""Every text perturbation by name (character, word, then sentence level)."""


def perturb_texts(
    texts: Sequence[str],
    name: str,
    severity: int,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
) -> list[str]:
    """Apply the text perturbation ``name`` at ``severity`` (rate ``TEXT_RATES[severity - 1]``).

    Each text draws from its own stream seeded by ``(seed, row index)`` (or by ``row_seeds``,
    one per text), so the result of a row does not depend on the other rows.

    Example:
        >>> perturb_texts(["a red circle", "a blue square"], "case_noise", 5, seed=3)
        ['A reD CIrCLe', 'A BLue squaRE']
    """
    if name not in TEXT_PERTURBATIONS:
        raise ValueError(
            f"Unknown text perturbation {name!r}; choose from {', '.join(TEXT_PERTURBATIONS)}."
        )
    rate = TEXT_RATES[_check_severity(severity)]
    fn = TEXT_PERTURBATIONS[name]
    if row_seeds is not None:
        if len(row_seeds) != len(texts):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(texts)} texts")
        return [
            fn(str(t), rate, np.random.default_rng(int(s)))
            for t, s in zip(texts, row_seeds, strict=True)
        ]
    return [fn(str(t), rate, np.random.default_rng([int(seed), i])) for i, t in enumerate(texts)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character).

    Example:
        >>> edit_distance("kitten", "sitting")
        3
    """
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
