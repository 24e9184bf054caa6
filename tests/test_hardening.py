from __future__ import annotations

import json

import numpy as np
import pytest

from mmsafe.harden.base import HardenError
from mmsafe.harden.calibration import TemperatureHardener, TemperatureScaler
from mmsafe.harden.flow import harden
from tests.conftest import make_colour_data


def test_harden_temperature_fits_on_calibration_and_reaudits(toy_model, tmp_path):
    data = make_colour_data(n=300)
    result = harden(TemperatureHardener(), toy_model, data, out=tmp_path)
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
        harden(TemperatureHardener(), toy_model, data, out=tmp_path)


def test_temperature_is_fitted_on_calibration_rows_only(toy_model, tmp_path):
    data = make_colour_data(n=300)
    test_rows = np.array([s == "test" for s in data.splits])
    data.labels[test_rows] = (data.labels[test_rows] + 1) % 3  # corrupt only the test labels
    a = harden(TemperatureHardener(), toy_model, data, out=tmp_path / "a").summary["temperature"]
    b = harden(TemperatureHardener(), toy_model, make_colour_data(n=300), out=tmp_path / "b")
    assert a == pytest.approx(b.summary["temperature"])


def test_harden_conformal_exports_a_predictor_that_covers(toy_model, tmp_path):
    from mmsafe.harden.conformal import ConformalHardener
    from mmsafe.methods.conformal import ConformalPredictor

    data = make_colour_data(n=600, seed=1)
    hardener = ConformalHardener(confidence_level=0.8, score="lac")
    result = harden(hardener, toy_model, data, out=tmp_path)
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
    from mmsafe.harden.fairness import FairnessHardener

    data = make_colour_data(n=600, seed=4)
    result = harden(FairnessHardener(methods=("pre", "post")), toy_model, data, out=tmp_path)
    saved = json.loads(result.artifact.read_text())
    assert [r["method"] for r in saved["rows"]] == ["none", "pre", "post"]
    card = json.loads((tmp_path / "after" / "card.json").read_text())
    table = card["checks"]["controllability.fairness"]["plots"]["mitigation"]
    assert [r[0] for r in table["rows"]] == ["none", "pre", "post"]
    assert table["rows"][0][1] == pytest.approx(saved["rows"][0]["accuracy"])
    assert "Mitigation on the test rows" in (tmp_path / "after" / "index.html").read_text()
    with pytest.raises(HardenError, match="Unknown mitigation"):
        harden(FairnessHardener(methods=("bogus",)), toy_model, data, out=tmp_path / "x")


# --------------------------------------------------------------------------- contract, registry


# Every flag the hand-written subcommands had before they were generated from the registry.
OLD_FLAGS = {
    "calibration": ["--model", "--data", "--task", "--out", "--device", "--seed", "--quick"],
    "adversarial": ["--task", "--eps", "--eval-eps", "--epochs", "--max-clean-drop", "--free"],
    "dp": ["--target-epsilon", "--delta", "--max-grad-norm", "--epochs", "--cache-dir"],
    "dp-clip": ["--split", "--target-epsilon", "--delta", "--max-grad-norm", "--epochs", "--lr"],
    "unlearn": ["--forget", "--method", "--out"],
    "fairness": ["--methods", "--constraints", "--positive-class"],
    "conformal": ["--task", "--confidence-level", "--score", "--mondrian"],
}


def test_every_builtin_hardener_is_registered_and_keeps_the_contract():
    import inspect

    from mmsafe.harden.base import Hardener, get_hardener, list_hardeners

    assert set(OLD_FLAGS) <= set(list_hardeners())
    for name in OLD_FLAGS:
        cls = get_hardener(name)
        assert issubclass(cls, Hardener) and cls.name == name and cls.description
        assert cls.artifact and not inspect.isabstract(cls)
        # __init__ only stores its keyword options; get_params gives them back
        defaults = {
            k: p.default
            for k, p in cls.options().items()
            if p.default is not inspect.Parameter.empty
        }
        required = {k: "x" for k in cls.options() if k not in defaults}
        hardener = cls(**defaults, **required)
        assert hardener.get_params() == {**defaults, **required}
        # nothing is learned before fit: every learned attribute ends in "_" and is empty
        learned = {k: v for k, v in vars(hardener).items() if k.endswith("_")}
        assert learned and all(v in (None, [], {}) for v in learned.values()), (name, learned)
    with pytest.raises(HardenError, match="Unknown hardener 'nope'"):
        get_hardener("nope")


