"""Turn the CLI's ``--model`` string into a model, training embedded ones on a world."""

from __future__ import annotations

from pathlib import Path

from mmsafe.data.dataset import Dataset
from mmsafe.data.worlds import is_world_spec
from mmsafe.models.base import EncoderModel, create_model

WORLD_TRAINED: tuple[str, ...] = ("tiny-clip", "lit-mini")
"""Model families that train on a world: with ``--data shapes:...`` on that world's train split,
else on the default world. ``<family>:<dir>`` names a saved one and loads as is."""


REC_TRAINED: tuple[str, ...] = ("mm-sasrec", "sasrec-id")
"""Recommender families: they train on the users of ``--data`` (recommendation data)."""

VLM_TRAINED: tuple[str, ...] = ("tiny-vlm",)
"""Vision-language families that train on ``--data shapes-vqa...`` (else on the default one)."""

GEN_TRAINED: tuple[str, ...] = ("tiny-diffusion",)
"""Text-to-image families that train on ``--data shapes-gen...`` (else on the default one)."""


def is_world_trained(name: str) -> bool:
    """Whether ``--model name`` trains on the data's world (``tiny-clip-xs`` yes, ``x:<dir>`` no).

    Example:
        >>> [is_world_trained(n) for n in ("tiny-clip-m", "lit-mini", "lit-mini:/m", "hf:x")]
        [True, True, False, False]
    """
    return ":" not in name and name.startswith(WORLD_TRAINED)


def load_model(
    name: str,
    *,
    data: Dataset | None = None,
    quick: bool = False,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> EncoderModel:
    """Build ``--model``. ``tiny-clip*`` and ``lit-mini`` train on the data's own world.

    With ``--data shapes:...`` the model is trained on that world's train split (or loaded from
    the cache), so the planted training flaws really are in the model; with any other data it is
    the model of the default world (see :data:`WORLD_TRAINED`). ``tiny-clip:<dir>`` and
    ``lit-mini:<dir>`` load a saved one (e.g. hardened). Recommenders (``mm-sasrec``,
    ``mm-sasrec:<encoder>``, ``sasrec-id``) train on the users of ``data`` (cached).
    ``tiny-vlm`` trains on ``--data shapes-vqa...`` and ``tiny-diffusion`` on
    ``--data shapes-gen...`` (else on their default world); ``tiny-diffusion:<dir>`` loads one.
    """
    if name.startswith(REC_TRAINED):
        return create_model(
            name,
            train_data=data,
            seed=seed,
            quick=quick,
            cache_dir=cache_dir,
            progress=progress,
            device=device,
        )
    if ":" not in name and name.startswith(GEN_TRAINED):
        is_gen = data is not None and (data.source or "").startswith("shapes-gen")
        return create_model(
            name,
            train_data=data if is_gen else None,
            seed=seed,
            quick=quick,
            cache_dir=cache_dir,
            progress=progress,
            device=device,
        )
    if ":" not in name and name.startswith(VLM_TRAINED):
        is_vqa = data is not None and (data.source or "").startswith("shapes-vqa")
        return create_model(
            name,
            train_data=data if is_vqa else None,
            seed=seed,
            quick=quick,
            cache_dir=cache_dir,
            progress=progress,
            device=device,
        )
    if is_world_trained(name):
        is_world = data is not None and is_world_spec(data.source or "")
        world = data if is_world and data.catalog is None else None  # not a recommender world
        return create_model(
            name,
            train_data=world,
            seed=seed,
            quick=quick,
            cache_dir=cache_dir,
            progress=progress,
            device=device,
        )
    return create_model(name, device=device)
