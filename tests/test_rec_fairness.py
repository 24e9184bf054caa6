"""``controllability.rec_fairness``: user-group gaps, item exposure and attribute leakage of a
recommender, on planted flaws with clean controls, and its numbers against direct computations.

Leakage is planted in a world where users follow their own preferences (``follow=0.3``) and
group ``b``'s preferences lean wholly towards half of the colours (``group_bias=1``); the
control differs only in ``group_bias=0``. (On the default world, ``follow=0.85``, the next
topic mostly follows the world's chain and even a probe on the whole history's topic counts
only reaches AUC ~0.61, so the last state does not carry the attribute.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import mmsafe.checks.controllability.rec_fairness as rf  # registers the check
from mmsafe.audit import run_audit
from mmsafe.checks.base import AuditContext
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.methods.rec_fairness import (
    exposure_bootstrap,
    exposure_summary,
    gini,
    group_gap_bootstrap,
    macro_auc,
    macro_auc_bootstrap,
    popularity_item_groups,
    probe_probabilities,
    top_k_items,
    user_exposure,
)
from mmsafe.methods.recommend import histories, interaction_counts, user_metrics
from mmsafe.metrics import bootstrap_ci
from mmsafe.models.seqrec import build_seqrec
from mmsafe.tasks import create_task

NAME = rf.RecFairnessCheck.name
WORLD = "shapes-rec:n_users=1200"  # tests/test_seqrec.py trains the same model (shared cache)
FLAW = "shapes-rec:n_users=600,group_bias=1,follow=0.3"
CONTROL = "shapes-rec:n_users=600,group_bias=0,follow=0.3"
OPTIONS = {NAME: {"n_boot": 200}}


@pytest.fixture(scope="module")
def encoder(shapes_quick):
    return shapes_quick[1]


@pytest.fixture(scope="module")
def worlds():
    return {name: load_world(spec) for name, spec in
            (("default", WORLD), ("flaw", FLAW), ("control", CONTROL))}  # fmt: skip


def _model(world, encoder, cache):
    return build_seqrec(items="content", train_data=world, encoder=encoder, quick=True,
                        cache_dir=cache, progress=False)  # fmt: skip


def _card(model, world):
    result = run_audit(model, world, task="seqrec", checks=[NAME], options=OPTIONS,
                       engine=Engine(progress=False))  # fmt: skip
    return result.card["checks"][NAME]


@pytest.fixture(scope="module")
def models(worlds, encoder, mmsafe_cache):
    """The default world's model: tests/test_seqrec.py trains the same one (shared cache)."""
    return {"default": _model(worlds["default"], encoder, mmsafe_cache)}


@pytest.fixture(scope="module")
def leak_models(worlds, encoder, mmsafe_cache):
    """The planted-leakage world's model and its control's: two trainings of their own."""
    return {name: _model(worlds[name], encoder, mmsafe_cache) for name in ("flaw", "control")}


@pytest.fixture(scope="module")
def cards(worlds, models):
    return {"default": _card(models["default"], worlds["default"])}


@pytest.fixture(scope="module")
def leak_cards(worlds, leak_models):
    return {name: _card(model, worlds[name]) for name, model in leak_models.items()}


@pytest.fixture(scope="module")
def default_ctx(worlds, models):
    return _context(models["default"], worlds["default"])


def _m(entry, metric):
    return entry["metrics"][metric]


def _context(model, data) -> AuditContext:
    engine = Engine(progress=False)
    task = create_task("seqrec")
    task.prepare(model, engine, data.classes)
    outputs = engine.outputs(model, task, data)
    return AuditContext(model, task, data, outputs, engine, check=NAME)


# --------------------------------------------------------------------------- leakage


@pytest.mark.slow
def test_leakage_is_flagged_on_the_planted_bias_and_not_on_the_control(leak_cards):
    flaw, control = leak_cards["flaw"], leak_cards["control"]
    assert flaw["status"] == control["status"] == "ok"
    auc = _m(flaw, "leakage/auc")
    assert auc["value"] > 0.75 and auc["ci"][0] > 0.7
    leaks = [f for f in flaw["findings"] if "encodes the sensitive attribute" in f["message"]]
    assert leaks and leaks[0]["severity"] in ("medium", "high")
    ctrl = _m(control, "leakage/auc")
    assert ctrl["ci"][0] < 0.5 < ctrl["ci"][1] and abs(ctrl["value"] - 0.5) < 0.05
    assert not [f for f in control["findings"] if "encodes the sensitive" in f["message"]]
    for entry in (flaw, control):  # the chance control sits at chance on both
        perm = _m(entry, "leakage/auc_permuted")
        # (cross-validation under the null runs a little below 0.5: each user's own label is
        # missing from the fit that scores it)
        assert abs(perm["value"] - 0.5) < 0.05 and perm["ci"][1] < auc["ci"][0]


