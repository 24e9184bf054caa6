"""Memorization of training images by a generator: copy detection and replication rates.

A generator *replicates* a training image when one of its samples is a (near-)copy of it. Two
complementary measurements, both pure functions of image tensors:

1. **A copy-detection descriptor** in the spirit of SSCD (Pizzi et al., CVPR 2022, "A
   Self-Supervised Descriptor for Image Copy Detection"): a small CNN whose L2-normalised
   embedding is trained (under a minute on one CPU thread at 32 px) with InfoNCE to match
   augmented views of the same image (random resized crops, small shifts, flips, noise,
   brightness / contrast jitter) and to separate different images (:func:`fit_copy_descriptor`,
   :class:`CopyDescriptor`). Copies that are shifted or re-coloured, which pixel distances miss,
   stay close in this space.
2. **Carlini et al.'s tiled L2** (USENIX Security 2023, "Extracting Training Data from
   Diffusion Models"): split both images into a grid of tiles, take the L2 distance per tile and
   keep the largest (:func:`tiled_l2`), so a copy must match *everywhere*; and their *relative*
   criterion: a generation copies its nearest training image when that distance divided by the
   mean distance to its ``k`` nearest training images (``k = 50``) is below ``0.5``. A
   generation that is merely "typical" is about as far from its nearest neighbour as from the
   next 49; a copy is far closer to one of them.

:func:`copy_matches` applies the relative criterion per generation (in descriptor space when a
descriptor is given, else in tiled L2), :func:`control_threshold` fits the threshold to a control
set that holds no copies (held-out real images) at a chosen false-positive rate, and
:func:`replication_report` summarises: the share of generations that are copies, the training
images replicated, and their precision / recall against the training images known to be
duplicated (planted), with Wilson intervals.

Tiled L2 alone misses copies shifted by a few pixels (every tile moves); the descriptor catches
them. On the 32 px blob images of the tests (five descriptor seeds), the descriptor's ratios of
noisy, shifted (2 px), re-lit copies stayed below 0.53 (90% below 0.36), and about 1% of fresh
draws fell below Carlini's 0.5; on other data, calibrate the threshold on a control.

Images are uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]`` (numpy or torch).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> train = torch.rand(60, 3, 16, 16, generator=g)
    >>> gen = torch.cat([train[:3] + 0.01, torch.rand(5, 3, 16, 16, generator=g)]).clamp(0, 1)
    >>> m = copy_matches(gen, train, k=20)
    >>> m.copy.tolist(), m.nearest[:3].tolist()
    ([True, True, True, False, False, False, False, False], [0, 1, 2])
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsafe.methods.hallucination import wilson_interval

__all__ = [
    "MITIGATIONS",
    "CopyDescriptor",
    "CopyMatches",
    "augment_views",
    "control_threshold",
    "copy_matches",
    "fit_copy_descriptor",
    "mitigate_training_set",
    "replication_report",
    "tiled_l2",
]

Space = Literal["auto", "descriptor", "tiled_l2"]


# ------------------------------------------------------------------------------ images
def _images(x: Any, name: str) -> Tensor:
    """uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1] -> float32 ``(N, 3, H, W)``."""
    if not isinstance(x, Tensor):
        try:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`{name}` could not be converted to a tensor: {exc}") from exc
    x = x.detach().cpu()
    if x.ndim != 4:
        raise ValueError(
            f"`{name}` must be uint8 (N, H, W, 3) or float (N, 3, H, W) images, got shape "
            f"{tuple(x.shape)}."
        )
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 `{name}` must be (N, H, W, 3), got {tuple(x.shape)}.")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be uint8 or floating point, got {x.dtype}.")
    if x.shape[1] != 3:
        raise ValueError(f"float `{name}` must be (N, 3, H, W), got {tuple(x.shape)}.")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"float `{name}` must be finite pixels in [0, 1].")
    return x.float()


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


# ------------------------------------------------------------------------------ tiled L2
def _tile_edges(length: int, tiles: int) -> list[int]:
    return [round(i * length / tiles) for i in range(tiles + 1)]


def tiled_l2(a: Any, b: Any, tiles: int = 4) -> Tensor:
    """Carlini et al.'s tiled L2: the largest per-tile RMS distance, for every pair of images.

    Both images are cut into a ``tiles x tiles`` grid (as even as the size allows); for each
    tile the root-mean-square pixel difference is taken (the L2 distance over ``sqrt`` of the
    tile's number of values, so the scale does not depend on the image size), and the distance
    is the maximum over tiles. A copy must be close in *every* tile; two images that share a
    large flat background but differ in one object are far apart, unlike under the plain L2.
    ``tiles=1`` is the plain RMS distance; Carlini et al. use 16 tiles (``tiles=4``).

    Args:
        a: ``N`` images (uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]``).
        b: ``M`` images of the same size.
        tiles: tiles per side, ``1 <= tiles <= min(H, W)``.

    Returns:
        ``(N, M)`` float64 distances, in pixel units of ``[0, 1]``.

    Raises:
        ValueError: bad images, different sizes or a bad ``tiles``.

    Example:
        >>> a = torch.zeros(1, 3, 8, 8)
        >>> b = a.clone(); b[..., :2, :2] = 1.0  # one corner of a 4 x 4 grid changed
        >>> tiled_l2(a, b, tiles=4).item(), round(tiled_l2(a, b, tiles=1).item(), 4)
        (1.0, 0.25)
    """
    x, y = _images(a, "a"), _images(b, "b")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"`a` and `b` must have the same image size, got {tuple(x.shape[1:])} and "
            f"{tuple(y.shape[1:])}."
        )
    h, w = x.shape[-2:]
    t = _check_int(tiles, "tiles")
    if t > min(h, w):
        raise ValueError(f"`tiles` must be at most min(H, W) = {min(h, w)}, got {t}.")
    x, y = x.double(), y.double()
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)
    rows, cols = _tile_edges(h, t), _tile_edges(w, t)
    for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
        for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
            xt = x[:, :, r0:r1, c0:c1].reshape(x.shape[0], -1)
            yt = y[:, :, r0:r1, c0:c1].reshape(y.shape[0], -1)
            d = torch.cdist(xt, yt, compute_mode="donot_use_mm_for_euclid_dist")
            out = torch.maximum(out, d / math.sqrt(xt.shape[1]))
    return out


# ------------------------------------------------------------------------------ descriptor
def augment_views(
    images: Tensor,
    *,
    generator: torch.Generator,
    min_scale: float = 0.9,
    max_shift: float = 0.1,
    flips: bool = True,
    noise: float = 0.05,
    jitter: float = 0.1,
) -> Tensor:
    """One random copy-style edit of each image (the views the descriptor learns to match).

    Per image: a random resized crop (area share in ``[min_scale, 1]``, square), a translation
    of up to ``max_shift`` of the side, a horizontal flip (probability 1/2, if ``flips``),
    brightness and contrast changes of up to ``jitter``, and Gaussian noise with a standard
    deviation drawn in ``[0, noise]``; the result is clamped to ``[0, 1]``.

    Args:
        images: float ``(N, 3, H, W)`` in ``[0, 1]``.
        generator: the random stream (CPU).
        min_scale: smallest crop area share.
        max_shift: largest shift, as a share of the side.
        flips: allow horizontal flips.
        noise: largest noise standard deviation.
        jitter: largest brightness shift and relative contrast change.

    Returns:
        ``(N, 3, H, W)`` augmented views.

    Example:
        >>> v = augment_views(torch.rand(4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
        >>> v.shape, bool(v.min() >= 0 and v.max() <= 1)
        (torch.Size([4, 3, 8, 8]), True)
    """
    n = images.shape[0]

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    side = u(math.sqrt(min_scale), 1.0)  # crop side as a share of the image side
    room = 1.0 - side
    tx = u(-1.0, 1.0) * room + u(-2.0 * max_shift, 2.0 * max_shift)
    ty = u(-1.0, 1.0) * room + u(-2.0 * max_shift, 2.0 * max_shift)
    flip = torch.ones(n)
    if flips:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = side * flip
    theta[:, 1, 1] = side
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = u(1.0 - jitter, 1.0 + jitter, 1, 1, 1)
    bright = u(-jitter, jitter, 1, 1, 1)
    out = (out - mean) * contrast + mean + bright
    sd = u(0.0, noise, 1, 1, 1)
    out = out + sd * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)


class _DescriptorNet(nn.Module):
    """Three conv blocks (two of stride 2), an 8 x 8 map, a linear projection, unit norm."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(8),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 64, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


@dataclass(frozen=True)
class CopyDescriptor:
    """A trained copy-detection embedding (from :func:`fit_copy_descriptor`).

    Attributes:
        net: the CNN, in eval mode; its output rows have unit norm.
        size: the side images are resized to before embedding.
        final_loss: the training loss (InfoNCE plus the KoLeo term, which can be negative),
            mean of the last 10 steps.
    """

    net: nn.Module
    size: int
    final_loss: float

    def embed(self, images: Any, *, batch_size: int = 512) -> Tensor:
        """Unit-norm ``(N, dim)`` descriptors of images (uint8 NHWC or float NCHW in [0, 1]).

        Cosine similarity is the dot product of two rows; copies score near 1.
        """
        x = _resize(_images(images, "images"), self.size)
        bs = _check_int(batch_size, "batch_size")
        self.net.eval()
        with torch.no_grad():
            out = [self.net(x[i : i + bs]) for i in range(0, x.shape[0], bs)]
        dim = self.net.head.out_features  # type: ignore[union-attr]
        return torch.cat(out) if out else torch.zeros(0, int(dim))


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _koleo(z: Tensor) -> Tensor:
    """KoLeo entropy estimate (as in SSCD): minus the mean log distance to the nearest other row."""
    with torch.no_grad():
        d = torch.cdist(z, z)
        d.fill_diagonal_(float("inf"))
        nn_idx = d.argmin(dim=1)
    return -torch.log((z - z[nn_idx]).norm(dim=1) + 1e-8).mean()


def fit_copy_descriptor(
    images: Any,
    *,
    dim: int = 128,
    width: int = 32,
    size: int = 32,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 3e-3,
    temperature: float = 0.1,
    entropy_weight: float = 1.0,
    min_scale: float = 0.9,
    max_shift: float = 0.1,
    flips: bool = True,
    seed: int = 0,
) -> CopyDescriptor:
    """Train an SSCD-style copy descriptor on a set of images (under a minute on a CPU at 32 px).

    Each step draws ``batch_size`` images, makes two :func:`augment_views` of each and minimises
    the symmetric InfoNCE loss (cross-entropy of the ``B x B`` cosine-similarity matrix over
    ``temperature`` towards its diagonal): a view must be nearer its sibling than every other
    image's view. A KoLeo term (``entropy_weight``, as in SSCD) pushes each descriptor away
    from its nearest neighbour in the batch, spreading the images over the sphere so that
    near-duplicates stand out from merely similar images. Train it on the images whose copies
    are sought (the training set of the generator), so it learns to tell exactly those apart.

    Args:
        images: the reference images (uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)``),
            ``N >= 2``; resized to ``size``.
        dim: descriptor dimension.
        width: channels of the first conv layer (then ``2 * width``).
        size: the side images are resized to.
        steps: optimisation steps (Adam, one-cycle learning-rate schedule).
        batch_size: images per step (capped at ``N``).
        lr: peak learning rate.
        temperature: InfoNCE temperature.
        entropy_weight: weight of the KoLeo spreading term (0 turns it off).
        min_scale: smallest crop area share of the augmentations (smaller makes the
            descriptor more invariant, and less discriminative between similar images).
        max_shift: largest shift of the augmentations, as a share of the side.
        flips: include horizontal flips in the augmentations (leave on unless mirrored
            images should count as different).
        seed: seed of the initialisation, batches and augmentations.

    Returns:
        The trained :class:`CopyDescriptor`.

    Raises:
        ValueError: bad images or options.

    Example:
        >>> imgs = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> d = fit_copy_descriptor(imgs, size=16, steps=3, batch_size=8)
        >>> e = d.embed(imgs)
        >>> e.shape, bool(torch.allclose(e.norm(dim=1), torch.ones(16)))
        (torch.Size([16, 128]), True)
    """
    x = _images(images, "images")
    if x.shape[0] < 2:
        raise ValueError(f"`images` needs at least 2 images to contrast, got {x.shape[0]}.")
    dim = _check_int(dim, "dim")
    width = _check_int(width, "width")
    size = _check_int(size, "size", 8)
    steps = _check_int(steps, "steps")
    bs = min(_check_int(batch_size, "batch_size", 2), x.shape[0])
    if not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
    if not (isinstance(lr, numbers.Real) and lr > 0):
        raise ValueError(f"`lr` must be positive, got {lr!r}.")
    if not (isinstance(entropy_weight, numbers.Real) and entropy_weight >= 0):
        raise ValueError(f"`entropy_weight` must be >= 0, got {entropy_weight!r}.")
    if not (isinstance(min_scale, numbers.Real) and 0 < min_scale <= 1):
        raise ValueError(f"`min_scale` must be in (0, 1], got {min_scale!r}.")
    if not (isinstance(max_shift, numbers.Real) and 0 <= max_shift < 0.5):
        raise ValueError(f"`max_shift` must be in [0, 0.5), got {max_shift!r}.")
    seed = _check_int(seed, "seed", 0)
    x = _resize(x, size)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _DescriptorNet(dim, width)
    opt = torch.optim.Adam(net.parameters(), lr=float(lr))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=float(lr), total_steps=steps, pct_start=0.1
    )
    labels = torch.arange(bs)
    losses: list[float] = []
    net.train()
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=gen)[:bs]
        batch = x[idx]
        v1 = augment_views(
            batch, generator=gen, min_scale=min_scale, max_shift=max_shift, flips=flips
        )
        v2 = augment_views(
            batch, generator=gen, min_scale=min_scale, max_shift=max_shift, flips=flips
        )
        z = net(torch.cat([v1, v2]))
        logits = z[:bs] @ z[bs:].T / float(temperature)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        if entropy_weight:
            loss = loss + float(entropy_weight) * _koleo(z[:bs])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    return CopyDescriptor(net=net, size=size, final_loss=float(np.mean(losses[-10:])))


