"""Retrieval fine-tuning (``adapt(..., objective="retrieval")``): contrastive loss, R@1/R@5.

The quality checks run on the quick-trained tiny-clip of the shared ``shapes_quick`` fixture
(640 train pairs, 180 test pairs with 170 distinct captions); the parameter-count and API checks
on an untrained tiny-clip-xs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from mmsafe.data.worlds.shapes import make_shapes
from mmsafe.methods.adapt import (
    RETRIEVAL_METHODS,
    AdaptError,
    SideRetrievalHead,
    adapt,
    adapt_command,
    compare_methods,
    markdown_table,
    parse_methods,
    zero_shot_retrieval,
)
from mmsafe.methods.efficiency import count_parameters
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
from tests.conftest import audit_context, require

EPOCHS, SEED = 6, 3


def _recall_by_sorting(sim: np.ndarray, captions: list[str], k: int) -> tuple[float, float]:
    """Brute-force R@k both ways: sort each row (stable) and look for a matching caption."""
    caps = np.asarray(captions, dtype=object)

    def one_way(s: np.ndarray, query_caps: np.ndarray, gallery_caps: np.ndarray) -> float:
        hits = [
            any(gallery_caps[j] == query_caps[q] for j in np.argsort(-s[q], kind="stable")[:k])
            for q in range(len(s))
        ]
        return float(np.mean(hits))

    return one_way(sim, caps, caps), one_way(sim.T, caps, caps)


# --------------------------------------------------------------------------- units


def test_side_retrieval_head_is_intra_modal_only() -> None:
    torch.manual_seed(0)
    head = SideRetrievalHead({"image": [4, 6, 6], "text": [5]}, embed_dim=3, width=8)
    assert set(head.sanb) == {"image", "text"}  # no inter-modal network
    assert [len(head.sanb[m]) for m in ("image", "text")] == [3, 1]  # taps may differ
    assert all(float(g().detach()) == 0.5 for gs in head.gates.values() for g in gs)
    image = [torch.randn(4, 4), torch.randn(4, 6), torch.randn(4, 6)]
    out = head({"image": image, "text": [torch.randn(4, 5)]})
    other = head({"image": image, "text": [torch.randn(4, 5)]})
    torch.testing.assert_close(out["image"], other["image"])  # text never reaches the image
    assert not torch.allclose(out["text"], other["text"])
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(4))
    assert set(head({"text": [torch.randn(2, 5)]})) == {"text"}  # one modality at a time


def test_momef_and_unknown_objective_are_rejected() -> None:
    with pytest.raises(ValueError, match="does not support retrieval"):
        adapt(None, None, None, "momef", objective="retrieval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="objective"):
        adapt(None, None, None, "iisan", objective="ranking")  # type: ignore[arg-type]
    assert parse_methods("full, iisan-versa", "retrieval") == ["full", "iisan-versa"]
    with pytest.raises(AdaptError, match="do not support retrieval"):
        parse_methods("iisan,momef", "retrieval")
    with pytest.raises(AdaptError, match="objective"):
        parse_methods("iisan", "ranking")


# --------------------------------------------------------------------------- on tiny-clip


@pytest.fixture(scope="module")
def iisan_retrieval(shapes_quick, tmp_path_factory) -> dict[str, Any]:
    """A cached IISAN retrieval run, with a snapshot of the backbone taken before."""
    world, model = shapes_quick
    model.zero_grad(set_to_none=True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train, test = world.split("train"), world.split("test")
    cache_dir = tmp_path_factory.mktemp("iisan-retrieval")
    run = adapt(
        model, train, test, "iisan", objective="retrieval", epochs=EPOCHS, seed=SEED,
        cache_dir=cache_dir,
    )  # fmt: skip
    return {"before": before, "run": run, "train": train, "test": test}


def test_iisan_retrieval_leaves_the_backbone_bit_identical(shapes_quick, iisan_retrieval) -> None:
    _, model = shapes_quick
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    for k, v in iisan_retrieval["before"].items():  # weights and batch-norm statistics
        assert torch.equal(after[k], v), k
    run = iisan_retrieval["run"]
    rep = run.report
    assert rep.objective == "retrieval" and rep.extra["cached"]
    assert set(rep.metrics) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}
    assert rep.accuracy == pytest.approx((rep.metrics["i2t_R@1"] + rep.metrics["t2i_R@1"]) / 2)
    assert rep.trainable_params == count_parameters(run.module).trainable
    assert rep.total_params == count_parameters(model).total + rep.trainable_params
    assert set(rep.extra["gates"]) == {"image", "text"}  # intra-modal side networks only
    assert rep.cache_seconds > 0 and math.isfinite(rep.peak_memory_mib)
    assert len(rep.epoch_times) == EPOCHS
    assert len(rep.losses) == EPOCHS * math.ceil(len(iisan_retrieval["train"]) / 64)
    assert rep.losses[-1] < rep.losses[0] / 3  # measured 5.41 -> 0.74


def test_recalls_equal_a_direct_computation_on_the_embeddings(iisan_retrieval) -> None:
    run, test = iisan_retrieval["run"], iisan_retrieval["test"]
    emb = run.embed(test)
    assert emb["image"].shape == emb["text"].shape == (len(test), 64)  # every test row
    sim = run.predict(test)
    torch.testing.assert_close(sim, emb["image"] @ emb["text"].T)
    captions = [str(t) for t in test.modalities["text"]]
    for k in (1, 5):
        i2t, t2i = _recall_by_sorting(sim.double().numpy(), captions, k)
        assert run.report.metrics[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-12)
        assert run.report.metrics[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-12)


def test_zero_shot_recalls_agree_with_the_audit(shapes_quick) -> None:
    from mmsafe.checks.performance.retrieval import RetrievalPerformanceCheck

    world, model = shapes_quick
    ctx = audit_context(model, world, task="retrieval")
    audited = RetrievalPerformanceCheck(n_boot=10).run(ctx).metrics
    ours = zero_shot_retrieval(model, world.split("test"))
    for name, value in ours.items():
        assert value == pytest.approx(audited[name].value, abs=1e-12), name


def test_iisan_retrieval_within_gap_of_full_and_above_zero_shot(
    shapes_quick, iisan_retrieval
) -> None:
    # Stated gap: after the same 6 epochs (seed 3), IISAN's mean R@1 is at most 0.06 below full
    # fine-tuning's, and above the frozen model's. Measured (mean of i2t and t2i R@1):
    # zero-shot 0.308; full 0.350 (seed 3), 0.369 (seed 0); iisan 0.344, 0.344, 0.333 (seeds 3,
    # 0, 1). After only 3 epochs IISAN is *not* reliably above zero-shot (0.314, 0.306, 0.264):
    # its side networks and projections start from random, while full fine-tuning starts from
    # the trained towers (full: 0.358, 0.356, 0.367 after 3 epochs).
    world, model = shapes_quick
    train, test = iisan_retrieval["train"], iisan_retrieval["test"]
    zero_shot = zero_shot_retrieval(model, test)
    zs = (zero_shot["i2t_R@1"] + zero_shot["t2i_R@1"]) / 2
    full = adapt(model, train, test, "full", objective="retrieval", epochs=EPOCHS, seed=SEED)
    iisan = iisan_retrieval["run"].report
    assert iisan.accuracy >= full.report.accuracy - 0.06
    assert iisan.accuracy > zs
    # Full fine-tuning's own gain over zero-shot is not asserted: 0.350 on one machine, 0.308
    # (below zero-shot's 0.314) on an AVX2-only one, after the same 6 epochs.
    assert full.report.trainable_params > 4 * iisan.trainable_params  # measured 5.4x
    moved = full.module.encoder.state_dict()  # the copy moved, the session model did not
    assert not torch.equal(moved["image.proj.weight"], model.state_dict()["image.proj.weight"])


def test_cached_side_training_never_runs_the_backbone(shapes_quick, monkeypatch) -> None:
    world, model = shapes_quick
    train, test = world.split("train"), world.split("test")
    calls = {"n": 0}
    hidden_states = TinyClip.hidden_states

    def counted(self: TinyClip, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return hidden_states(self, *args, **kwargs)

    monkeypatch.setattr(TinyClip, "hidden_states", counted)
    per_epochs = {}
    for epochs in (1, 3):
        calls["n"] = 0
        adapt(model, train, test, "iisan-versa", objective="retrieval", epochs=epochs)
        per_epochs[epochs] = calls["n"]
    # Probe (2) + cache (3 chunks of 256 x 2 towers) + test embeddings (1 x 2): no training pass.
    assert per_epochs == {1: 10, 3: 10}
    calls["n"] = 0
    adapt(model, train, test, "iisan", objective="retrieval", epochs=1, cache=False)
    assert calls["n"] == 2 + 2 * 10 + 2  # uncached: both towers in each of the 10 steps


# --------------------------------------------------------------------------- on tiny-clip-xs


def _xs() -> tuple[Any, Any, Any]:
    world = make_shapes(n=120, seed=1)
    torch.manual_seed(0)
    return world.split("train"), world.split("test"), TinyClip(TinyClipConfig.for_size("xs"))


def test_every_retrieval_method_reports_cost_and_recall() -> None:
    require("peft")
    train, test, model = _xs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports = compare_methods(
        model, train, test, objective="retrieval", epochs=1, batch_size=32,
        groups={"image": 4, "text": 1},
    )  # fmt: skip
    by = {r.method: r for r in reports}
    assert tuple(by) == RETRIEVAL_METHODS
    assert all(r.objective == "retrieval" and 0 <= r.accuracy <= 1 for r in reports)
    assert all(np.isfinite(r.losses).all() and not math.isnan(r.tpme) for r in reports)
    # LoRA, rank 8, on the xs towers' layers (as in test_adapt.py) + the temperature.
    convs = [(3, 8), (8, 16), (16, 32), (32, 64)]
    linears = [(128, 64), (32, 96), (32, 32), (32, 128), (128, 32), (32, 64)]
    lora = 8 * sum(i * 9 + o for i, o in convs) + 8 * sum(i + o for i, o in linears)
    assert by["lora"].trainable_params == lora + 1
    adapters = sum(2 * 16 * w + 16 + w for w in [8, 16, 32, 64, 32])
    assert by["adapter"].trainable_params == adapters + 1
    assert by["full"].trainable_params == count_parameters(model).total + 1
    assert by["iisan-versa"].extra["taps"] == {"image": [0, 1, 2, 3], "text": [0]}
    assert by["iisan"].extra["taps"] == {"image": [3], "text": [0]}  # xs: 1 text block
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    table = markdown_table(reports)
    assert "R@1 (mean i2t, t2i) | i2t_R@1 | i2t_R@5 | t2i_R@1 | t2i_R@5 | TPME" in table
    with pytest.raises(ValueError, match="different objectives"):
        markdown_table([reports[0], adapt(model, train, test, "iisan", epochs=1).report])


def test_adapt_command_retrieval_writes_results(tmp_path, monkeypatch) -> None:
    import mmsafe.models.loading

    _, _, model = _xs()
    monkeypatch.setattr(mmsafe.models.loading, "load_model", lambda *a, **k: model)
    reports = adapt_command(
        "tiny-clip-xs", "shapes:n=120,seed=1", "iisan,full", objective="retrieval", epochs=1,
        device="cpu", out=tmp_path / "out", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    doc = json.loads((tmp_path / "out" / "adaptation.json").read_text())
    assert doc["objective"] == "retrieval"
    assert [r["metrics"]["i2t_R@1"] for r in doc["reports"]] == [
        r.metrics["i2t_R@1"] for r in reports
    ]
    assert "| iisan |" in (tmp_path / "out" / "adaptation.md").read_text()
    with pytest.raises(AdaptError, match="do not support retrieval"):
        adapt_command("tiny-clip-xs", "shapes:n=120,seed=1", "momef", objective="retrieval")
