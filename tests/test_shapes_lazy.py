"""Lazy shapes worlds: the same rows, bit for bit, as the eager renderer, in little memory.

The reference below is the eager renderer the lazy one replaced, kept verbatim: it draws the
whole world's pixel noise at once and plants defects in place. Every world built by
``make_shapes`` (lazy or not) must equal it exactly, since cached models key on the data.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import mmsafe.data.worlds.shapes as shapes
from mmsafe.data.columns import is_lazy
from mmsafe.data.dataset import UNLABELLED, Dataset
from mmsafe.data.worlds.shapes import (
    CLASSES,
    COLOURS,
    DEFECT_PHRASES,
    OOD_SHAPES,
    POSITIONS,
    SIZES,
    SPLITS,
    TONES,
    ShapesConfig,
    ShapesImages,
    ShapesMeta,
    make_shapes,
    shape_coverage,
)

# --------------------------------------------------------------------------- the old renderer


def _ref_segment_mask(p0: np.ndarray, p1: np.ndarray, width: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    d = p1 - p0
    t = ((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1])) <= width / 2


def _ref_disc_mask(centre: np.ndarray, radius: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return np.hypot(xx - centre[0], yy - centre[1]) <= radius


def _ref_plant_defects(images, rows, tone, c, stream="defects", fraction=None, out=None):
    n, size = len(images), c.image_size
    d = shapes._rng(c.seed, stream)
    kinds = d.integers(0, 2, n)
    geometry = d.uniform(0.0, 1.0, (n, 5))
    defect, defect_mask = out or ([None] * n, [None] * n)
    for i in shapes._pick(d, rows, c.defects if fraction is None else fraction):
        g = geometry[i]
        if kinds[i] == 0:
            p0 = g[:2] * size
            angle, length = g[2] * 2 * np.pi, (0.5 + 0.4 * g[3]) * size
            p1 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 0, size)
            drawn = _ref_segment_mask(p0, p1, width=max(1.2, size / 24), size=size)
        else:
            centre = (0.15 + 0.7 * g[:2]) * size
            drawn = _ref_disc_mask(centre, radius=(1.5 + g[4]) * size / 32, size=size)
        before = images[i].copy()
        images[i][drawn] = np.uint8(255 if tone[i] == 0 else 0)
        mask = (images[i] != before).any(axis=-1)
        if mask.any():
            defect[i], defect_mask[i] = ("scratch", "hole")[kinds[i]], mask
    return defect, defect_mask


def _ref_render(shape_names, tone, c):
    n, size = len(shape_names), c.image_size
    a = shapes._rng(c.seed, "attributes")
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
    coverage = shape_coverage(shape_names, cx, cy, radius, size)[..., None]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    fg = np.clip(palette[attrs["colour"]] + colour_jitter, 0, 255).astype(np.float32)
    bg = np.clip(bg_level[:, None] + bg_tint, 0, 255).astype(np.float32)
    noise = shapes._rng(c.seed, "pixels").normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
    pixels = bg[:, None, None, :] * (1 - coverage) + fg[:, None, None, :] * coverage
    pixels += noise * np.float32(c.pixel_noise)
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images, attrs | {"cx": cx, "cy": cy, "radius": radius}


def reference_world(**knobs: Any) -> Dataset:
    """The shapes world as the eager renderer made it (before lazy worlds)."""
    c = ShapesConfig(**knobs)
    n, k = c.n, len(CLASSES)
    split_idx = shapes._assign_splits(c)
    train_rows, test_rows = np.flatnonzero(split_idx == 0), np.flatnonzero(split_idx == 2)
    true_label = shapes._rng(c.seed, "shape").integers(0, k, n)
    ood_rng = shapes._rng(c.seed, "ood")
    ood_choice = ood_rng.integers(0, len(OOD_SHAPES), n)
    is_ood = np.zeros(n, dtype=bool)
    is_ood[shapes._pick(ood_rng, test_rows, c.ood)] = True
    true_label[is_ood] = UNLABELLED
    names = [OOD_SHAPES[ood_choice[i]] if is_ood[i] else CLASSES[true_label[i]] for i in range(n)]
    majority = (np.arange(k) >= math.ceil(k / 2)).astype(np.int64)
    tone_rng = shapes._rng(c.seed, "tone")
    u_tone, coin = tone_rng.random(n), tone_rng.integers(0, 2, n)
    p_major = c.spurious if c.spurious > 0 else 0.5
    cls_major = majority[np.clip(true_label, 0, None)]
    tone = np.where(u_tone < p_major, cls_major, 1 - cls_major)
    tone = np.where((split_idx == 0) & ~is_ood, tone, coin)
    aligned = ~is_ood & (tone == cls_major)
    images, attrs = _ref_render(names, tone, c)
    ln = shapes._rng(c.seed, "label_noise")
    shift = ln.integers(1, k, n)
    noisy = np.zeros(n, dtype=bool)
    noisy[shapes._pick(ln, train_rows, c.label_noise)] = True
    labels = np.where(noisy, (true_label + shift) % k, true_label)
    defect, defect_mask = _ref_plant_defects(images, np.flatnonzero(split_idx > 0), tone, c)
    _ref_plant_defects(
        images, train_rows, tone, c, "train_defects", c.train_defects, (defect, defect_mask)
    )
    captions, names_label = shapes._captions(names, attrs, tone, is_ood, c)
    for i in train_rows:
        if defect[i] is not None:
            captions[i] += DEFECT_PHRASES[defect[i]][i % 2]
    colour_names = list(COLOURS)
    meta = [
        {
            "true_shape": names[i],
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
    if c.duplicates > 0 and c.n_duplicated > 0:
        order = shapes._rng(c.seed, "duplicates").permutation(len(train_rows))
        ids = rows["ids"]
        for i in np.sort(train_rows[order[: c.n_duplicated]]):
            meta[i]["n_copies"] = c.duplicates + 1
            for _ in range(c.duplicates):
                ids.append(f"shapes-{len(ids):06d}")
                rows["image"].append(rows["image"][i].copy())
                for key in ("text", "label", "split"):
                    rows[key].append(rows[key][i])
                meta.append(meta[i] | {"dup_of": ids[i]})
    return Dataset(
        name="shapes",
        ids=rows["ids"],
        modalities={"image": rows["image"], "text": rows["text"]},
        labels=np.asarray(rows["label"], dtype=np.int64),
        classes=list(CLASSES),
        groups=[m["tone"] for m in rows["meta"]],
        splits=rows["split"],
        meta=rows["meta"],
        source=c.spec,
    )


# --------------------------------------------------------------------------- helpers


def assert_same_images(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape, i
        assert np.array_equal(a, b), f"image of row {i} differs"


def assert_same_meta(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for i, (m, w) in enumerate(zip(got, want, strict=True)):
        assert list(m) == list(w), i
        for key, value in w.items():
            if isinstance(value, np.ndarray):
                assert isinstance(m[key], np.ndarray) and m[key].dtype == value.dtype, (i, key)
                assert np.array_equal(m[key], value), (i, key)
            else:
                assert m[key] == value and type(m[key]) is type(value), (i, key, m[key], value)


def assert_same_world(got: Dataset, want: Dataset) -> None:
    assert got.name == want.name and got.source == want.source and got.classes == want.classes
    assert got.ids == want.ids
    assert got.modalities["text"] == want.modalities["text"]
    assert got.labels.dtype == want.labels.dtype and np.array_equal(got.labels, want.labels)
    assert got.groups == want.groups and got.splits == want.splits
    assert_same_images(list(got.modalities["image"]), want.modalities["image"])
    assert_same_meta(list(got.meta), want.meta)


CONFIGS = [
    {},  # the default world, flaws on
    {"n": 500, "seed": 3, "ood": 0.3, "label_noise": 0.3, "defects": 0.4, "train_defects": 0.4},
    {"n": 300, "seed": 1, "image_size": 48, "duplicates": 2, "n_duplicated": 40},
    {"n": 400, "spurious": 0, "label_noise": 0, "ood": 0, "defects": 0, "train_defects": 0,
     "duplicates": 0, "caption_label": 1.0},
    # noise so large that some pixels already have the defect colour: masks smaller than drawn
    {"n": 300, "seed": 9, "pixel_noise": 200.0, "defects": 1.0, "train_defects": 1.0},
    {"n": 300, "seed": 4, "pixel_noise": 0.0, "defects": 1.0, "train_defects": 1.0},
]  # fmt: skip


@pytest.fixture(scope="module")
def default_pair() -> tuple[Dataset, Dataset]:
    return make_shapes(lazy=True), make_shapes()


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("knobs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_lazy_and_eager_worlds_equal_the_old_renderer(knobs):
    want = reference_world(**knobs)
    eager, lazy = make_shapes(**knobs), make_shapes(lazy=True, **knobs)
    assert isinstance(eager.modalities["image"], list) and isinstance(eager.meta, list)
    assert isinstance(lazy.modalities["image"], ShapesImages)
    assert isinstance(lazy.meta, ShapesMeta)
    assert_same_world(eager, want)
    assert_same_world(lazy, want)
    assert eager.fingerprint() == want.fingerprint()  # cached models stay valid


def test_a_defect_that_covers_no_pixel_is_no_defect():
    """A scratch clipped at a corner can miss every pixel centre: no defect, no caption phrase."""
    knobs = {"n": 20000, "seed": 3, "image_size": 16, "defects": 1.0, "train_defects": 1.0}
    items, _ = shapes._draw_items(ShapesConfig(**knobs))
    at = int(np.searchsorted(items.defect_rows, 3287))
    assert items.defect_rows[at] == 3287 and items.defect_kind[at] == 0  # picked: a scratch
    assert not shapes._defect_pixels(0, items.defect_geometry[at], 16).any()
    want, got = reference_world(**knobs), make_shapes(lazy=True, **knobs)
    assert want.splits[3287] == "train" and want.meta[3287]["defect"] is None
    assert got.modalities["text"] == want.modalities["text"]  # no phrase for the missing scratch
    assert_same_meta(list(got.meta), want.meta)
    rows = [3287, 3286, 0, 19999, 20050]
    assert_same_images(
        got.modalities["image"].load(rows), [want.modalities["image"][r] for r in rows]
    )


def test_lazy_rows_in_any_order(default_pair):
    lazy, eager = default_pair
    images, meta = lazy.modalities["image"], lazy.meta
    copy = next(i for i, m in enumerate(eager.meta) if m["dup_of"] is not None)
    defect = next(i for i, m in enumerate(eager.meta) if m["defect"] is not None)
    source = eager.ids.index(eager.meta[copy]["dup_of"])
    for rows in ([2999, 5, 2999], [copy, source, defect, copy, 0], [-1, 1700, 1699, 3, 3050]):
        want = [eager.modalities["image"][r] for r in rows]
        assert_same_images(images.load(rows), want)
        assert_same_meta(meta.load(rows), [eager.meta[r] for r in rows])
    assert_same_images(
        [images[copy], images[-7]], [eager.modalities["image"][i] for i in (copy, -7)]
    )
    # repeated rows come back as separate arrays and dicts
    a, b = images.load([7, 7])
    a[0, 0] = 0
    assert np.array_equal(b, eager.modalities["image"][7])
    m1, m2 = meta.load([7, 7])
    assert m1 == m2 and m1 is not m2
    with pytest.raises(IndexError):
        images.load([len(eager)])


def test_subsets_of_a_lazy_world_stay_lazy_and_equal(default_pair):
    lazy, eager = default_pair
    rng = np.random.default_rng(0)
    pick = rng.choice(len(eager), 300, replace=False)
    for got, want in (
        (lazy.subset(pick), eager.subset(pick)),
        (lazy.split("test"), eager.split("test")),
    ):
        assert is_lazy(got.modalities["image"]) and is_lazy(got.meta)
        assert got.ids == want.ids and got.modalities["text"] == want.modalities["text"]
        assert_same_images(list(got.modalities["image"]), want.modalities["image"])
        assert_same_meta(list(got.meta), want.meta)
        inner = got.subset([5, 1, 5])
        assert_same_images(
            list(inner.modalities["image"]), [want.modalities["image"][i] for i in (5, 1, 5)]
        )


def test_size_decides_lazy_unless_told(monkeypatch):
    monkeypatch.setattr(shapes, "LAZY_ROWS", 100)
    small, large = make_shapes(n=100), make_shapes(n=101)
    assert isinstance(small.modalities["image"], list) and isinstance(small.meta, list)
    assert is_lazy(large.modalities["image"]) and is_lazy(large.meta)
    assert isinstance(make_shapes(n=101, lazy=False).meta, list)
    assert is_lazy(make_shapes(n=100, lazy=True).modalities["image"])
    assert isinstance(large.modalities["text"], list)


# --------------------------------------------------------------------------- the noise stream


def test_chunked_normal_draws_equal_one_draw():
    """What lazy rendering rests on: a Generator's normals do not depend on how they are split."""
    whole = np.random.default_rng([7, 5]).normal(0.0, 1.0, (50, 4, 4, 3))
    rng = np.random.default_rng([7, 5])
    parts = [rng.normal(0.0, 1.0, (m, 4, 4, 3)) for m in (1, 16, 3, 16, 14)]
    assert np.array_equal(np.concatenate(parts), whole)
    # and restoring a saved state mid-stream replays the same numbers
    rng = np.random.default_rng([7, 5])
    rng.normal(0.0, 1.0, (20, 4, 4, 3))
    saved = rng.bit_generator.state
    other = np.random.default_rng(0)
    other.bit_generator.state = saved
    assert np.array_equal(other.normal(0.0, 1.0, (30, 4, 4, 3)), whole[20:])


