"""Checks by name: ``register_check``, ``list_checks`` and glob selection.

Example:
    >>> import mmsafe.checks  # registers the built-in checks
    >>> "calibration" in list_checks()
    True
    >>> select_checks("perf*")
    ['performance']
"""

from __future__ import annotations

import fnmatch

from mmsafe.checks.base import Check

_CHECKS: dict[str, type[Check]] = {}


class CheckSelectionError(ValueError):
    """A ``--checks`` pattern matched nothing."""


def register_check(cls: type[Check]) -> type[Check]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if cls.name in _CHECKS and _CHECKS[cls.name] is not cls:
        raise ValueError(f"check name {cls.name!r} registered twice")
    _CHECKS[cls.name] = cls
    return cls


def list_checks(pattern: str = "*") -> list[str]:
    """Registered check names matching a glob, sorted by pillar then name."""
    names = [n for n in _CHECKS if fnmatch.fnmatch(n, pattern)]
    return sorted(names, key=lambda n: (_pillar_rank(_CHECKS[n].pillar), n))


def get_check(name: str) -> type[Check]:
    """The check class registered under ``name``."""
    return _CHECKS[name]


def select_checks(patterns: str) -> list[str]:
    """Check names selected by a comma-separated list of globs; ``all`` selects every check.

    Raises:
        CheckSelectionError: when a pattern matches no check.
    """
    chosen: list[str] = []
    for pat in (p.strip() for p in patterns.split(",")):
        if not pat:
            continue
        hits = list_checks("*" if pat == "all" else pat)
        if not hits:
            raise CheckSelectionError(
                f"--checks {pat!r} matches no check. Known checks: {', '.join(list_checks())}."
            )
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _pillar_rank(pillar: str) -> int:
    from mmsafe.checks.base import PILLARS

    return PILLARS.index(pillar) if pillar in PILLARS else len(PILLARS)
