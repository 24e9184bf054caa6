"""``digits``: real handwritten digits that ship inside scikit-learn, as image-caption pairs.

Not synthetic and without planted flaws: the 1,797 8x8 grey-level scans of the UCI
handwritten digits (``sklearn.datasets.load_digits``, 43 writers), upscaled to ``image_size``
pixels (bilinear, so a pretrained tower sees strokes, not blocks) and captioned with the digit's
name. It is the real-data control beside the planted-flaw worlds: checks that need planted
ground truth (defects, OOD rows, duplicates) skip on it with a reason, and every other check
must run on it. Groups are the stroke weight (``light``/``heavy`` ink, split at each digit's
median), a real attribute for slices and fairness.

Spec: ``digits[:seed=0,image_size=32,train_frac=0.6,calibration_frac=0.2]``.

Example:
    >>> ds = load_digits_world("digits:image_size=16")
    >>> len(ds), ds.modalities["image"][0].shape, ds.classes[:3]
    (1797, (16, 16, 3), ['zero', 'one', 'two'])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmsafe.data.dataset import Dataset
from mmsafe.data.worlds.spec import WorldSpecError, knob_help, parse_knobs

WORLD_NAME = "digits"
CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten digit {}",
    "the number {} written by hand",
    "a scanned handwritten {}",
    "a digit {} in pen",
)


@dataclass(frozen=True)
class DigitsConfig:
    """The knobs of the digits world.

    Attributes:
        seed: seeds the split and the caption choice.
        image_size: output side in pixels (the scans are 8x8).
        train_frac: share of rows in ``train`` (stratified by digit).
        calibration_frac: share in ``calibration``; the rest is ``test``.
    """

    seed: int = 0
    image_size: int = 32
    train_frac: float = 0.6
    calibration_frac: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be >= 0")
        if not 8 <= self.image_size <= 512:
            problems.append(f"image_size={self.image_size} must be in [8, 512]")
        if not (0 < self.train_frac < 1 and 0 < self.calibration_frac < 1) or (
            self.train_frac + self.calibration_frac >= 1
        ):
            problems.append("train_frac and calibration_frac must be in (0, 1) with sum < 1")
        if problems:
            raise WorldSpecError(
                f"Invalid digits world: {'; '.join(problems)}. {knob_help(DigitsConfig)}"
            )

    @property
    def spec(self) -> str:
        """The canonical spec string naming every knob."""
        return (
            f"{WORLD_NAME}:seed={self.seed},image_size={self.image_size},"
            f"train_frac={self.train_frac!r},calibration_frac={self.calibration_frac!r}"
        )


def render(scans: np.ndarray, size: int) -> np.ndarray:
    """``(N, 8, 8)`` scans in ``[0, 16]`` -> ``(N, size, size, 3)`` uint8 dark ink on white.

    Example:
        >>> render(np.full((1, 8, 8), 16.0), 4)[0, 0, 0].tolist()
        [0, 0, 0]
    """
    ink = torch.from_numpy(np.asarray(scans, dtype=np.float32) / 16.0)[:, None]
    if ink.shape[-1] != size:
        ink = torch.nn.functional.interpolate(
            ink, size=(size, size), mode="bilinear", align_corners=False
        )
    grey = (255.0 * (1.0 - ink.clamp(0, 1))).round().to(torch.uint8)[:, 0].numpy()
    return np.repeat(grey[..., None], 3, axis=-1)


def stratified_splits(labels: np.ndarray, train: float, cal: float, seed: int) -> list[str]:
    """A seeded ``train``/``calibration``/``test`` name per row, stratified by label.

    Example:
        >>> s = stratified_splits(np.repeat([0, 1], 10), 0.6, 0.2, 0)
        >>> [s.count(k) for k in ("train", "calibration", "test")]
        [12, 4, 4]
    """
    rng = np.random.default_rng([seed, 7])
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_cal = int(round(len(rows) * train)), int(round(len(rows) * cal))
        out[rows[:n_train]] = "train"
        out[rows[n_train : n_train + n_cal]] = "calibration"
        out[rows[n_train + n_cal :]] = "test"
    return out.tolist()


def make_digits(config: DigitsConfig | None = None) -> Dataset:
    """Build the digits world (see the module docstring)."""
    from sklearn.datasets import load_digits

    c = config or DigitsConfig()
    bunch = load_digits()
    scans, labels = np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    ink = scans.reshape(len(scans), -1).sum(axis=1)
    heavy = np.zeros(len(labels), dtype=bool)
    for d in range(len(CLASSES)):
        rows = labels == d
        heavy[rows] = ink[rows] > np.median(ink[rows])
    rng = np.random.default_rng([c.seed, 11])
    templates = rng.integers(0, len(CAPTIONS), len(labels))
    images = render(scans, c.image_size)
    captions = [CAPTIONS[t].format(CLASSES[y]) for t, y in zip(templates, labels, strict=True)]
    return Dataset(
        name=WORLD_NAME,
        ids=[f"digit-{i:04d}" for i in range(len(labels))],
        modalities={
            "image": list(images),
            "text": captions,
        },
        labels=labels,
        classes=list(CLASSES),
        groups=["heavy" if h else "light" for h in heavy],
        splits=stratified_splits(labels, c.train_frac, c.calibration_frac, c.seed),
        meta=[{"ink": float(v)} for v in ink],
        source=c.spec,
    )


def load_digits_world(spec: str = WORLD_NAME) -> Dataset:
    """Build the digits world from a spec string."""
    return make_digits(parse_knobs(spec, WORLD_NAME, DigitsConfig))
