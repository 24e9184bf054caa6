"""The "shapes" world: a tiny synthetic image-caption dataset with planted, known flaws.

Every row is a 32x32 RGB image of one coloured shape (circle, square, triangle, cross, diamond)
at some position and size on a dark or light background, with a caption generated from those
attributes. The world is fully determined by a :class:`ShapesConfig` (its *knobs*), and each
planted flaw records its ground truth in the row's ``meta`` so checks can be scored against it:

* **spurious correlation** (``spurious``): in the train split the background tone goes with the
  class; in calibration and test it does not (``meta["spurious_aligned"]``).
* **label noise** (``label_noise``): train labels flipped to another class
  (``meta["noisy_label"]``, ``meta["true_label"]``).
* **out-of-distribution items** (``ood``): test rows showing shapes never seen in training, with
  label ``-1`` (``meta["ood"]``, ``meta["true_shape"]``).
* **pixel defects** (``defects``): scratches and holes in calibration and test images
  (``meta["defect"]``, ``meta["defect_mask"]``).
* **duplicates** (``duplicates``, ``n_duplicated``): exact copies of train rows
  (``meta["dup_of"]``, ``meta["n_copies"]``).
* **text leakage** (``caption_label``): how often the caption names the shape
  (``meta["caption_names_label"]``).

Each part draws from its own random stream (seeded by ``seed`` and the part), so switching one
flaw off leaves every other row attribute, and every other flaw, unchanged.

Example:
    >>> ds = make_shapes(n=40, seed=3)
    >>> ds.classes
    ['circle', 'square', 'triangle', 'cross', 'diamond']
    >>> ds.modalities["image"][0].shape, ds.modalities["image"][0].dtype
    ((32, 32, 3), dtype('uint8'))
    >>> parse_world_spec("shapes:seed=3,n=40") == ShapesConfig(seed=3, n=40)
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmsafe.data.dataset import UNLABELLED, Dataset
from mmsafe.data.worlds.spec import WorldSpecError, knob_types, parse_knobs
from mmsafe.data.worlds.spec import knob_help as _knob_help

WORLD_NAME = "shapes"

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
"""The known classes, in label order. The first ``ceil(K/2)`` go with dark backgrounds in train."""

OOD_SHAPES: tuple[str, ...] = ("star", "heart", "crescent")
"""Shapes that appear only as out-of-distribution test items."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 205, 40),
    "purple": (140, 60, 190),
    "orange": (235, 130, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
DEFECT_PHRASES: dict[str, tuple[str, str]] = {
    "scratch": (" with a scratch", ", scratched"),
    "hole": (" with a hole", ", damaged"),
}
"""What a train caption adds for a planted defect (``train_defects``), two phrasings each."""
TONES: tuple[str, ...] = ("dark", "light")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SPLITS: tuple[str, ...] = ("train", "calibration", "test")
GENERIC_NOUNS: tuple[str, ...] = ("object", "shape", "thing")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{art} {size} {colour} {shape} at the {pos} on a {tone} background",
    "{art} {colour} {shape} on a {tone} background",
    "{art} {size} {colour} {shape} at the {pos}",
    "a {tone} background with {art} {colour} {shape} at the {pos}",
    "{art} {colour} {shape}",
    "a photo of {art} {size} {colour} {shape} on a {tone} background",
)
"""Caption templates; ``{art}`` becomes "a" or "an" to agree with the word after it."""

# Independent random streams, one per part of the generator.
_STREAMS = {
    "split": 1,
    "shape": 2,
    "tone": 3,
    "attributes": 4,
    "pixels": 5,
    "label_noise": 6,
    "ood": 7,
    "defects": 8,
    "duplicates": 9,
    "captions": 10,
    "train_defects": 11,
}