@pytest.mark.parametrize("name", list(OLD_FLAGS))
def test_generated_subcommands_keep_the_old_flags(name):
    from typer.testing import CliRunner

    from mmsafe.cli import app

    res = CliRunner().invoke(app, ["harden", name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    flags = set(res.output.replace("│", " ").split())
    missing = [f for f in [*OLD_FLAGS[name], "--cache-dir", "--seed"] if f not in flags]
    assert not missing, res.output


def test_the_cli_parses_flag_values_into_the_hardener(monkeypatch, tmp_path):
    """Defaults, a comma-separated tuple and an unknown option reach the hardener as typed."""
    from typer.testing import CliRunner

    import mmsafe.cli as cli

    seen = {}

    def fake_harden(kind, *, options, **common):
        seen.update(kind=kind, options=options, **common)

    monkeypatch.setattr(cli, "_harden", fake_harden)
    runner = CliRunner()
    res = runner.invoke(cli.app, ["harden", "fairness", "--methods", "pre, post", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert seen["options"] == {
        "methods": ("pre", "post"),
        "constraints": "equalized_odds",
        "positive_class": None,
    }
    assert seen["task"] == "fusion" and seen["seed"] == 3
    res = runner.invoke(cli.app, ["harden", "adversarial", "--alphas", "0,0.5", "--eps", "0.01"])
    assert res.exit_code == 0, res.output
    assert seen["options"]["alphas"] == (0.0, 0.5) and seen["options"]["eps"] == 0.01
    assert seen["task"] == "zero_shot" and seen["options"]["max_rows"] == 200
    res = runner.invoke(cli.app, ["harden", "adversarial", "--alphas", "0,half"])
    assert res.exit_code == 2 and "--alphas takes comma-separated float" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli.app, ["harden", "unlearn"])  # --forget is required
    assert res.exit_code == 2 and "--forget" in res.output
    res = runner.invoke(cli.app, ["harden", "calibration", "--no-such-flag"])
    assert res.exit_code == 2


def test_a_registered_hardener_gets_a_subcommand_and_runs_the_flow(toy_model, tmp_path):
    """A hardener defined outside mmsafe: registered, generated as a command, run by harden."""
    from typer.testing import CliRunner

    from mmsafe.cli import app
    from mmsafe.engine.cache import atomic_write_json
    from mmsafe.harden.base import _HARDENERS, Hardened, Hardener, register_hardener
    from mmsafe.tasks.base import TemperatureScaledTask

    class Sharpen(Hardener):
        """Divide the logits by a fixed temperature.

        Args:
            temperature: The divisor of the logits.
        """

        name = "test-sharpen"
        description = "Test-only: a fixed temperature."
        checks = "performance,calibration"
        artifact = "sharpen.json"

        def __init__(self, *, temperature: float = 0.5) -> None:
            self.temperature = temperature
            self.fitted_: bool | None = None

        def fit(self, model, task, data, engine, *, seed=0):
            self.fitted_ = True
            return self

        def transform(self, model, task):
            return Hardened(model, TemperatureScaledTask(task, self.temperature))

        def summary(self):
            return {"temperature": self.temperature}

        def save(self, path):
            return atomic_write_json(path, {"temperature": self.temperature})

    register_hardener(Sharpen)
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_hardener(type("Other", (Sharpen,), {}))
        res = CliRunner().invoke(app, ["harden", "test-sharpen", "--help"], terminal_width=200)
        assert res.exit_code == 0 and "--temperature" in res.output
        assert "The divisor of the logits." in res.output
        data = make_colour_data(n=300)
        result = harden(Sharpen(temperature=0.25), toy_model, data, out=tmp_path)
    finally:
        del _HARDENERS["test-sharpen"]
    assert json.loads(result.artifact.read_text()) == {"temperature": 0.25}
    assert result.summary == {"temperature": 0.25}
    deltas = {d.metric: d for d in result.deltas}
    # a temperature keeps every prediction
    assert deltas["performance.classification.accuracy"].delta == 0
    # logits halved twice over: the NLL changes (the colour task is confident and right)
    nll = deltas["monitoring.calibration.nll"]
    assert nll.after != pytest.approx(nll.before)
    assert result.after.card["task"]["params"]["temperature"] == 0.25
    for side in ("before", "after"):
        assert (tmp_path / side / "card.json").is_file()


def test_harden_validates_before_any_audit_runs(toy_model, tmp_path):
    from mmsafe.harden.conformal import ConformalHardener
    from mmsafe.harden.dp import DPHardener

    data = make_colour_data(n=60)
    with pytest.raises(HardenError, match="--task fusion"):
        harden(DPHardener(), toy_model, data, task="zero_shot", out=tmp_path)
    with pytest.raises(HardenError, match="score"):
        harden(ConformalHardener(score="bogus"), toy_model, data, out=tmp_path)
    assert not (tmp_path / "before").exists() and not (tmp_path / "after").exists()


def test_harden_imports_no_private_names_and_no_flow_at_import_time():
    """The old circle (unlearn <-> flow) and the private imports from models.heads stay gone."""
    import ast
    from pathlib import Path

    import mmsafe.harden

    root = Path(mmsafe.harden.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmsafe."):
                foreign = not node.module.startswith("mmsafe.harden")
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not (foreign and private), f"{path.name}: {private} from {node.module}"
        top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        if path.name != "flow.py":
            assert all(n.module != "mmsafe.harden.flow" for n in top_level), path.name