# ------------------------------------------------------------------------------ matching
@dataclass(frozen=True)
class CopyMatches:
    """Per generation: its nearest training image and whether it is a copy of it.

    Attributes:
        nearest: ``(G,)`` index of the nearest training image in the matching space.
        similarity: ``(G,)`` descriptor cosine similarity to ``nearest`` (NaN without one).
        tiled_l2: ``(G,)`` :func:`tiled_l2` distance to ``nearest``.
        ratio: ``(G,)`` relative distance: distance to ``nearest`` over the mean distance to
            the ``k`` nearest training images, in the matching space.
        copy: ``(G,)`` ``ratio < threshold``.
        space: ``"descriptor"`` or ``"tiled_l2"``, the matching space.
        k: the number of neighbours the ratio averaged over.
        threshold: the ratio below which a generation is a copy.
    """

    nearest: np.ndarray
    similarity: np.ndarray
    tiled_l2: np.ndarray
    ratio: np.ndarray
    copy: np.ndarray
    space: str
    k: int
    threshold: float

    def with_threshold(self, threshold: float) -> CopyMatches:
        """The same matches with the copy flags re-drawn at another ``threshold``."""
        t = _check_threshold(threshold)
        return replace(self, copy=np.asarray(self.ratio) < t, threshold=t)


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}.")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}.")
    return float(threshold)