@dataclass(frozen=True)
class ShapesConfig:
    """Every knob of the shapes world. A knob set to 0 switches its flaw off.

    Attributes:
        seed: random seed; the same config gives byte-identical rows.
        n: number of distinct items (before duplicates are added).
        image_size: side of the square RGB images, in pixels (16-256).
        spurious: in the train split, probability that a class appears on its majority
            background tone (the first ``ceil(K/2)`` classes mostly dark, the rest mostly light).
            Must be 0 (off: tone independent of class, as in calibration/test) or in [0.5, 1].
        label_noise: fraction of train items whose label is flipped to another class.
        ood: fraction of the test split replaced by out-of-distribution shapes (label -1).
        defects: fraction of calibration + test images given a scratch or a hole.
        train_defects: fraction of train images given a scratch or a hole *and a caption that
            says so* ("... with a scratch"), so a contrastive model learns the defect words
            that zero-shot anomaly prompts use (as web-trained CLIP does).
        duplicates: extra exact copies made of each duplicated train item (0 = off).
        n_duplicated: number of train items that are duplicated (0 = off).
        caption_label: probability that a caption names the shape (otherwise "an object", ...).
            Out-of-distribution items are always named.
        train_frac: fraction of items in the train split.
        calibration_frac: fraction in the calibration split; the rest is the test split.
        pixel_noise: standard deviation of the Gaussian pixel noise, in 0-255 units.
    """

    seed: int = 0
    n: int = 3000
    image_size: int = 32
    spurious: float = 0.9
    label_noise: float = 0.1
    ood: float = 0.1
    defects: float = 0.1
    train_defects: float = 0.1
    duplicates: int = 5
    n_duplicated: int = 20
    caption_label: float = 0.8
    train_frac: float = 0.6
    calibration_frac: float = 0.2
    pixel_noise: float = 4.0

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise WorldSpecError(f"Invalid shapes world: {'; '.join(problems)}. {knob_help()}")

    @property
    def spec(self) -> str:
        """The canonical spec string naming every knob, e.g. ``shapes:seed=0,n=3000,...``."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
        return f"{WORLD_NAME}:{','.join(parts)}"

    def split_sizes(self) -> tuple[int, int, int]:
        """Number of distinct items in train, calibration and test (before duplicates)."""
        n_train = int(round(self.n * self.train_frac))
        n_cal = int(round(self.n * self.calibration_frac))
        return n_train, n_cal, self.n - n_train - n_cal


_KNOB_TYPES: dict[str, type] = knob_types(ShapesConfig)


def knob_help() -> str:
    """A one-line list of the valid knobs with their defaults.

    Example:
        >>> knob_help().split(",")[0]
        'Valid knobs (with defaults): seed=0'
    """
    return _knob_help(ShapesConfig)


def _validate(c: ShapesConfig) -> list[str]:
    problems = []
    for name, kind in _KNOB_TYPES.items():
        value = getattr(c, name)
        ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            problems.append(
                f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}"
            )
    if problems:
        return problems
    for name in _KNOB_TYPES:
        if not math.isfinite(getattr(c, name)):
            problems.append(f"{name} must be finite")
    if problems:
        return problems
    if c.seed < 0:
        problems.append(f"seed={c.seed} must be >= 0")
    if not 16 <= c.image_size <= 256:
        problems.append(f"image_size={c.image_size} must be in [16, 256]")
    if not (c.spurious == 0 or 0.5 <= c.spurious <= 1):
        problems.append(f"spurious={c.spurious} must be 0 (off) or in [0.5, 1]")
    for name in ("label_noise", "ood", "defects", "train_defects", "caption_label", "pixel_noise"):
        value = getattr(c, name)
        if value < 0 or (name != "pixel_noise" and value > 1):
            bound = ">= 0" if name == "pixel_noise" else "in [0, 1]"
            problems.append(f"{name}={value} must be {bound}")
    for name in ("duplicates", "n_duplicated"):
        if getattr(c, name) < 0:
            problems.append(f"{name}={getattr(c, name)} must be >= 0")
    if not (0 < c.train_frac < 1 and 0 < c.calibration_frac < 1):
        problems.append("train_frac and calibration_frac must be in (0, 1)")
    elif c.train_frac + c.calibration_frac >= 1:
        problems.append("train_frac + calibration_frac must be < 1 (the rest is the test split)")
    if problems:
        return problems
    n_train, n_cal, n_test = c.split_sizes()
    if min(n_train, n_cal, n_test) < 1:
        problems.append(
            f"n={c.n} gives split sizes train={n_train}, calibration={n_cal}, test={n_test}; "
            "every split needs at least one item (raise n)"
        )
    elif c.duplicates > 0 and c.n_duplicated > n_train:
        problems.append(f"n_duplicated={c.n_duplicated} exceeds the train split ({n_train} items)")
    return problems


def parse_world_spec(spec: str) -> ShapesConfig:
    """Parse ``"shapes"`` or ``"shapes:knob=value,..."`` into a :class:`ShapesConfig`.

    Args:
        spec: the spec string; values are parsed by each knob's type.

    Raises:
        WorldSpecError: unknown world or knob, malformed pair, or a bad value.

    Example:
        >>> parse_world_spec("shapes:seed=7, spurious=0.75").spurious
        0.75
        >>> try:
        ...     parse_world_spec("shapes:colour=red")
        ... except WorldSpecError as err:
        ...     print(str(err).split(". ")[0])
        Unknown knob 'colour' in 'shapes:colour=red'
    """
    return parse_knobs(spec, WORLD_NAME, ShapesConfig)


# --------------------------------------------------------------------------- rendering


def _rng(seed: int, part: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[part]])


def _mask_circle(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return dx**2 + dy**2 <= 1.0


def _mask_square(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82


def _mask_triangle(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (dy >= -1.0) & (dy <= 0.75) & (np.abs(dx) <= (dy + 1.0) / 1.75)


def _mask_cross(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))


def _mask_diamond(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.abs(dx) + np.abs(dy) <= 1.1


def _mask_star(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    theta = np.arctan2(dy, dx) + np.pi / 2  # one point straight up
    sector = 2 * np.pi / 5
    t = np.mod(theta + sector / 2, sector) - sector / 2
    return np.hypot(dx, dy) <= 1.0 - 0.6 * np.abs(t) / (sector / 2)


def _mask_heart(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    x, y = dx / 0.9, -(dy + 0.1) / 0.9
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


def _mask_crescent(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (dx**2 + dy**2 <= 1.0) & ((dx - 0.45) ** 2 + (dy + 0.15) ** 2 > 0.75**2)


SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _mask_circle,
    "square": _mask_square,
    "triangle": _mask_triangle,
    "cross": _mask_cross,
    "diamond": _mask_diamond,
    "star": _mask_star,
    "heart": _mask_heart,
    "crescent": _mask_crescent,
}
"""Shape name -> inside test on coordinates relative to the centre, in units of the radius."""


def shape_coverage(
    shapes: list[str], cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, size: int
) -> np.ndarray:
    """Fraction of each pixel covered by each shape, ``(N, size, size)`` in ``[0, 1]``.

    Pixels are 2x2 supersampled, so edges are antialiased.

    Example:
        >>> cov = shape_coverage(["square"], np.array([4.0]), np.array([4.0]), np.array([2.0]), 8)
        >>> float(cov[0].sum()), float(cov[0, 4, 4]), float(cov[0, 0, 0])
        (9.0, 1.0, 0.0)
    """
    ss = 2
    grid = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    out = np.zeros((len(shapes), size, size), dtype=np.float32)
    names = np.asarray(shapes)
    for name in dict.fromkeys(shapes):
        idx = np.flatnonzero(names == name)
        r = radius[idx, None, None].astype(np.float32)
        dx = (grid[None, None, :] - cx[idx, None, None].astype(np.float32)) / r
        dy = (grid[None, :, None] - cy[idx, None, None].astype(np.float32)) / r
        inside = SHAPE_MASKS[name](dx, dy).astype(np.float32)
        out[idx] = inside.reshape(len(idx), size, ss, size, ss).mean(axis=(2, 4))
    return out


def _segment_mask(p0: np.ndarray, p1: np.ndarray, width: float, size: int) -> np.ndarray:
    """Pixels whose centre lies within ``width / 2`` of the segment ``p0``-``p1`` (x, y)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    d = p1 - p0
    t = ((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1])) <= width / 2


