"""The shapes world: determinism, splits, and every planted flaw with its ground truth."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest

from mmsafe.data.worlds import (
    WORLDS,
    ShapesConfig,
    WorldSpecError,
    is_world_spec,
    load_world,
    make_shapes,
    parse_world_spec,
)
from mmsafe.data.worlds.shapes import CLASSES, GENERIC_NOUNS, OOD_SHAPES, shape_coverage


def world_hash(ds) -> str:
    h = hashlib.sha256()
    for img in ds.modalities["image"]:
        h.update(img.tobytes())
    h.update("\n".join(ds.modalities["text"]).encode())
    h.update(ds.labels.tobytes())
    h.update(repr((ds.ids, ds.groups, ds.splits, ds.source)).encode())
    for m in ds.meta:
        for k in sorted(m):
            v = m[k]
            h.update(k.encode())
            h.update(v.tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
    return h.hexdigest()


def binomial_ok(successes: int, n: int, p: float, z: float = 4.5) -> bool:
    """Whether ``successes`` out of ``n`` is within ``z`` standard deviations of ``n * p``."""
    return abs(successes - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


@pytest.fixture(scope="module")
def world():
    return make_shapes()


def base_rows(ds, split: str) -> np.ndarray:
    """Positions of the distinct (non-copy) rows of one split."""
    return np.array(
        [i for i, m in enumerate(ds.meta) if ds.splits[i] == split and m["dup_of"] is None]
    )


# --------------------------------------------------------------------------- basics


def test_same_seed_identical_bytes_and_other_seed_differs():
    a, b = make_shapes(n=200, seed=5), make_shapes(n=200, seed=5)
    assert world_hash(a) == world_hash(b)
    assert a.fingerprint() == b.fingerprint()
    c = make_shapes(n=200, seed=6)
    assert world_hash(c) != world_hash(a)
    assert not all(
        np.array_equal(x, y)
        for x, y in zip(a.modalities["image"], c.modalities["image"], strict=True)
    )


def test_rows_are_well_formed(world):
    cfg = ShapesConfig()
    assert world.name == "shapes"
    assert world.source == cfg.spec and parse_world_spec(world.source) == cfg
    assert world.classes == ["circle", "square", "triangle", "cross", "diamond"]
    assert all(" " not in c for c in world.classes)
    assert len(world) == cfg.n + cfg.n_duplicated * cfg.duplicates
    assert len(set(world.ids)) == len(world)
    assert all(re.fullmatch(r"shapes-\d{6}", i) for i in world.ids)
    for img in world.modalities["image"][:50]:
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert set(world.groups) == {"dark", "light"}
    assert world.groups == [m["tone"] for m in world.meta]
    dark = np.mean(
        [world.modalities["image"][i].mean() for i in range(300) if world.groups[i] == "dark"]
    )
    light = np.mean(
        [world.modalities["image"][i].mean() for i in range(300) if world.groups[i] == "light"]
    )
    assert dark < 100 < light
    # labels agree with the drawn shape, except for planted noise and OOD rows
    for lab, m in zip(world.labels, world.meta, strict=True):
        if m["ood"]:
            assert lab == -1
        elif not m["noisy_label"]:
            assert world.classes[lab] == m["true_shape"]


def test_image_size_knob():
    ds = make_shapes(n=30, image_size=48, n_duplicated=2)
    assert ds.modalities["image"][0].shape == (48, 48, 3)
    masks = [m["defect_mask"] for m in ds.meta if m["defect_mask"] is not None]
    assert all(mask.shape == (48, 48) for mask in masks)


def test_split_fractions(world):
    n_train, n_cal, n_test = ShapesConfig().split_sizes()
    assert (n_train, n_cal, n_test) == (1800, 600, 600)
    assert len(base_rows(world, "train")) == n_train
    assert len(base_rows(world, "calibration")) == n_cal
    assert len(base_rows(world, "test")) == n_test
    ds = make_shapes(n=1000, train_frac=0.5, calibration_frac=0.3, n_duplicated=0)
    assert [ds.splits.count(s) for s in ("train", "calibration", "test")] == [500, 300, 200]


def test_shape_coverage_matches_geometry():
    c = np.array([64.0, 64.0, 64.0])
    cov = shape_coverage(["circle", "square", "diamond"], c, c, np.array([20.0] * 3), 128)
    assert cov.min() >= 0 and cov.max() <= 1
    expected = [math.pi * 20**2, (2 * 0.82 * 20) ** 2, 2 * (1.1 * 20) ** 2]  # disc, square, rhombus
    for area, want in zip(cov.sum(axis=(1, 2)), expected, strict=True):
        assert abs(area - want) / want < 0.03
    assert cov[0, 64, 64] == 1 and cov[0, 0, 0] == 0


def test_captions_describe_the_attributes(world):
    for text, m in zip(world.modalities["text"][:500], world.meta[:500], strict=True):
        assert m["colour"] in text
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", text), text
        named = [w for w in (*CLASSES, *OOD_SHAPES) if re.search(rf"\b{w}\b", text)]
        if m["caption_names_label"]:
            assert named == [m["true_shape"]]
        else:
            assert named == [] and any(re.search(rf"\b{g}\b", text) for g in GENERIC_NOUNS)
    assert len(set(world.modalities["text"])) > 500  # template variety


# --------------------------------------------------------------------------- planted flaws


def test_spurious_correlation_in_train_only(world):
    def aligned_rate(split: str) -> tuple[int, int]:
        rows = [i for i in base_rows(world, split) if not world.meta[i]["ood"]]
        return sum(world.meta[i]["spurious_aligned"] for i in rows), len(rows)

    hits, n = aligned_rate("train")
    assert binomial_ok(hits, n, 0.9)
    hits, n = aligned_rate("test")
    assert binomial_ok(hits, n, 0.5)
    assert n - hits > 150  # a sizeable rare-combination slice to find in test
    # the flag means what it says: first ceil(5/2) classes on dark, the rest on light
    for i in base_rows(world, "train"):
        m = world.meta[i]
        majority = "dark" if m["true_label"] < 3 else "light"
        assert m["spurious_aligned"] == (m["tone"] == majority)
    # tone is strongly dependent on class in train, not in test
    tr = base_rows(world, "train")
    dark_share = [
        np.mean([world.groups[i] == "dark" for i in tr if world.meta[i]["true_label"] == k])
        for k in range(5)
    ]
    assert min(dark_share[:3]) > 0.8 and max(dark_share[3:]) < 0.2
    off = make_shapes(spurious=0)
    hits = sum(off.meta[i]["spurious_aligned"] for i in base_rows(off, "train"))
    assert binomial_ok(hits, len(base_rows(off, "train")), 0.5)


def test_label_noise(world):
    noisy = [i for i, m in enumerate(world.meta) if m["noisy_label"] and m["dup_of"] is None]
    assert len(noisy) == round(0.1 * 1800)
    assert all(world.splits[i] == "train" for i in noisy)
    for i, m in enumerate(world.meta):
        assert (world.labels[i] != m["true_label"]) == m["noisy_label"], i
        assert m["ood"] or 0 <= world.labels[i] < 5
    off = make_shapes(label_noise=0)
    assert not any(m["noisy_label"] for m in off.meta)
    assert all(lab == m["true_label"] for lab, m in zip(off.labels, off.meta, strict=True))
    # switching label noise off leaves everything else identical
    assert off.modalities["text"] == world.modalities["text"]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(off.modalities["image"], world.modalities["image"], strict=True)
    )


def test_ood_only_in_test(world):
    ood = [i for i, m in enumerate(world.meta) if m["ood"]]
    assert len(ood) == round(0.1 * 600)
    assert all(world.splits[i] == "test" and world.labels[i] == -1 for i in ood)
    for i in ood:
        m = world.meta[i]
        assert m["true_shape"] in OOD_SHAPES and m["true_shape"] not in world.classes
        assert m["true_shape"] in world.modalities["text"][i]
    assert {world.meta[i]["true_shape"] for i in ood} == set(OOD_SHAPES)
    seen = {m["true_shape"] for m, s in zip(world.meta, world.splits, strict=True) if s != "test"}
    assert seen == set(CLASSES)
    off = make_shapes(ood=0)
    assert not any(m["ood"] for m in off.meta) and (off.labels >= 0).all()


def test_defects_mark_exactly_the_changed_pixels(world):
    clean = make_shapes(defects=0, train_defects=0)
    assert not any(m["defect"] for m in clean.meta)
    hit = [i for i, m in enumerate(world.meta) if m["defect"] is not None]
    held_out = [i for i in hit if world.splits[i] != "train"]
    assert len(held_out) == round(0.1 * 1200)
    trained = [i for i in hit if world.splits[i] == "train" and world.meta[i]["dup_of"] is None]
    assert len(trained) == round(0.1 * 1800)
    assert {world.meta[i]["defect"] for i in hit} == {"scratch", "hole"}
    for i, (a, b, m) in enumerate(
        zip(world.modalities["image"], clean.modalities["image"], world.meta, strict=True)
    ):
        changed = (a != b).any(axis=-1)
        if m["defect"] is None:
            assert m["defect_mask"] is None and not changed.any()
            assert world.modalities["text"][i] == clean.modalities["text"][i]
        else:
            mask = m["defect_mask"]
            assert mask.dtype == bool and mask.shape == (32, 32) and mask.any()
            assert np.array_equal(mask, changed), i
            if world.splits[i] == "train":  # the caption says what the picture shows
                assert world.modalities["text"][i] != clean.modalities["text"][i]
                assert any(p in world.modalities["text"][i] for p in ("scratch", "hole", "damaged"))
            else:
                assert world.modalities["text"][i] == clean.modalities["text"][i]
    holes = [world.meta[i]["defect_mask"].sum() for i in hit if world.meta[i]["defect"] == "hole"]
    assert min(holes) >= 3 and max(holes) <= 40  # small discs


def test_duplicates_are_exact_copies(world):
    copies = [i for i, m in enumerate(world.meta) if m["dup_of"] is not None]
    assert len(copies) == 20 * 5
    index = {id_: i for i, id_ in enumerate(world.ids)}
    originals = {world.meta[i]["dup_of"] for i in copies}
    assert len(originals) == 20
    for i in copies:
        j = index[world.meta[i]["dup_of"]]
        assert world.meta[j]["dup_of"] is None and world.splits[j] == "train"
        assert np.array_equal(world.modalities["image"][i], world.modalities["image"][j])
        assert world.modalities["text"][i] == world.modalities["text"][j]
        assert world.labels[i] == world.labels[j] and world.splits[i] == "train"
        assert world.meta[i]["n_copies"] == world.meta[j]["n_copies"] == 6
    assert sum(m["n_copies"] > 0 for m in world.meta) == 20 * 6
    for off in (make_shapes(n=300, duplicates=0), make_shapes(n=300, n_duplicated=0)):
        assert len(off) == 300
        assert all(m["dup_of"] is None and m["n_copies"] == 0 for m in off.meta)
    # no two distinct items share an image by accident
    digests = {
        hashlib.sha1(world.modalities["image"][i].tobytes()).hexdigest() for i in range(3000)
    }
    assert len(digests) == 3000


def test_caption_label_rate(world):
    rows = [m for m in world.meta if not m["ood"] and m["dup_of"] is None]
    assert binomial_ok(sum(m["caption_names_label"] for m in rows), len(rows), 0.8)
    leaky = make_shapes(n=300, caption_label=1.0)
    for text, m in zip(leaky.modalities["text"], leaky.meta, strict=True):
        assert m["caption_names_label"] and m["true_shape"] in text
    mute = make_shapes(n=300, caption_label=0.0, ood=0)
    assert not any(any(c in t for c in CLASSES) for t in mute.modalities["text"])


# --------------------------------------------------------------------------- spec strings


def test_parse_world_spec():
    assert parse_world_spec("shapes") == ShapesConfig()
    cfg = parse_world_spec(
        "shapes:seed=7,n=3000,spurious=0.9,label_noise=0.1,ood=0.1,defects=0.1,duplicates=5"
    )
    assert cfg.seed == 7 and isinstance(cfg.n, int) and isinstance(cfg.spurious, float)
    assert parse_world_spec(" shapes : n = 50 , spurious=1 ").n == 50
    assert parse_world_spec(cfg.spec) == cfg
    ds = load_world("shapes:n=60,seed=2")
    assert len(ds) == 60 + 20 * 5 and ds.source == ShapesConfig(n=60, seed=2).spec
    assert is_world_spec("shapes") and is_world_spec("shapes:n=5") and "shapes" in WORLDS
    assert not is_world_spec("shapes.csv") and not is_world_spec("data/x.jsonl")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("shapes:colour=red", "Unknown knob 'colour'"),
        ("shapes:n=abc", "Knob 'n' needs an integer, got 'abc'"),
        ("shapes:n=3.5", "Knob 'n' needs an integer"),
        ("shapes:ood=lots", "Knob 'ood' needs a number"),
        ("shapes:spurious=0.3", "spurious=0.3 must be 0 (off) or in [0.5, 1]"),
        ("shapes:label_noise=1.5", "label_noise=1.5 must be in [0, 1]"),
        ("shapes:n", "Malformed knob 'n'"),
        ("shapes:n=3", "every split needs at least one item"),
        ("shapes:n=20,n_duplicated=50", "exceeds the train split"),
        ("shapes:train_frac=0.9,calibration_frac=0.2", "must be < 1"),
        ("shapes:ood=nan", "must be finite"),
    ],
)
def test_bad_spec_raises_listing_knobs(spec, needle):
    with pytest.raises(WorldSpecError) as err:
        parse_world_spec(spec)
    message = str(err.value)
    assert needle in message
    assert "Valid knobs" in message
    for knob in ("seed=0", "n=3000", "spurious=0.9", "label_noise=0.1", "caption_label=0.8"):
        assert knob in message


def test_other_spec_errors():
    with pytest.raises(WorldSpecError, match="given twice"):
        parse_world_spec("shapes:n=5,n=6")
    with pytest.raises(WorldSpecError, match="Not a shapes world spec"):
        parse_world_spec("circles:n=5")


def test_bad_knobs_in_python_and_unknown_world():
    with pytest.raises(WorldSpecError, match="Unknown knob.*Valid knobs"):
        make_shapes(noise=3)
    with pytest.raises(WorldSpecError, match="seed=-1"):
        make_shapes(seed=-1)
    with pytest.raises(WorldSpecError, match="Known worlds: digits, shapes"):
        load_world("circles:n=5")
    assert issubclass(WorldSpecError, ValueError)
