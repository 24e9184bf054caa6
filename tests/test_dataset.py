"""Dataset fingerprints: content hashes, memoised per column, derived for subsets."""

from __future__ import annotations

import numpy as np

from mmsafe.data.dataset import Dataset


def _data(n: int = 6, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        name="d",
        ids=[f"r{i}" for i in range(n)],
        modalities={
            "image": [rng.integers(0, 255, (4, 4, 3), dtype=np.uint8) for _ in range(n)],
            "text": [f"t{i}" for i in range(n)],
        },
        labels=np.arange(n) % 2,
        classes=["a", "b"],
        splits=["train", "test"] * (n // 2),
    )


def test_splitting_twice_gives_the_same_fingerprint_and_different_rows_differ() -> None:
    data = _data()
    a, b = data.split("test"), data.split("test")
    assert a is not b and a.fingerprint() == b.fingerprint()
    assert data.split("train").fingerprint() != a.fingerprint()
    # an identical parent built separately gives the same subset fingerprint
    assert _data().split("test").fingerprint() == a.fingerprint()
    # a parent with other pixels does not
    assert _data(seed=1).split("test").fingerprint() != a.fingerprint()


def test_replaced_columns_are_hashed_by_content() -> None:
    data = _data()
    expected = _data().split("test").fingerprint()
    # the subset's own column replaced by a new list: digested from its values
    sub2 = data.split("test")
    sub2.modalities["text"] = ["x"] * len(sub2)
    assert sub2.fingerprint() != expected
    # the parent's column replaced after the split (fingerprint not yet taken): the subset's
    # values did not change, and it must not pick up the parent's new content
    sub = data.split("test")
    data.modalities["image"] = [np.zeros((4, 4, 3), np.uint8)] * len(data)
    twin = _data().split("test")
    direct = Dataset(
        "d",
        list(twin.ids),
        {k: list(v) for k, v in twin.modalities.items()},
        twin.labels.copy(),
        list(twin.classes),
        splits=list(twin.splits or []),
    )
    # the image column is now hashed by content, from the subset's own (old) values
    digest = sub._values_digest("image", sub.modalities["image"])
    assert digest == direct._values_digest("image", direct.modalities["image"])
    assert sub.fingerprint() != expected
    assert sub.fingerprint() != data.split("test").fingerprint()
