"""Nothing assumes 32 px: every length scales with the image, and is today's number at 32 px.

The cross-check audit of issue 12: each pixel length a check or method uses (anomaly windows and
stride, the uncertainty check's test-time shift, the corruptions' blur radii and displacements,
the card's thumbnails) is a fraction of the image side; the defaults are exactly the old pixel
values at 32 px, and twice the image is twice the length.
"""

from __future__ import annotations

import base64
import inspect
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmsafe.checks.monitoring.uncertainty import UncertaintyCheck
from mmsafe.checks.registry import get_check, list_checks
from mmsafe.methods import perturb
from mmsafe.methods.resolution import REFERENCE_SIDE, check_fraction, length_scale, to_pixels
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
from mmsafe.report.plots import png_base64, thumbnail_png
from tests.conftest import ToyEncoder

OLD_PIXELS: dict[str, dict[str, tuple[float, ...]]] = {
    "monitoring.anomaly": {"windows": (12, 20), "stride": (4,)},
    "monitoring.uncertainty": {"max_shift": (2,)},
}
"""Every length option of a registered check, with its pixel default before issue 12."""

NOT_LENGTHS: dict[str, set[str]] = {
    "monitoring.conformal": {"shifts", "shift_severity"},  # corruption names and a severity
    "monitoring.anomaly": {"window_scale"},  # a choice of crop scale ("auto", "input", "native")
}
"""Options whose names look like lengths but are not."""

LOOKS_LIKE_A_LENGTH = re.compile(r"window|stride|shift|radius|sigma|kernel|crop|patch_size|px")


def _check_class(name: str) -> type:
    c = get_check(name)
    return c if isinstance(c, type) else type(c)


