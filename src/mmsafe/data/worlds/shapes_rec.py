"""``shapes-rec``: a synthetic ID-free sequential recommendation world with planted flaws.

Items are rendered by the shapes world (one coloured shape per image) and titled with their
colour and shape ("red circle, small, top left"). Users click through items in sequences that
follow a **Markov chain over topics** (a topic is a ``colour shape`` pair): a world-level sparse
transition matrix (each topic has two likely successors), mixed with each user's own topic
preference (a concentrated Dirichlet draw) and a ``stay`` probability. Within a topic an item is
drawn with a Zipf **popularity skew**. The world is fully determined by a
:class:`ShapesRecConfig` (its knobs), and every planted flaw records its ground truth:

* **misclicks** (``misclick``): an interaction of a user's ``sequence`` replaced by a uniformly
  random warm item (``meta[u]["noisy"]``, one bool per position; the held-out label never is).
* **image/title mismatch** (``mismatch``): items whose title names another shape than the image
  shows (``catalog.meta[i]["mismatch"]``, ``"title_shape"``, ``"shape"``). Interactions follow
  the item's true (image) topic.
* **cold-start items** (``cold``): items that never appear in any ``sequence``; they can still
  be a held-out label (``catalog.meta[i]["cold"]``).
* **group bias** (``group_bias``): users carry a sensitive attribute (``groups``, ``a`` or
  ``b``); group ``b``'s preferences lean towards the topics of half of the colours
  (``catalog.meta[i]["favoured_by_b"]``).

Rows of the returned dataset are users (see :mod:`mmsafe.data.dataset`): a ``sequence`` column of
item positions (oldest first, the held-out item excluded), the held-out last item as the label,
the item ids as ``classes`` and the items themselves as ``catalog``.

Example:
    >>> ds = make_shapes_rec(n_items=40, n_users=30)
    >>> len(ds), len(ds.catalog), ds.catalog.modality_names
    (30, 40, ('image', 'text'))
    >>> seq = ds.modalities["sequence"][0]
    >>> seq.dtype, len(seq) >= 2, len(ds.meta[0]["noisy"]) == len(seq)
    (dtype('int64'), True, True)
    >>> parse_shapes_rec_spec("shapes-rec:seed=2,misclick=0") == ShapesRecConfig(seed=2, misclick=0)
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmsafe.data.dataset import Dataset
from mmsafe.data.worlds.shapes import CLASSES, COLOURS, make_shapes
from mmsafe.data.worlds.spec import (
    MAX_EAGER_ROWS,
    WorldSpecError,
    knob_types,
    parse_knobs,
    size_problem,
    type_problems,
)
from mmsafe.data.worlds.spec import knob_help as _knob_help

__all__ = [
    "GROUPS",
    "SUCCESSOR_WEIGHTS",
    "WORLD_NAME",
    "ShapesRecConfig",
    "load_shapes_rec",
    "make_shapes_rec",
    "parse_shapes_rec_spec",
]

WORLD_NAME = "shapes-rec"

GROUPS: tuple[str, ...] = ("a", "b")
"""The users' sensitive attribute values; exactly half of the users (rounded down) are ``b``."""

SUCCESSOR_WEIGHTS: tuple[float, ...] = (0.7, 0.3)
"""How the world transition row of a topic splits over its (two) likely successor topics."""

HEAD_SHARE = 0.2
"""The share of items, by popularity weight, that form the ``head`` item group."""

_STREAMS = {
    "topics": 1,
    "groups": 2,
    "preferences": 3,
    "lengths": 4,
    "chain": 5,
    "items": 6,
    "misclick": 7,
    "cold": 8,
    "mismatch": 9,
    "order": 10,
    "favoured": 11,
}


