"""End to end through the CLI with a user's own data: a JSONL manifest and a local `hf:` CLIP.

Covers the path a real user takes (manifest -> validation -> --skip-invalid -> HF adapter ->
engine -> checks -> card) without tiny-clip and without any download.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from typer.testing import CliRunner

from mmsafe.cli import app
from mmsafe.data.manifest import write_manifest
from mmsafe.report import card_schema
from tests.conftest import make_colour_data
from tests.test_hf import save_tiny

runner = CliRunner()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("task", ["zero_shot", "retrieval", "fusion"])
def test_manifest_with_a_bad_row_and_a_local_hf_clip(tmp_path, task):
    data = make_colour_data(n=60)
    data.modalities["text"][5] = "<script>alert(1)</script> a red square"
    manifest = write_manifest(data, tmp_path / "data" / "eval.jsonl")
    lines = manifest.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["image"] = "images/does-not-exist.png"
    lines[2] = json.dumps(bad)
    manifest.write_text("\n".join(lines) + "\n")
    model_dir = save_tiny(tmp_path / "clip")
    out = tmp_path / "report"
    args = ["audit", "--model", f"hf:{model_dir}", "--data", str(manifest), "--task", task]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]

    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "row 3" in refused.output and "does-not-exist.png" in refused.output

    result = runner.invoke(app, [*args, "--skip-invalid"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    jsonschema.validate(card, card_schema())
    assert card["data"]["skipped"]["count"] == 1
    assert card["data"]["skipped"]["rows"][0]["row"] == 3
    assert card["model"]["name"].startswith("hf")
    perf = "performance.retrieval" if task == "retrieval" else "performance.classification"
    assert card["checks"][perf]["status"] == "ok", card["checks"][perf]["reason"]
    expected_cal = "skipped" if task == "retrieval" else "ok"
    assert card["checks"]["monitoring.calibration"]["status"] == expected_cal
    html = (out / "index.html").read_text()
    assert "<script>alert(1)" not in html
    assert "1 invalid rows were skipped" in result.output