def _options(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(_check_class(name).__init__).parameters
    return {k: p for k, p in params.items() if k != "self"}


def test_every_length_option_is_known():
    """A check that grows an option named like a length must list it here, as a fraction."""
    found = {
        (name, opt)
        for name in list_checks()
        for opt in _options(name)
        if LOOKS_LIKE_A_LENGTH.search(opt) and opt not in NOT_LENGTHS.get(name, set())
    }
    known = {(name, opt) for name, opts in OLD_PIXELS.items() for opt in opts}
    assert found == known


@pytest.mark.parametrize(
    ("name", "option"), [(n, o) for n, opts in OLD_PIXELS.items() for o in opts]
)
def test_length_defaults_are_the_old_pixels_at_32_px(name, option):
    default = _options(name)[option].default
    values = default if isinstance(default, tuple) else (default,)
    assert all(0 < v <= 1 for v in values)  # a fraction of the side, not pixels
    assert tuple(to_pixels(v, REFERENCE_SIDE) for v in values) == OLD_PIXELS[name][option]
    assert tuple(to_pixels(v, 64) for v in values) == tuple(2 * p for p in OLD_PIXELS[name][option])
    old = OLD_PIXELS[name][option]
    with pytest.raises(ValueError, match="no longer in pixels"):
        _check_class(name)(**{option: old if isinstance(default, tuple) else old[0]})


def test_to_pixels_rounds_half_up_and_check_fraction_guards():
    assert [to_pixels(0.375, s) for s in (32, 100, 128, 250)] == [12, 38, 48, 94]
    assert to_pixels(1e-6, 32) == 1 and to_pixels(0.0, 32, minimum=0) == 0
    assert length_scale(32) == 1.0 and length_scale(96) == 3.0
    assert check_fraction("x", 0.0, allow_zero=True) == 0.0
    for bad in (0.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="fraction of the image side"):
            check_fraction("x", bad)


# --------------------------------------------------------------------------- corruptions
SPATIAL = {
    "gaussian_blur": lambda i: {"sigma": perturb.GAUSSIAN_BLUR[i]},
    "defocus_blur": lambda i: dict(
        zip(("radius", "alias_sigma"), perturb.DEFOCUS_BLUR[i], strict=True)
    ),
    "motion_blur": lambda i: dict(zip(("radius", "sigma"), perturb.MOTION_BLUR[i], strict=True)),
    "elastic_transform": lambda i: {"displacement": perturb.ELASTIC[i], "smoothing_sigma": 2.0},
}


@pytest.mark.parametrize("name", sorted(perturb.IMAGE_CORRUPTIONS))
def test_corruption_lengths_scale_with_the_side(name):
    for severity in perturb.SEVERITIES:
        at32 = perturb.spatial_lengths(name, severity, 32)
        at64 = perturb.spatial_lengths(name, severity, 64)
        assert at32 == (SPATIAL[name](severity - 1) if name in SPATIAL else {})  # CIFAR-10-C
        assert at64 == {k: 2 * v for k, v in at32.items()}
        assert perturb.spatial_lengths(name, severity, 224) == pytest.approx(
            {k: 7 * v for k, v in at32.items()}
        )


def _spread(img: torch.Tensor) -> float:
    """The standard deviation, in pixels, of a blurred impulse along one axis."""
    w = img[0, 0].double()
    pos = torch.arange(w.shape[0], dtype=torch.float64)
    p = w.sum(dim=1) / w.sum()
    mean = (p * pos).sum()
    return float(((p * (pos - mean) ** 2).sum()).sqrt())


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur"])
def test_a_blur_at_64_px_is_twice_as_wide_as_at_32_px(name):
    spreads = {}
    for side in (32, 64):
        x = torch.zeros(1, 3, side, side)
        x[..., side // 2, side // 2] = 1.0
        spreads[side] = _spread(perturb.corrupt_images(x, name, 5, seed=0))
    assert spreads[64] / spreads[32] == pytest.approx(2.0, rel=0.1)


def test_blur_at_32_px_is_the_cifar_blur_exactly():
    px = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for severity in (1, 5):
        got = perturb.corrupt_images(px, "gaussian_blur", severity, seed=0)
        sigma = perturb.GAUSSIAN_BLUR[severity - 1]
        assert torch.equal(got, perturb.gaussian_filter(px, sigma).clamp(0, 1))


# --------------------------------------------------------------------------- test-time shifts
def test_tta_shift_is_a_fraction_of_the_models_input():
    check = UncertaintyCheck()
    small = TinyClip(TinyClipConfig.for_size("xs"))  # 32-px input
    big = TinyClip(TinyClipConfig(image_size=224))
    assert small.input_size == 32 and big.input_size == 224
    assert check._shift_pixels(small) == 2  # the old default: the same engine variant
    assert check._shift_pixels(big) == 14
    assert UncertaintyCheck(max_shift=0)._shift_pixels(big) == 0
    with pytest.raises(ValueError, match="no longer in pixels"):
        UncertaintyCheck(max_shift=2)


def test_tta_pass_at_32_px_is_the_old_variant(colour_data, monkeypatch):
    """On a 32-px input the TTA passes are the very variants of the pixel default (same cache
    entries, same BALD); on the toy's 8-px input the shift is 1 px, no longer 2."""
    from mmsafe.engine.variants import Variant
    from mmsafe.models.base import images_to_tensor
    from tests.conftest import audit_context

    class Toy32(ToyEncoder):
        def preprocess(self, modality, values):
            if modality == "image":
                return images_to_tensor(values, 32)
            return super().preprocess(modality, values)

    for model, shift in ((Toy32(), 2), (ToyEncoder(), 1)):
        ctx = audit_context(model, colour_data)
        seen = []
        embed = ctx.engine.embed

        def spy(*args, _embed=embed, _seen=seen, **kwargs):
            _seen.append(kwargs.get("variant"))
            return _embed(*args, **kwargs)

        monkeypatch.setattr(ctx.engine, "embed", spy)
        UncertaintyCheck(method="tta", n_passes=2, n_boot=10).run(ctx)
        tta = [v for v in seen if v is not None and v.kind == "tta"]
        assert len(tta) == 2
        first = Variant.of(
            "tta",
            seed=perturb.row_seed(int(ctx.seed), "tta/0"),
            max_shift=shift,
            brightness=0.1,
            flip=True,
        )
        assert tta[0] == first


# --------------------------------------------------------------------------- the card
def _png_size(png: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(png))).size


def test_thumbnails_are_the_old_ones_at_32_px_and_small_at_any_size():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # an image and its overlay
    assert thumbnail_png(small) == png_base64(small, scale=3)  # byte for byte
    for h, shown in ((8, 96), (48, 96), (50, 50), (96, 96), (100, 96), (250, 96), (1000, 96)):
        size = _png_size(thumbnail_png(rng.integers(0, 256, (h, 2 * h, 3), dtype=np.uint8)))
        assert size == (2 * shown, shown)  # whole-factor enlarged, or shrunk; aspect kept


def test_no_check_draws_a_fixed_size_thumbnail():
    """Galleries go through thumbnail_png; a fixed ``png_base64(..., scale=3)`` would make a
    250-px photo a 750-px picture in the card."""
    from pathlib import Path

    import mmsafe.checks

    root = Path(mmsafe.checks.__file__).parent
    offenders = [p.name for p in root.rglob("*.py") if "png_base64(" in p.read_text("utf-8")]
    assert offenders == []
