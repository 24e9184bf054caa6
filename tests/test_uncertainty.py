"""Uncertainty metrics (mmsafe.metrics.uncertainty) and the monitoring.uncertainty check."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from torch import Tensor, nn

from mmsafe.checks.monitoring.uncertainty import (
    UncertaintyCheck,
    augment_pixels,
    best_avu_threshold,
    dropout_modules,
)
from mmsafe.metrics.uncertainty import (
    avu,
    avu_counts,
    bald,
    confidence_violation_rate,
    confidence_violations,
    predictive_entropy,
)
from mmsafe.tasks.fusion import fusion_head_of
from tests.conftest import ToyEncoder, audit_context

# --------------------------------------------------------------------------- metrics


def test_predictive_entropy_matches_scipy_and_bounds() -> None:
    p = np.random.default_rng(0).dirichlet(np.ones(5) * 0.5, size=200)
    p[0] = [1.0, 0, 0, 0, 0]
    p[1] = 0.2
    h = predictive_entropy(p)
    np.testing.assert_allclose(h, scipy_entropy(p, axis=1), rtol=1e-12, atol=1e-15)
    assert h[0] == 0.0 and h[1] == pytest.approx(math.log(5))
    assert (h >= 0).all() and (h <= math.log(5) + 1e-12).all()
    with pytest.raises(ValueError):
        predictive_entropy([[0.5, 0.6]])


def test_avu_hand_computed() -> None:
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))  # noqa: E731
    probs = [[0.95, 0.05], [0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.98, 0.02], [0.7, 0.3]]
    target = [0, 0, 0, 1, 1, 0]
    th = 0.5  # entropies: 0.199, 0.325, 0.688, 0.673, 0.098, 0.611
    assert [h(p[0]) <= th for p in probs] == [True, True, False, False, True, False]
    # accurate: T T T F F T -> AC = rows 0, 1; AU = rows 2, 5; IU = row 3; IC = row 4
    counts = avu_counts(probs, target, th)
    assert (counts.n_ac, counts.n_au, counts.n_ic, counts.n_iu) == (2, 2, 1, 1)
    assert avu(probs, target, th) == pytest.approx(3 / 6)
    assert counts.avu == pytest.approx(0.5)
    # A threshold exactly at a row's entropy makes it certain (<=).
    assert avu_counts([[0.5, 0.5]], [0], math.log(2)).n_ac == 1
    # Extreme thresholds: everything certain -> AvU = accuracy; everything uncertain -> error.
    assert avu(probs, target, 10.0) == pytest.approx(4 / 6)
    assert avu(probs, target, -1.0) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        avu(probs, target, math.nan)


def test_bald_hand_examples_and_nonnegative() -> None:
    # p1 = [0.9, 0.1], p2 = [0.5, 0.5]: H(mean [0.7, 0.3]) - (H(p1) + H(p2)) / 2
    expected = scipy_entropy([0.7, 0.3]) - (scipy_entropy([0.9, 0.1]) + math.log(2)) / 2
    samples = np.array([[[0.9, 0.1], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]])
    b = bald(samples)
    assert b[0] == pytest.approx(expected, rel=1e-12)
    assert b[0] == pytest.approx(0.1018, abs=1e-4)
    assert b[1] == pytest.approx(math.log(2))  # confident passes that disagree
    rng = np.random.default_rng(1)
    many = rng.dirichlet(np.ones(4), size=(6, 300))
    scores = bald(many)
    assert (scores >= 0).all() and (scores <= math.log(4) + 1e-12).all()
    same = np.repeat(many[:1], 5, axis=0)  # every pass agrees
    assert np.abs(bald(same)).max() < 1e-12
    with pytest.raises(ValueError, match="T, N, C"):
        bald(many[0])


def test_confidence_violations_ties_tolerance_and_subsets() -> None:
    full = [0.9, 0.6, 0.7, 0.5]
    assert confidence_violations(full, [0.9, 0.6, 0.7, 0.5]).sum() == 0  # ties: no violation
    assert confidence_violation_rate(full, [0.95, 0.6, 0.71, 0.4]) == pytest.approx(0.5)
    assert confidence_violation_rate(full, [0.95, 0.6, 0.71, 0.4], tolerance=0.02) == 0.25
    sub = [[0.8, 0.2], [0.7, 0.5], [0.7, 0.1], [0.4, 0.9]]  # any column counts
    assert confidence_violations(full, sub).tolist() == [False, True, False, True]
    with pytest.raises(ValueError):
        confidence_violations(full, [0.1, 0.2])
    with pytest.raises(ValueError):
        confidence_violations(full, full, tolerance=-0.1)


def test_best_avu_threshold_maximises_avu() -> None:
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(3), size=300)
    y = rng.integers(0, 3, 300)
    h = predictive_entropy(p)
    th = best_avu_threshold(h, p.argmax(1) == y)
    grid = np.linspace(-0.1, math.log(3) + 0.1, 2001)
    brute = max(avu(p, y, t) for t in grid)
    assert avu(p, y, th) == pytest.approx(brute)  # the grid cannot beat the chosen threshold


def test_augment_pixels_identity_and_determinism() -> None:
    px = torch.rand(5, 3, 8, 8)
    same = augment_pixels(px, torch.Generator().manual_seed(0), 0, 0.0, flip=False)
    assert torch.equal(same, px)
    a = augment_pixels(px, torch.Generator().manual_seed(3))
    b = augment_pixels(px, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, px)


# --------------------------------------------------------------------------- the check


def test_check_on_zero_shot_session_model(shapes_quick) -> None:
    world, model = shapes_quick
    ctx = audit_context(model, world)
    res = UncertaintyCheck(n_boot=200).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    for key in ("entropy", "entropy_correct", "entropy_wrong", "entropy_gap", "avu", "bald"):
        assert math.isfinite(m[key]), key
    assert not any(k.startswith("violation_rate") for k in m)
    keep = ctx.outputs.labels >= 0
    h = predictive_entropy(ctx.outputs.probs[keep])
    assert m["entropy"] == pytest.approx(h.mean())
    # Measured on the 162 labelled test rows: 0.706 (wrong) vs 0.360 (correct), gap CI
    # [0.23, 0.45]; 0.1 leaves a wide margin, and the CI must exclude 0.
    assert m["entropy_wrong"] > m["entropy_correct"] + 0.1
    assert res.metrics["entropy_gap"].ci[0] > 0
    assert 0 < m["bald"] < math.log(len(world.classes))  # measured 0.117
    assert 0.5 < m["avu"] <= 1.0  # measured 0.71
    assert m["avu_threshold"] > 0
    notes = " ".join(f.message for f in res.findings)
    assert "test-time augmentation" in notes and "calibration split" in notes
    assert "one modality" in notes
    assert not [f for f in res.findings if f.severity == "medium" and "entropy" in f.message]
    spec = res.plots["entropy_histogram"]
    assert spec["kind"] == "line" and len(spec["series"]) == 2
    assert all(sum(s["y"]) == pytest.approx(1.0) for s in spec["series"])
    res.to_dict()  # JSON-able


def test_check_fusion_violations_match_direct_head_calls(shapes_quick) -> None:
    world, model = shapes_quick
    ctx = audit_context(model, world, task="fusion")
    res = UncertaintyCheck(n_boot=200).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    head = fusion_head_of(ctx.task)
    keep = ctx.outputs.labels >= 0
    emb = {k: v[torch.as_tensor(keep)] for k, v in ctx.outputs.embeddings.items()}
    with torch.no_grad():  # the head fills a missing modality with its null embedding
        full = torch.softmax(head(emb).double(), -1).max(-1).values.numpy()
        no_image = torch.softmax(head({"text": emb["text"]}).double(), -1).max(-1).values
        no_text = torch.softmax(head({"image": emb["image"]}).double(), -1).max(-1).values
    assert m["violation_rate/image"] == pytest.approx(np.mean(no_image.numpy() > full))
    assert m["violation_rate/text"] == pytest.approx(np.mean(no_text.numpy() > full))
    both = np.column_stack([no_image.numpy(), no_text.numpy()])
    assert m["violation_rate"] == pytest.approx(confidence_violation_rate(full, both))
    assert m["bald"] >= 0 and math.isfinite(m["entropy_gap"])
    # Measured: fusion entropy 1.237 (wrong) vs 0.890 (correct), violation rate 0.204.
    assert m["entropy_wrong"] > m["entropy_correct"] + 0.1
    finding = [f for f in res.findings if "modality raises" in f.message]
    assert bool(finding) == (m["violation_rate"] > 0.2)
    if finding:
        assert finding[0].severity == "medium" and "cml_finetune" in finding[0].remediation
    assert res.plots["confidence_violations"]["kind"] == "bar"


class DropoutToy(ToyEncoder):
    """The toy encoder with a dropout layer on its image embedding."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def encode_modality(self, modality: str, batch: Any) -> Tensor:
        out = super().encode_modality(modality, batch)
        return self.drop(out) if modality == "image" else out