@dataclass(frozen=True)
class ShapesRecConfig:
    """Every knob of the shapes-rec world. A flaw knob set to 0 switches that flaw off.

    Attributes:
        seed: random seed; the same config gives an identical world.
        n_items: number of items in the catalog (10-100000).
        n_users: number of users (rows).
        min_len: fewest interactions of a user, the held-out label included (>= 3, so every
            ``sequence`` has at least 2 items).
        max_len: most interactions of a user (>= ``min_len``); lengths are uniform in between.
        image_size: side of the item images in pixels (16-256).
        stay: probability that the next interaction stays in the current topic.
        follow: otherwise, probability that the next topic follows the world transition matrix
            (two likely successors per topic, weighted :data:`SUCCESSOR_WEIGHTS`) rather than the
            user's own preference.
        concentration: Dirichlet concentration per topic of the user preferences; small values
            give users a few favourite topics.
        popularity: Zipf exponent of the item popularity within a topic (0 = uniform).
        group_bias: how far group ``b``'s preference prior moves towards the topics of the
            ``favoured`` colours (half of the colours, drawn per world): 0 = same as group ``a``,
            1 = only those topics.
        cold: fraction of items that never appear in a ``sequence`` (cold-start items).
        misclick: probability that each interaction of a ``sequence`` is replaced by a
            uniformly random warm item.
        mismatch: fraction of items whose title names another shape than the image shows.
    """

    seed: int = 0
    n_items: int = 300
    n_users: int = 2000
    min_len: int = 8
    max_len: int = 20
    image_size: int = 32
    stay: float = 0.1
    follow: float = 0.85
    concentration: float = 0.1
    popularity: float = 1.0
    group_bias: float = 0.5
    cold: float = 0.1
    misclick: float = 0.1
    mismatch: float = 0.05

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise WorldSpecError(
                f"Invalid {WORLD_NAME} world: {'; '.join(problems)}. {knob_help()}"
            )

    @property
    def spec(self) -> str:
        """The canonical spec string naming every knob, e.g. ``shapes-rec:seed=0,...``."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
        return f"{WORLD_NAME}:{','.join(parts)}"


_KNOB_TYPES: dict[str, type] = knob_types(ShapesRecConfig)


def knob_help() -> str:
    """A one-line list of the valid knobs with their defaults.

    Example:
        >>> knob_help().split(",")[1]
        ' n_items=300'
    """
    return _knob_help(ShapesRecConfig)


def _validate(c: ShapesRecConfig) -> list[str]:
    problems = type_problems(c)
    if problems:
        return problems
    if c.seed < 0:
        problems.append(f"seed={c.seed} must be >= 0")
    if not 10 <= c.n_items <= 100_000:
        problems.append(f"n_items={c.n_items} must be in [10, 100000]")
    if c.n_users < 1:
        problems.append(f"n_users={c.n_users} must be >= 1")
    problems += size_problem("n_users", c.n_users, MAX_EAGER_ROWS)
    if c.min_len < 3:
        problems.append(f"min_len={c.min_len} must be >= 3 (a label and a sequence of >= 2)")
    if c.max_len < c.min_len:
        problems.append(f"max_len={c.max_len} must be >= min_len={c.min_len}")
    if not 16 <= c.image_size <= 256:
        problems.append(f"image_size={c.image_size} must be in [16, 256]")
    for name in ("stay", "follow", "group_bias", "misclick", "mismatch"):
        if not 0 <= getattr(c, name) <= 1:
            problems.append(f"{name}={getattr(c, name)} must be in [0, 1]")
    if not 0 <= c.cold < 1:
        problems.append(f"cold={c.cold} must be in [0, 1)")
    if c.concentration <= 0:
        problems.append(f"concentration={c.concentration} must be > 0")
    if c.popularity < 0:
        problems.append(f"popularity={c.popularity} must be >= 0")
    return problems


def parse_shapes_rec_spec(spec: str) -> ShapesRecConfig:
    """Parse ``"shapes-rec"`` or ``"shapes-rec:knob=value,..."`` into a :class:`ShapesRecConfig`.

    Raises:
        WorldSpecError: another world, an unknown knob, a malformed pair, or a bad value.

    Example:
        >>> parse_shapes_rec_spec("shapes-rec:n_users=50, cold=0.2").cold
        0.2
    """
    return parse_knobs(spec, WORLD_NAME, ShapesRecConfig)


# --------------------------------------------------------------------------- the world


def _rng(seed: int, part: str) -> np.random.Generator:
    return np.random.default_rng([seed, 1000 + _STREAMS[part]])


@dataclass(frozen=True)
class _Items:
    """The catalog as small arrays: topics, popularity, flaws."""

    shape: np.ndarray  # index into CLASSES (the image's shape)
    colour: np.ndarray  # index into COLOURS
    topic: np.ndarray  # index into topic_names
    topic_names: list[str]
    popularity: np.ndarray  # the item's Zipf weight within its topic, normalised per topic
    cold: np.ndarray
    mismatch: np.ndarray
    title_shape: np.ndarray  # index into CLASSES
    favoured: np.ndarray  # per topic: whether group b leans towards it


def _draw_items(c: ShapesRecConfig, shapes_meta: list[dict[str, Any]]) -> _Items:
    n = c.n_items
    colour_names = list(COLOURS)
    shape = np.array([CLASSES.index(m["true_shape"]) for m in shapes_meta], dtype=np.int64)
    colour = np.array([colour_names.index(m["colour"]) for m in shapes_meta], dtype=np.int64)
    pair = shape * len(colour_names) + colour
    present, topic = np.unique(pair, return_inverse=True)  # topics sorted by (shape, colour)
    topic_names = [
        f"{colour_names[p % len(colour_names)]} {CLASSES[p // len(colour_names)]}"
        for p in present.tolist()
    ]

    # Popularity: a random order of each topic's items, Zipf weights by rank, normalised.
    order = _rng(c.seed, "order").permutation(n)
    rank = np.empty(n, dtype=np.int64)
    for t in range(len(present)):
        members = order[topic[order] == t]
        rank[members] = np.arange(1, len(members) + 1)
    weight = rank.astype(np.float64) ** -c.popularity
    totals = np.bincount(topic, weights=weight, minlength=len(present))
    popularity = weight / totals[topic]

    # Cold items: a random exact count, never a topic's last warm item.
    n_cold = int(round(c.cold * n))
    cold = np.zeros(n, dtype=bool)
    warm_left = np.bincount(topic, minlength=len(present))
    made = 0
    for i in _rng(c.seed, "cold").permutation(n).tolist():
        if made == n_cold:
            break
        if warm_left[topic[i]] > 1:
            cold[i] = True
            warm_left[topic[i]] -= 1
            made += 1
    if made < n_cold:
        raise WorldSpecError(
            f"Invalid {WORLD_NAME} world: cold={c.cold} asks for {n_cold} cold items, but only "
            f"{made} can be cold while every topic keeps a warm item (lower cold)"
        )

    # Mismatch: an exact count of items whose title names another shape.
    mm = _rng(c.seed, "mismatch")
    shift = mm.integers(1, len(CLASSES), n)
    mismatch = np.zeros(n, dtype=bool)
    mismatch[mm.permutation(n)[: int(round(c.mismatch * n))]] = True
    title_shape = np.where(mismatch, (shape + shift) % len(CLASSES), shape)

    fav_colours = _rng(c.seed, "favoured").permutation(len(colour_names))[: len(colour_names) // 2]
    favoured = np.isin(present % len(colour_names), fav_colours)
    return _Items(
        shape, colour, topic, topic_names, popularity, cold, mismatch, title_shape, favoured
    )


def _transitions(c: ShapesRecConfig, n_topics: int) -> tuple[np.ndarray, np.ndarray]:
    """The world transition matrix ``(T, T)`` and each topic's successors ``(T, k)``."""
    rng = _rng(c.seed, "topics")
    k = min(len(SUCCESSOR_WEIGHTS), n_topics - 1)
    weights = np.asarray(SUCCESSOR_WEIGHTS[:k]) / sum(SUCCESSOR_WEIGHTS[:k]) if k else None
    matrix = np.zeros((n_topics, n_topics))
    successors = np.zeros((n_topics, k), dtype=np.int64)
    for t in range(n_topics):
        if k == 0:
            matrix[t, t] = 1.0
            continue
        others = np.delete(np.arange(n_topics), t)
        successors[t] = rng.choice(others, size=k, replace=False)
        matrix[t, successors[t]] = weights
    return matrix, successors


