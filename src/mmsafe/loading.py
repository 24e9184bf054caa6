"""Turn the CLI's ``--data`` and ``--model`` strings into a Dataset and a model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmsafe.data.dataset import Dataset
from mmsafe.data.manifest import ManifestError, load_manifest
from mmsafe.data.worlds import WorldSpecError, is_world_spec, load_world
from mmsafe.models.base import EncoderModel, ModelError, create_model

MANIFEST_SUFFIXES = (".jsonl", ".csv")


class DataSpecError(ValueError):
    """``--data`` names neither a built-in world nor a manifest file."""


USER_ERRORS: tuple[type[Exception], ...] = (
    DataSpecError,
    ManifestError,
    WorldSpecError,
    ModelError,
)


def load_data(
    spec: str, *, skip_invalid: bool = False, classes: Sequence[str] | None = None
) -> Dataset:
    """A built-in world (``shapes``, ``shapes:seed=7,n=3000``) or a JSONL/CSV manifest."""
    if is_world_spec(spec):
        return load_world(spec)
    path = Path(spec)
    if path.suffix.lower() in MANIFEST_SUFFIXES or path.exists():
        return load_manifest(path, classes=classes, skip_invalid=skip_invalid)
    raise DataSpecError(
        f"--data {spec!r} is neither a built-in world nor a manifest file. Pass 'shapes' (or "
        "'shapes:knob=value,...') or the path of a .jsonl or .csv manifest."
    )


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
    """Build ``--model``. ``tiny-clip*`` trains on the data's own world when the data is one.

    With ``--data shapes:...`` the model is trained on that world's train split (or loaded from
    the cache), so the planted training flaws really are in the model; with any other data it is
    the tiny-clip of the default world. ``tiny-clip:<dir>`` loads a saved one (e.g. hardened).
    """
    if name.startswith("tiny-clip") and ":" not in name:
        world = data if data is not None and is_world_spec(data.source or "") else None
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
