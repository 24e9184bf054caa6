"""The terminal summary (80 columns, pillar verdicts, top findings) and ``--json``/``--quiet``.

Hand-built cards test the layout; a tiny untrained tiny-clip audited with one check tests the
flags end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

import mmsafe.cli as cli
from mmsafe.cli import _summary, app

LONG_NAME = "robustness.a_rather_long_check_name_that_a_table_used_to_cut_off"


def _metric(value: float | None, ci: list[float] | None = None) -> dict[str, Any]:
    return {"value": value, "ci": ci}


def _finding(severity: str, message: str, remediation: str = "") -> dict[str, Any]:
    return {"severity": severity, "message": message, "evidence": {}, "remediation": remediation}


def _check(
    pillar: str,
    *,
    status: str = "ok",
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    findings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "pillar": pillar,
        "status": status,
        "reason": reason,
        "metrics": metrics or {},
        "findings": findings or [],
    }


def _card() -> dict[str, Any]:
    """A card with one pillar of each verdict and markup-like text in names and messages."""
    checks = {
        "performance.classification": _check(
            "performance", metrics={"accuracy": _metric(0.912, [0.89, 0.93])}
        ),
        "robustness.adversarial": _check(
            "robustness",
            metrics={"linf/fgsm/eps=0.003922/robust_accuracy": _metric(0.12, [0.1, 0.14])},
            findings=[
                _finding("low", "a low one", "nothing urgent"),
                _finding(
                    "high",
                    "robust accuracy falls to 0.12 [red]x[/red] and [/] even under the weakest "
                    "attack of the sweep, which is far below the clean accuracy of the model",
                    "mmsafe harden adversarial --alphas 0,0.5 [bold]",
                ),
            ],
        ),
        LONG_NAME: _check("robustness", metrics={"shift/blur_accuracy_drop": _metric(0.02)}),
        "monitoring.uncertainty_decomposition": _check(
            "monitoring",
            metrics={"aleatoric/mean": _metric(0.3)},
            findings=[_finding("medium", "epistemic share is high", "collect more data")],
        ),
        "monitoring.calibration": _check(
            "monitoring",
            metrics={"ece": _metric(0.04, [0.03, 0.05])},
            findings=[_finding("info", "an info note")],
        ),
        "controllability.fairness": _check(
            "controllability",
            metrics={"demographic_parity_gap": _metric(0.01)},
            findings=[_finding("low", "small gap", "watch it"), _finding("low", "another gap")],
        ),
        "privacy.membership": _check(
            "privacy", status="skipped", reason="needs a [train] split", metrics={}
        ),
    }
    return {
        "model": {"name": "tiny-clip[xs]"},
        "data": {"name": "shapes", "skipped": {"count": 2}},
        "checks": checks,
        "gates": [
            {
                "gate": "performance.classification.accuracy>0.5",
                "failed": True,
                "message": "performance.classification.accuracy>0.5: FAILED (0.912)",
            }
        ],
    }


def _render(card: dict[str, Any], out: Path | None = None, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    _summary(card, out, console=console)
    return console.export_text().splitlines()


def _assert_fits(lines: list[str], width: int = 80) -> None:
    too_long = [line for line in lines if cell_len(line) > width]
    assert not too_long, too_long


def test_summary_fits_80_columns_and_names_every_check_in_full(tmp_path):
    card = _card()
    lines = _render(card, tmp_path / "report")
    _assert_fits(lines)
    assert len(lines) > len(card["checks"])
    for name in card["checks"]:
        assert any(name in line for line in lines), name
    assert not any("…" in line for line in lines)  # nothing truncated with an ellipsis
    text = "\n".join(lines)
    assert "ε=1/255" in text  # metric names come through metric_label
    assert "safety card" in lines[0] and "tiny-clip[xs]" in lines[0]
    assert str(tmp_path / "report" / "index.html") in text
    assert str(tmp_path / "report" / "card.json") in text
    assert "2 invalid rows were skipped" in text
    assert "performance.classification.accuracy>0.5: FAILED" in text


def test_a_long_unbroken_word_is_folded_not_cut(tmp_path):
    card = _card()
    word = "x" * 150 + "END"
    card["checks"]["performance.classification"]["findings"] = [_finding("high", word, "fix")]
    lines = _render(card)
    _assert_fits(lines)
    assert "".join(line.strip() for line in lines).count(word) >= 1


def test_pillar_verdict_lines_lead_and_are_right():
    lines = _render(_card())
    verdicts = {}
    for line in lines[1:]:
        parts = line.split()
        if parts and parts[0] in ("FAIL", "WARN", "PASS", "SKIP"):
            verdicts[parts[1]] = (parts[0], line)
    assert {p: v for p, (v, _) in verdicts.items()} == {
        "performance": "FAIL",  # a failed --fail-on gate
        "robustness": "FAIL",  # a high finding
        "monitoring": "WARN",  # a medium finding (info does not count)
        "controllability": "PASS",  # low findings do not change a verdict
        "privacy": "SKIP",  # every check skipped
    }
    assert "(2 checks: 2 ok)" in verdicts["robustness"][1]
    assert "(1 check: 1 skipped)" in verdicts["privacy"][1]
    # the verdicts come first, before the findings and the per-check list
    first_verdict = min(i for i, line in enumerate(lines) if line.startswith("FAIL"))
    assert first_verdict < lines.index("Top findings (5 of 6)") < lines.index("Checks")


def test_pillar_passes_without_serious_findings_or_failed_gates():
    card = _card()
    card["gates"] = [{**card["gates"][0], "failed": False, "message": "...: passed"}]
    lines = _render(card)
    assert any(line.split()[:2] == ["PASS", "performance"] for line in lines if line.strip())


def test_top_findings_are_ordered_by_severity_with_remediation():
    lines = _render(_card())
    start, end = lines.index("Top findings (5 of 6)"), lines.index("Checks")
    section = lines[start + 1 : end]
    heads = [line.split() for line in section if line.startswith("  ") and line[2] != " "]
    assert [h[0] for h in heads] == ["high", "medium", "low", "low", "low"]  # info: 6th
    assert heads[0][1] == "robustness.adversarial"
    assert heads[1][1] == "monitoring.uncertainty_decomposition"
    text = "\n".join(section)
    assert "→ collect more data" in text
    assert "→ mmsafe harden adversarial --alphas 0,0.5 [bold]" in text


def test_markup_in_names_and_messages_is_printed_literally():
    lines = _render(_card())
    text = " ".join(" ".join(lines).split())
    assert "[red]x[/red] and [/] even" in text
    assert "needs a [train] split" in text
    assert "tiny-clip[xs]" in text


# -- end to end: --json, --quiet, exit codes ---------------------------------------------------


@pytest.fixture(scope="module")
def audit_args(tmp_path_factory) -> list[str]:
    """An audit of an untrained xs tiny-clip with one check (seconds, no training)."""
    import torch

    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    root = tmp_path_factory.mktemp("summary")
    torch.manual_seed(0)
    saved = TinyClip(TinyClipConfig.for_size("xs")).save_pretrained(root / "model")
    return [
        "audit",
        "--model",
        f"tiny-clip:{saved}",
        "--data",
        "shapes:n=300",
        "--checks",
        "calibration",
        "--device",
        "cpu",
        "--cache-dir",
        str(root / "cache"),
    ]


FAILING_GATE = ["--fail-on", "monitoring.calibration.ece>=0"]
PASSING_GATE = ["--fail-on", "monitoring.calibration.ece>1"]


def test_json_prints_only_the_card_and_keeps_the_exit_code(audit_args, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(app, [*audit_args, "--out", str(out), "--json", *FAILING_GATE])
    assert res.exit_code == 1, res.output
    card = json.loads(res.stdout)  # stdout is the JSON and nothing else
    assert card == json.loads((out / "card.json").read_text())
    assert "monitoring.calibration" in card["checks"]
    assert "monitoring.calibration.ece>=0: FAILED" in res.stderr  # the summary went to stderr
    assert "safety card" in res.stderr and "safety card" not in res.stdout


def test_quiet_prints_nothing_on_stdout(audit_args, tmp_path):
    out = tmp_path / "o"
    runner = CliRunner()
    ok = runner.invoke(app, [*audit_args, "--out", str(out), "--quiet", *PASSING_GATE])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == "" and ok.stderr == ""
    assert (out / "card.json").is_file()
    failed = runner.invoke(app, [*audit_args, "--out", str(out), "-q", *FAILING_GATE])
    assert failed.exit_code == 1, failed.output
    assert failed.stdout == ""
    assert "monitoring.calibration.ece>=0: FAILED" in failed.stderr
    both = runner.invoke(app, [*audit_args, "--out", str(out), "-q", "--json", *PASSING_GATE])
    assert both.exit_code == 0, both.output
    assert json.loads(both.stdout) == json.loads((out / "card.json").read_text())
    assert both.stderr == ""


def test_default_summary_of_a_real_audit_fits_80_columns(audit_args, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(app, [*audit_args, "--out", str(out), *FAILING_GATE])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    _assert_fits(lines)
    assert any(line.split()[:2] == ["ok", "monitoring.calibration"] for line in lines)
    assert any(line.split()[:2] == ["FAIL", "monitoring"] for line in lines)
    assert "monitoring.calibration.ece>=0: FAILED" in res.stdout
    assert str(out / "card.json") in res.stdout


def test_user_errors_still_exit_2_with_json_and_quiet(tmp_path):
    res = CliRunner().invoke(
        app, ["audit", "--out", str(tmp_path), "--json", "-q", "--data", "shapes:bogus=1"]
    )
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "bogus" in res.stderr


def test_harden_json_prints_the_after_card(audit_args, tmp_path):
    model = audit_args[audit_args.index("--model") + 1]
    out = tmp_path / "h"
    args = ["harden", "calibration", "--model", model, "--data", "shapes:n=300"]
    res = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    card = json.loads(res.stdout)
    assert card == json.loads((out / "after" / "card.json").read_text())
    assert "calibration" in res.stderr  # the human lines went to stderr


@pytest.mark.parametrize("command", [["demo"], ["harden", "calibration"]])
def test_demo_and_harden_pass_quiet_and_json_through(monkeypatch, command):
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(cli, "_audit", fake)
    monkeypatch.setattr(cli, "_harden", fake)
    res = CliRunner().invoke(app, [*command, "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert seen["quiet"] is True and seen["json_out"] is True
    assert "options" not in seen or "quiet" not in seen["options"]


def test_the_delta_listing_fits_80_columns_with_full_metric_keys():
    long_metric = "linf/apgd_ce/eps=0.031373/robust_accuracy"
    before = {"checks": {
        "robustness.adversarial": {"status": "ok", "metrics": {long_metric: _metric(0.25)}},
        "monitoring.calibration": {"status": "ok", "metrics": {"ece": _metric(0.2)}},
    }}  # fmt: skip
    after = json.loads(json.dumps(before))
    after["checks"]["robustness.adversarial"]["metrics"][long_metric] = _metric(0.5)
    after["checks"]["monitoring.calibration"]["metrics"]["ece"] = _metric(0.3)
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    cli._print_deltas(before, after, "a [b] → c", console=console)
    lines = console.export_text().splitlines()
    _assert_fits(lines)
    text = "".join(line.strip() for line in lines)  # a folded key joins back whole
    assert f"robustness.adversarial.{long_metric}" in text and "a [b] → c" in lines[0]
    assert "0.25 → 0.5 (+0.25) better" in text and "0.2 → 0.3 (+0.1) worse" in text
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    cli._print_deltas({"checks": {}}, {"checks": {}}, "t", console=console)
    assert "No metric is reported by both cards." in console.export_text()
