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


def compare_cards(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Delta]:
    """Every finite metric that both cards report for checks that ran (``ok``) in both."""
    out = []
    for name, a in before.get("checks", {}).items():
        b = after.get("checks", {}).get(name)
        if b is None or a.get("status") != "ok" or b.get("status") != "ok":
            continue
        for metric, ma in a.get("metrics", {}).items():
            mb = b.get("metrics", {}).get(metric)
            if mb is None or ma.get("value") is None or mb.get("value") is None:
                continue
            va, vb = float(ma["value"]), float(mb["value"])
            hib = _direction(name, metric)
            improved = None if hib is None or va == vb else (vb > va) == hib
            out.append(Delta(f"{name}.{metric}", va, vb, vb - va, improved))
    return out
