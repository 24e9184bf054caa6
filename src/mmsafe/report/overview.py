"""What a reader sees first: a verdict per pillar, the top findings, readable metric names.

Both the HTML card and the terminal summary lead with this overview. It reads the card's
``checks`` and ``gates`` only (never its timings), so the same card always gets the same
verdicts:

* **fail**: a ``--fail-on`` gate on one of the pillar's checks failed, or a high-severity
  finding stands;
* **warn**: a medium-severity finding stands (or a check of the pillar crashed);
* **pass**: otherwise (low and info findings do not change a verdict);
* **skipped**: every check of the pillar was skipped.

Metric labels are display names only: ``card.json`` keys and ``--fail-on`` paths stay as
they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmsafe.checks.base import PILLARS, SEVERITY_RANK

VERDICTS: tuple[str, ...] = ("fail", "warn", "pass", "skipped")
"""Verdicts from worst to best (``skipped``: nothing ran)."""


@dataclass(frozen=True)
class PillarVerdict:
    """One pillar's verdict and why.

    Attributes:
        pillar: the pillar's name.
        verdict: one of :data:`VERDICTS`.
        checks: the pillar's checks in the card.
        reasons: one line per cause, worst first: failed gates, high findings, medium
            findings, crashed checks.
        counts: ``{status: number of checks}``.
    """

    pillar: str
    verdict: str
    checks: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)


def check_of_target(target: str, checks: Mapping[str, Any]) -> str | None:
    """The check a gate target (``<check>.<metric>``) names: the longest matching prefix.

    Example:
        >>> check_of_target("monitoring.calibration.ece", {"monitoring.calibration": {}})
        'monitoring.calibration'
        >>> check_of_target("nope.x", {"monitoring.calibration": {}}) is None
        True
    """
    best = None
    for name in checks:
        if target.startswith(name + ".") and (best is None or len(name) > len(best)):
            best = name
    return best


def pillar_verdicts(card: Mapping[str, Any]) -> list[PillarVerdict]:
    """The verdict of every pillar in the card, in :data:`~mmsafe.checks.base.PILLARS` order.

    Example:
        >>> card = {"checks": {
        ...     "robustness.shift": {"pillar": "robustness", "status": "ok", "findings": [
        ...         {"severity": "medium", "message": "accuracy drops under blur"}]},
        ...     "monitoring.ood": {"pillar": "monitoring", "status": "ok", "findings": []}},
        ...     "gates": [{"gate": "monitoring.ood.auroc<0.9", "failed": True,
        ...                "message": "monitoring.ood.auroc<0.9: FAILED"}]}
        >>> [(v.pillar, v.verdict) for v in pillar_verdicts(card)]
        [('robustness', 'warn'), ('monitoring', 'fail')]
    """
    checks = card.get("checks", {})
    by: dict[str, list[str]] = {}
    for name, c in checks.items():
        by.setdefault(c.get("pillar") or "other", []).append(name)
    gate_fails: dict[str, list[str]] = {}
    for g in card.get("gates", []) or []:
        if g.get("failed"):
            check = check_of_target(str(g.get("gate", "")), checks)
            pillar = checks[check].get("pillar") if check else None
            gate_fails.setdefault(pillar or "", []).append(f"gate {g.get('message') or g['gate']}")
    order = [p for p in PILLARS if p in by] + sorted(p for p in by if p not in PILLARS)
    out = []
    for pillar in order:
        names = by[pillar]
        counts: dict[str, int] = {}
        for n in names:
            counts[checks[n]["status"]] = counts.get(checks[n]["status"], 0) + 1
        ranked = [(0, r) for r in gate_fails.get(pillar, [])]  # gates, high, medium, crashes
        for n in names:
            c = checks[n]
            if c["status"] == "failed":
                ranked.append((3, f"{n} crashed: {c.get('reason') or ''}".strip()))
            for f in c.get("findings", []):
                if f["severity"] in ("high", "medium"):
                    ranked.append((1 if f["severity"] == "high" else 2, f"{n}: {f['message']}"))
        ranked.sort(key=lambda r: r[0])  # stable: card order within a rank
        reasons = [r for _, r in ranked]
        worst = min((k for k, _ in ranked), default=None)
        verdict = {None: "pass", 0: "fail", 1: "fail", 2: "warn", 3: "warn"}[worst]
        if counts.get("skipped", 0) == len(names):
            verdict = "skipped"
        out.append(PillarVerdict(pillar, verdict, tuple(names), tuple(reasons), counts))
    return out


def top_findings(card: Mapping[str, Any], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` most severe findings, each with its ``check`` and ``pillar``.

    Ranked by severity, then in card order (checks, then findings within a check).

    Example:
        >>> card = {"checks": {"a.x": {"pillar": "a", "findings": [
        ...     {"severity": "low", "message": "m1"}, {"severity": "high", "message": "m2"}]}}}
        >>> [(f["check"], f["message"]) for f in top_findings(card)]
        [('a.x', 'm2'), ('a.x', 'm1')]
    """
    items = [
        {**f, "check": name, "pillar": c.get("pillar")}
        for name, c in card.get("checks", {}).items()
        for f in c.get("findings", [])
    ]
    items.sort(key=lambda f: SEVERITY_RANK.get(f["severity"], 9))  # stable: card order kept
    return items[:n]


_EPS = re.compile(r"(?<![A-Za-z])eps=([0-9.eE+-]+)")


def _as_255(value: str) -> str:
    """``0.003922`` -> ``1/255`` when the value is (nearly) k/255, else the value."""
    try:
        x = float(value)
    except ValueError:
        return value
    k = round(x * 255)
    if 0 < k < 255 and abs(x * 255 - k) < 5e-3 and x < 0.25:  # pixel budgets, not 0.5 or 1
        return f"{k}/255"
    return value


def metric_label(name: str) -> str:
    """A metric key as a person reads it (the key itself stays in ``card.json``).

    Example:
        >>> metric_label("linf/fgsm/eps=0.003922/robust_accuracy")
        'linf · fgsm · ε=1/255 · robust accuracy'
        >>> metric_label("ece")
        'ece'
    """
    parts = [_EPS.sub(lambda m: f"ε={_as_255(m.group(1))}", p) for p in name.split("/")]
    return " · ".join(p.replace("_", " ") for p in parts)
