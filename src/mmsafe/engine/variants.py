"""Variants: what the engine does to a modality's rows before encoding them.

A :class:`Variant` is a name (``corrupt/gaussian_noise``, ``perturb/char_swap``, ``tta``), JSON-able
parameters and a seed. Its :attr:`~Variant.key` is a stable hash of the three, so the engine can
cache what a variant produced and two checks that ask for the same variant share it.

A variant's transform acts per row: every row draws its random numbers from its own generator,
seeded by :func:`~mmsafe.methods.perturb.row_seed` from the variant's seed and the row's id
(a dataset row) or position (raw values), never from the row's batch. The same variant gives the
same result for any batch size or device.

Example:
    >>> v = Variant.of("corrupt/gaussian_noise", seed=0, severity=3)
    >>> v.key == Variant.of("corrupt/gaussian_noise", severity=3, seed=0).key
    True
    >>> v.label
    'corrupt/gaussian_noise severity=3 seed=0'
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.engine.cache import stable_hash
from mmsafe.methods import perturb

Stage = str  # "values" (before model.preprocess), "pixels" (after it) or "model" (a context)


@dataclass(frozen=True)
class Variant:
    """A named, seeded transform of one modality's rows.

    Attributes:
        name: ``<kind>/<what>`` or ``<kind>``; the kind selects the transform
            (:data:`TRANSFORMS`).
        params: ``((name, value), ...)`` JSON-able parameters, sorted by name.
        seed: seeds every row's random draws (with the row's id or position).
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    @classmethod
    def of(cls, name: str, seed: int = 0, **params: Any) -> Variant:
        """A variant from keyword parameters (which must be JSON-able)."""
        try:
            json.dumps(params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"variant {name!r}: parameters must be JSON-able ({exc})") from exc
        if name.split("/", 1)[0] not in TRANSFORMS:
            raise ValueError(f"unknown variant kind {name!r}; known: {', '.join(TRANSFORMS)}")
        return cls(name, tuple(sorted(params.items())), int(seed))

    @property
    def kind(self) -> str:
        """The part of the name before the first ``/``."""
        return self.name.split("/", 1)[0]

    @property
    def key(self) -> str:
        """A stable hash of the name, parameters and seed."""
        return stable_hash("variant", self.name, dict(self.params), self.seed)

    @property
    def label(self) -> str:
        """A short human-readable form, for progress lines."""
        parts = [self.name, *(f"{k}={v}" for k, v in self.params), f"seed={self.seed}"]
        return " ".join(parts)

    @property
    def stage(self) -> Stage:
        """Where the transform acts: raw ``values``, preprocessed ``pixels`` or the ``model``."""
        return TRANSFORMS[self.kind][0]

    def apply(self, batch: Any, row_seeds: Sequence[int]) -> Any:
        """Transform one batch (raw values or pixels), one seed per row."""
        return TRANSFORMS[self.kind][1](self, batch, row_seeds)


def corruption_variant(modality: str, name: str, severity: int, seed: int) -> Variant:
    """The engine variant of one corruption (image) or perturbation (text) at one severity.

    Every check that measures under the same corruption asks for this variant, so the engine
    encodes it once per audit.

    Example:
        >>> corruption_variant("image", "fog", 2, seed=0).label
        'corrupt/fog severity=2 seed=0'
    """
    kind = "corrupt" if modality == "image" else "perturb"
    return Variant.of(f"{kind}/{name}", seed=int(seed), severity=int(severity))


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``model`` with ``p > 0`` (any ``nn.Dropout*`` kind).

    Example:
        >>> len(dropout_modules(nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.0), nn.Linear(2, 2))))
        1
    """
    kinds = (nn.modules.dropout._DropoutNd,)
    return [m for m in model.modules() if isinstance(m, kinds) and float(m.p) > 0]


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[None]:
    """Put only the dropout layers in training mode (batch norm etc. stay in eval)."""
    layers = dropout_modules(model)
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.train()
        yield
    finally:
        for m, was in zip(layers, modes, strict=True):
            m.train(was)


def _suffix(v: Variant) -> str:
    if "/" not in v.name:
        raise ValueError(f"variant {v.name!r} needs a name after '/'")
    return v.name.split("/", 1)[1]


def _corrupt(v: Variant, pixels: Tensor, row_seeds: Sequence[int]) -> Tensor:
    p = dict(v.params)
    return perturb.corrupt_images(pixels, _suffix(v), int(p["severity"]), row_seeds=row_seeds)


def _perturb(v: Variant, texts: Sequence[Any], row_seeds: Sequence[int]) -> list[str]:
    p = dict(v.params)
    return perturb.perturb_texts(texts, _suffix(v), int(p["severity"]), row_seeds=row_seeds)


def _tta(v: Variant, pixels: Tensor, row_seeds: Sequence[int]) -> Tensor:
    p = dict(v.params)
    return perturb.augment_pixels(
        pixels,
        perturb.generators(row_seeds),
        int(p.get("max_shift", 2)),
        float(p.get("brightness", 0.1)),
        bool(p.get("flip", True)),
    )


@contextlib.contextmanager
def _dropout(v: Variant, model: nn.Module, row_seeds: Sequence[int]) -> Iterator[None]:
    """MC dropout for one batch: dropout layers on, torch's RNG seeded from the first row.

    Dropout masks are drawn inside the model, so unlike the other kinds they depend on how the
    rows are batched (the same batching gives the same masks).
    """
    device = next(iter(model.parameters()), torch.zeros(0)).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(row_seeds[0]) if len(row_seeds) else int(v.seed))
        with mc_dropout(model):
            yield


TRANSFORMS: dict[str, tuple[Stage, Callable[[Variant, Any, Sequence[int]], Any]]] = {
    "corrupt": ("pixels", _corrupt),
    "perturb": ("values", _perturb),
    "tta": ("pixels", _tta),
    "dropout": ("model", _dropout),
}
"""Variant kinds: ``{kind: (stage, transform(variant, batch, row_seeds))}``.

Stages: ``values`` transforms the raw values before ``model.preprocess``, ``pixels`` the
preprocessed batch on the device, and ``model`` returns a context manager that the batch's
forward pass runs in (given the model instead of a batch).
"""
