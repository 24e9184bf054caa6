"""End-to-end CLI tests: the quick demo (tiny-clip on a small shapes world), gates, user errors.

The quick demo trains tiny-clip once per session into a session cache; later tests reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsafe.cli import QUICK_WORLD, app
from mmsafe.report import card_schema

runner = CliRunner()


@pytest.fixture(scope="session")
def cache_dir(mmsafe_cache) -> Path:
    return mmsafe_cache


@pytest.fixture(scope="session")
def demo_out(cache_dir, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("demo")
    result = runner.invoke(
        app,
        ["demo", "--quick", "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu"],
    )
    return out, result


def _mmsafe(*args: str, cache_dir: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMSAFE_CACHE_DIR": str(cache_dir), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "mmsafe", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.slow
def test_quick_demo_writes_a_valid_card_with_real_accuracy(demo_out):
    out, result = demo_out
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    jsonschema.validate(card, card_schema())
    assert card["data"]["source"].startswith("shapes")
    assert {"performance.classification", "monitoring.calibration"} <= set(card["checks"])
    acc = card["checks"]["performance.classification"]["metrics"]["accuracy"]["value"]
    assert acc > 0.5  # 5 classes: chance is 0.2
    html = (out / "index.html").read_text()
    assert "Reliability diagram" in html and "<svg" in html
    assert "safety card" in result.output  # the terminal summary table


@pytest.mark.slow
def test_fail_on_sets_exit_code_and_names_the_gate(demo_out, cache_dir, tmp_path):
    out, _ = demo_out
    args = ["audit", "--data", QUICK_WORLD, "--quick", "--out", str(out), "--device", "cpu"]
    args += ["--cache-dir", str(cache_dir)]
    failed = runner.invoke(app, [*args, "--fail-on", "performance.accuracy>0.1"])
    assert failed.exit_code == 1
    assert "performance.accuracy>0.1: FAILED" in failed.output
    passed = runner.invoke(
        app, [*args, "--fail-on", "performance.accuracy<0.1", "--fail-on", "calibration.ece>1"]
    )
    assert passed.exit_code == 0, passed.output
    assert "reused" in passed.output  # the checks were resumed, not recomputed


def test_bad_manifest_exits_2_naming_the_row_without_traceback(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rows = [
        {"id": "a", "image": "ok.png", "text": "a cat", "label": "cat"},
        {"id": "b", "image": "missing.png", "text": "a dog", "label": "dog"},
        {"id": "c", "image": "ok.png", "text": "", "label": "dog"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    proc = _mmsafe("audit", "--data", str(tmp_path / "m.jsonl"), cache_dir=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "row 2" in proc.stderr and "missing.png" in proc.stderr
    assert "row 3" in proc.stderr and "--skip-invalid" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "shapes:bogus=1"], "bogus"),
        (["--data", "nothing-here"], "neither a built-in world"),
        (["--fail-on", "ece>0.1"], "<check>.<metric>"),
        (["--checks", "nope.*"], "matches no check"),
        (["--model", "no-such-model"], "Unknown model"),
        (["--model", "hf:/no/such/dir"], "/no/such/dir"),
        (["--task", "nope"], "Unknown task"),
    ],
)
def test_user_errors_exit_2_with_a_message(args, needle, tmp_path):
    result = runner.invoke(app, ["audit", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_list_commands():
    checks = runner.invoke(app, ["list-checks"])
    assert checks.exit_code == 0 and "calibration" in checks.output
    models = runner.invoke(app, ["list-models"])
    assert models.exit_code == 0
    assert "tiny-clip" in models.output and "hf:" in models.output


def test_help_is_useful():
    result = runner.invoke(app, ["audit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--model", "--data", "--task", "--fail-on", "--skip-invalid", "--checks"):
        assert flag in result.output


@pytest.mark.slow
def test_adapt_command_compares_methods_and_rejects_unknown_ones(demo_out, cache_dir, tmp_path):
    out = tmp_path / "adapt"
    args = ["adapt", "--quick", "--epochs", "1", "--out", str(out), "--device", "cpu"]
    args += ["--cache-dir", str(cache_dir)]
    result = runner.invoke(app, [*args, "--method", "full,iisan"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "adaptation.json").read_text())
    methods = [r["method"] for r in doc["reports"]]
    assert methods == ["full", "iisan"]
    trainable = {r["method"]: r["trainable_params"] for r in doc["reports"]}
    assert trainable["iisan"] < trainable["full"]
    bad = runner.invoke(app, [*args, "--method", "bogus"])
    assert bad.exit_code == 2 and "bogus" in bad.output


def test_audit_options_reach_the_check_and_typos_fail_early(tmp_path) -> None:
    import torch

    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    torch.manual_seed(0)
    saved = TinyClip(TinyClipConfig.for_size("xs")).save_pretrained(tmp_path / "model")
    base = ["audit", "--model", f"tiny-clip:{saved}", "--data", "shapes:n=300"]
    base += ["--checks", "calibration", "--device", "cpu", "--out", str(tmp_path / "o")]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--options", '{"calibration": {"n_bins": 5}}'])
    assert res.exit_code in (0, 1), res.output
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    check = card["checks"]["monitoring.calibration"]
    assert check["options"] == {"n_bins": 5}
    assert len(check["plots"]["reliability"]["bin_edges"]) == 6  # 5 bins
    opts = tmp_path / "opts.json"
    opts.write_text('{"calibration": {"bins": 5}}')
    for bad, says in (
        (f"@{opts}", "has no option 'bins'"),
        ('{"calibration": 5}', "JSON object of objects"),
        ("{nope", "not valid JSON"),
        ('{"calibrate": {}}', "unknown check 'calibrate'"),
        (f"@{tmp_path / 'missing.json'}", "cannot read it"),
    ):
        res = runner.invoke(app, [*base, "--options", bad])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and says in text and "Traceback" not in text, (bad, text)


def test_adapt_command_retrieval_objective(tmp_path) -> None:
    import torch

    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    torch.manual_seed(0)
    saved = TinyClip(TinyClipConfig.for_size("xs")).save_pretrained(tmp_path / "model")
    args = ["adapt", "--model", f"tiny-clip:{saved}", "--data", "shapes:n=300", "--epochs", "1"]
    args += ["--out", str(tmp_path / "out"), "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--method", "full,iisan", "--objective", "retrieval"])
    assert res.exit_code == 0, res.output
    saved_json = json.loads((tmp_path / "out" / "adaptation.json").read_text())
    assert saved_json["objective"] == "retrieval"
    bad = runner.invoke(app, [*args, "--method", "momef", "--objective", "retrieval"])
    assert bad.exit_code == 2 and "momef" in bad.output, bad.output
