from __future__ import annotations

import re

import jsonschema
import pytest

from mmsafe.report import (
    GateSyntaxError,
    card_schema,
    evaluate_gates,
    parse_gate,
    render_html,
    render_plot,
)


def _card(**checks):
    return {
        "schema_version": "2.0",
        "model": {"name": "m", "fingerprint": "f", "config": {}, "parameters": 1},
        "data": {
            "name": "d",
            "source": "s",
            "fingerprint": "f",
            "n_rows": 1,
            "n_evaluated": 1,
            "splits": {},
            "modalities": [],
            "classes": [],
            "skipped": {"count": 0, "rows": []},
        },
        "task": {"name": "zero_shot"},
        "seed": 0,
        "checks": checks,
        "gates": [],
        "timings": {
            "created": "2026-11-22T00:00:00+00:00",
            "total_seconds": 1.5,
            "seconds": {name: 0.5 for name in checks},
            "reused": [],
            "checks": {},
        },
        "environment": {
            "mmsafe": "0",
            "python": "3",
            "platform": "p",
            "torch": "2",
            "numpy": "1",
            "device": "cpu",
            "threads": 2,
        },
    }


def _timed(card, check, findings=(), **metrics):
    """Give ``check`` timing metrics (and findings) in the card's ``timings`` section."""
    card["timings"]["checks"][check] = {
        "metrics": {k: {"value": v, "ci": None} for k, v in metrics.items()},
        "findings": list(findings),
        "plots": {},
    }
    return card


def _check(status="ok", **metrics):
    return {
        "status": status,
        "reason": None if status == "ok" else "needs labels",
        "pillar": "monitoring",
        "metrics": {k: {"value": v, "ci": None} for k, v in metrics.items()},
        "findings": [],
        "plots": {},
    }


@pytest.mark.parametrize(
    ("expr", "value", "failed"),
    [
        ("calibration.ece>0.05", 0.06, True),
        ("calibration.ece>0.05", 0.05, False),
        ("calibration.ece>=0.05", 0.05, True),
        ("calibration.ece<0.05", 0.01, True),
        ("calibration.ece<=0.01", 0.02, False),
        ("calibration.ece==0.5", 0.5, True),
        ("calibration.ece!=0.5", 0.5, False),
    ],
)
def test_gate_operators(expr, value, failed):
    (outcome,) = evaluate_gates([parse_gate(expr)], _card(calibration=_check(ece=value)))
    assert outcome.failed is failed and outcome.value == value


def test_gate_with_dotted_check_name_and_slash_metric():
    card = _card(**{"monitoring.ood": _check(**{"auroc": 0.7, "class_accuracy/a b": 0.2})})
    (o1, o2) = evaluate_gates(
        [
            parse_gate("monitoring.ood.auroc<0.8"),
            parse_gate("monitoring.ood.class_accuracy/a b<0.5"),
        ],
        card,
    )
    assert o1.failed and o2.failed


@pytest.mark.parametrize(
    ("expr", "needle"),
    [("nope.ece>0", "no check"), ("calibration.xyz>0", "no finite metric")],
)
def test_gate_on_missing_target_fails_loudly(expr, needle):
    (outcome,) = evaluate_gates([parse_gate(expr)], _card(calibration=_check(ece=0.1)))
    assert outcome.failed and needle in outcome.message


def test_gate_on_skipped_check_fails():
    (outcome,) = evaluate_gates(
        [parse_gate("calibration.ece>0.5")], _card(calibration=_check("skipped"))
    )
    assert outcome.failed and "skipped" in outcome.message


@pytest.mark.parametrize("bad", ["ece>0.05", "calibration.ece>>1", "calibration.ece>abc", "x"])
def test_bad_gate_syntax(bad):
    with pytest.raises(GateSyntaxError):
        parse_gate(bad)


def test_schema_accepts_a_minimal_card_and_rejects_a_bad_status():
    card = _card(calibration=_check(ece=0.1))
    jsonschema.validate(card, card_schema())
    card["checks"]["calibration"]["status"] = "great"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(card, card_schema())