def control_threshold(control: CopyMatches, *, fpr: float = 0.01, cap: float = 0.5) -> float:
    """A copy threshold that flags at most a share ``fpr`` of a control set, capped at ``cap``.

    Carlini et al.'s ``0.5`` is a convention, fitted to CIFAR-10 in pixel space; how far a
    merely typical image sits from its nearest neighbour depends on the data and on the space
    (a learned descriptor packs similar images closer). Matching a *control* set that holds no
    copies, e.g. held-out real images of the training distribution, against the training set
    gives the ratios of non-copies; the threshold is their lower ``fpr`` quantile (an order
    statistic, so strictly fewer than ``fpr`` of the control would be flagged), and never above
    ``cap``. Apply it with :meth:`CopyMatches.with_threshold`.

    Args:
        control: :func:`copy_matches` of the control images (same space, ``k`` and ``tiles``).
        fpr: the largest share of the control to flag, in ``(0, 1)``.
        cap: the largest threshold returned, in ``(0, 1]``.

    Returns:
        The threshold.

    Raises:
        ValueError: a bad ``fpr`` or ``cap``, or an empty control.

    Example:
        >>> m = CopyMatches(nearest=np.zeros(5, np.int64), similarity=np.full(5, np.nan),
        ...                 tiled_l2=np.zeros(5), ratio=np.array([0.3, 0.6, 0.7, 0.8, 0.9]),
        ...                 copy=np.zeros(5, bool), space="tiled_l2", k=50, threshold=0.5)
        >>> control_threshold(m, fpr=0.2), control_threshold(m, fpr=0.2, cap=0.25)
        (0.3, 0.25)
    """
    if not (isinstance(fpr, numbers.Real) and 0.0 < fpr < 1.0):
        raise ValueError(f"`fpr` must be in (0, 1), got {fpr!r}.")
    cap = _check_threshold(cap)
    ratios = np.asarray(control.ratio, dtype=np.float64)
    if ratios.size == 0:
        raise ValueError("`control` holds no matches.")
    q = float(np.quantile(ratios, float(fpr), method="lower"))
    return min(max(q, np.finfo(np.float64).tiny), cap)


