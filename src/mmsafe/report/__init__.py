"""The AuditCard: JSON, HTML, plots and CI gates."""

from mmsafe.report.card import (
    RUN_SECTIONS,
    SCHEMA_VERSION,
    build_card,
    card_schema,
    load_card,
    validate_card,
    without_run_sections,
)
from mmsafe.report.compare import Delta, compare_cards
from mmsafe.report.gates import Gate, GateOutcome, GateSyntaxError, evaluate_gates, parse_gate
from mmsafe.report.html import render_html, write_html
from mmsafe.report.plots import render_plot

__all__ = [
    "Delta",
    "compare_cards",
    "RUN_SECTIONS",
    "SCHEMA_VERSION",
    "Gate",
    "GateOutcome",
    "GateSyntaxError",
    "build_card",
    "card_schema",
    "evaluate_gates",
    "load_card",
    "parse_gate",
    "render_html",
    "render_plot",
    "validate_card",
    "without_run_sections",
    "write_html",
]