def _disc_mask(centre: np.ndarray, radius: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return np.hypot(xx - centre[0], yy - centre[1]) <= radius


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _caption(template: str, shape: str, colour: str, size: str, pos: str, tone: str) -> str:
    after_art = template.split("{art}", 1)[1].split("}", 1)[0] + "}"
    first = after_art.strip().format(size=size, colour=colour, shape=shape)
    return template.format(
        art=_article(first), size=size, colour=colour, shape=shape, pos=pos, tone=tone
    )


# --------------------------------------------------------------------------- the world


def _assign_splits(c: ShapesConfig) -> np.ndarray:
    n_train, n_cal, _ = c.split_sizes()
    order = _rng(c.seed, "split").permutation(c.n)
    split_idx = np.full(c.n, 2, dtype=np.int64)
    split_idx[order[:n_train]] = 0
    split_idx[order[n_train : n_train + n_cal]] = 1
    return split_idx


def _pick(rng: np.random.Generator, rows: np.ndarray, fraction: float) -> np.ndarray:
    """Exactly ``round(fraction * len(rows))`` of ``rows``, chosen at random, sorted."""
    order = rng.permutation(len(rows))
    return np.sort(rows[order[: int(round(fraction * len(rows)))]])


def _plant_defects(
    images: np.ndarray,
    rows: np.ndarray,
    tone: np.ndarray,
    c: ShapesConfig,
    stream: str = "defects",
    fraction: float | None = None,
    out: tuple[list[str | None], list[np.ndarray | None]] | None = None,
) -> tuple[list[str | None], list[np.ndarray | None]]:
    """Draw scratches and holes into ``images`` (in place) on a fraction of ``rows``.

    Returns the defect kind and the mask of changed pixels per image (None where clean), filled
    into ``out`` when given.
    """
    n, size = len(images), c.image_size
    d = _rng(c.seed, stream)
    kinds = d.integers(0, 2, n)
    geometry = d.uniform(0.0, 1.0, (n, 5))
    defect, defect_mask = out or ([None] * n, [None] * n)
    for i in _pick(d, rows, c.defects if fraction is None else fraction):
        g = geometry[i]
        if kinds[i] == 0:
            p0 = g[:2] * size
            angle, length = g[2] * 2 * np.pi, (0.5 + 0.4 * g[3]) * size
            p1 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 0, size)
            drawn = _segment_mask(p0, p1, width=max(1.2, size / 24), size=size)
        else:
            centre = (0.15 + 0.7 * g[:2]) * size
            drawn = _disc_mask(centre, radius=(1.5 + g[4]) * size / 32, size=size)
        before = images[i].copy()
        images[i][drawn] = np.uint8(255 if tone[i] == 0 else 0)  # off colour: white on dark
        mask = (images[i] != before).any(axis=-1)
        if mask.any():
            defect[i], defect_mask[i] = ("scratch", "hole")[kinds[i]], mask
    return defect, defect_mask