def test_schema_2_keeps_run_to_run_values_out_of_checks():
    card = _timed(_card(**{"efficiency.profile": _check()}), "efficiency.profile", p50_ms=3.0)
    card["engine"] = {  # an optional section: the engine's pass accounting
        "modalities": {
            "image": {"rows_encoded": 4, "distinct_row_variants": 4, "duplication": 1.0}
        },
        "duplication": 1.0,
    }
    jsonschema.validate(card, card_schema())
    for bad in ("seconds", "timings", "environment", "old_version"):
        broken = _card(calibration=_check(ece=0.1))
        if bad == "seconds":  # schema 1.0 kept per-check seconds inside the check entry
            broken["checks"]["calibration"]["seconds"] = 0.5
        elif bad == "old_version":
            broken["schema_version"] = "1.0"
        else:
            del broken[bad]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, card_schema())
    broken = _timed(_card(x=_check()), "x", p50_ms=3.0)
    broken["timings"]["checks"]["x"]["metrics"]["p50_ms"] = {"value": "fast", "ci": None}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, card_schema())


def test_a_gate_on_a_timing_fails_and_says_timings_cannot_be_gated():
    card = _timed(
        _card(**{"efficiency.profile": _check(params_total=10.0)}),
        "efficiency.profile",
        **{"image/bs1/latency_p50_ms": 3.0},
    )
    timing, real = evaluate_gates(
        [
            parse_gate("efficiency.profile.image/bs1/latency_p50_ms>1000"),  # would pass
            parse_gate("efficiency.profile.params_total>5"),
        ],
        card,
    )
    assert timing.failed and timing.value is None
    assert "timing" in timing.message and "cannot be gated" in timing.message
    assert real.failed and real.value == 10.0  # metrics outside timings are gated as before


def test_compare_cards_ignores_timings():
    from mmsafe.report import compare_cards

    before = _timed(_card(p=_check(params=1.0)), "p", latency_ms=1.0)
    after = _timed(_card(p=_check(params=2.0)), "p", latency_ms=9.0)
    assert [d.metric for d in compare_cards(before, after)] == ["p.params"]


def test_html_shows_timings_in_their_own_section():
    finding = {"severity": "low", "message": "Latency is unstable", "evidence": {}}
    card = _timed(
        _card(**{"efficiency.profile": _check(params_total=7.0)}),
        "efficiency.profile",
        [{**finding, "remediation": "re-measure"}],
        **{"image/bs1/latency_p50_ms": 3.25},
    )
    card["timings"]["reused"] = ["efficiency.profile"]
    html = render_html(card)
    results, timings = html.split('<h2 id="timings">Timings</h2>')
    assert "params_total" in results and "latency_p50_ms" not in results
    assert "Latency is unstable" not in results
    assert "image/bs1/latency_p50_ms" in timings and "3.25" in timings
    assert "Latency is unstable" in timings and "reused from an interrupted run" in timings
    assert "2026-11-22T00:00:00+00:00" in html


def test_html_escapes_every_user_string():
    evil = "<script>alert(1)</script>"
    card = _card(**{"calibration": _check(ece=0.1)})
    card["data"]["classes"] = [evil]
    card["data"]["source"] = evil
    card["model"]["name"] = evil
    card["checks"]["calibration"]["findings"] = [
        {"severity": "high", "message": evil, "evidence": {}, "remediation": evil}
    ]
    card["checks"]["calibration"]["plots"] = {
        "p": {"kind": "bar", "title": evil, "labels": [evil], "values": [0.5]}
    }
    card["data"]["skipped"] = {
        "count": 1,
        "rows": [{"row": 3, "id": evil, "field": "text", "reason": evil}],
    }
    _timed(card, evil, [{"severity": "low", "message": evil, "evidence": {}, "remediation": ""}])
    card["timings"]["seconds"][evil] = 1.0
    html = render_html(card)
    assert "<script>" not in html
    assert html.count("&lt;script&gt;") >= 11


