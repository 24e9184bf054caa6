"""Render a card as one self-contained HTML page (inline SVG plots, no external assets).

The page leads with an overview (:mod:`mmsafe.report.overview`): a verdict per pillar, the top
findings with what to do, what was audited, the gates and, given a ``baseline`` card, the
before/after delta. Each check's details are collapsed below it, metric names are shown
readably (the ``card.json`` keys in a tooltip), long tables fold away and every plot has a
one-line caption on how to read it. A Content-Security-Policy meta tag forbids every script and
every request (images are inline ``data:`` URLs), and print styles drop the colours.

Jinja2 autoescaping is on, so every user-supplied string (class names, captions, paths, model
names) is HTML-escaped; plots are drawn by :mod:`mmsafe.report.plots`, which escapes its labels.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, Template, select_autoescape
from markupsafe import Markup

from mmsafe.checks.base import PILLARS
from mmsafe.engine.cache import atomic_write_text
from mmsafe.report.overview import metric_label, pillar_verdicts, top_findings
from mmsafe.report.plots import TABLE_ROWS_SHOWN, plot_caption, render_plot

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)
"""The page's Content-Security-Policy: no script, no request, inline styles and images only."""


def fmt(value: float | None) -> str:
    """Four significant digits, or an em dash for missing values.

    Example:
        >>> fmt(0.123456), fmt(None)
        ('0.1235', '—')
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.4g}"


def headline(check: Mapping[str, Any]) -> str:
    """The first two metrics of a check, readably named, for the summary lines.

    Example:
        >>> headline({"metrics": {"robust_accuracy": {"value": 0.5}, "x": {"value": None}}})
        'robust accuracy 0.5, x —'
    """
    items = list(check.get("metrics", {}).items())[:2]
    return ", ".join(f"{metric_label(k)} {fmt(v['value'])}" for k, v in items)


def _anchor(name: str) -> str:
    return "check-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _pillars(card: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    by: dict[str, list[str]] = {}
    for name, c in card["checks"].items():
        by.setdefault(c.get("pillar") or "other", []).append(name)
    order = [p for p in PILLARS if p in by] + sorted(p for p in by if p not in PILLARS)
    return [(p, by[p]) for p in order]


@functools.cache
def _template() -> Template:
    env = Environment(
        loader=PackageLoader("mmsafe.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    return env.get_template("card.html")


def _deltas(card: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> list[Any]:
    """The metrics that changed against ``baseline``, worsened first, then by size."""
    if baseline is None:
        return []
    from mmsafe.report.compare import compare_cards

    changed = [d for d in compare_cards(baseline, card) if d.delta != 0]
    rank = {False: 0, None: 1, True: 2}
    return sorted(changed, key=lambda d: (rank[d.improved], -abs(d.delta)))


def render_html(card: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """The card as an HTML string; with ``baseline`` (an earlier card) it shows the delta."""
    return _template().render(
        card=card,
        pillars=_pillars(card),
        verdicts=pillar_verdicts(card),
        top=top_findings(card, 10),
        deltas=_deltas(card, baseline),
        baseline=baseline,
        csp=CSP,
        fmt=fmt,
        headline=headline,
        anchor=_anchor,
        label=metric_label,
        shown=TABLE_ROWS_SHOWN,
        caption=plot_caption,
        plot=lambda spec: Markup(render_plot(spec)),  # noqa: S704 - render_plot escapes labels
    )


def write_html(
    card: Mapping[str, Any], path: str | Path, baseline: Mapping[str, Any] | None = None
) -> Path:
    """Render and write ``index.html`` atomically (with the delta against ``baseline``)."""
    return atomic_write_text(Path(path), render_html(card, baseline))