def test_bald_method_selection_and_zero_when_passes_agree(colour_data) -> None:
    ctx = audit_context(DropoutToy(0.3), colour_data)
    res = UncertaintyCheck(n_boot=50).run(ctx)
    assert any("MC dropout" in f.message for f in res.findings)
    assert res.metrics["bald"].value > 0
    assert not any(m.training for m in dropout_modules(ctx.model))  # restored to eval
    px = ctx.model.preprocess("image", colour_data.modalities["image"][:8])
    with torch.no_grad():  # dropout is off again: two forward passes agree exactly
        a, b = (ctx.model.encode({"image": px})["image"] for _ in range(2))
    assert torch.equal(a, b)

    ctx0 = audit_context(DropoutToy(0.0), colour_data)
    assert dropout_modules(ctx0.model) == []
    trivial = UncertaintyCheck(max_shift=0, brightness=0.0, flip=False, n_boot=50).run(ctx0)
    assert any("test-time augmentation" in f.message for f in trivial.findings)
    assert abs(trivial.metrics["bald"].value) < 1e-9  # identical passes: BALD = 0
    with pytest.raises(ValueError, match="no dropout"):
        UncertaintyCheck(method="mc_dropout").run(ctx0)


def test_avu_threshold_falls_back_to_median_without_calibration(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data)
    ctx = dataclasses.replace(ctx, calibration=None)
    res = UncertaintyCheck(n_boot=50).run(ctx)
    keep = ctx.outputs.labels >= 0
    median = float(np.median(predictive_entropy(ctx.outputs.probs[keep])))
    assert res.metrics["avu_threshold"].value == pytest.approx(median)
    assert any("median" in f.message for f in res.findings)