def _relative(dist: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest index, its distance, and distance / mean of the ``k`` smallest, per row."""
    near, _ = torch.topk(dist, k, dim=1, largest=False)  # sorted ascending
    idx = dist.argmin(dim=1)
    d0 = near[:, 0]
    mean = near.mean(dim=1)
    ratio = torch.where(mean > 0, d0 / mean.clamp_min(1e-300), torch.zeros_like(d0))
    return idx, d0, ratio


def copy_matches(
    generated: Any,
    training: Any,
    *,
    descriptor: CopyDescriptor | None = None,
    space: Space = "auto",
    tiles: int = 4,
    k: int = 50,
    threshold: float = 0.5,
) -> CopyMatches:
    r"""Match each generation to its nearest training image and flag copies (Carlini's criterion).

    In the matching space (descriptor distance ``sqrt(2 - 2 cos)`` between unit descriptors, or
    :func:`tiled_l2`), a generation ``g`` with nearest training image ``x`` is a copy when

    .. math::
        \frac{d(g, x)}{\frac{1}{k} \sum_{y \in S_k(g)} d(g, y)} < \text{threshold}

    where ``S_k(g)`` are the ``k`` training images nearest ``g`` (``x`` among them): Carlini et
    al.'s relative criterion (``k = 50``, threshold ``0.5``; ``k`` is capped at the training
    set's size). Being relative, it adapts to how crowded the neighbourhood is: a typical
    generation near a dense cluster of similar training images is not flagged for being close
    to all of them. Exact ties at distance 0 (all ``k`` neighbours identical to ``g``) count as
    copies.

    Args:
        generated: ``G`` generated images (uint8 NHWC or float NCHW in ``[0, 1]``).
        training: ``N >= 2`` training images of the same size.
        descriptor: a :class:`CopyDescriptor`; enables ``space="descriptor"`` and fills
            ``similarity``.
        space: ``"descriptor"``, ``"tiled_l2"`` or ``"auto"`` (the descriptor when given; it
            also catches shifted or re-coloured copies that pixel distances miss).
        tiles: tiles per side of :func:`tiled_l2`.
        k: neighbours of the relative criterion.
        threshold: the ratio below which a generation is a copy, in ``(0, 1]`` (Carlini's 0.5;
            :func:`control_threshold` fits one to a control set of non-copies).

    Returns:
        A :class:`CopyMatches`.

    Raises:
        ValueError: bad images, sizes or options, or ``space="descriptor"`` without one.
    """
    gen = _images(generated, "generated")
    train = _images(training, "training")
    if train.shape[0] < 2:
        raise ValueError(f"`training` needs at least 2 images, got {train.shape[0]}.")
    if gen.shape[0] == 0:
        raise ValueError("`generated` is empty.")
    k = min(_check_int(k, "k"), train.shape[0])
    threshold = _check_threshold(threshold)
    if space == "auto":
        space = "descriptor" if descriptor is not None else "tiled_l2"
    if space not in ("descriptor", "tiled_l2"):
        raise ValueError(f"`space` must be 'auto', 'descriptor' or 'tiled_l2', got {space!r}.")
    if space == "descriptor" and descriptor is None:
        raise ValueError("`space='descriptor'` needs a `descriptor` (see fit_copy_descriptor).")
    tl2 = tiled_l2(gen, train, tiles)
    sim = None
    if descriptor is not None:
        sim = (descriptor.embed(gen).double() @ descriptor.embed(train).double().T).clamp(-1, 1)
    dist = (2.0 - 2.0 * sim).clamp_min(0).sqrt() if space == "descriptor" else tl2  # type: ignore[operator]
    idx, _, ratio = _relative(dist, k)
    rows = torch.arange(gen.shape[0])
    similarity = sim[rows, idx].numpy() if sim is not None else np.full(gen.shape[0], np.nan)
    return CopyMatches(
        nearest=idx.numpy().astype(np.int64),
        similarity=similarity.astype(np.float64),
        tiled_l2=tl2[rows, idx].numpy(),
        ratio=ratio.numpy(),
        copy=(ratio < float(threshold)).numpy(),
        space=space,
        k=k,
        threshold=float(threshold),
    )


# ------------------------------------------------------------------------------ report
def _int_set(values: Any, name: str) -> set[int]:
    arr = np.asarray(list(values) if isinstance(values, Collection) else values)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`{name}` must hold integer training indices, got dtype {arr.dtype}.")
    return {int(v) for v in arr.ravel()}


def replication_report(
    matches: CopyMatches,
    *,
    planted: Collection[int] | None = None,
    copy_truth: Any = None,
    level: float = 0.95,
    max_pairs: int | None = None,
) -> dict[str, Any]:
    """Replication rate, replicated training images, and their agreement with a known truth.

    Args:
        matches: from :func:`copy_matches`.
        planted: training indices known to be duplicated / memorisable (the ground truth of a
            planted-duplicate experiment); gives the precision and recall of the replicated set.
        copy_truth: optional ``(G,)`` bools, which generations truly are copies; gives the
            generation-level precision and recall of the copy flags.
        level: confidence level of the Wilson intervals.
        max_pairs: keep at most this many gallery pairs (the most blatant first).

    Returns:
        A dict with ``n_generations``, ``n_copies``, ``replication_rate`` and its
        ``replication_rate_ci``; ``replicated`` (sorted training indices copied at least once);
        ``pairs``: ``(generation, training)`` index pairs of the copies, by ascending ratio;
        with ``planted``: ``precision``, ``recall`` and their ``_ci`` of the replicated set
        (NaN when undefined); with ``copy_truth``: ``copy_precision``, ``copy_recall`` and
        their ``_ci``.

    Raises:
        ValueError: mismatched ``copy_truth``, non-integer ``planted`` or a bad ``max_pairs``.

    Example:
        >>> m = CopyMatches(nearest=np.array([4, 7, 4, 1]), similarity=np.full(4, np.nan),
        ...                 tiled_l2=np.zeros(4), ratio=np.array([0.1, 0.2, 0.9, 0.3]),
        ...                 copy=np.array([True, True, False, True]), space="tiled_l2", k=50,
        ...                 threshold=0.5)
        >>> r = replication_report(m, planted={4, 7, 9})
        >>> r["replication_rate"], r["replicated"], r["pairs"]
        (0.75, [1, 4, 7], [(0, 4), (1, 7), (3, 1)])
        >>> round(r["precision"], 4), round(r["recall"], 4)
        (0.6667, 0.6667)
    """
    copy = np.asarray(matches.copy, dtype=bool)
    nearest = np.asarray(matches.nearest, dtype=np.int64)
    g = int(copy.shape[0])
    n_copies = int(copy.sum())
    order = np.flatnonzero(copy)
    order = order[np.argsort(np.asarray(matches.ratio)[order], kind="stable")]
    if max_pairs is not None:
        order = order[: _check_int(max_pairs, "max_pairs", 0)]
    replicated = sorted({int(v) for v in nearest[copy]})
    out: dict[str, Any] = {
        "n_generations": g,
        "n_copies": n_copies,
        "replication_rate": n_copies / g if g else math.nan,
        "replication_rate_ci": wilson_interval(n_copies, g, level),
        "replicated": replicated,
        "pairs": [(int(i), int(nearest[i])) for i in order],
    }
    if planted is not None:
        truth = _int_set(planted, "planted")
        hit = len(truth & set(replicated))
        out["precision"] = hit / len(replicated) if replicated else math.nan
        out["precision_ci"] = wilson_interval(hit, len(replicated), level)
        out["recall"] = hit / len(truth) if truth else math.nan
        out["recall_ci"] = wilson_interval(hit, len(truth), level)
    if copy_truth is not None:
        t = np.asarray(copy_truth)
        if t.shape != copy.shape:
            raise ValueError(f"`copy_truth` must have shape {copy.shape}, got {t.shape}.")
        t = t.astype(bool)
        tp = int((t & copy).sum())
        out["copy_precision"] = tp / n_copies if n_copies else math.nan
        out["copy_precision_ci"] = wilson_interval(tp, n_copies, level)
        out["copy_recall"] = tp / int(t.sum()) if t.any() else math.nan
        out["copy_recall_ci"] = wilson_interval(tp, int(t.sum()), level)
    return out


MITIGATIONS = ("dedupe", "randomise")
"""Training-data mitigations of memorisation (:func:`mitigate_training_set`)."""


def mitigate_training_set(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    strategy: str,
    *,
    vocabulary: Sequence[str] = (),
    words: int = 2,
    seed: int = 0,
) -> tuple[list[int], list[str]]:
    """The rows to retrain on and their captions, after a memorisation mitigation.

    * ``dedupe``: keep the first of every group of byte-identical images (the duplicates that
      drive memorisation; Carlini et al., 2023; Somepalli et al., 2023). Captions unchanged.
    * ``randomise``: keep every row, and insert ``words`` random ``vocabulary`` words at random
      places of each caption, drawn afresh per row, so the copies of a duplicated image no
      longer share one caption (Somepalli et al., 2023's random token addition, applied once
      per training example).

    Example:
        >>> im = [np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8),
        ...       np.ones((2, 2, 3), np.uint8)]
        >>> mitigate_training_set(im, ["a", "a", "b"], "dedupe")
        ([0, 2], ['a', 'b'])
    """
    if strategy not in MITIGATIONS:
        raise ValueError(f"strategy must be one of {', '.join(MITIGATIONS)}, not {strategy!r}")
    if len(images) != len(captions):
        raise ValueError("mitigate_training_set: one caption per image")
    if strategy == "dedupe":
        seen: set[bytes] = set()
        keep = []
        for i, im in enumerate(images):
            arr = np.ascontiguousarray(im)
            digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
        return keep, [str(captions[i]) for i in keep]
    if not vocabulary:
        raise ValueError("randomise needs a vocabulary to draw words from")
    rng = np.random.default_rng([seed, 0x4A9D])
    out = []
    for text in captions:
        tokens = str(text).split()
        for w in rng.choice(len(vocabulary), size=int(words)):
            tokens.insert(int(rng.integers(len(tokens) + 1)), str(vocabulary[w]))
        out.append(" ".join(tokens))
    return list(range(len(captions))), out
