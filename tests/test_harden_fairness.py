"""Fairness mitigation (mmsafe.harden.fairness): group norming, adversary, group thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fairlearn.postprocessing import ThresholdOptimizer
from sklearn.base import BaseEstimator, ClassifierMixin

from mmsafe.harden.fairness import (
    FairnessMitigationReport,
    GroupStandardizer,
    GroupThresholdOptimizer,
    MitigationRow,
    NotFittedError,
    _representation,
    fit_adversarial_fusion_head,
    mitigate_fairness,
    one_vs_rest_override,
)
from mmsafe.metrics.fairness import group_fairness
from mmsafe.models.heads import fit_fusion_head

# The quick tiny-clip (trained on shapes:n=900) encodes a larger world with the same planted
# spurious tone/class correlation (spurious=0.9 in train, independent in calibration/test); the
# fusion heads are trained on its train split, so they learn the tone shortcut. 600 test rows
# keep the gaps' sampling noise well below the effects asserted here.
MITIGATION_WORLD = "shapes:n=3000,seed=1,train_defects=0"


# --------------------------------------------------------------------------- pre


def test_group_standardizer_per_group_and_fallbacks() -> None:
    gen = torch.Generator().manual_seed(0)
    g = np.array(["a"] * 50 + ["b"] * 40 + ["tiny"] * 3)
    img = torch.randn(93, 4, generator=gen) + torch.as_tensor(g == "b")[:, None] * 5.0
    txt = torch.randn(93, 2, generator=gen) * 3.0
    gs = GroupStandardizer(min_group_size=5).fit({"image": img, "text": txt}, g)
    assert gs.groups_ == ("a", "b")  # "tiny" is too small for its own statistics
    out = gs.transform({"image": img, "text": txt}, g)
    for k in ("a", "b"):
        rows = torch.as_tensor(g == k)
        for m in ("image", "text"):
            torch.testing.assert_close(out[m][rows].mean(0), torch.zeros(out[m].shape[1]),
                                       atol=1e-5, rtol=0)  # fmt: skip
            torch.testing.assert_close(out[m][rows].std(0, unbiased=False),
                                       torch.ones(out[m].shape[1]), atol=1e-5, rtol=0)  # fmt: skip
    # a small group and a group first seen at transform use the global statistics
    glob = (img - img.mean(0)) / img.std(0, unbiased=False)
    torch.testing.assert_close(out["image"][90:], glob[90:])
    new = gs.transform({"image": img[:2]}, ["unseen", "a"])["image"]
    torch.testing.assert_close(new[0], glob[0])
    torch.testing.assert_close(new[1], out["image"][1])
    with pytest.raises(NotFittedError):
        GroupStandardizer().transform({"image": img}, g)
    with pytest.raises(ValueError, match="not seen"):
        gs.transform({"audio": img}, g)
    with pytest.raises(ValueError, match="one entry per row"):
        gs.transform({"image": img}, g[:-1])


# --------------------------------------------------------------------------- in


def _shortcut_data(n: int, seed: int, spurious: float):
    """2 classes; a noisy label signal plus a clean group feature correlated with the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    grp = np.where(rng.random(n) < spurious, y, 1 - y)
    x = np.c_[
        y[:, None] + rng.normal(0, 0.8, (n, 3)), 2.0 * grp[:, None] + rng.normal(0, 0.1, (n, 2))
    ]
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), grp.astype(str)


def _group_probe_accuracy(head, x, y, grp) -> float:
    """Held-out accuracy of a logistic-regression probe for the group, given the hidden layer
    and the label (what an equalized-odds adversary may not use)."""
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        r = _representation(head, {"image": x}).numpy()
    feats = np.c_[r, y.numpy()]
    half = len(y) // 2
    probe = LogisticRegression(max_iter=2000).fit(feats[:half], grp[:half])
    return float(probe.score(feats[half:], grp[half:]))


