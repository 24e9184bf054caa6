"""The shapes-rec world: a synthetic sequential-recommendation world with planted flaws."""

from __future__ import annotations

import numpy as np
import pytest

from mmsafe.data.loading import load_data
from mmsafe.data.worlds import WorldSpecError, is_world_spec, load_world
from mmsafe.data.worlds.shapes import CLASSES
from mmsafe.data.worlds.shapes_rec import (
    ShapesRecConfig,
    make_shapes_rec,
    parse_shapes_rec_spec,
)


@pytest.fixture(scope="module")
def world():
    return load_world("shapes-rec")


def _topic_index(ds):
    topics = [m["topic"] for m in ds.catalog.meta]
    names = sorted(set(topics))
    return np.array([names.index(t) for t in topics]), len(names)


def test_representation_contract(world):
    ds, cat = world, world.catalog
    c = ShapesRecConfig()
    assert ds.name == "shapes-rec" and is_world_spec("shapes-rec:seed=1")
    assert len(ds) == c.n_users and len(set(ds.ids)) == len(ds)
    assert ds.modality_names == ("sequence",) and ds.splits is None
    assert ds.classes == cat.ids and len(cat) == c.n_items
    assert ds.labels.dtype == np.int64 and ds.labels.min() >= 0 and ds.labels.max() < len(cat)
    assert set(ds.groups) == {"a", "b"} and ds.groups.count("b") == c.n_users // 2
    for seq, meta in zip(ds.modalities["sequence"], ds.meta, strict=True):
        assert seq.dtype == np.int64 and len(seq) >= 2
        assert c.min_len - 1 <= len(seq) <= c.max_len - 1
        assert len(meta["noisy"]) == len(meta["clean_sequence"]) == len(seq)
        assert seq.min() >= 0 and seq.max() < len(cat)
    image = cat.modalities["image"][0]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert all(isinstance(t, str) and t for t in cat.modalities["text"])
    assert cat.classes == list(CLASSES)
    assert [CLASSES[y] for y in cat.labels] == [m["shape"] for m in cat.meta]
    assert cat.groups.count("head") == 60 and set(cat.groups) == {"head", "tail"}
    keys = {"shape", "colour", "topic", "cold", "mismatch", "title_shape", "popularity"}
    assert keys <= set(cat.meta[0])
    assert {"noisy", "top_topic"} <= set(ds.meta[0])
    assert ds.source == c.spec and parse_shapes_rec_spec(ds.source) == c