def _topic_cdfs(items: _Items, n_topics: int, warm_only: bool) -> list[tuple[np.ndarray, ...]]:
    """Per topic: its items (warm ones only, or all) and their cumulative popularity in (0, 1]."""
    keep = ~items.cold if warm_only else np.ones(len(items.topic), dtype=bool)
    out = []
    for t in range(n_topics):
        members = np.flatnonzero((items.topic == t) & keep)
        cdf = np.cumsum(items.popularity[members])
        out.append((members, cdf / cdf[-1]))
    return out


def _pick(tables: list[tuple[np.ndarray, ...]], topics: np.ndarray, u: np.ndarray) -> np.ndarray:
    """An item of each of ``topics`` by inverse CDF on the uniforms ``u``."""
    out = np.empty(len(topics), dtype=np.int64)
    for t in np.unique(topics).tolist():
        rows = np.flatnonzero(topics == t)
        members, cdf = tables[t]
        at = np.searchsorted(cdf, u[rows], side="right")
        out[rows] = members[np.minimum(at, len(members) - 1)]
    return out


def _sample_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One category per row of ``probs`` (rows sum to 1) by inverse CDF on ``u``."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(axis=1), probs.shape[1] - 1)


def _title(colour: str, shape: str, size: str, position: str) -> str:
    return f"{colour} {shape}, {size}, {position}"