def test_adversary_weakens_the_shortcut_but_not_a_fresh_probe() -> None:
    """Train rows: group = label 90% of the time, and the group feature is clean while the label
    signal is noisy; test rows: group independent of the label.

    Measured (seed 0, 40 epochs): weight 0 -> test accuracy 0.744, equalized-odds difference
    0.568; weight 3 -> 0.838 and 0.236. A fresh logistic-regression probe still reads the
    group from the hidden layer (0.99+ in both cases): gradient reversal stops the head from
    *using* the group, it does not erase every linear trace of it (the known limit of
    adversarial removal, Elazar & Goldberg 2018).
    """
    x, y, grp = _shortcut_data(600, 0, spurious=0.9)
    xt, yt, gt = _shortcut_data(2000, 1, spurious=0.5)
    kw = {"hidden": 16, "epochs": 40, "seed": 0}
    plain = fit_adversarial_fusion_head({"image": x}, y, grp, adversary_weight=0.0, **kw)
    adv = fit_adversarial_fusion_head({"image": x}, y, grp, adversary_weight=3.0, **kw)
    with torch.no_grad():
        preds = [h({"image": xt}).argmax(-1).numpy() for h in (plain, adv)]
    acc = [float((p == yt.numpy()).mean()) for p in preds]
    eod = [group_fairness(yt, p, gt, 2).summary["equalized_odds_difference"] for p in preds]
    assert acc[1] > acc[0] + 0.05
    assert eod[1] < eod[0] - 0.1
    assert adv.fit_info["adversary_group_accuracy"] < plain.fit_info["adversary_group_accuracy"]
    # the documented limit: a fresh probe still finds the group in the hidden layer
    assert _group_probe_accuracy(plain, xt, yt, gt) > 0.95
    assert _group_probe_accuracy(adv, xt, yt, gt) > 0.9
    assert adv.fit_info["adversary_weight"] == 3.0 and adv.fit_info["groups"] == ["0", "1"]
    # a plain FusionHead comes back (no adversary weights), deterministic for a seed
    again = fit_adversarial_fusion_head({"image": x}, y, grp, adversary_weight=3.0, **kw)
    for k, v in adv.state_dict().items():
        torch.testing.assert_close(v, again.state_dict()[k])
    with pytest.raises(ValueError, match="hidden"):
        fit_adversarial_fusion_head({"image": x}, y, grp, hidden=0)
    with pytest.raises(ValueError, match="two groups"):
        fit_adversarial_fusion_head({"image": x}, y, ["a"] * len(y), hidden=4)


# --------------------------------------------------------------------------- post


class _Scores(ClassifierMixin, BaseEstimator):
    """The test's own prefit estimator: P(positive | x) is column ``c`` of X."""

    def __init__(self, c: int = 0) -> None:
        self.c = c

    def fit(self, X, y=None):  # noqa: N803
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):  # noqa: N803
        return np.c_[1 - X[:, self.c], X[:, self.c]]


