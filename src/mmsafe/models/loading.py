"""Turn the CLI's ``--model`` string into a model, training embedded ones on a world."""

from __future__ import annotations

from pathlib import Path

from mmsafe.data.dataset import Dataset
from mmsafe.data.worlds import is_world_spec
from mmsafe.models.base import EncoderModel, create_model


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
