"""Built-in "worlds": datasets named by a spec string, generated or bundled, no files needed.

``shapes`` is synthetic, with planted flaws whose ground truth is known; ``digits`` is real
(scikit-learn's bundled handwritten digits), the control without planted flaws; ``shapes-rec``
is a synthetic sequential-recommendation world (users' item sequences over a shapes catalog);
``shapes-vqa`` holds scenes with questions and answers, a planted secret and a co-occurrence
bias, for vision-language models; ``shapes-gen`` holds captioned images for text-to-image
generators, with planted duplicates, a colour skew and a forbidden concept.

A world is named by a spec string ``<world>[:knob=value,...]``, e.g. ``shapes`` or
``shapes:seed=7,spurious=0.9``; :func:`load_world` dispatches on the name before the colon.

Example:
    >>> is_world_spec("shapes:seed=1"), is_world_spec("data/manifest.csv")
    (True, False)
    >>> len(load_world("shapes:n=30,n_duplicated=2,duplicates=1"))
    32
"""

from __future__ import annotations

from collections.abc import Callable

from mmsafe.data.dataset import Dataset
from mmsafe.data.worlds.digits import load_digits_world
from mmsafe.data.worlds.shapes import ShapesConfig, load_shapes, make_shapes, parse_world_spec
from mmsafe.data.worlds.shapes_gen import ShapesGenConfig, load_shapes_gen, make_shapes_gen
from mmsafe.data.worlds.shapes_rec import ShapesRecConfig, load_shapes_rec, make_shapes_rec
from mmsafe.data.worlds.shapes_vqa import ShapesVQAConfig, load_shapes_vqa, make_shapes_vqa
from mmsafe.data.worlds.spec import WorldSpecError

WORLDS: dict[str, Callable[[str], Dataset]] = {
    "shapes": load_shapes,
    "digits": load_digits_world,
    "shapes-rec": load_shapes_rec,
    "shapes-vqa": load_shapes_vqa,
    "shapes-gen": load_shapes_gen,
}
"""World name -> loader taking the full spec string."""

__all__ = [
    "WORLDS",
    "ShapesConfig",
    "ShapesGenConfig",
    "ShapesRecConfig",
    "ShapesVQAConfig",
    "WorldSpecError",
    "is_world_spec",
    "load_world",
    "make_shapes",
    "make_shapes_gen",
    "make_shapes_rec",
    "make_shapes_vqa",
    "parse_world_spec",
]


def _world_name(spec: str) -> str:
    return spec.strip().partition(":")[0].strip()


def is_world_spec(spec: str) -> bool:
    """Whether ``spec`` names a known world (``shapes`` or ``shapes:...``), not a file path."""
    return isinstance(spec, str) and _world_name(spec) in WORLDS


def load_world(spec: str) -> Dataset:
    """Generate the world named by ``spec``.

    Raises:
        WorldSpecError: an unknown world name, an unknown knob or a bad knob value.
    """
    name = _world_name(spec)
    if name not in WORLDS:
        known = ", ".join(sorted(WORLDS))
        raise WorldSpecError(
            f"Unknown world {name!r} in {spec!r}. Known worlds: {known} "
            "(write e.g. 'shapes' or 'shapes:seed=7,n=3000')."
        )
    return WORLDS[name](spec)