def _random_probs(seed: int, n: int = 500, k: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    g = rng.choice(["a", "b", "c"], n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y] + (g == "a")[:, None] * [1.5, 0, 0, 0]
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y, g


@pytest.mark.parametrize("constraints", ["equalized_odds", "demographic_parity"])
def test_threshold_optimizer_equals_fairlearn_directly(constraints: str) -> None:
    p, y, g = _random_probs(0)
    pt, _, gt = _random_probs(1)
    ours = GroupThresholdOptimizer(positive_class=0, constraints=constraints).fit(p, y, g)
    ref = ThresholdOptimizer(
        estimator=_Scores(0).fit(p),
        constraints=constraints,
        prefit=True,
        predict_method="predict_proba",
    ).fit(p, (y == 0).astype(int), sensitive_features=g)
    expected = ref.predict(pt, sensitive_features=gt, random_state=3)
    np.testing.assert_array_equal(ours.predict_binary(pt, gt, random_state=3), expected)
    multi = ours.predict(pt, gt, random_state=3)
    np.testing.assert_array_equal(multi == 0, expected == 1)  # the one-vs-rest view is fairlearn's
    keep = expected == 1
    np.testing.assert_array_equal(
        multi[~keep & (pt.argmax(1) != 0)], pt.argmax(1)[~keep & (pt.argmax(1) != 0)]
    )


def test_threshold_optimizer_picks_the_worst_class_and_validates() -> None:
    p, y, g = _random_probs(2)
    opt = GroupThresholdOptimizer().fit(p, y, g)
    rep = group_fairness(y, p.argmax(1), g, 4)
    assert opt.positive_class_ == int(np.argmax(rep.per_class["equalized_odds_difference"]))
    with pytest.raises(NotFittedError):
        GroupThresholdOptimizer().predict(p, g)
    with pytest.raises(ValueError, match="constraints"):
        GroupThresholdOptimizer(constraints="equal_pay").fit(p, y, g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        GroupThresholdOptimizer(positive_class=7).fit(p, y, g)


def test_one_vs_rest_override_keeps_the_binary_decision() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((200, 5))
    accept = rng.integers(0, 2, 200)
    for c in range(5):
        out = one_vs_rest_override(p, c, accept)
        np.testing.assert_array_equal(out == c, accept == 1)
        untouched = (accept == 0) & (p.argmax(1) != c)
        np.testing.assert_array_equal(out[untouched], p.argmax(1)[untouched])


# --------------------------------------------------------------------------- on the shapes world


@pytest.fixture(scope="module")
def mitigation(shapes_quick):
    from mmsafe.data.loading import load_data
    from mmsafe.engine import Engine

    _, model = shapes_quick
    world = load_data(MITIGATION_WORLD)
    engine = Engine(progress=False)
    report = mitigate_fairness(model, world, engine=engine, seed=0)
    return model, world, engine, report


def test_mitigations_shrink_the_planted_gap(mitigation) -> None:
    """Measured on this world (seed 0; macro equalized-odds difference, accuracy):
    none 0.246 / 0.774, pre 0.168 / 0.793, in 0.130 / 0.828; on the thresholded class
    (triangle, the tone-boundary class) post takes the equalized-odds gap 0.387 -> 0.012 at
    accuracy 0.750. Seeds 1-3 gave the same direction for every method on its own target
    (see the module report)."""
    *_, report = mitigation
    assert isinstance(report, FairnessMitigationReport)
    assert report.methods == ("none", "pre", "in", "post")
    none, pre, adv, post = (report.row(m) for m in report.methods)
    # Measured on an AVX2-only 2-core machine (same seed): none 0.232 / 0.781, pre 0.214 /
    # 0.791, in 0.118 / 0.815; post takes the thresholded class's gap 0.116 -> 0.012 at 0.761
    # (its parity gap 0.022 -> 0.040: equalized odds, not parity, is what post constrains).
    # The bounds below hold on both machines; the margins on one draw are not asserted.
    # the planted shortcut gives a real gap to mitigate
    assert none.equalized_odds_difference > 0.18
    # post: fairlearn's thresholds at least halve the gap on the class they are fitted for
    assert post.positive_class_equalized_odds_difference < (
        none.positive_class_equalized_odds_difference / 2
    )
    assert post.accuracy > none.accuracy - 0.05
    # pre and in: the macro gap over all classes shrinks, and accuracy does not suffer (the
    # test split has no tone shortcut to exploit, so removing it helps)
    assert pre.equalized_odds_difference < none.equalized_odds_difference
    assert adv.equalized_odds_difference < none.equalized_odds_difference - 0.05
    assert pre.statistical_parity_difference < none.statistical_parity_difference
    assert adv.statistical_parity_difference < none.statistical_parity_difference
    assert min(pre.accuracy, adv.accuracy) > none.accuracy - 0.01
    # the report is JSON-able, with deltas against the unmitigated head
    table = report.table()
    assert table[0]["delta/accuracy"] == 0.0
    assert table[3]["delta/positive_class_equalized_odds_difference"] == pytest.approx(
        post.positive_class_equalized_odds_difference
        - none.positive_class_equalized_odds_difference
    )
    json.dumps(report.to_dict())
    assert report.n_test > 500 and report.groups == ("dark", "light")
    assert set(report.details["post"]["thresholds"]) == {"dark", "light"}
    with pytest.raises(KeyError):
        report.row("magic")


def test_post_row_equals_fairlearn_on_the_same_head(mitigation) -> None:
    """Rebuild the unmitigated head and the calibration/test probabilities independently, call
    fairlearn directly, and get the report's ``post`` row back exactly."""
    model, world, engine, report = mitigation
    from mmsafe.audit import evaluation_splits

    test, cal, train = evaluation_splits(world)

    def arrays(d):
        keep = d.labelled
        emb = engine.embed(model, d, ("image", "text"))
        idx = torch.as_tensor(np.flatnonzero(keep))
        groups = np.asarray(d.groups)[keep]
        return {m: e[idx] for m, e in emb.items()}, np.asarray(d.labels)[keep], groups

    (x_tr, y_tr, _), (x_cal, y_cal, g_cal), (x_te, y_te, g_te) = map(arrays, (train, cal, test))
    head = fit_fusion_head(x_tr, torch.as_tensor(y_tr), num_classes=5, hidden=64, epochs=60)
    with torch.no_grad():
        p_cal = torch.softmax(head(x_cal), -1).double().numpy()
        p_te = torch.softmax(head(x_te), -1).double().numpy()
    c = list(world.classes).index(report.positive_class)
    ref = ThresholdOptimizer(
        estimator=_Scores(c).fit(p_cal),
        constraints="equalized_odds",
        prefit=True,
        predict_method="predict_proba",
    ).fit(p_cal, (y_cal == c).astype(int), sensitive_features=g_cal)
    accept = ref.predict(p_te, sensitive_features=g_te, random_state=0)
    preds = one_vs_rest_override(p_te, c, accept)
    expected = MitigationRow.from_report("post", group_fairness(y_te, preds, g_te, 5), c)
    assert report.row("post") == expected
    base = MitigationRow.from_report("none", group_fairness(y_te, p_te.argmax(1), g_te, 5), c)
    assert report.row("none") == base


def test_mitigate_fairness_validates(mitigation) -> None:
    model, world, engine, _ = mitigation
    with pytest.raises(ValueError, match="Unknown mitigation"):
        mitigate_fairness(model, world, methods=("during",), engine=engine)
    no_cal = world.subset(np.flatnonzero(np.asarray(world.splits) != "calibration"))
    with pytest.raises(ValueError, match="calibration"):
        mitigate_fairness(model, no_cal, methods=("post",), engine=engine)
    with pytest.raises(ValueError, match="positive_class"):
        mitigate_fairness(model, world, methods=("post",), engine=engine, positive_class="star")