def make_shapes_rec(config: ShapesRecConfig | None = None, **knobs: Any) -> Dataset:
    """Generate the shapes-rec world.

    Args:
        config: the world's knobs; defaults to ``ShapesRecConfig()``.
        **knobs: knob overrides (applied on top of ``config``).

    Returns:
        A Dataset of users (``sequence`` column, held-out label, ``a``/``b`` groups, ground
        truth in ``meta``) whose ``catalog`` holds the items (``image``, ``text``, shape labels,
        ``head``/``tail`` groups, ground truth in ``meta``); ``source`` is the canonical spec.

    Raises:
        WorldSpecError: an unknown knob or a bad value.
    """
    unknown = sorted(set(knobs) - set(_KNOB_TYPES))
    if unknown:
        raise WorldSpecError(f"Unknown knob(s) {', '.join(unknown)}. {knob_help()}")
    c = dataclasses.replace(config or ShapesRecConfig(), **knobs)
    shapes = make_shapes(
        n=c.n_items,
        seed=c.seed,
        image_size=c.image_size,
        spurious=0.0,
        label_noise=0.0,
        ood=0.0,
        defects=0.0,
        train_defects=0.0,
        duplicates=0,
        n_duplicated=0,
        caption_label=1.0,
    )  # a catalog larger than shapes.LAZY_ROWS gets a lazy image column
    shapes_meta = list(shapes.meta)
    items = _draw_items(c, shapes_meta)
    n_topics = len(items.topic_names)
    matrix, successors = _transitions(c, n_topics)

    # Users: group, preference (Dirichlet around the group's prior), length.
    n_b = c.n_users // 2
    is_b = np.zeros(c.n_users, dtype=bool)
    is_b[_rng(c.seed, "groups").permutation(c.n_users)[:n_b]] = True
    uniform = np.full(n_topics, 1.0 / n_topics)
    fav = items.favoured / max(int(items.favoured.sum()), 1)
    prior_b = (1 - c.group_bias) * uniform + c.group_bias * (fav if fav.any() else uniform)
    priors = np.where(is_b[:, None], prior_b[None], uniform[None])
    alpha = np.maximum(c.concentration * n_topics * priors, 1e-3)
    gamma = _rng(c.seed, "preferences").standard_gamma(alpha)
    gamma = np.where(gamma.sum(axis=1, keepdims=True) > 0, gamma, priors)
    pref = gamma / gamma.sum(axis=1, keepdims=True)
    lengths = _rng(c.seed, "lengths").integers(c.min_len, c.max_len + 1, c.n_users)

    # The topic chain and the items, one step for all users at a time.
    chain, pick_rng, click_rng = (_rng(c.seed, p) for p in ("chain", "items", "misclick"))
    warm_tables = _topic_cdfs(items, n_topics, warm_only=True)
    all_tables = _topic_cdfs(items, n_topics, warm_only=False)
    warm_items = np.flatnonzero(~items.cold)
    steps = c.max_len
    topics = np.zeros((c.n_users, steps), dtype=np.int64)
    clean = np.zeros((c.n_users, steps), dtype=np.int64)
    rows = np.arange(c.n_users)
    for s in range(steps):
        u_topic = chain.random(c.n_users)
        if s == 0:
            probs = pref
        else:
            prev = topics[:, s - 1]
            probs = (1 - c.follow) * pref + c.follow * matrix[prev]
            probs = (1 - c.stay) * probs
            probs[rows, prev] += c.stay
        topics[:, s] = _sample_rows(probs, u_topic)
        u_item = pick_rng.random(c.n_users)
        held_out = lengths - 1 == s  # the label may be any item, a history item only a warm one
        clean[:, s] = np.where(
            held_out,
            _pick(all_tables, topics[:, s], u_item),
            _pick(warm_tables, topics[:, s], u_item),
        )
    noisy = click_rng.random((c.n_users, steps)) < c.misclick
    random_warm = warm_items[click_rng.integers(0, len(warm_items), (c.n_users, steps))]
    noisy &= np.arange(steps)[None, :] < (lengths - 1)[:, None]  # never the held-out label
    observed = np.where(noisy, random_warm, clean)
    labels = observed[rows, lengths - 1]

    catalog = _catalog(c, shapes, shapes_meta, items)
    topic_names = items.topic_names
    user_meta = []
    sequences = []
    for u in range(c.n_users):
        n_seq = int(lengths[u]) - 1
        sequences.append(observed[u, :n_seq].copy())
        user_meta.append(
            {
                "noisy": noisy[u, :n_seq].tolist(),
                "clean_sequence": clean[u, :n_seq].tolist(),
                "topics": [topic_names[t] for t in topics[u, :n_seq].tolist()],
                "label_topic": topic_names[int(topics[u, n_seq])],
                "label_cold": bool(items.cold[labels[u]]),
                "top_topic": topic_names[int(np.argmax(pref[u]))],
                "group": GROUPS[int(is_b[u])],
            }
        )
    # World-level ground truth every user row can reach without the catalog.
    succ = {
        topic_names[t]: [topic_names[s] for s in successors[t].tolist()] for t in range(n_topics)
    }
    for m in user_meta:
        m["likely_next"] = succ[m["topics"][-1]] if m["topics"] else []
    return Dataset(
        name=WORLD_NAME,
        ids=[f"user-{u:06d}" for u in range(c.n_users)],
        modalities={"sequence": sequences},
        labels=labels.astype(np.int64),
        classes=list(catalog.ids),
        groups=[GROUPS[int(b)] for b in is_b],
        meta=user_meta,
        source=c.spec,
        catalog=catalog,
    )


