"""Render a card as one self-contained HTML page (inline SVG plots, no external assets).

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
from mmsafe.report.plots import render_plot


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
    """The first two metrics of a check, for the summary table."""
    items = list(check.get("metrics", {}).items())[:2]
    return ", ".join(f"{k} {fmt(v['value'])}" for k, v in items)


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


def render_html(card: Mapping[str, Any]) -> str:
    """The card as an HTML string."""
    return _template().render(
        card=card,
        pillars=_pillars(card),
        fmt=fmt,
        headline=headline,
        anchor=_anchor,
        plot=lambda spec: Markup(render_plot(spec)),  # noqa: S704 - render_plot escapes labels
    )


def write_html(card: Mapping[str, Any], path: str | Path) -> Path:
    """Render and write ``index.html`` atomically."""
    return atomic_write_text(Path(path), render_html(card))
