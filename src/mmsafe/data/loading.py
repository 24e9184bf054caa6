"""Turn the CLI's ``--data`` string into a Dataset: a world, recommendation data or a manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmsafe.data.dataset import Dataset
from mmsafe.data.manifest import load_manifest
from mmsafe.data.rec_formats import is_rec_spec, load_rec_data
from mmsafe.data.worlds import is_world_spec, load_world

MANIFEST_SUFFIXES = (".jsonl", ".csv")


class DataSpecError(ValueError):
    """``--data`` names neither a built-in world nor a manifest file."""


def load_data(
    spec: str, *, skip_invalid: bool = False, classes: Sequence[str] | None = None
) -> Dataset:
    """A built-in world, a recommendation data folder, or a JSONL/CSV manifest.

    ``spec`` is a world (``shapes``, ``shapes:seed=7,n=3000``, ``shapes-rec``), ``iisan:<folder>``
    or ``mmrec:<folder>`` (:mod:`mmsafe.data.rec_formats`; ``classes`` is ignored there), or the
    path of a manifest.
    """
    if is_world_spec(spec):
        return load_world(spec)
    if is_rec_spec(spec):
        return load_rec_data(spec, skip_invalid=skip_invalid)
    path = Path(spec)
    if path.suffix.lower() in MANIFEST_SUFFIXES or path.exists():
        return load_manifest(path, classes=classes, skip_invalid=skip_invalid)
    raise DataSpecError(
        f"--data {spec!r} is neither a built-in world nor a manifest file. Pass 'shapes' (or "
        "'shapes:knob=value,...'), 'iisan:<folder>' or 'mmrec:<folder>' (recommendation data), "
        "or the path of a .jsonl or .csv manifest."
    )
