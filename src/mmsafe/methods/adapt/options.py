"""The adaptation methods, objectives and their defaults."""

from __future__ import annotations

from typing import Literal


class AdaptError(ValueError):
    """``mmsafe adapt`` cannot run as asked: a user error (exit 2).

    An unknown method, data without splits, a model whose towers a method cannot reach.
    """


Method = Literal["full", "lora", "adapter", "iisan", "iisan-versa", "momef", "crossan"]
METHODS: tuple[str, ...] = ("full", "lora", "adapter", "iisan", "iisan-versa", "momef", "crossan")
"""The adaptation methods :func:`adapt` implements."""

SIDE_METHODS: tuple[str, ...] = ("iisan", "iisan-versa", "momef", "crossan")
"""The decoupled methods: frozen backbones, side networks over cached hidden states."""

TOWER_BLOCK_METHODS: tuple[str, ...] = ("adapter", *SIDE_METHODS)
"""The methods that need a model's tower blocks (``tower_blocks()`` or a known layout)."""

DEFAULT_LR: dict[str, float] = {
    "full": 3e-4,
    "lora": 2e-3,
    "adapter": 2e-3,
    "iisan": 2e-3,
    "iisan-versa": 2e-3,
    "momef": 2e-3,
    "crossan": 2e-3,
}
"""AdamW learning rate per method (when ``lr`` is not given)."""

MODALITIES: tuple[str, str] = ("image", "text")

MAX_SCALE = 100.0  # the largest contrastive temperature, as in CLIP

Objective = Literal["classification", "retrieval", "seqrec"]
OBJECTIVES: tuple[str, ...] = ("classification", "retrieval", "seqrec")
"""The downstream tasks :func:`adapt` trains for."""

RETRIEVAL_METHODS: tuple[str, ...] = ("full", "lora", "adapter", "iisan", "iisan-versa")
"""The methods that support ``objective="retrieval"`` (MOMEF and CROSSAN fuse the modalities into
one vector, so they are not dual encoders)."""

RETRIEVAL_KS: tuple[int, ...] = (1, 5)
"""Recall cut-offs :func:`adapt` reports for ``objective="retrieval"``."""

SEQREC_METHODS: tuple[str, ...] = METHODS
"""The methods that support ``objective="seqrec"`` (all: each gives an item representation)."""

SEQREC_KS: tuple[int, ...] = (10,)
"""NDCG/HR cut-offs :func:`adapt` reports for ``objective="seqrec"``."""
