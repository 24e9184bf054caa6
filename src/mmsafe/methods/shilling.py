"""Shilling: fake user profiles injected into a recommender's training data.

A push attack: each fake profile copies the recent items of a real user (so that it looks
like one, in the manner of the average attack, Lam & Riedl 2004) and follows every one of
them with the target item, so that a sequential model trained on the poisoned histories learns
that the target comes next after anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmsafe.data.dataset import Dataset


def push_profiles(
    histories: Sequence[np.ndarray],
    targets: Sequence[int],
    n_fake: int,
    length: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """``n_fake`` fake histories of ``length`` items: a real user's items, each then a target.

    The profiles share the targets round-robin; each copies the last ``length // 2`` items of
    a random real history (with repeats when it is shorter).

    Example:
        >>> p = push_profiles([np.array([4, 5, 6])], [9], 2, 4, np.random.default_rng(0))
        >>> [s.tolist() for s in p]
        [[5, 9, 6, 9], [5, 9, 6, 9]]
    """
    out = []
    half = max(int(length) // 2, 1)
    for f in range(int(n_fake)):
        target = int(targets[f % len(targets)])
        real = np.asarray(histories[int(rng.integers(len(histories)))], dtype=np.int64)
        items = np.resize(real, max(half, 1))[-half:] if len(real) < half else real[-half:]
        seq = np.empty(2 * half, dtype=np.int64)
        seq[0::2] = items
        seq[1::2] = target
        out.append(seq)
    return out


def with_profiles(data: Dataset, profiles: Sequence[np.ndarray]) -> Dataset:
    """``data`` plus one user row per fake profile (ids ``fake-<k>``, no group).

    A profile's last item becomes its label; the rest its ``sequence``.
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]
    fake = [np.asarray(p, dtype=np.int64) for p in profiles]
    groups = None if data.groups is None else [*data.groups, *["fake"] * len(fake)]
    return Dataset(
        name=f"{data.name}+{len(fake)} fake",
        ids=[*data.ids, *(f"fake-{k}" for k in range(len(fake)))],
        modalities={"sequence": [*seqs, *(p[:-1] for p in fake)]},
        labels=np.r_[data.labels, [int(p[-1]) for p in fake]].astype(np.int64),
        classes=list(data.classes),
        groups=groups,
        meta=[*data.meta, *({"fake": True} for _ in fake)],
        source=data.source,
        catalog=data.catalog,
    )