def _render(
    shapes: list[str], tone: np.ndarray, c: ShapesConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw the attributes of every item and render the images ``(N, S, S, 3)`` uint8."""
    n, size = len(shapes), c.image_size
    a = _rng(c.seed, "attributes")
    attrs = {
        "colour": a.integers(0, len(COLOURS), n),
        "size": a.integers(0, len(SIZES), n),
        "position": a.integers(0, len(POSITIONS), n),
    }
    rel = np.where(attrs["size"] == 0, a.uniform(0.13, 0.17, n), a.uniform(0.24, 0.29, n))
    radius = rel * size
    jitter = a.uniform(-0.04, 0.04, (n, 2)) * size
    colour_jitter = a.integers(-15, 16, (n, 3))
    bg_level = np.where(tone == 0, a.uniform(25, 75, n), a.uniform(175, 230, n))
    bg_tint = a.integers(-8, 9, (n, 3))
    margin = radius * 1.05 + 1.0
    span = size - 2 * margin
    cx = margin + (attrs["position"] % 3) / 2 * span + jitter[:, 0]
    cy = margin + (attrs["position"] // 3) / 2 * span + jitter[:, 1]

    coverage = shape_coverage(shapes, cx, cy, radius, size)[..., None]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    fg = np.clip(palette[attrs["colour"]] + colour_jitter, 0, 255).astype(np.float32)
    bg = np.clip(bg_level[:, None] + bg_tint, 0, 255).astype(np.float32)
    noise = _rng(c.seed, "pixels").normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
    pixels = bg[:, None, None, :] * (1 - coverage) + fg[:, None, None, :] * coverage
    pixels += noise * np.float32(c.pixel_noise)
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images, attrs | {"cx": cx, "cy": cy, "radius": radius}


def _captions(
    shapes: list[str], attrs: dict[str, np.ndarray], tone: np.ndarray, is_ood: np.ndarray,
    c: ShapesConfig,
) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """One caption per item, and whether it names the shape."""
    n = len(shapes)
    cap = _rng(c.seed, "captions")
    u_name = cap.random(n)
    template_idx = cap.integers(0, len(CAPTION_TEMPLATES), n)
    generic = cap.integers(0, len(GENERIC_NOUNS), n)
    names_label = (u_name < c.caption_label) | is_ood
    colour_names = list(COLOURS)
    captions = [
        _caption(
            CAPTION_TEMPLATES[template_idx[i]],
            shapes[i] if names_label[i] else GENERIC_NOUNS[generic[i]],
            colour_names[attrs["colour"][i]],
            SIZES[attrs["size"][i]],
            POSITIONS[attrs["position"][i]],
            TONES[tone[i]],
        )
        for i in range(n)
    ]
    return captions, names_label


def make_shapes(config: ShapesConfig | None = None, **knobs: Any) -> Dataset:
    """Generate the shapes world.

    Args:
        config: the world's knobs; defaults to ``ShapesConfig()``.
        **knobs: knob overrides (applied on top of ``config``).

    Returns:
        A Dataset named ``shapes`` with ``image`` and ``text`` modalities, the background tone as
        ``groups``, a ``train``/``calibration``/``test`` split, and planted-flaw ground truth in
        ``meta``; its ``source`` is the canonical spec string.

    Raises:
        WorldSpecError: an unknown knob or a bad value.
    """
    unknown = sorted(set(knobs) - set(_KNOB_TYPES))
    if unknown:
        raise WorldSpecError(f"Unknown knob(s) {', '.join(unknown)}. {knob_help()}")
    c = dataclasses.replace(config or ShapesConfig(), **knobs)
    n, k = c.n, len(CLASSES)
    split_idx = _assign_splits(c)
    train_rows, test_rows = np.flatnonzero(split_idx == 0), np.flatnonzero(split_idx == 2)

    # Shapes, then out-of-distribution replacements in the test split.
    true_label = _rng(c.seed, "shape").integers(0, k, n)
    ood_rng = _rng(c.seed, "ood")
    ood_choice = ood_rng.integers(0, len(OOD_SHAPES), n)
    is_ood = np.zeros(n, dtype=bool)
    is_ood[_pick(ood_rng, test_rows, c.ood)] = True
    true_label[is_ood] = UNLABELLED
    shapes = [OOD_SHAPES[ood_choice[i]] if is_ood[i] else CLASSES[true_label[i]] for i in range(n)]

    # Background tone: spurious in train, independent elsewhere (1 = light).
    majority = (np.arange(k) >= math.ceil(k / 2)).astype(np.int64)
    tone_rng = _rng(c.seed, "tone")
    u_tone, coin = tone_rng.random(n), tone_rng.integers(0, 2, n)
    p_major = c.spurious if c.spurious > 0 else 0.5
    cls_major = majority[np.clip(true_label, 0, None)]
    tone = np.where(u_tone < p_major, cls_major, 1 - cls_major)
    tone = np.where((split_idx == 0) & ~is_ood, tone, coin)
    aligned = ~is_ood & (tone == cls_major)

    images, attrs = _render(shapes, tone, c)

    # Label noise (train only): shift the label by 1..k-1 classes.
    ln = _rng(c.seed, "label_noise")
    shift = ln.integers(1, k, n)
    noisy = np.zeros(n, dtype=bool)
    noisy[_pick(ln, train_rows, c.label_noise)] = True
    labels = np.where(noisy, (true_label + shift) % k, true_label)

    defect, defect_mask = _plant_defects(images, np.flatnonzero(split_idx > 0), tone, c)
    _plant_defects(images, train_rows, tone, c, "train_defects", c.train_defects,
                   (defect, defect_mask))  # fmt: skip
    captions, names_label = _captions(shapes, attrs, tone, is_ood, c)
    for i in train_rows:
        if defect[i] is not None:
            captions[i] += DEFECT_PHRASES[defect[i]][i % 2]

    colour_names = list(COLOURS)
    meta: list[dict[str, Any]] = [
        {
            "true_shape": shapes[i],
            "true_label": int(true_label[i]),
            "colour": colour_names[attrs["colour"][i]],
            "size": SIZES[attrs["size"][i]],
            "position": POSITIONS[attrs["position"][i]],
            "tone": TONES[tone[i]],
            "center": (float(attrs["cx"][i]), float(attrs["cy"][i])),
            "radius": float(attrs["radius"][i]),
            "spurious_aligned": bool(aligned[i]),
            "noisy_label": bool(noisy[i]),
            "ood": bool(is_ood[i]),
            "defect": defect[i],
            "defect_mask": defect_mask[i],
            "caption_names_label": bool(names_label[i]),
            "dup_of": None,
            "n_copies": 0,
        }
        for i in range(n)
    ]
    rows = {
        "ids": [f"shapes-{i:06d}" for i in range(n)],
        "image": list(images),
        "text": captions,
        "label": [int(x) for x in labels],
        "split": [SPLITS[s] for s in split_idx],
        "meta": meta,
    }
    _append_duplicates(rows, train_rows, c)
    return Dataset(
        name=WORLD_NAME,
        ids=rows["ids"],
        modalities={"image": rows["image"], "text": rows["text"]},
        labels=np.asarray(rows["label"], dtype=np.int64),
        classes=list(CLASSES),
        groups=[m["tone"] for m in rows["meta"]],
        splits=rows["split"],
        meta=rows["meta"],
        source=c.spec,
    )


def _append_duplicates(rows: dict[str, list[Any]], train_rows: np.ndarray, c: ShapesConfig) -> None:
    """Append ``duplicates`` exact copies of ``n_duplicated`` train items, with new ids."""
    if c.duplicates <= 0 or c.n_duplicated <= 0:
        return
    order = _rng(c.seed, "duplicates").permutation(len(train_rows))
    ids, meta = rows["ids"], rows["meta"]
    for i in np.sort(train_rows[order[: c.n_duplicated]]):
        meta[i]["n_copies"] = c.duplicates + 1
        for _ in range(c.duplicates):
            ids.append(f"shapes-{len(ids):06d}")
            rows["image"].append(rows["image"][i].copy())
            for key in ("text", "label", "split"):
                rows[key].append(rows[key][i])
            meta.append(meta[i] | {"dup_of": ids[i]})


def load_shapes(spec: str = WORLD_NAME) -> Dataset:
    """Build the shapes world from a spec string (see :func:`parse_world_spec`)."""
    return make_shapes(parse_world_spec(spec))
