from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from mmsafe.audit import run_audit
from mmsafe.checks import (
    CalibrationCheck,
    CheckResult,
    PerformanceCheck,
    list_checks,
    select_checks,
)
from mmsafe.checks.base import AuditContext
from mmsafe.engine import Engine
from mmsafe.report import card_schema, parse_gate
from mmsafe.tasks import ZeroShotTask
from tests.conftest import make_colour_data

PERFORMANCE = ["performance.classification", "performance.ranking", "performance.retrieval"]
"""What the old name ``performance`` selects (skipped where the task or kind does not fit)."""


def test_card_validates_and_numbers_match_references(toy_model, colour_data, tmp_path):
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="all")
    card = json.loads((tmp_path / "card.json").read_text())
    import jsonschema

    jsonschema.validate(card, card_schema())
    assert set(card["checks"]) == set(list_checks())
    test = colour_data.split("test")
    preds = result.results["performance.classification"]  # the audit evaluates the test split
    engine = Engine(progress=False)
    task = ZeroShotTask()
    task.prepare(toy_model, engine, colour_data.classes)
    ref = accuracy_score(test.labels, engine.outputs(toy_model, task, test).preds)
    assert preds.metrics["accuracy"].value == pytest.approx(ref)
    lo, hi = preds.metrics["accuracy"].ci
    assert lo <= ref <= hi
    assert card["data"]["n_evaluated"] == len(test)
    assert "<svg" in (tmp_path / "index.html").read_text()
    # schema 2.0: what varies run to run is in `timings` / `environment`, not in `checks`
    assert card["schema_version"] == "2.1" and "created" not in card
    assert all("seconds" not in c for c in card["checks"].values())
    timings = card["timings"]
    assert list(timings["seconds"]) == list(card["checks"]) and timings["reused"] == []
    assert timings["total_seconds"] >= sum(timings["seconds"].values()) > 0
    profile = card["checks"]["efficiency.profile"]
    assert "params_total" in profile["metrics"]
    assert not any("latency" in m or "throughput" in m for m in profile["metrics"])
    assert not any("atency" in f["message"] for f in profile["findings"])
    timed = timings["checks"]["efficiency.profile"]
    assert "image/bs1/latency_p50_ms" in timed["metrics"] and "latency" in timed["plots"]
    assert any("wall-clock" in f["message"] for f in timed["findings"])
    assert set(timings["checks"]) == {"efficiency.profile"}  # the only check that times itself
    assert card["environment"]["threads"] >= 1 and card["environment"]["device"] == "cpu"


def test_resume_skips_finished_checks(toy_model, colour_data, tmp_path, monkeypatch):
    calls: list[str] = []
    original_perf, original_cal = PerformanceCheck.run, CalibrationCheck.run

    def perf(self, ctx):
        calls.append("performance")
        return original_perf(self, ctx)

    def interrupted(self, ctx):
        calls.append("calibration")
        raise KeyboardInterrupt

    monkeypatch.setattr(PerformanceCheck, "run", perf)
    monkeypatch.setattr(CalibrationCheck, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_audit(toy_model, colour_data, out=tmp_path, checks="performance,calibration")
    assert calls == ["performance", "calibration"]
    assert not (tmp_path / "card.json").exists()

    def cal(self, ctx):
        calls.append("calibration")
        return original_cal(self, ctx)

    monkeypatch.setattr(CalibrationCheck, "run", cal)
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="performance,calibration")
    assert calls == ["performance", "calibration", "calibration"]
    assert result.resumed == PERFORMANCE
    assert result.results["performance.classification"].status == "ok"
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["timings"]["reused"] == PERFORMANCE
    assert (
        card["timings"]["seconds"]["performance.classification"] > 0
    )  # the interrupted run's time, kept

    # a run killed mid-write leaves temporary files; the next run removes them
    leftovers = [tmp_path / ".card.json.k1x2.tmp", tmp_path / ".mmsafe/checks/.a.json.k3y4.tmp"]
    for p in leftovers:
        p.write_text("{partial")
    run_audit(toy_model, colour_data, out=tmp_path, checks="performance")
    assert not any(p.exists() for p in leftovers)
    assert not list(tmp_path.rglob("*.tmp"))

    # a different seed is a different audit: nothing is reused
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="performance", seed=1)
    assert result.resumed == []
    # the same audit is reused ... unless mmsafe's code changed since
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="performance", seed=1)
    assert result.resumed == PERFORMANCE
    import mmsafe.audit

    monkeypatch.setattr(mmsafe.audit, "code_digest", lambda: "other code")
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="performance", seed=1)
    assert result.resumed == []


