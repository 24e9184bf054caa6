"""CI gates: ``--fail-on "<check>.<metric><op><value>"``.

A gate *fails* when its condition holds, e.g. ``calibration.ece>0.05`` fails when the ECE is
above 0.05. A gate naming a check or metric that is not in the card fails too, with a message
that lists what is there, so a typo never passes silently.

Gates read the card's ``checks`` section only, never its ``timings``: latency, throughput and
the like vary run to run, so a verdict on them would not be reproducible. A gate on a timing
metric fails and says so (measure latency with a benchmark instead; see
``docs/efficiency.md``).

Example:
    >>> g = parse_gate("calibration.ece>0.05")
    >>> (g.target, g.op, g.threshold)
    ('calibration.ece', '>', 0.05)
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_OPS = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_GATE = re.compile(
    r"^\s*(?P<target>[^<>=!]+?)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>[^<>=!]+?)\s*$"
)


class GateSyntaxError(ValueError):
    """A ``--fail-on`` expression that cannot be parsed."""


@dataclass(frozen=True)
class Gate:
    """One parsed ``--fail-on`` expression."""

    target: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.target}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class GateOutcome:
    """The verdict of one gate on one card."""

    gate: str
    failed: bool
    value: float | None
    message: str


def parse_gate(text: str) -> Gate:
    """Parse ``<check>.<metric><op><value>``; ``op`` is one of ``< <= > >= == !=``."""
    m = _GATE.match(text)
    if not m or "." not in m["target"]:
        raise GateSyntaxError(
            f"--fail-on {text!r} is not of the form '<check>.<metric><op><value>', e.g. "
            "'calibration.ece>0.05' or 'performance.accuracy<0.8'."
        )
    try:
        threshold = float(m["value"])
    except ValueError:
        raise GateSyntaxError(f"--fail-on {text!r}: {m['value']!r} is not a number.") from None
    if not math.isfinite(threshold):
        raise GateSyntaxError(
            f"--fail-on {text!r}: the threshold must be a finite number, not {m['value']!r} (a "
            "comparison with it never or always holds); write e.g. 'calibration.ece>0.05'."
        )
    return Gate(m["target"], m["op"], threshold)


def _split_target(target: str, checks: Mapping[str, Any]) -> tuple[str, str] | None:
    """Split ``check.metric`` at the longest check name that prefixes it (names contain dots).

    An alias (``calibration.ece``) stands for the check of the card it names that reports the
    metric (``monitoring.calibration.ece``; ``performance`` is the classification or the
    retrieval check, whichever ran).
    """
    from mmsafe.checks.registry import check_aliases

    aliases = {a: [n for n in ns if n in checks] for a, ns in check_aliases().items()}
    for name in sorted({*checks, *aliases}, key=len, reverse=True):
        if not target.startswith(name + "."):
            continue
        metric = target[len(name) + 1 :]
        if name in checks and metric in checks[name].get("metrics", {}):
            return name, metric
        for real in aliases.get(name, []):
            if metric in checks[real].get("metrics", {}):
                return real, metric
        if name in checks:
            return name, metric
        if aliases.get(name):
            return aliases[name][0], metric
    return None


def evaluate_gates(gates: Sequence[Gate], card: Mapping[str, Any]) -> list[GateOutcome]:
    """Evaluate every gate against a card's ``checks`` section (never its ``timings``)."""
    checks = card.get("checks", {})
    timed = card.get("timings", {}).get("checks", {})
    outcomes = []
    for gate in gates:
        split = _split_target(gate.target, checks)
        if split is None:
            outcomes.append(
                GateOutcome(
                    str(gate),
                    True,
                    None,
                    f"{gate}: no check in the card matches {gate.target!r} "
                    f"(checks: {', '.join(checks) or 'none'})",
                )
            )
            continue
        check, metric = split
        entry = checks[check]
        if entry.get("status") != "ok":
            outcomes.append(
                GateOutcome(
                    str(gate),
                    True,
                    None,
                    f"{gate}: check {check!r} is {entry.get('status')} "
                    f"({entry.get('reason') or 'no reason'}), so the gate cannot pass",
                )
            )
            continue
        value = entry.get("metrics", {}).get(metric, {}).get("value")
        if metric not in entry.get("metrics", {}) and metric in timed.get(check, {}).get(
            "metrics", {}
        ):
            outcomes.append(
                GateOutcome(
                    str(gate),
                    True,
                    None,
                    f"{gate}: {gate.target!r} is a timing (it varies run to run and lives in "
                    "the card's 'timings' section), and timings cannot be gated; gate on "
                    "what does not depend on the machine's load (e.g. parameters or FLOPs)",
                )
            )
            continue
        if metric not in entry.get("metrics", {}) or value is None or math.isnan(value):
            known = ", ".join(entry.get("metrics", {})) or "none"
            outcomes.append(
                GateOutcome(
                    str(gate),
                    True,
                    None,
                    f"{gate}: check {check!r} has no finite metric {metric!r} (metrics: {known})",
                )
            )
            continue
        failed = bool(_OPS[gate.op](value, gate.threshold))
        verdict = "FAILED" if failed else "passed"
        outcomes.append(
            GateOutcome(
                str(gate), failed, value, f"{gate}: {verdict} ({gate.target} = {value:.4g})"
            )
        )
    return outcomes
