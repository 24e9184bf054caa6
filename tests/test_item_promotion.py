"""``robustness.item_promotion`` on shapes-rec: PGD on a cold item's image lifts it into the users'
top 10 on the content model (the planted flaw), a random perturbation as large does not, eps = 0
changes nothing, and the metrics equal an independent recomputation through ``task.logits``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsafe.audit import run_audit
from mmsafe.checks import AuditContext
from mmsafe.checks.robustness.item_promotion import ItemPromotionCheck
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.methods.attacks.promotion import (
    exclusion_mask,
    item_scorer,
    promote_item,
    promotion_margins,
)
from mmsafe.methods.recommend import histories
from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender, build_seqrec
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
from mmsafe.tasks import create_task

WORLD = "shapes-rec:n_users=1200"
NAME = "robustness.item_promotion"
EPS = 8 / 255
CHEAP = {"eps": [2 / 255], "steps": 2, "n_targets": 2, "n_boot": 50}


@pytest.fixture(scope="module")
def world():
    return load_world(WORLD)


@pytest.fixture(scope="module")
def content(world, shapes_quick, mmsafe_cache):
    return build_seqrec(items="content", encoder=shapes_quick[1], train_data=world, quick=True,
                        cache_dir=mmsafe_cache, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def ctx(world, content):
    engine = Engine(progress=False)
    task = create_task("seqrec")
    task.prepare(content, engine, world.classes)
    outputs = engine.outputs(content, task, world)
    return AuditContext(content, task, world, outputs, engine, check=NAME)


@pytest.fixture(scope="module")
def audited(ctx):
    """``(result, run)``: the check's result through ``run`` and the attack behind it."""
    check = ItemPromotionCheck(eps=(0.0, EPS), n_boot=200)
    seen = {}
    promote = check.promote

    def spy(c):
        seen["run"] = promote(c)
        return seen["run"]

    check.promote = spy  # type: ignore[method-assign]
    before = ctx.engine.accounting()["attack_iterations"]
    result = check.run(ctx)
    seen["counted"] = ctx.engine.accounting()["attack_iterations"] - before
    return result, seen["run"], seen["counted"]


def _value(result, metric):
    return result.metrics[metric].value


def test_pgd_lifts_cold_items_into_the_top_10_at_8_of_255(audited):
    """The goal: a cold item's HR@10 rises from < 0.05 to >= 0.5 at eps = 8/255 (white-box)."""
    result, run, counted = audited
    assert result.status == "ok" and len(run.targets) == 5
    clean = run.hits["clean"].mean(axis=0)
    attacked = run.hits[EPS].mean(axis=0)
    unexposed = clean < 0.05  # the cold items the model all but never recommends
    assert unexposed.any()
    assert attacked[unexposed].mean() >= 0.5, (clean, attacked)
    assert (attacked > clean).all()
    assert _value(result, "eps=8/255/target_hr@10") >= 0.5
    assert _value(result, "eps=8/255/rank_uplift") > 20
    severities = [f.severity for f in result.findings]
    assert severities[0] == "high" and "8/255" in result.findings[0].message
    lo, hi = result.metrics["eps=8/255/target_hr@10"].ci
    assert lo <= _value(result, "eps=8/255/target_hr@10") <= hi
    assert counted >= 5 * 10  # every PGD step encodes the attacked image
    spec = result.plots["target_hr_vs_eps"]
    assert spec["kind"] == "line" and spec["series"][0]["x"] == pytest.approx([0.0, 0.0, 8.0])


def test_random_signs_do_not_promote_and_eps_0_changes_nothing(ctx, audited):
    result, run, _ = audited
    random_hr = _value(result, "random/eps=8/255/target_hr@10")
    assert abs(random_hr - _value(result, "clean/target_hr@10")) < 0.1
    assert random_hr < _value(result, "eps=8/255/target_hr@10") - 0.3
    for t in run.targets.tolist():
        x = run.clean_pixels[t]
        assert torch.equal(run.pixels[(t, 0.0)], x)
        for key, eps in ((EPS, EPS), ("random", EPS)):
            adv = run.pixels[(t, key)]
            assert float((adv - x).abs().max()) <= eps + 1e-6
            assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert np.array_equal(run.ranks[0.0], run.ranks["clean"])  # bit for bit
    assert _value(result, "eps=0/255/target_hr@10") == _value(result, "clean/target_hr@10")
    assert _value(result, "eps=0/255/rank_uplift") == 0.0
    with torch.inference_mode():
        again = ctx.task.logits(dict(ctx.outputs.embeddings)).float().cpu()
    assert torch.equal(again, ctx.outputs.logits)


