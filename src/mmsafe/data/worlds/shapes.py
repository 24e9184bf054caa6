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

**Large worlds are lazy.** Every per-item draw (attributes, tone, split, flaws, defect geometry)
is a small array made up front, and captions are a list; the pixels are not. A world of more
than :data:`LAZY_ROWS` items gets lazy ``image`` and ``meta`` columns
(:class:`ShapesImages`, :class:`ShapesMeta`) that render rows in batches when asked, so
``shapes:n=1000000`` costs a few hundred MB of metadata, not gigabytes of pixels. A smaller
world holds the same columns materialised as lists; ``make_shapes(..., lazy=...)`` overrides
the choice. Both forms hold the same values, bit for bit, from the same rendering code: the
per-pixel noise comes from one random stream, walked once in chunks whose start states are kept
(see :class:`_PixelNoise`), so any row can be redrawn without holding the stream.

Example:
    >>> ds = make_shapes(n=40, seed=3)
    >>> ds.classes
    ['circle', 'square', 'triangle', 'cross', 'diamond']
    >>> ds.modalities["image"][0].shape, ds.modalities["image"][0].dtype
    ((32, 32, 3), dtype('uint8'))
    >>> parse_world_spec("shapes:seed=3,n=40") == ShapesConfig(seed=3, n=40)
    True
    >>> lazy = make_shapes(n=40, seed=3, lazy=True)
    >>> lazy.modalities["image"], lazy.meta
    (<ShapesImages: 140 rows>, <ShapesMeta: 140 rows>)
    >>> bool((lazy.modalities["image"][7] == ds.modalities["image"][7]).all())
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmsafe.data.columns import LazyColumn
from mmsafe.data.dataset import UNLABELLED, Dataset
from mmsafe.data.worlds.spec import (
    MAX_INT_KNOB,
    MAX_LAZY_ROWS,
    WorldSpecError,
    knob_types,
    parse_knobs,
    size_problem,
)
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
DEFECT_KINDS: tuple[str, ...] = ("scratch", "hole")
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

LAZY_ROWS = 50_000
"""Worlds with more items than this get lazy image and meta columns (see the module docstring)."""
NOISE_CHUNK_VALUES = 8 * 32 * 32 * 3
"""Noise values per saved state of the pixel-noise stream (8 rows of 32x32 RGB, at least 1 row):
a lazy row away from the rows just rendered costs drawing its whole chunk."""

_ALL_SHAPES: tuple[str, ...] = CLASSES + OOD_SHAPES
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_FILL: tuple[int, int] = (255, 0)  # a defect's colour by tone: white on dark, black on light
_LAZY_VERSION = b"mmsafe.worlds.shapes.lazy/1"
_NOISE_BOUND = 16.0
"""Above any ``|x|`` NumPy's ziggurat ``standard_normal`` can return (its largest is under 12.3)."""

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
        value = getattr(c, name)
        if isinstance(value, float) and not math.isfinite(value):  # ints are finite
            problems.append(f"{name} must be finite")
        elif isinstance(value, int) and abs(value) > MAX_INT_KNOB:
            problems.append(f"{name} is out of range (more than 18 digits)")
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
    problems += size_problem("n", c.n, MAX_LAZY_ROWS)
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


@functools.cache
def _pixel_centres(size: int) -> np.ndarray:
    """The ``(y, x)`` centres of the pixels of a ``size`` x ``size`` image (read-only)."""
    centres = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    centres.flags.writeable = False
    return centres


def _segment_mask(p0: np.ndarray, p1: np.ndarray, width: float, size: int) -> np.ndarray:
    """Pixels whose centre lies within ``width / 2`` of the segment ``p0``-``p1`` (x, y)."""
    yy, xx = _pixel_centres(size)
    d = p1 - p0
    t = ((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1])) <= width / 2


def _disc_mask(centre: np.ndarray, radius: float, size: int) -> np.ndarray:
    yy, xx = _pixel_centres(size)
    return np.hypot(xx - centre[0], yy - centre[1]) <= radius


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@functools.cache  # a few thousand distinct captions: a large world shares their strings
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


def _draw_attributes(tone: np.ndarray, c: ShapesConfig) -> dict[str, np.ndarray]:
    """Colour, size, position, geometry and the fore/background colours of every item."""
    n, size = len(tone), c.image_size
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
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    fg = np.clip(palette[attrs["colour"]] + colour_jitter, 0, 255).astype(np.float32)
    bg = np.clip(bg_level[:, None] + bg_tint, 0, 255).astype(np.float32)
    return attrs | {"cx": cx, "cy": cy, "radius": radius, "fg": fg, "bg": bg}


