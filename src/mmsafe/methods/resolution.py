"""Lengths that scale with the image: fractions of its side instead of pixel constants.

mmsafe's defaults were set on 32-pixel images (the shapes world, tiny-clip's input). A length
that was ``n`` pixels there is now the fraction ``n / 32`` of the image side and becomes pixels
again on each image, so at 32 px every number is what it was and on a 250-px photo (or a 224-px
input) it is proportionally larger: window crops, strides and shifts keep covering the same part
of the picture, and their count does not grow with the resolution.

Which side a length refers to depends on where it acts: lengths applied to a model's
preprocessed pixels (corruptions, test-time augmentation) scale with ``model.input_size``;
lengths on the image's own grid (anomaly windows and maps) scale with the image's side.
Attack budgets are per-pixel values in ``[0, 1]`` (``4/255``), which do not depend on the size.

Example:
    >>> to_pixels(12 / 32, 32), to_pixels(12 / 32, 128), to_pixels(12 / 32, 100)
    (12, 48, 38)
    >>> length_scale(64)
    2.0
"""

from __future__ import annotations

import math

REFERENCE_SIDE = 32
"""The image side, in pixels, that mmsafe's pixel defaults were chosen for."""


def length_scale(side: int | float) -> float:
    """How many pixels at ``side`` one pixel at :data:`REFERENCE_SIDE` is: ``side / 32``.

    Example:
        >>> length_scale(32), length_scale(224)
        (1.0, 7.0)
    """
    return float(side) / REFERENCE_SIDE


def to_pixels(fraction: float, side: int, minimum: int = 1) -> int:
    """``fraction`` of ``side``, rounded half up to whole pixels, at least ``minimum``.

    Half up (not Python's half-to-even), so 37.5 px is 38 and a length never collapses to 0
    unless ``minimum`` is 0.

    Example:
        >>> to_pixels(0.125, 100), to_pixels(0.01, 32), to_pixels(0.0, 32, minimum=0)
        (13, 1, 0)
    """
    return max(int(minimum), math.floor(float(fraction) * int(side) + 0.5 + 1e-9))


def check_fraction(
    name: str, value: float, *, high: float = 1.0, allow_zero: bool = False
) -> float:
    """``value`` as a float when it is a fraction of the side in ``(0, high]``; else a clear error.

    Options that were pixel counts before are fractions now; a value above ``high`` is most
    likely an old pixel count, and the message says how to convert it.

    Example:
        >>> check_fraction("stride", 4 / 32)
        0.125
        >>> try:
        ...     check_fraction("stride", 4)
        ... except ValueError as err:
        ...     print(str(err).split("; ")[1])
        lengths are no longer in pixels (4 px of a 32-px image is 4/32 = 0.125)
    """
    v = float(value)
    low_ok = v >= 0 if allow_zero else v > 0
    if not (math.isfinite(v) and low_ok and v <= high):
        interval = f"[0, {high:g}]" if allow_zero else f"(0, {high:g}]"
        hint = ""
        if math.isfinite(v) and v > high:
            hint = (
                f"; lengths are no longer in pixels ({value:g} px of a {REFERENCE_SIDE}-px image "
                f"is {value:g}/{REFERENCE_SIDE} = {v / REFERENCE_SIDE:g})"
            )
        raise ValueError(
            f"{name}={value!r} must be a fraction of the image side in {interval}{hint}"
        )
    return v
