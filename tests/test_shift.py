"""Corruptions (mmsafe.methods.perturb) and the robustness.shift check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import linregress

import mmsafe.checks.robustness.shift  # noqa: F401  (registers the check)
from mmsafe.checks.registry import list_checks
from mmsafe.checks.robustness.shift import (
    ShiftCheck,
    effective_robustness,
    fit_logit_trend,
    logit,
    multimodal_impact,
    ratio_ci,
    relative_gain,
    relative_robustness,
    sigmoid,
)
from mmsafe.data.worlds import make_shapes
from mmsafe.methods.perturb import (
    IMAGE_CORRUPTIONS,
    SEVERITIES,
    TEXT_PERTURBATIONS,
    corrupt_images,
    edit_distance,
    hsv_to_rgb,
    perturb_texts,
    rgb_to_hsv,
)
from mmsafe.models.base import images_to_tensor
from tests.conftest import ToyEncoder, audit_context, make_colour_data

RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "motion_blur",
    "fog",
    "elastic_transform",
}


@pytest.fixture(scope="module")
def shapes_small() -> tuple[torch.Tensor, list[str]]:
    """64 shapes images (pixels) and 120 captions."""
    world = make_shapes(n=150)
    px = images_to_tensor(world.modalities["image"][:64], 32)
    return px, [str(t) for t in world.modalities["text"][:120]]


# --------------------------------------------------------------------------- image corruptions


def test_at_least_13_corruptions_and_registered() -> None:
    assert len(IMAGE_CORRUPTIONS) >= 13 and len(TEXT_PERTURBATIONS) >= 8
    assert "robustness.shift" in list_checks("robustness.*")


@pytest.mark.parametrize("name", list(IMAGE_CORRUPTIONS))
def test_image_corruption_shape_range_determinism(name: str, shapes_small) -> None:
    px = shapes_small[0][:16]
    for s in (1, 5):
        out = corrupt_images(px, name, s, seed=3)
        assert out.shape == px.shape and out.dtype == px.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.isfinite(out).all()
        assert torch.equal(out, corrupt_images(px, name, s, seed=3))  # same seed, same output
        assert not torch.equal(out, px)  # it changes something
    if name in RANDOM:
        assert not torch.equal(corrupt_images(px, name, 3, seed=3), corrupt_images(px, name, 3, 4))
    # each image is corrupted on its own (no mixing across the batch) for deterministic ones
    if name not in RANDOM:
        one = corrupt_images(px[:1], name, 3)
        torch.testing.assert_close(one, corrupt_images(px, name, 3)[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(IMAGE_CORRUPTIONS))
def test_image_corruption_magnitude_grows_with_severity(name: str, shapes_small) -> None:
    px = shapes_small[0]
    mags = [float((corrupt_images(px, name, s, seed=0) - px).abs().mean()) for s in SEVERITIES]
    assert all(a <= b + 1e-6 for a, b in zip(mags, mags[1:], strict=False)), mags
    assert mags[-1] > mags[0]


def test_corruption_input_validation() -> None:
    px = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="Unknown image corruption"):
        corrupt_images(px, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt_images(px, "contrast", 6)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        corrupt_images(px[0], "contrast", 1)


def test_hsv_round_trip_and_known_values() -> None:
    px = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(px)), px, atol=1e-5, rtol=0)
    grey = torch.full((1, 3, 1, 1), 0.4)
    assert rgb_to_hsv(grey).flatten().tolist() == pytest.approx([0.0, 0.0, 0.4])


def test_noise_statistics_match_their_parameters() -> None:
    from mmsafe.methods.perturb import GAUSSIAN_NOISE, IMPULSE_NOISE, SHOT_NOISE

    mid = torch.full((8, 3, 32, 32), 0.5)  # far from the clip bounds at severity 1
    diff = corrupt_images(mid, "gaussian_noise", 1) - mid
    assert float(diff.std()) == pytest.approx(GAUSSIAN_NOISE[0], rel=0.05)
    shot = corrupt_images(mid, "shot_noise", 1)  # Poisson(0.5 * 60) / 60: variance 0.5 / 60
    assert float(shot.var()) == pytest.approx(0.5 / SHOT_NOISE[0], rel=0.1)
    assert float(shot.mean()) == pytest.approx(0.5, abs=0.01)
    imp = corrupt_images(mid, "impulse_noise", 5)
    assert float((imp != 0.5).float().mean()) == pytest.approx(IMPULSE_NOISE[4], abs=0.01)


# --------------------------------------------------------------------------- text perturbations


@pytest.mark.parametrize("name", list(TEXT_PERTURBATIONS))
def test_text_perturbation_determinism_and_growth(name: str, shapes_small) -> None:
    texts = shapes_small[1]
    a = perturb_texts(texts, name, 3, seed=5)
    assert a == perturb_texts(texts, name, 3, seed=5)
    assert perturb_texts(texts[:7], name, 3, seed=5) == a[:7]  # rows are independent
    assert all(isinstance(t, str) and t for t in a)
    dist = [
        np.mean(
            [edit_distance(x, y) for x, y in zip(texts, perturb_texts(texts, name, s), strict=True)]
        )
        for s in SEVERITIES
    ]
    assert all(d0 <= d1 for d0, d1 in zip(dist, dist[1:], strict=False)), dist
    assert dist[-1] > 0 and dist[0] < dist[-1]
    fn = TEXT_PERTURBATIONS[name]
    assert fn("a small red circle", 0.0, np.random.default_rng(0)) == "a small red circle"


def test_text_perturbation_examples() -> None:
    rng = np.random.default_rng
    assert TEXT_PERTURBATIONS["char_drop"]("ab cd", 1.0, rng(0)) == " "
    assert TEXT_PERTURBATIONS["word_shuffle"]("one two three", 1.0, rng(0)) == "three one two"
    typo = TEXT_PERTURBATIONS["char_keyboard"]("s", 1.0, rng(0))
    assert typo in "adewxz" and len(typo) == 1
    assert edit_distance("abc", "abc") == 0 and edit_distance("", "ab") == 2
    with pytest.raises(ValueError, match="Unknown text perturbation"):
        perturb_texts(["x"], "nope", 1)


# --------------------------------------------------------------------------- RR / ER / MMI


def test_relative_robustness_and_mmi_by_hand() -> None:
    assert relative_robustness(0.8, 0.6) == pytest.approx(0.75)
    assert math.isnan(relative_robustness(0.0, 0.1))
    # drops (0.8 - s) / 0.8 = 0, 0.25, 0.5 -> mean 0.25, which is 1 - RR of the mean score
    assert multimodal_impact(0.8, [0.8, 0.6, 0.4]) == pytest.approx(0.25)
    assert multimodal_impact(0.8, [0.8, 0.6, 0.4]) == pytest.approx(
        1 - relative_robustness(0.8, 0.6)
    )
    assert multimodal_impact(0.5, [0.6]) == pytest.approx(-0.2)  # a perturbation that helps
    assert relative_gain(0.55, 0.62) == pytest.approx(0.07)


def test_effective_robustness_by_hand() -> None:
    # Family exactly on logit(y) = 0.5 * logit(x) - 0.2
    xs = np.array([-2.0, -0.5, 1.0, 2.5])
    family = [(float(sigmoid(x)), float(sigmoid(0.5 * x - 0.2))) for x in xs]
    a, b = fit_logit_trend(family)
    assert (a, b) == (pytest.approx(0.5), pytest.approx(-0.2))
    # clean 0.731 (logit 1) -> trend predicts sigmoid(0.3) = 0.574443; shifted 0.65 -> +0.075557
    clean = float(sigmoid(1.0))
    assert float(effective_robustness(clean, 0.65, (a, b))) == pytest.approx(
        0.65 - 0.574443, abs=1e-6
    )
    assert float(effective_robustness(*family[2], (a, b))) == pytest.approx(0.0, abs=1e-12)
    # a noisy family: the fit is ordinary least squares in logit space
    noisy = [(0.6, 0.4), (0.7, 0.45), (0.8, 0.6), (0.9, 0.7)]
    ref = linregress(logit([p[0] for p in noisy]), logit([p[1] for p in noisy]))
    fit = fit_logit_trend(noisy)
    assert fit == (pytest.approx(ref.slope), pytest.approx(ref.intercept))
    for bad in ([(0.5, 0.4)], [(0.5, 0.4), (0.5, 0.3)], [(1.0, 0.4), (0.5, 0.3)]):
        with pytest.raises(ValueError):
            fit_logit_trend(bad)
    assert float(logit(sigmoid(0.3))) == pytest.approx(0.3)


def test_ratio_ci_brackets_the_ratio() -> None:
    rng = np.random.default_rng(0)
    clean = (rng.random(300) < 0.8).astype(float)
    shifted = clean * (rng.random(300) < 0.7)
    lo, hi = ratio_ci(shifted, clean, n_boot=300, seed=0)
    assert lo < shifted.sum() / clean.sum() < hi and hi - lo < 0.2


# --------------------------------------------------------------------------- the check


def test_check_on_toy_encoder_fusion_with_family(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data, task="fusion")
    family = [(0.6, 0.4), (0.8, 0.55), (0.95, 0.8)]
    check = ShiftCheck(
        image_corruptions=["gaussian_noise", "contrast", "jpeg_compression"],
        text_perturbations=["char_drop", "word_drop"],
        family=family,
        n_boot=100,
    )
    res = check.run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    clean, mca = m["clean_accuracy"], m["mean_corruption_accuracy/image"]
    labels = ctx.outputs.labels
    assert clean == pytest.approx(np.mean(ctx.outputs.preds[labels >= 0] == labels[labels >= 0]))
    assert m["relative_robustness/image"] == pytest.approx(mca / clean)
    assert m["mmi/image"] == pytest.approx(1 - mca / clean)
    expected_er = mca - float(sigmoid(np.polyval(fit_logit_trend(family), logit(clean))))
    assert m["effective_robustness/image"] == pytest.approx(expected_er)
    lo, hi = res.metrics["effective_robustness/image"].ci
    assert lo <= expected_er <= hi
    assert "effective_robustness/text" not in m
    assert any("Effective robustness (text) not computed" in f.message for f in res.findings)
    # the heatmap carries the per-cell scores; metrics average them
    heat = res.plots["heatmap_image"]
    assert heat["kind"] == "heatmap" and heat["rows"] == list(check.image_corruptions)
    assert heat["columns"] == ["clean", "1", "2", "3", "4", "5"]
    cells = np.array(heat["values"])[:, 1:]
    assert mca == pytest.approx(cells.mean())
    assert m["accuracy/image/contrast"] == pytest.approx(cells[1].mean())
    assert m["accuracy/image/severity_5"] == pytest.approx(cells[:, 4].mean())
    assert 0.0 <= m["accuracy/text/word_drop"] <= 1.0
    assert res.plots["heatmap_text"]["rows"] == ["char_drop", "word_drop"]
    assert res.plots["severity_curve"]["kind"] == "line"
    res.to_dict()


def test_check_zero_shot_toy_says_text_skipped_and_no_family(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data)
    res = ShiftCheck(image_corruptions=["brightness"], severities=(1, 5), n_boot=50).run(ctx)
    notes = " ".join(f.message for f in res.findings)
    assert "Text perturbations skipped" in notes and "no model family given" in notes
    assert not any(k.endswith("/text") for k in res.metrics)
    assert res.plots["heatmap_image"]["columns"] == ["clean", "1", "5"]


def test_check_options_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        ShiftCheck(image_corruptions=["snow"])
    with pytest.raises(ValueError, match="severities"):
        ShiftCheck(severities=(0, 1))
    with pytest.raises(ValueError, match="two"):
        ShiftCheck(family=[(0.9, 0.5)])


def test_check_on_retrieval_and_subsample() -> None:
    data = make_colour_data(n=90)
    ctx = audit_context(ToyEncoder(), data, task="retrieval")
    res = ShiftCheck(
        image_corruptions=["gaussian_noise"], text_perturbations=["word_drop"], max_rows=20
    ).run(ctx)
    assert "clean_R@1" in res.metrics and "mean_corruption_R@1/text" in res.metrics
    assert any(f.evidence.get("rows") == 20 for f in res.findings)
    # the toy's text is colour-word counts: dropping words loses the colour word, so R@1 falls
    assert res.metrics["mean_corruption_R@1/text"].value < res.metrics["clean_R@1"].value
    assert res.plots["severity_curve"]["series"][0]["x"] == [0, 1, 2, 3, 4, 5]


def test_tiny_clip_accuracy_drops_with_noise_severity(shapes_quick) -> None:
    world, model = shapes_quick
    ctx = audit_context(model, world)
    noise = ["gaussian_noise", "shot_noise", "impulse_noise"]
    res = ShiftCheck(image_corruptions=noise, n_boot=100).run(ctx)
    clean = res.metrics["clean_accuracy"].value
    cells = np.array(res.plots["heatmap_image"]["values"])[:, 1:]
    # Measured (162 labelled test rows, clean 0.667): gaussian 0.47 0.30 0.19 0.16 0.16,
    # shot 0.48 0.30 0.21 0.16 0.16, impulse 0.31 0.17 0.16 0.16 0.16 (0.16: one class).
    for k, row in zip(noise, cells, strict=True):
        assert row[0] < clean, k
        assert all(a >= b - 0.02 for a, b in zip(row, row[1:], strict=False)), (k, row)
        assert row[-1] < clean - 0.25, (k, row)
    assert res.metrics["relative_robustness/image"].value < 0.8
    assert any(f.severity in ("medium", "high") for f in res.findings)
