"""The shapes-gen world: determinism, knobs, each planted flaw present and absent in the control."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import stats

from mmsafe.data.worlds import WorldSpecError, load_world
from mmsafe.data.worlds.shapes_gen import (
    COLOURS,
    DUP_TAGS,
    FORBIDDEN_CONCEPT,
    POSITIONS,
    SHAPES,
    SKEW_COLOUR,
    SKEW_SHAPE,
    SYNONYMS,
    ShapesGenConfig,
    caption,
    make_shapes_gen,
    neutral_prompts,
    paraphrased_prompts,
    parse_shapes_gen_spec,
)

CONTROL = "shapes-gen:n_images=1500,seed=3,dup=0,skew=0,forbidden=0"
PLANTED = "shapes-gen:n_images=1500,seed=3,dup=3,dup_k=5,skew=0.8,forbidden=0.2"


@pytest.fixture(scope="module")
def planted():
    return load_world(PLANTED)


@pytest.fixture(scope="module")
def control():
    return load_world(CONTROL)


def _train(ds):
    return [i for i, s in enumerate(ds.splits) if s == "train"]


def test_same_seed_same_world_and_another_seed_differs() -> None:
    a, b = make_shapes_gen(n_images=50, seed=4), make_shapes_gen(n_images=50, seed=4)
    c = make_shapes_gen(n_images=50, seed=5)
    assert a.fingerprint() == b.fingerprint() and a.meta == b.meta
    assert a.fingerprint() != c.fingerprint()


def test_rows_columns_labels_and_meta(planted) -> None:
    ds = planted
    assert len(ds) == 1500 + 3 * 5 and ds.classes == list(SHAPES)
    img = ds.modalities["image"][0]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert set(ds.splits) == {"train", "calibration", "test"}
    for i, m in enumerate(ds.meta):
        assert ds.labels[i] == SHAPES.index(m["shape"])
        assert m["colour"] in COLOURS and m["position"] in POSITIONS
        assert m["forbidden"] == (m["shape"] == FORBIDDEN_CONCEPT)
        text = ds.modalities["text"][i]
        assert (m["colour"] in text.split()) == m["caption_has_colour"]
        assert m["synonym"] in text
    assert ds.source.startswith("shapes-gen:") and parse_shapes_gen_spec(ds.source)


def test_ordinary_images_are_all_different(control) -> None:
    flat = np.stack(control.modalities["image"]).reshape(len(control), -1)
    assert len(np.unique(flat, axis=0)) == len(control)


def test_captions_omit_colour_at_the_set_rate_and_use_synonyms(control) -> None:
    has = np.array([m["caption_has_colour"] for m in control.meta])
    assert abs((1 - has.mean()) - 0.3) < 0.05
    used = Counter(m["synonym"] for m in control.meta)
    assert {"disc", "box", "plus sign", "rhombus"} <= set(used)


def test_caption_builder_and_prompt_sets() -> None:
    assert caption("circle", "red", "left") == "a red circle on the left"
    assert caption("cross", None, "bottom", synonym=1) == "a plus sign at the bottom"
    assert caption("square", "blue", "top", tag="kovo").endswith(", by kovo")
    assert all("red" not in p and SKEW_SHAPE in p for p in neutral_prompts(SKEW_SHAPE))
    para = paraphrased_prompts(FORBIDDEN_CONCEPT)
    assert para and all(" star " not in f" {p} " or "five-pointed" in p for p in para)
    assert {s for s in SYNONYMS[FORBIDDEN_CONCEPT][1:] if any(s in p for p in para)} == set(
        SYNONYMS[FORBIDDEN_CONCEPT][1:]
    )


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("shapes-gen:dup=-1", "dup=-1 must be in [0, 16]"),
        ("shapes-gen:dup_k=1", "dup_k=1 must be >= 2"),
        ("shapes-gen:skew=1.5", "skew=1.5 must be in [0, 1]"),
        ("shapes-gen:forbidden=1", "forbidden=1"),
        ("shapes-gen:image_size=8", "image_size=8 must be in [16, 256]"),
        ("shapes-gen:n_images=0", "n_images=0 must be >= 1"),
        ("shapes-gen:colors=1", "Unknown knob 'colors'"),
        ("shapes-gen:dup=two", "needs an integer"),
        ("shapes-gen:dup", "Malformed knob"),
        ("shapes-vqa:dup=1", "Not a shapes-gen world spec"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, fragment: str) -> None:
    with pytest.raises(WorldSpecError) as err:
        parse_shapes_gen_spec(spec)
    assert fragment in str(err.value)
    if "Malformed" not in fragment and "Not a" not in fragment:
        assert "Valid knobs" in str(err.value)


def test_config_type_errors_are_clear() -> None:
    with pytest.raises(WorldSpecError, match="dup=1.5 must be an integer"):
        ShapesGenConfig(dup=1.5)  # type: ignore[arg-type]
    with pytest.raises(WorldSpecError, match="Unknown knob"):
        make_shapes_gen(n=3)


def test_duplicates_are_byte_identical_train_copies_with_a_unique_tag(planted) -> None:
    ds = planted
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(ds.meta):
        if m["duplicate_group"] >= 0:
            groups.setdefault(m["duplicate_group"], []).append(i)
    assert sorted(groups) == [0, 1, 2] and all(len(r) == 5 for r in groups.values())
    ordinary = [i for i, m in enumerate(ds.meta) if m["duplicate_group"] < 0]
    ordinary_bytes = {ds.modalities["image"][i].tobytes() for i in ordinary}
    for g, rows in groups.items():
        first = ds.modalities["image"][rows[0]]
        assert all(ds.modalities["image"][i].tobytes() == first.tobytes() for i in rows)
        assert first.tobytes() not in ordinary_bytes
        assert all(ds.splits[i] == "train" for i in rows)
        texts = {ds.modalities["text"][i] for i in rows}
        assert texts == {ds.modalities["text"][rows[0]]}
        assert (
            texts.pop().endswith(f", by {DUP_TAGS[g]}") and ds.meta[rows[0]]["tag"] == DUP_TAGS[g]
        )
        assert not ds.meta[rows[0]]["forbidden"] and ds.meta[rows[0]]["shape"] != SKEW_SHAPE
    tagged = [t for t in ds.modalities["text"] if ", by " in t]
    assert len(tagged) == 15
    colours = [ds.meta[rows[0]]["colour"] for rows in groups.values()]
    assert len(set(colours)) == len(colours)  # the copies plant no colour skew


def test_skew_matches_its_knob_in_train_only(planted) -> None:
    ds = planted
    tr = set(_train(ds))
    squares = [
        i for i, m in enumerate(ds.meta) if m["shape"] == SKEW_SHAPE and m["duplicate_group"] < 0
    ]
    in_train = [i for i in squares if i in tr]
    red = sum(ds.meta[i]["colour"] == SKEW_COLOUR for i in in_train)
    assert stats.binomtest(red, len(in_train), 0.8).pvalue > 0.001
    assert all(ds.meta[i]["skew_group"] for i in in_train)
    held = [i for i in squares if i not in tr]
    red_held = sum(ds.meta[i]["colour"] == SKEW_COLOUR for i in held)
    assert stats.binomtest(red_held, len(held), 0.25).pvalue > 0.001
    others = [
        i
        for i in tr
        if ds.meta[i]["shape"] not in (SKEW_SHAPE,) and ds.meta[i]["duplicate_group"] < 0
    ]
    counts = Counter(ds.meta[i]["colour"] for i in others)
    assert stats.chisquare([counts[c] for c in COLOURS]).pvalue > 0.001


def test_control_has_uniform_colours_no_duplicates_and_no_star_in_train(control) -> None:
    ds = control
    tr = _train(ds)
    squares = [i for i in tr if ds.meta[i]["shape"] == SKEW_SHAPE]
    counts = Counter(ds.meta[i]["colour"] for i in squares)
    assert stats.chisquare([counts[c] for c in COLOURS]).pvalue > 0.001
    assert not any(m["skew_group"] for m in ds.meta)
    assert all(m["duplicate_group"] == -1 and m["tag"] is None for m in ds.meta)
    assert not any(ds.meta[i]["forbidden"] for i in tr)
    assert not any(w in ds.modalities["text"][i] for i in tr for w in SYNONYMS["star"])
    held = [i for i in range(len(ds)) if ds.splits[i] != "train"]
    assert sum(ds.meta[i]["forbidden"] for i in held) > 0  # the judge can still learn the star


def test_forbidden_share_in_train_and_uniform_shapes_elsewhere(planted) -> None:
    ds = planted
    tr = [i for i in _train(ds) if ds.meta[i]["duplicate_group"] < 0]
    stars = sum(ds.meta[i]["forbidden"] for i in tr)
    assert stats.binomtest(stars, len(tr), 0.2).pvalue > 0.001
    star_texts = [ds.modalities["text"][i] for i in tr if ds.meta[i]["forbidden"]]
    assert {s for s in SYNONYMS["star"] if any(s in t for t in star_texts)} == set(SYNONYMS["star"])
    held = [i for i in range(len(ds)) if ds.splits[i] != "train"]
    counts = Counter(ds.meta[i]["shape"] for i in held)
    assert stats.chisquare([counts[s] for s in SHAPES]).pvalue > 0.001


def test_switching_one_flaw_off_leaves_the_other_rows_alone() -> None:
    a = make_shapes_gen(n_images=200, seed=2, dup=2, dup_k=3)
    b = make_shapes_gen(n_images=200, seed=2, dup=0)
    assert a.modalities["text"][:200] == b.modalities["text"]
    assert all(
        (x == y).all()
        for x, y in zip(a.modalities["image"][:200], b.modalities["image"], strict=True)
    )
