"""Group-fairness metrics (mmsafe.metrics.fairness) and the controllability.fairness check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)

from mmsafe.checks.controllability.fairness import FairnessCheck, intersect, sensitive_features
from mmsafe.metrics import grouped_mean_ci
from mmsafe.metrics.fairness import (
    binary_fpr,
    binary_selection_rate,
    binary_tpr,
    encode_groups,
    fairness_bootstrap,
    group_fairness,
    summarise_rates,
)
from tests.conftest import ToyEncoder, audit_context, make_colour_data

# --------------------------------------------------------------------------- metrics


def _random_case(seed: int, n: int = 600, n_classes: int = 4, n_groups: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    g = rng.choice([f"g{k}" for k in range(n_groups)], n)
    # group-dependent accuracy, so the gaps are not all ~0
    acc = np.where(g == "g0", 0.9, 0.6)
    p = np.where(rng.random(n) < acc, y, rng.integers(0, n_classes, n))
    return y, p, g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaps_agree_with_fairlearn_functions(seed: int) -> None:
    y, p, g = _random_case(seed)
    r = group_fairness(y, p, g, 4)
    for c in range(4):
        yt, yp = y == c, p == c
        assert r.per_class["statistical_parity_difference"][c] == pytest.approx(
            demographic_parity_difference(yt, yp, sensitive_features=g)
        )
        assert r.per_class["statistical_parity_ratio"][c] == pytest.approx(
            demographic_parity_ratio(yt, yp, sensitive_features=g)
        )
        assert r.per_class["equalized_odds_difference"][c] == pytest.approx(
            equalized_odds_difference(yt, yp, sensitive_features=g, agg="worst_case")
        )
        assert r.per_class["equal_opportunity_difference"][c] == pytest.approx(
            equal_opportunity_difference(yt, yp, sensitive_features=g)
        )
        ref = MetricFrame(
            metrics={"sr": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate},
            y_true=yt,
            y_pred=yp,
            sensitive_features=g,
        ).by_group
        np.testing.assert_allclose(r.selection_rate[:, c], ref["sr"].to_numpy())
        np.testing.assert_allclose(r.tpr[:, c], ref["tpr"].to_numpy())
        np.testing.assert_allclose(r.fpr[:, c], ref["fpr"].to_numpy())
    assert r.summary["statistical_parity_difference"] == pytest.approx(
        np.mean(r.per_class["statistical_parity_difference"])
    )
    assert r.summary["equalized_odds_difference_worst"] == pytest.approx(
        np.max(r.per_class["equalized_odds_difference"])
    )
    assert r.summary["statistical_parity_ratio_worst"] == pytest.approx(
        np.min(r.per_class["statistical_parity_ratio"])
    )
    # masked-subset reference for accuracy (fairlearn's own test style)
    for k, name in enumerate(r.groups):
        m = g == name
        assert r.accuracy[k] == pytest.approx(np.mean(y[m] == p[m]))
        assert r.counts[k] == m.sum()


def test_hand_computed_small_example() -> None:
    #        group a          | group b
    y = np.array([0, 0, 1, 1, 2, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0, 0, 2, 2, 2])
    g = np.array(["a"] * 5 + ["b"] * 5)
    r = group_fairness(y, p, g, 3)
    assert r.groups == ["a", "b"]
    assert r.accuracy.tolist() == [0.8, 0.6]
    # selection rates: a: pred 0 1/5, 1 3/5, 2 1/5; b: 0 2/5, 1 0, 2 3/5
    np.testing.assert_allclose(r.selection_rate, [[0.2, 0.6, 0.2], [0.4, 0.0, 0.6]])
    # TPR: a: class 0 1/2, class 1 2/2, class 2 1/1; b: class 0 1/1, class 1 0/2, class 2 2/2
    np.testing.assert_allclose(r.tpr, [[0.5, 1.0, 1.0], [1.0, 0.0, 1.0]])
    # FPR: a: class 0 0/3, class 1 1/3, class 2 0/4; b: class 0 1/4, class 1 0/3, class 2 1/3
    np.testing.assert_allclose(r.fpr, [[0, 1 / 3, 0], [1 / 4, 0, 1 / 3]])
    spd = [0.2, 0.6, 0.4]
    eod = [max(0.5, 0.25), max(1.0, 1 / 3), max(0.0, 1 / 3)]
    assert r.summary["statistical_parity_difference"] == pytest.approx(np.mean(spd))
    assert r.summary["statistical_parity_difference_worst"] == pytest.approx(0.6)
    assert r.summary["statistical_parity_ratio"] == pytest.approx(np.mean([0.5, 0.0, 1 / 3]))
    assert r.summary["equal_opportunity_difference"] == pytest.approx(np.mean([0.5, 1.0, 0.0]))
    assert r.summary["equalized_odds_difference"] == pytest.approx(np.mean(eod))
    assert r.summary["accuracy_difference"] == pytest.approx(0.2)
    assert r.tpr_macro.tolist() == pytest.approx([2.5 / 3, 2 / 3])
    # the vectorised formulas give the same summaries as the MetricFrame path
    vec = summarise_rates(r.selection_rate, r.tpr, r.fpr, r.accuracy)
    for k, v in vec.items():
        if "/" not in k:
            assert float(v) == pytest.approx(r.summary[k]), k


def test_binary_rates_and_undefined_rates() -> None:
    assert binary_selection_rate([0, 1, 1, 0], [1, 1, 1, 0]) == 0.75
    assert binary_tpr([1, 1, 0], [1, 0, 1]) == 0.5
    assert binary_fpr([1, 1, 0], [1, 0, 1]) == 1.0
    assert math.isnan(binary_tpr([0, 0], [1, 1])) and math.isnan(binary_fpr([1], [1]))
    # group b has no row of class 1: its TPR is NaN (fairlearn says 0) and is left out of the gap
    y = np.array([0, 1, 1, 0, 0, 0])
    p = np.array([0, 1, 0, 0, 1, 0])
    g = np.array(["a", "a", "a", "b", "b", "b"])
    r = group_fairness(y, p, g, 2)
    assert math.isnan(r.tpr[1, 1])
    assert r.per_class["equal_opportunity_difference"][1] == 0.0  # one defined group
    assert equal_opportunity_difference(y == 1, p == 1, sensitive_features=g) == 0.5


def test_bootstrap_intervals_match_grouped_mean_ci_and_cover() -> None:
    y, p, g = _random_case(3, n=400)
    codes, names = encode_groups(g)
    ci = fairness_bootstrap(y, p, codes, len(names), 4, n_boot=300, seed=5)
    _, per = grouped_mean_ci((y == p).astype(float), codes, len(names), n_boot=300, seed=5)
    for k in range(len(names)):  # the same resamples as grouped_mean_ci
        assert ci[f"accuracy/{k}"] == pytest.approx(per[k])
    r = group_fairness(y, p, g, 4)
    assert ci["accuracy_difference"][0] <= r.summary["accuracy_difference"] + 0.05
    for key in ("equalized_odds_difference", "statistical_parity_difference"):
        lo, hi = ci[key]
        assert lo < hi and lo <= r.summary[key] + 0.05 and r.summary[key] <= hi
    assert ci["selection_rate/0/1"][0] <= r.selection_rate[0, 1] <= ci["selection_rate/0/1"][1]
    with pytest.raises(ValueError):
        fairness_bootstrap(y, p[:-1], codes, 3, 4)


# --------------------------------------------------------------------------- the check


def test_sensitive_features_and_intersection(colour_data) -> None:
    for i, m in enumerate(colour_data.meta):
        m["group_size"] = "big" if i % 3 else "small"
        m["other"] = "x"
    cols = sensitive_features(colour_data, None)
    assert list(cols) == ["group", "group_size"]
    joint = intersect(cols)
    assert joint[0] == f"{colour_data.groups[0]}&small"
    assert list(sensitive_features(colour_data, ["other"])) == ["other"]

    ctx = audit_context(ToyEncoder(), colour_data)
    res = FairnessCheck(n_boot=100, min_group_size=1).run(ctx)
    m = res.metrics
    keep = ctx.outputs.labels >= 0
    ev_joint = np.asarray(intersect(sensitive_features(ctx.data, None)))[keep]
    ref = group_fairness(ctx.outputs.labels[keep], ctx.outputs.preds[keep], ev_joint, 3)
    assert m["equalized_odds_difference"].value == pytest.approx(
        ref.summary["equalized_odds_difference"]
    )
    # headline on the 4 intersectional groups, single features reported too
    assert "equalized_odds_difference/group" in m and "equalized_odds_difference/group_size" in m
    groups = {k.split("/")[1] for k in m if k.startswith("accuracy/")}
    assert groups == {"g0&big", "g0&small", "g1&big", "g1&small"}


def test_check_on_toy_model_zero_shot(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data)
    res = FairnessCheck(n_boot=100).run(ctx)
    keep = ctx.outputs.labels >= 0
    ref = group_fairness(
        ctx.outputs.labels[keep], ctx.outputs.preds[keep], np.asarray(ctx.data.groups)[keep], 3
    )
    for k in ("statistical_parity_difference", "equalized_odds_difference", "accuracy_difference"):
        assert res.metrics[k].value == pytest.approx(ref.summary[k])
        assert res.metrics[k].ci is not None
    assert res.metrics["accuracy/g0"].value == pytest.approx(ref.accuracy[0])
    assert {"selection_rate/g1/red", "tpr/g0", "fpr/g1"} <= set(res.metrics)
    assert any("not a fusion task" in f.message for f in res.findings)
    assert res.plots["accuracy_per_group"]["kind"] == "bar"
    assert res.plots["accuracy_per_group"]["labels"] == ["g0", "g1"]
    assert res.plots["selection_rate"]["kind"] == "heatmap"
    res.to_dict()


def test_skip_reasons(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data)
    assert FairnessCheck().skip_reason(ctx) is None
    assert "2 groups" in FairnessCheck(min_group_size=1000).skip_reason(ctx)
    ctx.data.groups = None
    assert "group" in FairnessCheck().skip_reason(ctx)
    assert "no group column" in FairnessCheck(attributes=["group"]).skip_reason(ctx)
    with pytest.raises(ValueError):
        FairnessCheck(min_group_size=0)


def test_small_groups_are_left_out() -> None:
    data = make_colour_data(n=300)
    data.groups = ["tiny" if i >= 295 else ("g0" if i % 2 else "g1") for i in range(len(data))]
    ctx = audit_context(ToyEncoder(), data)
    assert sum(g == "tiny" for g in ctx.data.groups) == 5  # rows of the test split
    res = FairnessCheck(n_boot=50, min_group_size=3).run(ctx)
    assert "accuracy/tiny" in res.metrics
    res = FairnessCheck(n_boot=50, min_group_size=20).run(ctx)
    assert "accuracy/tiny" not in res.metrics and "accuracy/g0" in res.metrics
    assert any("left out: tiny (5)" in f.message for f in res.findings)
    res = FairnessCheck(n_boot=50, min_group_size=90).run(ctx)
    assert res.status == "skipped" and "2 groups" in res.reason


def test_planted_spurious_tone_shows_as_a_group_gap(shapes_quick) -> None:
    """The quick tiny-clip was trained with class/tone correlated (spurious=0.9); test tone is
    independent of class, so a model that learned the shortcut predicts the dark-majority
    classes more on dark rows: a one-vs-rest TPR/selection-rate gap across tone.

    Measured (162 labelled test rows, seed 0): zero-shot equalized-odds difference 0.498 (CI
    [0.36, 0.63]), statistical parity 0.234; the same tone split on a quick tiny-clip trained
    on ``shapes:n=900,train_defects=0,spurious=0`` gave 0.128 and 0.070 (that model takes
    minutes to train on 2 shared cores, so the suite compares with a random grouping of the
    same rows instead).
    """
    world, model = shapes_quick
    ctx = audit_context(model, world)
    res = FairnessCheck(n_boot=300).run(ctx)
    eod = res.metrics["equalized_odds_difference"]
    spd = res.metrics["statistical_parity_difference"]
    assert eod.value > 0.3 and eod.ci[0] > 0.2
    assert spd.value > 0.15
    assert any(f.severity == "medium" and "Equalized odds" in f.message for f in res.findings)

    # Control: the same predictions, groups assigned at random (no relation to the shortcut).
    rng = np.random.default_rng(0)
    ctx.data.groups = list(rng.permutation(np.asarray(ctx.data.groups)))
    control = FairnessCheck(n_boot=300).run(ctx)
    assert control.metrics["equalized_odds_difference"].value < eod.ci[0]
    assert control.metrics["statistical_parity_difference"].value < spd.ci[0]


def test_fusion_attribution_points_at_the_image(shapes_quick) -> None:
    """On fusion the tone shortcut lives in the image embedding: replacing the image by its mean
    training embedding shrinks the equalized-odds gap (measured 0.393 -> 0.099), replacing the
    text does not (0.584)."""
    world, model = shapes_quick
    ctx = audit_context(model, world, task="fusion")
    res = FairnessCheck(n_boot=200).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    full = m["equalized_odds_difference"]
    assert m["equalized_odds_difference/without_image"] < full - 0.1
    assert m["equalized_odds_difference/attributed_to_image"] == pytest.approx(
        full - m["equalized_odds_difference/without_image"]
    )
    assert (
        m["equalized_odds_difference/attributed_to_image"]
        > m["equalized_odds_difference/attributed_to_text"]
    )
    assert any("removing image shrinks it most" in f.message for f in res.findings)
    assert res.plots["modality_attribution"]["kind"] == "bar"
    res.to_dict()


def test_caption_variants_compare_accuracy_across_translations() -> None:
    """Fusion on the colour toy with noise images: the toy text encoder counts English colour
    words, so a German caption carries no label information and accuracy falls towards chance;
    an identical copy of the captions changes nothing."""
    import torch

    data = make_colour_data(n=600, seed=3)
    rng = np.random.default_rng(0)  # uninformative images: only the caption tells the colour
    data.modalities["image"] = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in data.ids]
    german = {"red": "rot", "green": "grün", "blue": "blau"}
    for m, t in zip(data.meta, data.modalities["text"], strict=True):
        m["text_copy"] = t
        m["text_de"] = "ein " + german[t.split()[1]] + "es Quadrat"
    ctx = audit_context(ToyEncoder(), data, task="fusion")
    check = FairnessCheck(text_variants=("text_copy", "text_de", "paraphrase"), n_boot=200)
    res = check.run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    keep = ctx.outputs.labels >= 0
    original = float((ctx.outputs.preds[keep] == ctx.outputs.labels[keep]).mean())
    assert m["variant_accuracy/text_copy"] == pytest.approx(original)
    # recompute the German variant by hand through the task's head
    test = ctx.data.subset(keep)
    texts = [mm["text_de"] for mm in test.meta]
    model = ctx.model
    emb = {
        "image": ctx.outputs.embeddings["image"][torch.as_tensor(keep)],
        "text": model.encode({"text": model.preprocess("text", texts)})["text"],
    }
    with torch.no_grad():
        preds = ctx.task.logits(emb).argmax(-1).numpy()
    by_hand = float((preds == test.labels).mean())
    assert m["variant_accuracy/text_de"] == pytest.approx(by_hand)
    assert by_hand < original - 0.1  # the translation lost the caption's information
    accs = [original, m["variant_accuracy/text_copy"], by_hand, m["variant_accuracy/paraphrase"]]
    assert m["variant_accuracy_spread"] == pytest.approx(max(accs) - min(accs))
    lo, hi = res.metrics["variant_accuracy_spread"].ci
    assert lo <= m["variant_accuracy_spread"] <= hi
    assert any("caption variants" in f.message for f in res.findings)
    table = res.plots["caption_variants"]["rows"]
    assert [r[0] for r in table] == ["original", "text_copy", "text_de", "paraphrase"]
    with pytest.raises(ValueError, match="neither a meta key"):
        FairnessCheck(text_variants=("nope",)).run(ctx)