@pytest.mark.parametrize(
    "spec",
    [
        {
            "kind": "reliability",
            "bin_edges": [0, 0.5, 1],
            "confidence": [0.3, None],
            "accuracy": [0.2, None],
            "count": [4, 0],
        },
        {"kind": "bar", "labels": ["a", "b"], "values": [0.1, None], "reference": 0.5},
        {"kind": "heatmap", "rows": ["r"], "columns": ["c1", "c2"], "values": [[0.1, 0.9]]},
        {"kind": "line", "series": [{"name": "s", "x": [0, 1], "y": [0.2, 0.4]}]},
        {"kind": "unknown"},
    ],
)
def test_plots_render_valid_svg(spec):
    svg = render_plot(spec)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "nan" not in re.sub(r"<title>.*?</title>", "", svg).lower()


def test_reliability_bars_stand_on_the_axis():
    svg = render_plot(
        {
            "kind": "reliability",
            "bin_edges": [0, 0.5, 1],
            "confidence": [0.25, 0.75],
            "accuracy": [0.5, 1.0],
            "count": [1, 1],
        }
    )
    bars = re.findall(
        r'<rect x="[^"]+" y="([^"]+)" width="[^"]+" height="([^"]+)" fill="#3465a4" '
        r'opacity="0.8"',
        svg,
    )
    assert len(bars) == 2
    baselines = {round(float(y) + float(h), 1) for y, h in bars}
    assert len(baselines) == 1  # every bar ends on the x axis
    (y_half, h_half), (y_full, h_full) = ((float(y), float(h)) for y, h in bars)
    assert h_full == pytest.approx(2 * h_half)


def test_compare_cards_uses_declared_directions():
    from mmsafe.report import compare_cards

    before = _card(
        calibration=_check(ece=0.2, mean_confidence=0.9), performance=_check(accuracy=0.8)
    )
    after = _card(
        calibration=_check(ece=0.05, mean_confidence=0.8),
        performance=_check(accuracy=0.7),
        other=_check(x=1.0),
    )
    deltas = {d.metric: d for d in compare_cards(before, after)}
    assert deltas["calibration.ece"].improved is True
    assert deltas["calibration.ece"].delta == pytest.approx(-0.15)
    assert deltas["performance.accuracy"].improved is False
    assert deltas["calibration.mean_confidence"].improved is None  # no declared direction
    assert "other.x" not in deltas  # only in one card
    skipped = _card(calibration=_check("skipped"))
    assert compare_cards(before, skipped) == []


def test_compare_command(tmp_path):
    import json

    from typer.testing import CliRunner

    from mmsafe.cli import app

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "card.json").write_text(json.dumps(_card(calibration=_check(ece=0.2))))
    (tmp_path / "b" / "card.json").write_text(json.dumps(_card(calibration=_check(ece=0.1))))
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert (
        result.exit_code == 0 and "calibration.ece" in result.output and "better" in result.output
    )
    missing = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "zzz")])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_image_gallery_embeds_only_base64_png_and_escapes_captions():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from mmsafe.report.plots import images_html, png_base64

    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    encoded = png_base64(pixels, scale=2)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
    assert decoded.shape == (4, 6, 3) and np.array_equal(decoded[::2, ::2], pixels)
    html = images_html(
        {
            "title": "<t>",
            "items": [
                {"png": encoded, "caption": "<script>x</script>"},
                {"png": '"><script>alert(1)</script>', "caption": "bad"},
            ],
        }
    )
    assert f"data:image/png;base64,{encoded}" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<img") == 1 and "(invalid image)" in html


def test_token_highlights_escape_every_string_and_colour_by_sign():
    from mmsafe.report.plots import render_plot

    evil = "<script>alert(1)</script>"
    spec = {
        "kind": "tokens",
        "title": evil,
        "items": [
            {"caption": evil, "tokens": [evil, '"quoted"', "ok"], "scores": [2.0, -1.0, None]},
            {"caption": "empty", "tokens": [], "scores": []},
        ],
    }
    html = render_plot(spec)
    assert "<script>" not in html and html.count("&lt;script&gt;") == 3
    assert "&quot;quoted&quot;" in html
    assert "rgba(204,51,51,0.80)" in html and "rgba(52,101,164,0.40)" in html
    assert html.count("<span") == 3 and "nan" not in html
