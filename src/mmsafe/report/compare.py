"""Before/after deltas between two cards (a model and its hardened version, or two models).

Only the ``checks`` sections are compared: a card's ``timings`` (latency, seconds, ...) vary
run to run, so a delta there says more about the machine's load than about the model.

Example:
    >>> ok = lambda ece: {"status": "ok", "metrics": {"ece": {"value": ece}}}
    >>> a = {"checks": {"monitoring.calibration": ok(0.2)}}
    >>> b = {"checks": {"monitoring.calibration": ok(0.05)}}
    >>> [(d.metric, round(d.delta, 2), d.improved) for d in compare_cards(a, b)]
    [('monitoring.calibration.ece', -0.15, True)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Delta:
    """One metric in both cards.

    Attributes:
        metric: ``<check>.<metric>``, the name ``--fail-on`` uses.
        before: value in the first card.
        after: value in the second card.
        delta: ``after - before``.
        improved: ``True``/``False`` when the check declares a direction, else ``None``.
    """

    metric: str
    before: float
    after: float
    delta: float
    improved: bool | None


def _direction(check: str, metric: str) -> bool | None:
    """``higher_is_better`` as the registered check (or a check an alias names) declares it."""
    from mmsafe.checks import get_check, resolve_check

    base = metric.split("/")[-1]
    for name in resolve_check(check):
        declared = get_check(name).higher_is_better
        direction = declared.get(metric, declared.get(base))
        if direction is not None:
            return direction
    return None


class CardFormatError(ValueError):
    """A card given to :func:`compare_cards` is not shaped like a safety card.

    The message names the card (first or second) and the key path of the bad value, e.g.
    ``the second card: checks['a.b'].metrics['ece'].value is a string ('x'), expected a
    number or null``.
    """


def _mapping(value: Any, where: str, card: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CardFormatError(
            f"{card}: {where} is {_kind(value)}, expected an object; is it a card.json that "
            "mmsafe wrote?"
        )
    return value


def _kind(value: Any) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 30 else shown[:27] + "..."
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "a list"}
    return f"{names.get(type(value), 'a ' + type(value).__name__)} ({shown})"


def _value(entry: Any, where: str, card: str) -> float | None:
    """A metric's value as a float; ``None`` when absent, null or not finite."""
    value = _mapping(entry, where, card).get("value")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardFormatError(f"{card}: {where}.value is {_kind(value)}, expected a number or null")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if math.isfinite(number) else None


def _checks(card: Any, name: str) -> Mapping[str, Any]:
    checks = _mapping(card, "the card", name).get("checks", {})
    return _mapping(checks, "'checks'", name)


def compare_cards(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Delta]:
    """Every finite metric that both cards report for checks that ran (``ok``) in both.

    Raises:
        CardFormatError: a card, its ``checks``, a check, its ``metrics`` or a metric is not an
            object, or a metric's value is neither a number nor null (the message says where).
    """
    first, second = "the first card", "the second card"
    checks_a, checks_b = _checks(before, first), _checks(after, second)
    out = []
    for name, a in checks_a.items():
        a = _mapping(a, f"checks[{name!r}]", first)
        b = checks_b.get(name)
        if b is None:
            continue
        b = _mapping(b, f"checks[{name!r}]", second)
        if a.get("status") != "ok" or b.get("status") != "ok":
            continue
        metrics_a = _mapping(a.get("metrics", {}), f"checks[{name!r}].metrics", first)
        metrics_b = _mapping(b.get("metrics", {}), f"checks[{name!r}].metrics", second)
        for metric, ma in metrics_a.items():
            where = f"checks[{name!r}].metrics[{metric!r}]"
            va = _value(ma, where, first)
            vb = _value(metrics_b[metric], where, second) if metric in metrics_b else None
            if va is None or vb is None:
                continue
            hib = _direction(name, str(metric))
            improved = None if hib is None or va == vb else (vb > va) == hib
            out.append(Delta(f"{name}.{metric}", va, vb, vb - va, improved))
    return out