def _draw_defects(
    c: ShapesConfig, rows: np.ndarray, stream: str, fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows (a fraction of ``rows``, sorted) given a defect, its kind and its geometry."""
    d = _rng(c.seed, stream)
    kinds = d.integers(0, 2, c.n)
    geometry = d.uniform(0.0, 1.0, (c.n, 5))
    picked = _pick(d, rows, fraction)
    return picked, kinds[picked], geometry[picked]


def _defect_pixels(kind: int, g: np.ndarray, size: int) -> np.ndarray:
    """The pixels a defect covers: a scratch (``kind`` 0) or a hole (1) of geometry ``g``."""
    if kind == 0:
        p0 = g[:2] * size
        angle, length = g[2] * 2 * np.pi, (0.5 + 0.4 * g[3]) * size
        p1 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 0, size)
        return _segment_mask(p0, p1, width=max(1.2, size / 24), size=size)
    centre = (0.15 + 0.7 * g[:2]) * size
    return _disc_mask(centre, radius=(1.5 + g[4]) * size / 32, size=size)


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


@dataclass(frozen=True, eq=False)
class _Items:
    """Everything drawn up front for the ``n`` distinct items: small per-item arrays, no pixels.

    Rows ``0..n-1`` of the world are the items; rows from ``n`` on are the copies appended for
    ``duplicates`` (``duplicates`` consecutive copies of each of ``dup_sources``, in order).
    """

    config: ShapesConfig
    split: np.ndarray  # index into SPLITS
    label: np.ndarray  # the (possibly flipped) label
    true_label: np.ndarray
    shape: np.ndarray  # index into _ALL_SHAPES
    tone: np.ndarray  # index into TONES
    aligned: np.ndarray
    noisy: np.ndarray
    is_ood: np.ndarray
    names_label: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    position: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    fg: np.ndarray  # (n, 3) float32 shape colour
    bg: np.ndarray  # (n, 3) float32 background colour
    defect_rows: np.ndarray  # sorted items given a defect (either stream)
    defect_kind: np.ndarray  # 0 scratch, 1 hole, per defect row
    defect_geometry: np.ndarray  # (len(defect_rows), 5) uniforms
    dup_sources: np.ndarray  # sorted train items that are duplicated

    @property
    def n(self) -> int:
        """The number of distinct items."""
        return self.config.n

    @property
    def n_rows(self) -> int:
        """The number of rows: the items and their copies."""
        return self.n + len(self.dup_sources) * self.config.duplicates

    def item_of(self, rows: np.ndarray) -> np.ndarray:
        """The item each row shows (a copy shows its source item)."""
        rows = np.asarray(rows, dtype=np.int64)
        items, copy = rows.copy(), rows >= self.n
        items[copy] = self.dup_sources[(rows[copy] - self.n) // max(self.config.duplicates, 1)]
        return items

    def defect_of(self, items: np.ndarray) -> np.ndarray:
        """Position in ``defect_rows`` of each item, ``-1`` where it has no defect."""
        return _position_in(self.defect_rows, items)

    def n_copies(self, items: np.ndarray) -> np.ndarray:
        """``meta["n_copies"]`` of each item: ``duplicates + 1`` for a duplicated one, else 0."""
        copied = _position_in(self.dup_sources, items) >= 0
        return np.where(copied, self.config.duplicates + 1, 0)


def _position_in(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Position of each of ``x`` in ``sorted_values``, ``-1`` where it is absent."""
    x = np.asarray(x, dtype=np.int64)
    if len(sorted_values) == 0:
        return np.full(x.shape, -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_values, x), len(sorted_values) - 1)
    return np.where(sorted_values[at] == x, at, -1)