def test_entropy_that_does_not_separate_errors_is_a_finding() -> None:
    from mmsafe.checks.base import Metric

    check = UncertaintyCheck()
    metrics = {
        "entropy_wrong": Metric(0.40),
        "entropy_correct": Metric(0.41),
        "entropy_gap": Metric(-0.01, (-0.05, 0.03)),
    }
    (finding,) = check._separation_findings(metrics, n_wrong=20)
    assert finding.severity == "medium" and "does not separate" in finding.message
    metrics["entropy_gap"] = Metric(0.3, (0.2, 0.4))
    assert check._separation_findings(metrics, n_wrong=20) == []


def test_tta_passes_go_through_the_engine_and_do_not_depend_on_batch_size(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data)
    ctx.engine.outputs(ctx.model, ctx.task, ctx.calibration)  # the AvU threshold's clean rows
    before = ctx.engine.accounting()["modalities"]["image"]
    check = UncertaintyCheck(method="tta", n_passes=4, n_boot=20)
    first = check.run(ctx)
    after = ctx.engine.accounting()["modalities"]["image"]
    rows = int((ctx.outputs.labels >= 0).sum())
    assert after["variants"] == before["variants"] + 4  # one seeded variant per pass
    assert after["rows_encoded"] == before["rows_encoded"] + 4 * rows
    again = check.run(ctx)  # every pass is a cache hit
    assert ctx.engine.accounting()["modalities"]["image"] == after
    assert again.metrics["bald"].value == first.metrics["bald"].value
    other = audit_context(ToyEncoder(), colour_data)
    other.engine.batch_size = 5
    assert check.run(other).metrics["bald"].value == first.metrics["bald"].value


def _avu_threshold_by_mask(entropy: np.ndarray, accurate: np.ndarray) -> float:
    """The definition, candidates x rows: every candidate's AvU from a full mask."""
    values = np.unique(entropy)
    cands = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    certain = entropy[None, :] <= cands[:, None]
    return float(cands[int(np.argmax((certain == accurate[None, :]).mean(axis=1)))])


def test_best_avu_threshold_equals_the_definition_and_scales():
    from mmsafe.checks.monitoring.uncertainty import best_avu_threshold

    rng = np.random.default_rng(0)
    for _ in range(200):  # ties in entropy and in AvU included (rounded entropies)
        n = int(rng.integers(1, 60))
        h = np.round(rng.random(n) * rng.integers(1, 5), 1)
        a = rng.random(n) < rng.random()
        assert best_avu_threshold(h, a) == _avu_threshold_by_mask(h, a)
    # 200,000 rows: the mask would take 37 GiB; the cumulative counts find the planted cut
    h = rng.random(200_000)
    assert abs(best_avu_threshold(h, h < 0.3) - 0.3) < 1e-3