def _catalog(
    c: ShapesRecConfig, shapes: Dataset, shapes_meta: list[dict[str, Any]], items: _Items
) -> Dataset:
    """The items as a Dataset: images, titles, shape labels, head/tail groups, ground truth."""
    n = c.n_items
    by_weight = np.lexsort((np.arange(n), -items.popularity))  # ties: lower position first
    head = np.zeros(n, dtype=bool)
    head[by_weight[: int(math.ceil(HEAD_SHARE * n))]] = True
    titles, meta = [], []
    for i, m in enumerate(shapes_meta):
        shape, title_shape = CLASSES[items.shape[i]], CLASSES[items.title_shape[i]]
        titles.append(_title(m["colour"], title_shape, m["size"], m["position"]))
        meta.append(
            {
                "shape": shape,
                "colour": m["colour"],
                "topic": items.topic_names[items.topic[i]],
                "cold": bool(items.cold[i]),
                "mismatch": bool(items.mismatch[i]),
                "title_shape": title_shape,
                "popularity": float(items.popularity[i]),
                "favoured_by_b": bool(items.favoured[items.topic[i]]),
                "size": m["size"],
                "position": m["position"],
                "tone": m["tone"],
            }
        )
    return Dataset(
        name=f"{WORLD_NAME}-items",
        ids=[f"item-{i:05d}" for i in range(n)],
        modalities={"image": shapes.modalities["image"], "text": titles},
        labels=items.shape.copy(),
        classes=list(CLASSES),
        groups=["head" if h else "tail" for h in head],
        meta=meta,
        source=c.spec,
    )


def load_shapes_rec(spec: str = WORLD_NAME) -> Dataset:
    """Build the shapes-rec world from a spec string (see :func:`parse_shapes_rec_spec`)."""
    return make_shapes_rec(parse_shapes_rec_spec(spec))
