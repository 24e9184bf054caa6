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


# ------------------------------------------------------------------ the overview (issue 17)
def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every start tag of the page and its attributes, as a browser's parser sees them."""
    from html.parser import HTMLParser

    seen: list[tuple[str, dict[str, str | None]]] = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            seen.append((tag, dict(attrs)))

    P().feed(html)
    return seen


def _overview_card():
    finding = lambda sev, msg: {  # noqa: E731
        "severity": sev,
        "message": msg,
        "evidence": {},
        "remediation": f"fix {msg}",
    }
    card = _card(**{
        "robustness.adversarial": {**_check(**{"linf/fgsm/eps=0.003922/robust_accuracy": 0.4}),
                                   "pillar": "robustness",
                                   "findings": [finding("medium", "fgsm hurts")]},
        "monitoring.calibration": {**_check(ece=0.2), "findings": [finding("low", "a bit off")]},
        "monitoring.ood": _check(auroc=0.7),
        "alignment.jailbreak": {**_check("skipped"), "pillar": "alignment"},
        "controllability.privacy": {**_check(auc=0.9), "pillar": "controllability",
                                    "findings": [finding("high", "members leak")]},
    })  # fmt: skip
    card["gates"] = [{"gate": "monitoring.ood.auroc<0.8", "failed": True, "value": 0.7,
                      "message": "monitoring.ood.auroc<0.8: FAILED (0.7)"}]  # fmt: skip
    return card


def test_overview_leads_with_verdicts_top_findings_and_every_check():
    html = render_html(_overview_card())
    overview = html[html.index('id="overview"') : html.index('id="pillar-')]
    verdicts = re.findall(r'class="verdict v-(\w+)">\w+</span></td>\s*<td><a href="#pillar-(\w+)"',
                          overview)  # fmt: skip
    assert verdicts == [("warn", "robustness"), ("skipped", "alignment"), ("fail", "monitoring"),
                        ("fail", "controllability")]  # fmt: skip
    for name in _overview_card()["checks"]:
        assert f'href="#check-{name.replace(".", "-")}"' in overview, name
    # top findings: high before medium before low, each with its remediation
    top = overview[overview.index("Top findings") :]
    order = [top.index(m) for m in ("members leak", "fgsm hurts", "a bit off")]
    assert order == sorted(order) and "What to do: fix members leak" in overview
    assert overview.index("Top findings") < html.index('id="pillar-')
    assert "monitoring.ood.auroc&lt;0.8: FAILED" in overview  # the gate is the reason


def test_check_details_are_collapsed_with_readable_metric_names():
    card = _overview_card()
    card["checks"]["monitoring.ood"]["metrics"] = {
        f"m{i}": {"value": i / 10, "ci": None} for i in range(20)
    }
    card["checks"]["monitoring.ood"]["plots"] = {
        "t": {"kind": "table", "columns": ["a"], "rows": [[i] for i in range(40)]},
        "b": {"kind": "bar", "labels": ["x"], "values": [0.5], "caption": "read me like this"},
    }
    html = render_html(card)
    tags = _tags(html)
    details = [a.get("id") for t, a in tags if t == "details" and "check" in (a.get("class") or "")]
    assert set(card["checks"]) <= {d.removeprefix("check-").replace("-", ".") for d in details
                                   if d}  # fmt: skip
    assert not any("open" in a for t, a in tags if t == "details")  # all collapsed
    assert "ε=1/255" in html and 'title="linf/fgsm/eps=0.003922/robust_accuracy"' in html
    assert "5 more metrics" in html and "25 more rows" in html
    figures = html.count("<figure>") - html.count('class="gallery"')
    assert figures == html.count("<figcaption>") >= 2 and "read me like this" in html


def test_the_page_is_self_contained_with_a_csp_and_no_live_content():
    evil = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    card = _overview_card()
    card["checks"]["monitoring.ood"]["findings"] = [
        {"severity": "high", "message": evil, "evidence": {}, "remediation": evil}
    ]
    card["checks"]["monitoring.ood"]["plots"] = {
        "g": {"kind": "images", "title": evil, "items": [{"png": "iVBO", "caption": evil}]}
    }
    html = render_html(card)
    tags = _tags(html)
    assert not [t for t, _ in tags if t in ("script", "iframe", "object", "embed", "link")]
    assert not [a for _, a in tags if any(k.startswith("on") for k in a)]
    urls = [v for _, a in tags for k, v in a.items() if k in ("src", "href") and v]
    assert urls and all(u.startswith(("#", "data:image/png;base64,")) for u in urls), urls
    (csp,) = [a["content"] for t, a in tags if a.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "@media print" in html


def test_a_baseline_card_adds_the_before_after_delta():
    before = _overview_card()
    after = _overview_card()
    after["checks"]["monitoring.calibration"]["metrics"]["ece"]["value"] = 0.05  # better
    after["checks"]["monitoring.ood"]["metrics"]["auroc"]["value"] = 0.6  # worse
    html = render_html(after, baseline=before)
    text = " ".join(re.sub(r"<[^>]+>", "", html).split())
    assert "Before and after" in html and "2 metrics changed (1 better, 1 worse)" in text
    rows = re.findall(r'<td title="([^"]+)">.*?class="num (better|worse)"', html, re.S)
    assert rows[:2] == [("monitoring.ood.auroc", "worse"), ("monitoring.calibration.ece", "better")]
    assert "Before and after" not in render_html(after)


def test_pillar_reasons_lead_with_the_worst_cause():
    from mmsafe.report.overview import pillar_verdicts

    f = lambda sev, m: {"severity": sev, "message": m, "evidence": {}, "remediation": ""}  # noqa: E731
    card = _card(**{
        "monitoring.a": {**_check(x=1.0), "findings": [f("medium", "med"), f("low", "low")]},
        "monitoring.b": {**_check("failed"), "reason": "boom"},
        "monitoring.c": {**_check(x=1.0), "findings": [f("high", "hi")]},
    })  # fmt: skip
    (v,) = pillar_verdicts(card)
    assert v.verdict == "fail" and v.reasons == (
        "monitoring.c: hi", "monitoring.a: med", "monitoring.b crashed: boom"
    )  # fmt: skip
    card["checks"].pop("monitoring.c")
    assert pillar_verdicts(card)[0].verdict == "warn"
    card["checks"]["monitoring.a"]["findings"] = [f("low", "low")]
    card["checks"].pop("monitoring.b")
    assert pillar_verdicts(card)[0].verdict == "pass"