@pytest.mark.parametrize("chunk_rows", [1, 3, 8])
def test_pixel_noise_gives_any_rows_of_the_one_big_draw(chunk_rows):
    n, size = 50, 16
    whole = shapes._rng(11, "pixels").normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
    noise = shapes._PixelNoise(11, n, size, chunk_rows=chunk_rows)
    for rows in ([30, 2, 30], [49], [0, 1, 2, 48, 10], list(range(n))[::-1]):
        assert np.array_equal(noise.rows(np.array(rows)), whole[rows])
    assert len(noise._starts) == -(-n // chunk_rows)  # walked once, a state per chunk


def test_forked_worker_renders_the_same_rows(default_pair):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    lazy, eager = default_pair
    column = lazy.modalities["image"].take(np.arange(2000, 3100))
    column.load([5])  # the parent has walked part of the stream before the fork
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(column.load, ([1000, 0, 3, 1099],))
    assert_same_images(got, [eager.modalities["image"][2000 + i] for i in (1000, 0, 3, 1099)])


# --------------------------------------------------------------------------- fingerprints, cost


def test_lazy_fingerprint_is_stable_and_renders_nothing(monkeypatch):
    def no_pixels(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a fingerprint rendered pixels")

    monkeypatch.setattr(shapes, "_render_clean", no_pixels)
    a, b = make_shapes(n=2000, seed=1, lazy=True), make_shapes(n=2000, seed=1, lazy=True)
    assert a.fingerprint() == b.fingerprint()
    assert make_shapes(n=2000, seed=2, lazy=True).fingerprint() != a.fingerprint()
    assert make_shapes(n=2000, seed=1, ood=0.2, lazy=True).fingerprint() != a.fingerprint()
    assert a.split("test").fingerprint() != a.split("train").fingerprint()
    assert a.split("test").fingerprint() == b.split("test").fingerprint()
    assert a.modalities["image"].digest() != a.meta.digest()


@pytest.mark.slow
def test_a_million_row_world_is_cheap_to_define():
    """Defining ``shapes:n=1000000`` holds small per-item arrays, ids and captions, not pixels.

    Measured on a 2-core machine: about 7 s and 300-350 MB of peak memory above the imports
    (the eager renderer needed over 15 GB). Rendering starts only when a row is asked for.
    """
    script = textwrap.dedent(
        """
        import json, resource
        from mmsafe.data.worlds import load_world
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ds = load_world("shapes:n=1000000")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        images = ds.modalities["image"]
        print(json.dumps({
            "grew_mib": (after - before) / 1024,
            "rows": len(ds),
            "lazy": [type(images).__name__, type(ds.meta).__name__],
            "walked": len(images._noise._starts),
            "fingerprint": ds.fingerprint(),
            "walked_after_fingerprint": len(images._noise._starts),
        }))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rows"] == 1_000_000 + 20 * 5
    assert got["lazy"] == ["ShapesImages", "ShapesMeta"]
    assert got["walked"] == got["walked_after_fingerprint"] == 0
    assert got["grew_mib"] < 768, got