@pytest.mark.slow
def test_leakage_auc_is_sklearns_on_the_same_cross_validated_probabilities(worlds, leak_models,
                                                                           leak_cards):  # fmt: skip
    data, model = worlds["flaw"], leak_models["flaw"]
    ctx = _context(model, data)
    codes = (np.asarray(data.groups) == "b").astype(int)
    states = rf.user_representations(model, histories(data), ctx.outputs.embeddings)
    assert states.shape == (len(data), model.cfg.hidden)
    probs = probe_probabilities(states, codes, seed=ctx.seed_for("probe-folds"))
    assert macro_auc(probs, codes) == pytest.approx(roc_auc_score(codes, probs[:, 1]), abs=1e-12)
    # the check's figure is this one (same states, same folds: run_audit's seed is 0 too)
    assert _m(leak_cards["flaw"], "leakage/auc")["value"] == pytest.approx(
        roc_auc_score(codes, probs[:, 1]), abs=1e-9
    )


def test_macro_auc_matches_sklearn_ovr_and_its_bootstrap_matches_bootstrap_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 4)) + np.eye(3, 4)[y]
    probs = probe_probabilities(x, y, seed=1)
    want = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert macro_auc(probs, y) == pytest.approx(want, abs=1e-12)
    probs[:5] = probs[5]  # ties, and a resample may miss a group: the rules must agree
    fast = macro_auc_bootstrap(probs[:40], y[:40], n_boot=300, seed=3)
    slow = bootstrap_ci(macro_auc, probs[:40], y[:40], n_boot=300, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)


# --------------------------------------------------------------------------- user groups


def test_user_group_gap_equals_a_direct_computation(default_ctx, cards):
    ctx = default_ctx
    data = ctx.data
    per_user = user_metrics(ctx.outputs.logits, data, (10,))
    groups = np.asarray(data.groups)
    for m in ("ndcg@10", "hr@10"):
        means = {g: per_user[m][groups == g].mean() for g in ("a", "b")}
        gap = _m(cards["default"], f"users/{m}_gap")
        assert gap["value"] == pytest.approx(max(means.values()) - min(means.values()), abs=1e-9)
        low = _m(cards["default"], f"users/{m}_min_group")
        assert low["value"] == pytest.approx(min(means.values()), abs=1e-9)
        assert low["ci"][0] <= low["value"] <= low["ci"][1]
    # the bias is in what users like, not in how well they are served: no gap finding
    entry = cards["default"]
    assert _m(entry, "users/ndcg@10_gap")["ci"][0] < 0 < _m(entry, "users/ndcg@10_gap")["ci"][1]
    assert not [f for f in entry["findings"] if "differs across user groups" in f["message"]]
    plot = entry["plots"]["ndcg_per_user_group"]
    assert plot["labels"] == ["a", "b"]


def test_gap_bootstrap_finds_a_real_gap_and_its_ci_covers_zero_without_one():
    rng = np.random.default_rng(0)
    codes = np.r_[np.zeros(300, int), np.ones(300, int)]
    same = rng.random(600)
    out = group_gap_bootstrap(same, codes, 2, n_boot=300)
    assert out["gap_ci"][0] < 0 < out["gap_ci"][1]  # signed: not biased above 0
    shifted = same + 0.2 * codes
    out = group_gap_bootstrap(shifted, codes, 2, n_boot=300)
    assert out["best"] == 1 and out["gap_ci"][0] > 0.1


# --------------------------------------------------------------------------- exposure