def test_metrics_equal_an_independent_recomputation(ctx, audited):
    """Rank every user by hand from ``task.logits`` with the attacked image's embedding."""
    result, run, _ = audited
    hist = histories(ctx.data)
    encoder = ctx.model.encoder
    for key, metric in (
        (EPS, "eps=8/255/target_hr@10"),
        ("random", "random/eps=8/255/target_hr@10"),
    ):
        hits, ranks = [], []
        for t in run.targets.tolist():
            features = {m: f.clone() for m, f in ctx.outputs.embeddings.items()}
            with torch.no_grad():
                features["image"][t] = encoder.encode({"image": run.pixels[(t, key)]})["image"][0]
                scores = ctx.task.logits(features).numpy()
            mask = np.zeros(scores.shape, bool)
            for u, h in enumerate(hist):
                mask[u, h] = True
            mask[:, t] = False
            own = scores[:, t : t + 1]
            higher = ((scores > own) & ~mask).sum(axis=1)
            ties = ((scores == own) & ~mask).sum(axis=1) - 1  # a random tie-break, on average
            ranks.append(1 + higher + ties / 2)
            hits.append(np.clip(np.minimum(10, higher + ties + 1) - higher, 0, None) / (ties + 1))
        assert _value(result, metric) == pytest.approx(float(np.concatenate(hits).mean()), abs=1e-9)
        if key == EPS:
            uplift = run.ranks["clean"] - np.stack(ranks, axis=1)
            assert _value(result, "eps=8/255/rank_uplift") == pytest.approx(uplift.mean(), abs=1e-9)


def test_both_scorers_reproduce_the_clean_scores(ctx):
    """The fast scorer (an item in no history: only its column moves) and the full one (an item
    in some history: ``task.logits`` again) both give the clean scores on the clean image."""
    hist = histories(ctx.data)
    counts = np.bincount(np.concatenate(hist), minlength=len(ctx.data.classes))
    users = np.arange(0, len(hist), 7)
    for item in (int(np.flatnonzero(counts == 0)[0]), int(np.argmax(counts))):
        scorer = item_scorer(ctx.model, ctx.task, ctx.outputs.embeddings, item, users, hist,
                             ctx.outputs.logits)  # fmt: skip
        pixels = ctx.model.encoder.preprocess("image", [ctx.data.catalog.modalities["image"][item]])
        with torch.no_grad():
            scores = scorer(pixels)
        assert torch.allclose(scores, ctx.outputs.logits[users], atol=1e-4)


def test_promote_item_keeps_the_budget_and_targets_the_top_k():
    torch.manual_seed(0)
    proj = torch.randn(12, 4)
    states = torch.randn(30, 4)
    others = torch.randn(30, 6)

    def scorer(x):
        item = x.flatten()[None] @ proj  # (1, 4)
        return torch.cat([others, states @ item.T], dim=1)  # the target is column 6

    x = torch.rand(1, 3, 2, 2)
    exclude = exclusion_mask([np.array([0])] * 30, 7)
    clean = (promotion_margins(scorer(x), 6, exclude, k=3) > 0).float().mean()
    adv = promote_item(scorer, x, 6, exclude, 0.3, steps=20, k=3)
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6 and 0 <= float(adv.min()) <= 1
    assert (promotion_margins(scorer(adv), 6, exclude, k=3) > 0).float().mean() > clean
    assert torch.equal(promote_item(scorer, x, 6, exclude, 0.0), x)


def test_skipped_on_an_id_model_and_without_cold_items():
    """No pixels to attack (sasrec-id), or no cold item to promote: skipped, with the reason."""
    small = load_world("shapes-rec:n_users=200,n_items=60,seed=5")
    ident = SeqRecommender(SeqRecConfig(60, items="id"), name="sasrec-id").eval()
    card = run_audit(ident, small, task="seqrec", checks=NAME, options={NAME: CHEAP},
                     engine=Engine(progress=False)).card  # fmt: skip
    entry = card["checks"][NAME]
    assert entry["status"] == "skipped" and "item_pixels" in entry["reason"]
    assert "sasrec-id" in entry["reason"]
    warm = load_world("shapes-rec:n_users=200,n_items=60,seed=5,cold=0")
    torch.manual_seed(0)
    enc = TinyClip(TinyClipConfig.for_size("xs"))
    model = SeqRecommender(SeqRecConfig(60, feature_dims=(enc.embed_dim,) * 2), enc).eval()
    card = run_audit(model, warm, task="seqrec", checks=NAME, options={NAME: CHEAP},
                     engine=Engine(progress=False)).card  # fmt: skip
    entry = card["checks"][NAME]
    assert entry["status"] == "skipped" and "no cold items" in entry["reason"]


def test_cheap_audit_writes_a_valid_card_and_report(tmp_path):
    """The conformance setting: an untrained recommender over an xs tiny-clip, cheap options."""
    data = load_world("shapes-rec:n_users=200,n_items=60,seed=5")
    torch.manual_seed(0)
    enc = TinyClip(TinyClipConfig.for_size("xs"))
    model = SeqRecommender(SeqRecConfig(60, feature_dims=(enc.embed_dim,) * 2), enc).eval()
    result = run_audit(model, data, task="seqrec", checks=NAME, options={NAME: CHEAP},
                       engine=Engine(progress=False), out=tmp_path)  # fmt: skip
    entry = result.card["checks"][NAME]
    assert entry["status"] == "ok", entry["reason"]
    assert set(entry["metrics"]) == {
        "clean/target_hr@10", "clean/target_mean_rank", "eps=2/255/target_hr@10",
        "eps=2/255/target_mean_rank", "eps=2/255/rank_uplift",
        "random/eps=2/255/target_hr@10", "random/eps=2/255/target_mean_rank",
    }  # fmt: skip
    assert result.card["engine"]["attack_iterations"] > 0
    html = (tmp_path / "index.html").read_text()
    assert "HR@10 vs the image budget" in html and "<polyline" in html
    with pytest.raises(ValueError, match="eps"):
        ItemPromotionCheck(eps=(-1 / 255,))