def test_same_seed_same_world_and_other_seed_differs():
    kw = {"n_items": 60, "n_users": 80}
    a, b, other = (make_shapes_rec(seed=s, **kw) for s in (3, 3, 4))
    assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist()
    for x, y in zip(a.modalities["sequence"], b.modalities["sequence"], strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.catalog.modalities["image"], b.catalog.modalities["image"], strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.catalog.modalities["text"] == b.catalog.modalities["text"]
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != other.fingerprint()
    assert a.labels.tolist() != other.labels.tolist()


def test_planted_rates_are_near_their_knobs(world):
    cat = world.catalog
    noisy = np.concatenate([m["noisy"] for m in world.meta])
    assert abs(noisy.mean() - 0.1) < 0.02
    assert sum(m["mismatch"] for m in cat.meta) == round(0.05 * 300)
    assert sum(m["cold"] for m in cat.meta) == round(0.1 * 300)
    for title, m in zip(cat.modalities["text"], cat.meta, strict=True):
        assert title.startswith(f"{m['colour']} {m['title_shape']},")
        assert m["mismatch"] == (m["title_shape"] != m["shape"])
        assert m["topic"] == f"{m['colour']} {m['shape']}"


def test_cold_items_never_appear_in_sequences_but_can_be_labels(world):
    cold = np.array([m["cold"] for m in world.catalog.meta])
    assert not cold[np.concatenate(world.modalities["sequence"])].any()
    assert cold[world.labels].any()
    assert [bool(cold[y]) for y in world.labels] == [m["label_cold"] for m in world.meta]


def test_misclicks_replace_only_history_items(world):
    topic, _ = _topic_index(world)
    names = [m["topic"] for m in world.catalog.meta]
    for seq, m in zip(world.modalities["sequence"], world.meta, strict=True):
        clean = np.asarray(m["clean_sequence"])
        flags = np.asarray(m["noisy"])
        np.testing.assert_array_equal(seq[~flags], clean[~flags])
        assert [names[i] for i in clean] == m["topics"]  # clean items follow the chain
    # the held-out label follows the chain too: its topic is the user's label topic
    assert all(names[y] == m["label_topic"] for y, m in zip(world.labels, world.meta, strict=True))


def test_clean_control_has_no_planted_flaws():
    ds = make_shapes_rec(misclick=0, mismatch=0, cold=0, n_users=200)
    assert not any(any(m["noisy"]) for m in ds.meta)
    for seq, m in zip(ds.modalities["sequence"], ds.meta, strict=True):
        assert seq.tolist() == m["clean_sequence"]
    assert not any(m["mismatch"] or m["cold"] for m in ds.catalog.meta)


def test_next_topic_is_predictable_far_above_chance(world):
    topic, n_topics = _topic_index(world)
    counts = np.zeros((n_topics, n_topics))
    for seq in world.modalities["sequence"]:
        np.add.at(counts, (topic[seq[:-1]], topic[seq[1:]]), 1)
    last = np.array([seq[-1] for seq in world.modalities["sequence"]])
    predicted = counts.argmax(axis=1)[topic[last]]
    accuracy = (predicted == topic[world.labels]).mean()
    assert accuracy >= 0.4 and accuracy > 8 / n_topics
    # the world's own successors are the ground truth of that structure
    succ = [m["likely_next"][0] for m in world.meta]
    assert np.mean([s == m["label_topic"] for s, m in zip(succ, world.meta, strict=True)]) > 0.4


def test_popularity_is_skewed(world):
    clicks = np.concatenate([*world.modalities["sequence"], world.labels])
    counts = np.sort(np.bincount(clicks, minlength=len(world.catalog)))[::-1]
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share >= 0.3
    # without the Zipf skew only the topic preferences concentrate the clicks
    flat = make_shapes_rec(popularity=0)
    flat_clicks = np.concatenate([*flat.modalities["sequence"], flat.labels])
    flat_counts = np.sort(np.bincount(flat_clicks, minlength=len(flat.catalog)))[::-1]
    assert flat_counts[: len(flat_counts) // 10].sum() / flat_counts.sum() < top_share - 0.1
    head = np.array([g == "head" for g in world.catalog.groups])
    weights = np.array([m["popularity"] for m in world.catalog.meta])
    assert weights[head].min() >= weights[~head].max()


def test_group_bias_tilts_group_b_towards_favoured_topics():
    def favoured_share(ds, group):
        fav = np.array([m["favoured_by_b"] for m in ds.catalog.meta])
        rows = [s for s, g in zip(ds.modalities["sequence"], ds.groups, strict=True) if g == group]
        return fav[np.concatenate(rows)].mean()

    biased = make_shapes_rec(group_bias=1.0, n_users=600, misclick=0)
    fair = make_shapes_rec(group_bias=0.0, n_users=600, misclick=0)
    assert favoured_share(biased, "b") - favoured_share(biased, "a") > 0.1
    assert abs(favoured_share(fair, "b") - favoured_share(fair, "a")) < 0.05


def test_load_data_dispatches_with_knobs():
    ds = load_data("shapes-rec:seed=2,n_items=40,n_users=30,image_size=16,min_len=3,max_len=3")
    assert len(ds) == 30 and len(ds.catalog) == 40
    assert ds.catalog.modalities["image"][0].shape == (16, 16, 3)
    assert {len(s) for s in ds.modalities["sequence"]} == {2}


@pytest.mark.parametrize(
    ("spec", "knob"),
    [
        ("shapes-rec:misclick=1.5", "misclick"),
        ("shapes-rec:mismatch=-0.1", "mismatch"),
        ("shapes-rec:cold=1", "cold"),
        ("shapes-rec:min_len=2", "min_len"),
        ("shapes-rec:min_len=9,max_len=5", "max_len"),
        ("shapes-rec:n_items=5", "n_items"),
        ("shapes-rec:n_users=0", "n_users"),
        ("shapes-rec:concentration=0", "concentration"),
        ("shapes-rec:popularity=-1", "popularity"),
        ("shapes-rec:image_size=8", "image_size"),
        ("shapes-rec:stay=2", "stay"),
        ("shapes-rec:seed=-1", "seed"),
        ("shapes-rec:n_users=many", "n_users"),
        ("shapes-rec:colour=red", "colour"),
    ],
)
def test_bad_knobs_name_the_knob(spec, knob):
    with pytest.raises(WorldSpecError, match=knob):
        load_world(spec)


def test_too_many_cold_items_is_a_spec_error():
    with pytest.raises(WorldSpecError, match="cold"):
        make_shapes_rec(n_items=10, n_users=5, cold=0.95)


def test_unknown_keyword_knob():
    with pytest.raises(WorldSpecError, match="Unknown knob"):
        make_shapes_rec(n_user=5)
