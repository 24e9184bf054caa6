"""Checks by name: ``register_check``, ``list_checks`` and glob selection.

Every check is registered under ``<pillar>.<name>``. Older names stay usable as *aliases*
(``calibration`` is ``monitoring.calibration``); an alias may stand for several checks, e.g. the
task variants of one check (``performance`` is ``performance.classification`` and
``performance.retrieval``), since a check has one metric schema whatever the task.

Example:
    >>> import mmsafe.checks  # registers the built-in checks
    >>> "monitoring.calibration" in list_checks()
    True
    >>> select_checks("perf*")
    ['performance.classification', 'performance.ranking', 'performance.retrieval']
    >>> select_checks("calibration")
    ['monitoring.calibration']
"""

from __future__ import annotations

import fnmatch
import inspect
import json
from pathlib import Path
from typing import Any

from mmsafe.checks.base import Check

_CHECKS: dict[str, type[Check]] = {}
_ALIASES: dict[str, list[str]] = {}


class CheckSelectionError(ValueError):
    """A ``--checks`` pattern matched nothing."""


def register_check(cls: type[Check]) -> type[Check]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if cls.name in _CHECKS and _CHECKS[cls.name] is not cls:
        raise ValueError(f"check name {cls.name!r} registered twice")
    pillar, dot, rest = cls.name.partition(".")
    if not (dot and rest and pillar == cls.pillar):
        raise ValueError(f"check name {cls.name!r} must read '<pillar>.<name>' ({cls.pillar!r})")
    _CHECKS[cls.name] = cls
    for alias in cls.aliases:
        targets = _ALIASES.setdefault(alias, [])
        if cls.name not in targets:
            targets.append(cls.name)
    return cls


def resolve_check(name: str) -> list[str]:
    """The registered checks a name stands for: itself, and every check it is an alias of.

    Example:
        >>> import mmsafe.checks
        >>> resolve_check("calibration")
        ['monitoring.calibration']
        >>> resolve_check("nope")
        []
    """
    own = [name] if name in _CHECKS else []
    return own + [n for n in _ALIASES.get(name, []) if n not in own]


def check_aliases() -> dict[str, list[str]]:
    """``{alias: [check names]}`` of every registered alias."""
    return {a: list(ns) for a, ns in sorted(_ALIASES.items())}


def list_checks(pattern: str = "*") -> list[str]:
    """Registered check names matching a glob, sorted by pillar then name."""
    names = [n for n in _CHECKS if fnmatch.fnmatch(n, pattern)]
    return sorted(names, key=lambda n: (_pillar_rank(_CHECKS[n].pillar), n))


def get_check(name: str) -> type[Check]:
    """The check class registered under ``name`` (or the one check an alias stands for).

    Raises:
        KeyError: no check is registered under ``name``.
    """
    if name not in _CHECKS and len(_ALIASES.get(name, [])) == 1:
        return _CHECKS[_ALIASES[name][0]]
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
        for alias in [a for a in _ALIASES if fnmatch.fnmatch(a, pat)]:  # old names match too
            hits += [n for n in resolve_check(alias) if n not in hits]
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
    fails before any work is done. Options given under an alias apply to every check it stands
    for; the result is keyed by registered names.

    Raises:
        CheckSelectionError: unreadable file, invalid JSON, wrong shape, unknown check or
            option (the message says which).

    Example:
        >>> import mmsafe.checks
        >>> parse_check_options('{"calibration": {"n_bins": 10}}')
        {'monitoring.calibration': {'n_bins': 10}}
        >>> try:
        ...     parse_check_options('{"calibration": {"bins": 10}}')
        ... except CheckSelectionError as err:
        ...     print(str(err).split(" (")[0])
        --options: monitoring.calibration has no option 'bins'
    """
    source = "--options"
    if text.startswith("@"):
        path = Path(text[1:])
        source = f"--options file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise CheckSelectionError(f"{source}: cannot read it ({err.strerror}).") from None
        except UnicodeDecodeError as err:
            raise CheckSelectionError(
                f"{source}: not UTF-8 text ({err.reason}); save it as UTF-8."
            ) from None
    example = 'Write e.g. \'{"robustness.adversarial": {"steps": 20}}\'.'
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckSelectionError(
            f"{source}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}). "
            + example
        ) from None
    except ValueError as err:  # an integer of more than 4300 digits
        raise CheckSelectionError(f"{source}: not valid JSON ({err}). {example}") from None
    except RecursionError:
        raise CheckSelectionError(
            f"{source}: not valid JSON (nested too deeply). {example}"
        ) from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise CheckSelectionError(
            f"{source}: expected a JSON object of objects, {{check name: {{option: value}}}}."
        )
    resolved: dict[str, dict[str, Any]] = {}
    for given, opts in doc.items():
        targets = resolve_check(given)
        if not targets:
            raise CheckSelectionError(
                f"{source}: unknown check {given!r}; see `mmsafe list-checks`."
            )
        params = {n: _options_of(n) for n in targets}
        for key in opts:
            if not any(key in ps for ps in params.values()):
                name = " / ".join(targets)
                known = ", ".join(dict.fromkeys(p for ps in params.values() for p in ps))
                raise CheckSelectionError(
                    f"{source}: {name} has no option {key!r} (its options: {known})"
                )
        for name, ps in params.items():  # an alias's options go to the checks that take them
            resolved.setdefault(name, {}).update({k: v for k, v in opts.items() if k in ps})
    return resolved


def _options_of(name: str) -> list[str]:
    return [p for p in inspect.signature(_CHECKS[name].__init__).parameters if p != "self"]
