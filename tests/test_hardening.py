from __future__ import annotations

import json

import numpy as np
import pytest

from mmsafe.harden.calibration import TemperatureScaler
from mmsafe.harden.flow import HardenError, harden_temperature
from tests.conftest import make_colour_data


def test_harden_temperature_fits_on_calibration_and_reaudits(toy_model, tmp_path):
    data = make_colour_data(n=300)
    result = harden_temperature(toy_model, data, out=tmp_path)
    saved = TemperatureScaler.load(tmp_path / "temperature.json")
    assert saved.temperature_ == pytest.approx(result.summary["temperature"])
    for side in ("before", "after"):
        card = json.loads((tmp_path / side / "card.json").read_text())
        assert card["checks"]["monitoring.calibration"]["status"] == "ok"
    deltas = {d.metric: d for d in result.deltas}
    # a temperature never changes the predicted class, only the confidence
    assert deltas["performance.classification.accuracy"].delta == 0
    nll = deltas["monitoring.calibration.nll"]
    assert nll.after <= nll.before + 1e-9  # T minimises NLL on calibration rows
    assert result.after.card["task"]["params"]["temperature"] == saved.temperature_


def test_harden_needs_a_calibration_split(toy_model, tmp_path):
    data = make_colour_data(n=60)
    data.splits = ["test"] * len(data)
    with pytest.raises(HardenError, match="calibration"):
        harden_temperature(toy_model, data, out=tmp_path)


def test_temperature_is_fitted_on_calibration_rows_only(toy_model, tmp_path):
    data = make_colour_data(n=300)
    test_rows = np.array([s == "test" for s in data.splits])
    data.labels[test_rows] = (data.labels[test_rows] + 1) % 3  # corrupt only the test labels
    a = harden_temperature(toy_model, data, out=tmp_path / "a").summary["temperature"]
    b = harden_temperature(toy_model, make_colour_data(n=300), out=tmp_path / "b")
    assert a == pytest.approx(b.summary["temperature"])


def test_harden_conformal_exports_a_predictor_that_covers(toy_model, tmp_path):
    from mmsafe.harden.flow import harden_conformal
    from mmsafe.methods.conformal import ConformalPredictor

    data = make_colour_data(n=600, seed=1)
    result = harden_conformal(toy_model, data, out=tmp_path, confidence_level=0.8, score="lac")
    predictor = ConformalPredictor.load(result.artifact)
    assert predictor.confidence_level == 0.8 and predictor.score == "lac"
    meta = json.loads((tmp_path / "conformal.meta.json").read_text())
    assert meta["model"] == toy_model.fingerprint() and meta["score"] == "lac"
    card = json.loads((tmp_path / "after" / "card.json").read_text())
    check = card["checks"]["monitoring.conformal"]
    assert check["status"] == "ok"
    # the re-audit used the exported settings, and the sets cover at about the target level
    cov = check["metrics"]["lac/coverage"]["value"]
    assert 0.7 < cov <= 1.0
    assert "aps/coverage" not in check["metrics"]


def test_harden_unlearn_cli_forgets_rows_and_reaudits(tmp_path):
    import torch
    from typer.testing import CliRunner

    from mmsafe.cli import app
    from mmsafe.data.loading import load_data
    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    torch.manual_seed(0)
    saved = TinyClip(TinyClipConfig.for_size("xs")).save_pretrained(tmp_path / "model")
    spec = "shapes:n=300,train_defects=0"
    train_ids = load_data(spec).split("train").ids
    forget = tmp_path / "forget.txt"
    forget.write_text("# rows to forget\n" + "\n".join(train_ids[:12]) + "\n")
    common = ["--model", f"tiny-clip:{saved}", "--data", spec, "--device", "cpu"]
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["harden", "unlearn", "--forget", str(forget), "--out", str(out), *common]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "head" / "unlearn.json").read_text())
    assert report["n_forget"] == 12 and report["forget_ids"] == train_ids[:12]
    card = json.loads((out / "after" / "card.json").read_text())
    assert card["task"]["params"]["head"] == "unlearned (multidelete, 12 rows)"
    assert (out / "before" / "card.json").is_file()

    forget.write_text(f"{train_ids[0]}\nno-such-row\n")
    res = runner.invoke(
        app, ["harden", "unlearn", "--forget", str(forget), "--out", str(out), *common]
    )
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "forget.txt" in text and "line 2" in text and "Traceback" not in text


def test_harden_fairness_puts_the_mitigation_table_in_the_card(toy_model, tmp_path):
    from mmsafe.harden.flow import harden_fairness

    data = make_colour_data(n=600, seed=4)
    result = harden_fairness(toy_model, data, out=tmp_path, methods=("pre", "post"))
    saved = json.loads(result.artifact.read_text())
    assert [r["method"] for r in saved["rows"]] == ["none", "pre", "post"]
    card = json.loads((tmp_path / "after" / "card.json").read_text())
    table = card["checks"]["controllability.fairness"]["plots"]["mitigation"]
    assert [r[0] for r in table["rows"]] == ["none", "pre", "post"]
    assert table["rows"][0][1] == pytest.approx(saved["rows"][0]["accuracy"])
    assert "Mitigation on the test rows" in (tmp_path / "after" / "index.html").read_text()
    with pytest.raises(HardenError, match="Unknown mitigation"):
        harden_fairness(toy_model, data, out=tmp_path / "x", methods=("bogus",))
