"""The digits world: scikit-learn's real handwritten digits as image-caption pairs."""

from __future__ import annotations

import numpy as np
import pytest

from mmsafe.data.loading import load_data
from mmsafe.data.worlds import WorldSpecError, is_world_spec, load_world
from mmsafe.data.worlds.digits import CLASSES, DigitsConfig, make_digits, render


def test_rows_are_sklearns_digits_in_order():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = load_data("digits:image_size=8")
    assert is_world_spec("digits")
    assert len(ds) == len(ref.target) == 1797
    assert ds.labels.tolist() == ref.target.tolist()
    # at 8 px no resampling: the grey level is exactly 255 * (1 - v / 16), rounded
    want = np.round(255.0 * (1.0 - ref.images[5] / 16.0)).astype(np.uint8)
    np.testing.assert_array_equal(ds.modalities["image"][5][..., 0], want)
    assert all(CLASSES[y] in t for y, t in zip(ds.labels, ds.modalities["text"], strict=True))


def test_splits_are_stratified_and_seeded():
    ds = make_digits(DigitsConfig(seed=3))
    splits = np.array(ds.splits)
    for d in range(10):
        rows = ds.labels == d
        share = np.mean(splits[rows] == "train")
        assert abs(share - 0.6) < 0.02, (d, share)
    assert ds.splits == make_digits(DigitsConfig(seed=3)).splits
    assert ds.splits != make_digits(DigitsConfig(seed=4)).splits


def test_groups_split_each_digit_at_its_median_ink():
    ds = load_world("digits")
    ink = np.array([m["ink"] for m in ds.meta])
    heavy = np.array(ds.groups) == "heavy"
    for d in range(10):
        rows = ds.labels == d
        assert ink[rows & heavy].min() > np.median(ink[rows]) >= ink[rows & ~heavy].max()


def test_render_upscales_ink_dark_on_white():
    scan = np.zeros((1, 8, 8))
    scan[0, 2:6, 3:5] = 16.0
    img = render(scan, 64)[0]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img[32, 32, 0] < 30 and img[2, 2, 0] == 255  # stroke dark, paper white


@pytest.mark.parametrize(
    "spec, words",
    [
        ("digits:colour=1", "Unknown knob 'colour'"),
        ("digits:image_size=4", "image_size=4 must be in [8, 512]"),
        ("digits:seed=x", "needs an integer"),
        ("digits:train_frac=0.9", "sum < 1"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, words):
    with pytest.raises(WorldSpecError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_world(spec)


def test_source_is_the_canonical_spec():
    ds = load_world("digits:seed=2")
    assert load_world(ds.source).fingerprint() == ds.fingerprint()
