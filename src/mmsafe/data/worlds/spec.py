"""Parsing ``<world>[:knob=value,...]`` spec strings into a world's config dataclass.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     seed: int = 0
    ...     frac: float = 0.5
    >>> parse_knobs("demo:seed=3, frac=0.25", "demo", C)
    C(seed=3, frac=0.25)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar


class WorldSpecError(ValueError):
    """A world spec names an unknown world or knob, or gives a bad value."""


T = TypeVar("T")

MAX_INT_KNOB = 10**18 - 1
"""The largest magnitude an integer knob may have in a spec string (fits an int64)."""

MAX_EAGER_ROWS = 1_000_000
"""The most rows (images, scenes, users) a world rendered whole in memory may have."""
MAX_LAZY_ROWS = 10_000_000
"""The most rows of a ``shapes`` world (rendered on demand; its metadata is ~300 bytes a row)."""


def size_problem(name: str, value: int, limit: int) -> list[str]:
    """``[why]`` when a world's row count ``value`` exceeds ``limit``, else ``[]``.

    Example:
        >>> size_problem("n_users", 10**9, MAX_EAGER_ROWS)  # doctest: +ELLIPSIS
        ['n_users=1000000000 is more than 1,000,000 rows, ... for larger data']
    """
    if value <= limit:
        return []
    return [f"{name}={value} is more than {limit:,} rows, more than this generated world holds "
            "in memory; use a manifest (--data <file>) for larger data"]  # fmt: skip


def knob_types(config: type) -> dict[str, type]:
    """``{knob: int | float}`` of a config dataclass whose fields are ints and floats."""
    return {f.name: {"int": int, "float": float}[str(f.type)] for f in dataclasses.fields(config)}


def knob_help(config: type) -> str:
    """A one-line list of the valid knobs with their defaults."""
    listed = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(config))
    return f"Valid knobs (with defaults): {listed}."


def parse_knobs(spec: str, world: str, config: type[T]) -> T:
    """Parse ``"<world>"`` or ``"<world>:knob=value,..."`` into ``config(**knobs)``.

    Raises:
        WorldSpecError: another world's name, an unknown or repeated knob, a malformed pair, or
            a value of the wrong type.
    """
    types, help_ = knob_types(config), knob_help(config)
    name, _, rest = spec.strip().partition(":")
    if name.strip() != world:
        raise WorldSpecError(
            f"Not a {world} world spec: {spec!r} (expected '{world}[:knob=value,...]')"
        )
    knobs: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (s.strip() for s in pair.partition("="))
        if not eq or not key or not value:
            raise WorldSpecError(f"Malformed knob {pair!r} in {spec!r}: use knob=value. {help_}")
        if key not in types:
            raise WorldSpecError(f"Unknown knob {key!r} in {spec!r}. {help_}")
        if key in knobs:
            raise WorldSpecError(f"Knob {key!r} given twice in {spec!r}")
        try:
            knobs[key] = types[key](value)
        except ValueError:
            what = "an integer" if types[key] is int else "a number"
            raise WorldSpecError(f"Knob {key!r} needs {what}, got {value!r}. {help_}") from None
        if types[key] is int and abs(knobs[key]) > MAX_INT_KNOB:
            raise WorldSpecError(
                f"Knob {key!r} is out of range: {value[:20]}{'...' if len(value) > 20 else ''} "
                f"has more than 18 digits. {help_}"
            )
    return config(**knobs)


def type_problems(config: Any) -> list[str]:
    """What is wrong with the types of a config's knobs: ints, finite numbers, no booleans.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class C:
        ...     n: int = 1
        ...     p: float = 0.5
        >>> type_problems(C(n=1.5, p=float("nan")))
        ['n=1.5 must be an integer', 'p=nan must be finite']
    """
    problems = []
    for name, kind in knob_types(type(config)).items():
        value = getattr(config, name)
        ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            problems.append(
                f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}"
            )
        elif isinstance(value, float) and not math.isfinite(value):  # ints are finite
            problems.append(f"{name}={value!r} must be finite")
    return problems