def test_a_crashing_check_is_recorded_and_logged(toy_model, colour_data, tmp_path, monkeypatch):
    def boom(self, ctx):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(CalibrationCheck, "run", boom)
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="all")
    assert result.results["monitoring.calibration"].status == "failed"
    assert "kaboom" in result.results["monitoring.calibration"].reason
    assert result.results["performance.classification"].status == "ok"
    assert "RuntimeError: kaboom" in (tmp_path / "mmsafe.log").read_text()
    assert result.exit_code == 3


def test_gates_set_the_exit_code(toy_model, colour_data):
    ok = run_audit(toy_model, colour_data, gates=[parse_gate("performance.accuracy<0.1")])
    assert ok.exit_code == 0 and not ok.gates[0].failed
    bad = run_audit(toy_model, colour_data, gates=[parse_gate("performance.accuracy>0.1")])
    assert bad.exit_code == 1 and bad.gates[0].failed
    assert bad.card["gates"][0]["failed"] is True


def test_unlabelled_data_skips_label_checks_with_reason(toy_model):
    data = make_colour_data()
    data.labels = np.full(len(data), -1)
    result = run_audit(toy_model, data, task="retrieval", checks="all")
    assert result.results["monitoring.calibration"].status == "skipped"
    assert "zero_shot" in result.results["monitoring.calibration"].reason
    assert result.results["performance.classification"].status == "skipped"
    perf = result.results["performance.retrieval"]
    assert perf.status == "ok" and "i2t_R@1" in perf.metrics


def test_label_check_says_needs_labels(toy_model, colour_data):
    engine = Engine(progress=False)
    task = ZeroShotTask()
    task.prepare(toy_model, engine, colour_data.classes)
    data = colour_data.subset(range(20))
    out = engine.outputs(toy_model, task, data)
    data.labels[:] = -1
    ctx = AuditContext(toy_model, task, data, out, engine)
    assert CalibrationCheck().skip_reason(ctx) == "needs labels"


@pytest.mark.parametrize("name", ["monitoring.calibration", "efficiency.profile"])
def test_check_result_round_trips_through_json(toy_model, colour_data, name):
    result = run_audit(toy_model, colour_data, checks=name).results[name]
    saved = json.loads(json.dumps({"r": result.to_dict(), "t": result.timings_dict()}))
    again = CheckResult.from_dict(name, saved["r"], saved["t"])
    assert again.to_dict() == result.to_dict()
    assert again.timings_dict() == result.timings_dict() and again.seconds > 0
    assert bool(result.timings) == (name == "efficiency.profile")


def test_glob_selection():
    assert select_checks("all") == list_checks()
    assert select_checks("calib*,performance") == [
        "monitoring.calibration",
        *PERFORMANCE,
    ]
    from mmsafe.checks import CheckSelectionError

    with pytest.raises(CheckSelectionError, match="Known checks"):
        select_checks("nosuchpillar.*")


def test_html_escapes_a_caption_containing_script(toy_model, tmp_path):
    data = make_colour_data(n=150)
    evil = "<script>alert('x')</script>"
    data.modalities["text"] = [f"{evil} {t}" for t in data.modalities["text"]]
    data.labels[::4] = (data.labels[::4] + 1) % 3  # label noise: confident errors exist
    result = run_audit(toy_model, data, out=tmp_path, checks="performance")
    table = result.results["performance.classification"].plots["confident_errors"]
    assert table["rows"] and all(evil in row[1] for row in table["rows"])
    html = (tmp_path / "index.html").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    # the most confident error comes first
    confidences = [row[-1] for row in table["rows"]]
    assert confidences == sorted(confidences, reverse=True)


def test_undefined_numbers_in_findings_and_plots_become_null(
    toy_model, colour_data, tmp_path, monkeypatch
):
    """A NaN in a finding's evidence or a plot series is written as null, never a crash."""
    from mmsafe.checks.base import Finding

    original = CalibrationCheck.run

    def with_nan(self, ctx):
        result = original(self, ctx)
        nan = Finding("info", "an undefined ratio", {"ratio": float("nan"), "n": 0})
        plot = {"kind": "line", "series": [{"x": [0.0, 1.0], "y": [float("inf"), 0.5]}]}
        return dataclasses.replace(
            result, findings=(*result.findings, nan), plots={**result.plots, "p": plot}
        )

    monkeypatch.setattr(CalibrationCheck, "run", with_nan)
    result = run_audit(toy_model, colour_data, out=tmp_path, checks="calibration")
    card = json.loads((tmp_path / "card.json").read_text())
    entry = card["checks"]["monitoring.calibration"]
    assert {"ratio": None, "n": 0} in [f["evidence"] for f in entry["findings"]]
    assert entry["plots"]["p"]["series"][0]["y"] == [None, 0.5]
    assert result.exit_code == 0
    resumed = run_audit(toy_model, colour_data, out=tmp_path, checks="calibration")
    assert resumed.resumed == ["monitoring.calibration"]
    assert resumed.card["checks"] == card["checks"]