def _draw_items(c: ShapesConfig) -> tuple[_Items, list[str]]:
    """Draw every per-item attribute and flaw (no pixels), and the captions before defects."""
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
    shape = np.where(is_ood, k + ood_choice, true_label)

    # Background tone: spurious in train, independent elsewhere (1 = light).
    majority = (np.arange(k) >= math.ceil(k / 2)).astype(np.int64)
    tone_rng = _rng(c.seed, "tone")
    u_tone, coin = tone_rng.random(n), tone_rng.integers(0, 2, n)
    p_major = c.spurious if c.spurious > 0 else 0.5
    cls_major = majority[np.clip(true_label, 0, None)]
    tone = np.where(u_tone < p_major, cls_major, 1 - cls_major)
    tone = np.where((split_idx == 0) & ~is_ood, tone, coin)
    aligned = ~is_ood & (tone == cls_major)

    attrs = _draw_attributes(tone, c)

    # Label noise (train only): shift the label by 1..k-1 classes.
    ln = _rng(c.seed, "label_noise")
    shift = ln.integers(1, k, n)
    noisy = np.zeros(n, dtype=bool)
    noisy[_pick(ln, train_rows, c.label_noise)] = True
    labels = np.where(noisy, (true_label + shift) % k, true_label)

    # Defects: held-out rows ("defects"), train rows ("train_defects"); the two never overlap.
    held_out = _draw_defects(c, np.flatnonzero(split_idx > 0), "defects", c.defects)
    trained = _draw_defects(c, train_rows, "train_defects", c.train_defects)
    defect_rows, defect_kind, defect_geometry = (
        np.concatenate(parts) for parts in zip(held_out, trained, strict=True)
    )
    order = np.argsort(defect_rows)

    shapes = [_ALL_SHAPES[s] for s in shape.tolist()]
    captions, names_label = _captions(shapes, attrs, tone, is_ood, c)
    dup_sources = np.zeros(0, dtype=np.int64)
    if c.duplicates > 0 and c.n_duplicated > 0:
        dup_order = _rng(c.seed, "duplicates").permutation(len(train_rows))
        dup_sources = np.sort(train_rows[dup_order[: c.n_duplicated]])
    small = np.int8  # category indices
    items = _Items(
        config=c,
        split=split_idx.astype(small),
        label=labels,
        true_label=true_label,
        shape=shape.astype(small),
        tone=tone.astype(small),
        aligned=aligned,
        noisy=noisy,
        is_ood=is_ood,
        names_label=names_label,
        colour=attrs["colour"].astype(small),
        size=attrs["size"].astype(small),
        position=attrs["position"].astype(small),
        cx=attrs["cx"],
        cy=attrs["cy"],
        radius=attrs["radius"],
        fg=attrs["fg"],
        bg=attrs["bg"],
        defect_rows=defect_rows[order],
        defect_kind=defect_kind[order].astype(small),
        defect_geometry=defect_geometry[order],
        dup_sources=dup_sources,
    )
    return items, captions


# --------------------------------------------------------------------------- pixels on demand


