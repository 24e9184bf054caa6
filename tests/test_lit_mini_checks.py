"""Every check on lit-mini: real pretrained towers (locked) on the planted-flaw world.

One full zero-shot audit of the session's quick lit-mini (``lit_quick``: locked MobileNetV2 and
MiniLM towers, heads trained on ``shapes:n=600``) runs once for the module; each test holds one
check to what the world planted, with margins taken from the CIs, not from one lucky run.
Where a flaw cannot reach a model whose towers are locked, the test says so and asserts what
does hold (see docs/models.md, "Checks on lit-mini").
"""

from __future__ import annotations

import numpy as np
import pytest

from mmsafe.audit import run_audit
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.models.loading import load_model

PGD_1, PGD_4 = "linf/pgd/eps=0.003922/robust_accuracy", "linf/pgd/eps=0.01569/robust_accuracy"


@pytest.fixture(scope="module")
def card(lit_quick) -> dict:
    world, model = lit_quick
    result = run_audit(model, world, checks="all", engine=Engine(progress=False))
    return result.card


def metric(card: dict, check: str, name: str) -> dict:
    entry = card["checks"][check]
    assert entry["status"] == "ok", (check, entry["reason"])
    return entry["metrics"][name]


def test_every_zero_shot_check_runs_on_lit_mini(card) -> None:
    for name, entry in card["checks"].items():
        if entry["status"] == "skipped":  # only other tasks' or kinds' variants may skip
            assert entry["reason"].startswith(
                ("not applicable to task 'zero_shot'", "not applicable to encoder models")
            ), name
        else:
            assert entry["status"] == "ok", (name, entry["reason"])
    ok = {n for n, e in card["checks"].items() if e["status"] == "ok"}
    assert len(ok) == 14


def test_zero_shot_accuracy_well_above_chance(card) -> None:
    acc = metric(card, "performance.classification", "accuracy")
    assert acc["ci"][0] > 0.75  # five classes: chance is 0.2


def test_a_real_cnn_is_fragile_under_pgd(card) -> None:
    clean = metric(card, "robustness.adversarial", "clean_accuracy")["value"]
    one = metric(card, "robustness.adversarial", PGD_1)["value"]
    four = metric(card, "robustness.adversarial", PGD_4)["value"]
    assert clean > 0.8
    assert four <= one <= clean
    assert one < clean - 0.5  # 1/255 already breaks the ImageNet tower (tiny-clip keeps ~0.7)


def test_corruptions_hurt_more_with_severity(card) -> None:
    sev1 = metric(card, "robustness.shift", "accuracy/image/severity_1")["value"]
    sev5 = metric(card, "robustness.shift", "accuracy/image/severity_5")["value"]
    clean = metric(card, "robustness.shift", "clean_accuracy")["value"]
    assert sev5 < sev1 - 0.1
    assert metric(card, "robustness.shift", "mean_corruption_accuracy/image")["value"] < clean


def test_planted_defects_found_by_the_patch_bank(card) -> None:
    auc = metric(card, "monitoring.anomaly", "image_auroc")
    assert auc["ci"][0] > 0.8
    notes = " ".join(f["message"] for f in card["checks"]["monitoring.anomaly"]["findings"])
    assert "Headline method: patch_k" in notes and "calibration split" in notes


def test_no_planted_defects_no_anomaly_verdict(mmsafe_cache) -> None:
    # the clean control: the same world without defects has no defective row to find
    world = load_data("shapes:n=600,train_defects=0,defects=0")
    model = load_model("lit-mini", data=world, quick=True, cache_dir=mmsafe_cache, progress=False)
    out = run_audit(model, world, checks="monitoring.anomaly", engine=Engine(progress=False))
    entry = out.card["checks"]["monitoring.anomaly"]
    assert entry["status"] == "skipped"
    assert entry["reason"] == "needs both defective and normal (meta.defect None) evaluation rows"


def test_calibration_and_conformal_coverage(card) -> None:
    ece = metric(card, "monitoring.calibration", "ece")
    assert ece["ci"][0] <= ece["value"] <= ece["ci"][1] and ece["value"] < 0.2
    cover = metric(card, "monitoring.conformal", "coverage")["value"]
    target = metric(card, "monitoring.conformal", "target_coverage")["value"]
    n = card["data"]["splits"]["test"]
    # split conformal guarantees coverage >= target; allow 3 binomial standard errors
    assert cover >= target - 3 * np.sqrt(target * (1 - target) / n)


