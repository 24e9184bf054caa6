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
import inspect
import json
from pathlib import Path
from typing import Any

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


def parse_check_options(text: str) -> dict[str, dict[str, Any]]:
    """``--options``: JSON ``{check name: {option: value}}``, or ``@path`` to a JSON file.

    Every check must be registered and every option a parameter of its constructor, so a typo
    fails before any work is done.

    Raises:
        CheckSelectionError: unreadable file, invalid JSON, wrong shape, unknown check or
            option (the message says which).

    Example:
        >>> import mmsafe.checks
        >>> parse_check_options('{"calibration": {"n_bins": 10}}')
        {'calibration': {'n_bins': 10}}
        >>> try:
        ...     parse_check_options('{"calibration": {"bins": 10}}')
        ... except CheckSelectionError as err:
        ...     print(err)
        --options: calibration has no option 'bins' (its options: n_bins, n_boot, ece_threshold)
    """
    source = "--options"
    if text.startswith("@"):
        path = Path(text[1:])
        source = f"--options file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise CheckSelectionError(f"{source}: cannot read it ({err.strerror}).") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckSelectionError(
            f"{source}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}). "
            'Write e.g. \'{"robustness.adversarial": {"steps": 20}}\'.'
        ) from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise CheckSelectionError(
            f"{source}: expected a JSON object of objects, {{check name: {{option: value}}}}."
        )
    for name, opts in doc.items():
        if name not in _CHECKS:
            raise CheckSelectionError(
                f"{source}: unknown check {name!r}; see `mmsafe list-checks`."
            )
        params = [p for p in inspect.signature(_CHECKS[name].__init__).parameters if p != "self"]
        for key in opts:
            if key not in params:
                raise CheckSelectionError(
                    f"{source}: {name} has no option {key!r} (its options: {', '.join(params)})"
                )
    return doc