class _PixelNoise:
    """Random access to rows of the pixel-noise stream, without holding the stream.

    The world's noise is ``_rng(seed, "pixels").normal(0, 1, (n, S, S, 3))``, as float32. A
    Generator draws normals one after another from its bit stream, so drawing the stream chunk by
    chunk gives exactly the numbers of one big draw. This object walks the stream once, lazily
    and only as far as the rows asked for, keeping the bit generator's state (one 128-bit int) at
    the start of every chunk of ``chunk_rows`` rows; a chunk already walked past is redrawn from
    its saved state. So rows in order cost one pass over the stream, and a row behind the walk
    costs drawing its chunk.

    Not thread-safe. A forked worker process gets a copy as it stands and walks on by itself.

    Args:
        seed: the world's seed.
        n: the number of items.
        size: the image side.
        chunk_rows: rows per saved state; default from :data:`NOISE_CHUNK_VALUES`.
    """

    def __init__(self, seed: int, n: int, size: int, chunk_rows: int | None = None) -> None:
        self._n, self._size = n, size
        self._chunk = chunk_rows or max(1, NOISE_CHUNK_VALUES // (size * size * 3))
        self._frontier = _rng(seed, "pixels")  # at the start of chunk len(self._starts)
        self._replay = _rng(seed, "pixels")
        self._starts: list[int] = []  # the PCG64 state at the start of each chunk walked past

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The noise of ``rows`` (any order, repeats allowed), ``(len(rows), S, S, 3)`` float32."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self._size, self._size, 3), dtype=np.float32)
        chunk_of = rows // self._chunk
        for k in np.unique(chunk_of):
            at = np.flatnonzero(chunk_of == k)
            out[at] = self._chunk_noise(int(k))[rows[at] - k * self._chunk]
        return out

    def walk(self, row: int) -> None:
        """Walk the stream up to row ``row``'s chunk (saving states, keeping no noise)."""
        k = int(row) // self._chunk
        if k >= len(self._starts):
            self._chunk_noise(k)

    def _chunk_noise(self, k: int) -> np.ndarray:
        """The noise of every row of chunk ``k``."""
        if k < len(self._starts):
            state = self._replay.bit_generator.state
            state["state"]["state"] = self._starts[k]
            self._replay.bit_generator.state = state
            return self._draw(self._replay, k)
        while True:  # walk on to chunk k, discarding the chunks before it
            self._starts.append(self._frontier.bit_generator.state["state"]["state"])
            noise = self._draw(self._frontier, len(self._starts) - 1)
            if len(self._starts) > k:
                return noise

    def _draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        m = min(self._chunk, self._n - k * self._chunk)
        return rng.normal(0.0, 1.0, (m, self._size, self._size, 3)).astype(np.float32)


def _render_clean(items: _Items, noise: _PixelNoise, rows: np.ndarray) -> np.ndarray:
    """Items ``rows`` before any defect, ``(len(rows), S, S, 3)`` uint8."""
    size = items.config.image_size
    shapes = [_ALL_SHAPES[s] for s in items.shape[rows].tolist()]
    coverage = shape_coverage(shapes, items.cx[rows], items.cy[rows], items.radius[rows], size)
    coverage = coverage[..., None]
    fg, bg = items.fg[rows], items.bg[rows]
    pixels = bg[:, None, None, :] * (1 - coverage) + fg[:, None, None, :] * coverage
    pixels += noise.rows(rows) * np.float32(items.config.pixel_noise)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _render(items: _Items, noise: _PixelNoise, rows: np.ndarray) -> np.ndarray:
    """Items ``rows`` as the world shows them (defects drawn in), ``(len(rows), S, S, 3)`` uint8."""
    images = _render_clean(items, noise, rows)
    for j, d in enumerate(items.defect_of(rows)):
        if d >= 0:
            drawn = _defect_pixels(items.defect_kind[d], items.defect_geometry[d], images.shape[1])
            images[j][drawn] = np.uint8(_FILL[items.tone[rows[j]]])
    return images


def _defect_always_shows(items: _Items, rows: np.ndarray) -> np.ndarray:
    """Whether the defect colour differs from every pixel these items can have.

    A pixel mixes its item's background and shape colours plus noise, so each channel stays
    within ``[min(bg, fg), max(bg, fg)]`` widened by ``_NOISE_BOUND * pixel_noise``. Where some
    channel can never round to the defect colour, the defect changes every pixel it covers and its
    mask is known without rendering the item.
    """
    lo = np.minimum(items.fg[rows], items.bg[rows]).astype(np.float64)
    hi = np.maximum(items.fg[rows], items.bg[rows]).astype(np.float64)
    slack = _NOISE_BOUND * items.config.pixel_noise + 1.0  # + float32 rounding, with room
    white = items.tone[rows] == 0  # a dark background gets a white (255) defect
    return np.where(white, hi.min(axis=1) + slack < 254.5, lo.max(axis=1) - slack > 0.5)


_Defect = tuple[str, np.ndarray] | None
"""A row's visible defect: its kind and the mask of pixels it changed (None: no defect)."""


def _defects(items: _Items, noise: _PixelNoise, rows: np.ndarray) -> list[_Defect]:
    """The defect of each of the items ``rows``; None where it has none or it changed nothing.

    Rendering is needed only for items whose pixels might already have the defect colour
    (a very large ``pixel_noise``); see :func:`_defect_always_shows`.
    """
    at = items.defect_of(rows)
    has = np.flatnonzero(at >= 0)
    unsure = has[~_defect_always_shows(items, rows[has])]
    clean = {}
    if len(unsure):
        clean = dict(zip(unsure.tolist(), _render_clean(items, noise, rows[unsure]), strict=True))
    out: list[_Defect] = [None] * len(rows)
    for j in has.tolist():
        kind = int(items.defect_kind[at[j]])
        mask = _defect_pixels(kind, items.defect_geometry[at[j]], items.config.image_size)
        if j in clean:  # only the pixels that were not the defect colour already
            mask = mask & (clean[j] != np.uint8(_FILL[items.tone[rows[j]]])).any(axis=-1)
        if mask.any():
            out[j] = (DEFECT_KINDS[kind], mask)
    return out


def _item_meta(items: _Items, i: int, defect: _Defect, n_copies: int) -> dict[str, Any]:
    """The ground truth of item ``i`` (as its own row: ``dup_of`` is None)."""
    return {
        "true_shape": _ALL_SHAPES[items.shape[i]],
        "true_label": int(items.true_label[i]),
        "colour": _COLOUR_NAMES[items.colour[i]],
        "size": SIZES[items.size[i]],
        "position": POSITIONS[items.position[i]],
        "tone": TONES[items.tone[i]],
        "center": (float(items.cx[i]), float(items.cy[i])),
        "radius": float(items.radius[i]),
        "spurious_aligned": bool(items.aligned[i]),
        "noisy_label": bool(items.noisy[i]),
        "ood": bool(items.is_ood[i]),
        "defect": None if defect is None else defect[0],
        "defect_mask": None if defect is None else defect[1],
        "caption_names_label": bool(items.names_label[i]),
        "dup_of": None,
        "n_copies": n_copies,
    }


def _row_id(row: int) -> str:
    return f"shapes-{row:06d}"


def _meta(items: _Items, noise: _PixelNoise, rows: np.ndarray) -> list[dict[str, Any]]:
    """The meta dict of each row; a copy's is its source's with ``dup_of`` set."""
    distinct, inverse = np.unique(items.item_of(rows), return_inverse=True)
    defects, copies = _defects(items, noise, distinct), items.n_copies(distinct).tolist()
    metas = [
        _item_meta(items, i, defect, n)
        for i, defect, n in zip(distinct.tolist(), defects, copies, strict=True)
    ]
    out = []
    for row, j in zip(rows.tolist(), inverse.tolist(), strict=True):
        copy_of = _row_id(int(distinct[j])) if row >= items.n else None
        out.append(metas[j] | {"dup_of": copy_of})
    return out


class _ShapesColumn(LazyColumn):
    """A column of the shapes world, produced from its drawn items on access."""

    _name = ""

    def __init__(self, items: _Items, noise: _PixelNoise) -> None:
        super().__init__(items.n_rows)
        self._items, self._noise = items, noise

    def _base_digest(self) -> bytes:
        key = b"\x1f".join([_LAZY_VERSION, self._items.config.spec.encode(), self._name.encode()])
        return hashlib.blake2b(key, digest_size=16).digest()


class ShapesImages(_ShapesColumn):
    """The images of a shapes world, rendered in batches on access (``uint8`` ``(S, S, 3)``)."""

    _name = "image"

    def _load_base(self, base_rows: np.ndarray) -> list[Any]:
        distinct, inverse = np.unique(self._items.item_of(base_rows), return_inverse=True)
        return list(_render(self._items, self._noise, distinct)[inverse])

    def prepare(self) -> None:
        """Walk the noise stream as far as this view's rows need, once (before a fork)."""
        if len(self):
            self._noise.walk(int(self._items.item_of(self.base_rows()).max()))


class ShapesMeta(_ShapesColumn):
    """The ``meta`` dicts of a shapes world, built on access (defect masks included)."""

    _name = "meta"

    def _load_base(self, base_rows: np.ndarray) -> list[Any]:
        return _meta(self._items, self._noise, base_rows)


def make_shapes(
    config: ShapesConfig | None = None, *, lazy: bool | None = None, **knobs: Any
) -> Dataset:
    """Generate the shapes world.

    Args:
        config: the world's knobs; defaults to ``ShapesConfig()``.
        lazy: whether images and ``meta`` are lazy columns (:class:`ShapesImages`,
            :class:`ShapesMeta`) rendered on access, or lists in memory; ``None``: lazy when
            ``n`` exceeds :data:`LAZY_ROWS`. Both hold the same values.
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
    items, captions = _draw_items(c)
    noise = _PixelNoise(c.seed, c.n, c.image_size)

    # A train defect shows in the caption (where it changed any pixel).
    trained = items.defect_rows[items.split[items.defect_rows] == 0]
    for i, defect in zip(trained.tolist(), _defects(items, noise, trained), strict=True):
        if defect is not None:
            captions[i] += DEFECT_PHRASES[defect[0]][i % 2]

    images: Sequence[Any] = ShapesImages(items, noise)
    meta: Sequence[dict[str, Any]] = ShapesMeta(items, noise)
    if not (c.n > LAZY_ROWS if lazy is None else lazy):
        images, meta = list(images), list(meta)
    rows = items.item_of(np.arange(items.n_rows))
    return Dataset(
        name=WORLD_NAME,
        ids=[_row_id(r) for r in range(items.n_rows)],
        modalities={"image": images, "text": [captions[i] for i in rows.tolist()]},
        labels=items.label[rows],
        classes=list(CLASSES),
        groups=[TONES[t] for t in items.tone[rows].tolist()],
        splits=[SPLITS[s] for s in items.split[rows].tolist()],
        meta=meta,
        source=c.spec,
    )


def load_shapes(spec: str = WORLD_NAME) -> Dataset:
    """Build the shapes world from a spec string (see :func:`parse_world_spec`)."""
    return make_shapes(parse_world_spec(spec))