def test_planted_ood_shapes_rank_above_known_ones(card) -> None:
    auc = metric(card, "monitoring.ood", "auroc")
    assert auc["ci"][0] > 0.5
    # calibration holds no OOD row: the headline is the declared default, RMD on the MobileNet
    # tower's pooled hidden states (every layer), fitted on the calibration rows
    info = next(
        f for f in card["checks"]["monitoring.ood"]["findings"] if "chosen_on" in f["evidence"]
    )
    ev = info["evidence"]
    assert (ev["headline_method"], ev["chosen_on"], ev["rmd_fit"]) == (
        "rmd",
        "default",
        "calibration",
    )
    rmd, energy = (metric(card, "monitoring.ood", f"{s}/auroc") for s in ("rmd", "energy"))
    assert auc == rmd
    print(f"lit-mini OOD AUROC: rmd {rmd}, energy {energy}")
    # Measured here (108 ID vs 12 OOD test rows; Gaussians fitted on the 120 calibration rows):
    # rmd 0.785, CI (0.666, 0.890); energy 0.772, CI (0.621, 0.914). With 12 OOD rows (each
    # carries 1/12 of the AUROC) the two cannot be told apart, so "RMD beats energy" is not
    # asserted here; on the default world (60 OOD rows) rmd reaches 0.954, CI (0.935, 0.972),
    # against energy's 0.741 (bench/ood_scores.py).


def test_a_failure_slice_is_found(card) -> None:
    overall = metric(card, "monitoring.slices", "overall_accuracy")["value"]
    assert metric(card, "monitoring.slices", "n_significant")["value"] >= 1
    assert metric(card, "monitoring.slices", "slice1/accuracy")["value"] < overall - 0.3


def test_wrong_predictions_are_less_certain(card) -> None:
    right = metric(card, "monitoring.uncertainty", "entropy_correct")["value"]
    wrong = metric(card, "monitoring.uncertainty", "entropy_wrong")["value"]
    assert wrong > right


def test_integrated_gradients_beat_random_deletion(card) -> None:
    ig = metric(card, "controllability.explain", "ig/deletion_auc")["value"]
    rand = metric(card, "controllability.explain", "ig/deletion_auc_random")["value"]
    assert ig < rand


def test_membership_is_inferable_from_the_trained_heads(card) -> None:
    # the heads are trained on the train pairs, so their similarity leaks membership; the
    # duplicated items are NOT more exposed than unique ones (unlike tiny-clip, whose towers
    # learn the copies): the towers that could memorise them are locked
    assert metric(card, "controllability.privacy", "auc")["ci"][0] > 0.6
    dup = metric(card, "controllability.privacy", "duplicate_percentile")["value"]
    assert dup > 0.5


def test_only_the_heads_are_trainable(card, lit_quick) -> None:
    _, model = lit_quick
    total = metric(card, "efficiency.profile", "params_total")["value"]
    trainable = metric(card, "efficiency.profile", "params_trainable")["value"]
    heads = sum(p.numel() for h in (model.image_head, model.text_head) for p in h.parameters())
    assert total == sum(p.numel() for p in model.parameters())
    assert heads <= trainable < 0.05 * total  # towers locked: ~27M parameters, heads ~0.4M


def test_fairness_reports_both_tone_groups(card) -> None:
    entry = card["checks"]["controllability.fairness"]
    assert entry["status"] == "ok"
    gap = metric(card, "controllability.fairness", "accuracy_difference")
    assert 0.0 <= gap["value"] <= 1.0 and gap["ci"][0] <= gap["value"] <= gap["ci"][1]


def test_lit_mini_learns_real_digits(mmsafe_cache) -> None:
    world = load_data("digits")
    model = load_model("lit-mini", data=world, quick=True, cache_dir=mmsafe_cache, progress=False)
    engine = Engine(progress=False)
    out = run_audit(model, world, checks="performance.classification", engine=engine)
    acc = out.card["checks"]["performance.classification"]["metrics"]["accuracy"]
    assert acc["ci"][0] > 0.5  # ten classes: chance is 0.1