def test_exposure_by_hand_on_a_tiny_score_matrix():
    scores = np.array([
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [0.0, 9.0, 0.0, 9.0, 0.0, 0.0],
    ])  # fmt: skip
    exclude = [[0], [5, 4], []]
    top = top_k_items(scores, exclude, k=2)
    # user 0 skips item 0; user 1 skips 5 and 4; user 2's tie at 9 goes to the lower item
    assert top.tolist() == [[1, 2], [3, 2], [1, 3]]
    w2 = 1 / np.log2(3)
    item = np.asarray(user_exposure(top, 6).sum(axis=0)).ravel()
    np.testing.assert_allclose(item, [0, 1 + 1, w2 + w2, 1 + w2, 0, 0])
    groups = np.array([0, 0, 0, 1, 1, 1])  # items 0-2 against 3-5
    out = exposure_summary(item, groups, 2)
    total = 3 + 3 * w2
    share = np.array([2 + 2 * w2, 1 + w2]) / total  # = [2/3, 1/3]
    np.testing.assert_allclose(out["share"], share)
    np.testing.assert_allclose(out["catalog_share"], [0.5, 0.5])
    assert out["ratio"] == pytest.approx((1 / 3 / 0.5) / (2 / 3 / 0.5))  # 0.5
    assert out["coverage"] == pytest.approx(3 / 6)
    mad = np.abs(item[:, None] - item[None, :]).mean()  # Gini: mean |xi - xj| / (2 mean)
    assert out["gini"] == pytest.approx(mad / (2 * item.mean()))
    assert gini(item) == out["gini"]
    ci = exposure_bootstrap(user_exposure(top, 6), groups, 2, n_boot=200)
    assert all(lo <= hi for lo, hi in ci["share"])


def test_gini_against_the_direct_formula():
    rng = np.random.default_rng(1)
    for x in (rng.random(50), rng.exponential(size=7), np.r_[np.zeros(9), 1.0]):
        direct = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
        assert gini(x) == pytest.approx(direct, abs=1e-12)
    assert gini(np.ones(4)) == 0.0 and np.isnan(gini(np.zeros(3)))


def test_a_popularity_scorer_starves_the_tail_and_is_flagged(default_ctx, cards):
    ctx = default_ctx
    data = ctx.data
    pop = interaction_counts(histories(data), len(data.classes)).astype(np.float32)
    scores = torch.from_numpy(np.tile(pop, (len(data), 1)))
    ctx = dataclasses.replace(ctx, outputs=dataclasses.replace(ctx.outputs, logits=scores))
    result = rf.RecFairnessCheck(n_boot=100).run(ctx)
    ratio = result.metrics["items/exposure_ratio"]
    assert ratio.value < 0.05 and ratio.ci[1] < 0.1
    assert result.metrics["items/coverage@10"].value < 0.15  # the same few items for everyone
    flagged = [f for f in result.findings if "far from proportional" in f.message]
    assert flagged and flagged[0].severity == "medium"
    tail = flagged[0].evidence["item_groups"]["tail"]
    assert tail["exposure_share"] < 0.02 and tail["catalog_share"] == pytest.approx(0.8)
    # the trained model spreads exposure far wider than popularity does
    own = _m(cards["default"], "items/coverage@10")["value"]
    assert own > 3 * result.metrics["items/coverage@10"].value


def test_item_groups_fall_back_to_popularity_and_the_card_says_so(default_ctx):
    data = default_ctx.data
    bare = dataclasses.replace(data, catalog=dataclasses.replace(data.catalog, groups=None))
    result = rf.RecFairnessCheck(n_boot=50).run(dataclasses.replace(default_ctx, data=bare))
    assert "item groups" in result.limits and "popularity" in result.limits["item groups"]
    assert result.plots["exposure_vs_catalog_share"]["labels"][0].startswith("head")
    want = popularity_item_groups(histories(data), len(data.classes), 0.2)
    assert want.count("head") == 60
    counts = interaction_counts(histories(data), len(data.classes))
    assert min(counts[np.asarray(want) == "head"]) >= max(counts[np.asarray(want) == "tail"])


def test_metric_schema_and_skips(default_ctx, cards):
    for entry in cards.values():
        assert set(entry["metrics"]) == set(rf.RecFairnessCheck.higher_is_better)
        assert entry["metrics"]["items/coverage@10"]["ci"] is None  # said in the limits
        assert "coverage@10" in entry["limits"]
    data = default_ctx.data
    one_group = dataclasses.replace(data, groups=["a"] * len(data))
    ctx = dataclasses.replace(default_ctx, data=one_group)
    assert "at least 2 user groups" in rf.RecFairnessCheck().skip_reason(ctx)
    missing = rf.RecFairnessCheck(item_attribute="nope").skip_reason(default_ctx)
    assert "not in every item's meta" in missing
    by_attribute = rf.RecFairnessCheck(n_boot=20, item_attribute="favoured_by_b").run(default_ctx)
    assert by_attribute.plots["exposure_vs_catalog_share"]["labels"][0] == "False exposure"
    tiny = dataclasses.replace(data, groups=["c"] * 5 + list(data.groups[5:]))
    result = rf.RecFairnessCheck(n_boot=20).run(dataclasses.replace(default_ctx, data=tiny))
    assert any(f.evidence.get("left_out") == {"c": 5} for f in result.findings)
    assert result.plots["ndcg_per_user_group"]["labels"] == ["a", "b"]
