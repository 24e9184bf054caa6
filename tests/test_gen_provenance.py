"""generative.provenance science: LOGO detection, conformal thresholds, attribution."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, balanced_accuracy_score, confusion_matrix
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmsafe.methods.conformal import conformal_quantile
from mmsafe.methods.generative.provenance import (
    attribution,
    calibrate_threshold,
    detection_metrics,
    fit_probe,
    leave_one_generator_out,
    probe_scores,
)

D = 16
# (name, shift along the direction all generators share, shift along its own direction):
# two generators with strong artefacts, one subtle one that only shares a weaker common shift.
GENERATORS = [("gan", 4.0, 4.0), ("diffusion", 4.0, 4.0), ("subtle", 2.5, 0.0)]


def make_features(
    rng: np.random.Generator, n_real: int = 600, n_gen: int = 200
) -> tuple[np.ndarray, list[str]]:
    x, src = [rng.normal(size=(n_real, D))], ["real"] * n_real
    for j, (name, common, own) in enumerate(GENERATORS):
        mu = np.zeros(D)
        mu[0], mu[1 + j] = common, own
        x.append(rng.normal(size=(n_gen, D)) + mu)
        src += [name] * n_gen
    return np.concatenate(x), src


@pytest.fixture(scope="module")
def logo() -> dict:
    x, src = make_features(np.random.default_rng(0))
    return leave_one_generator_out(x, src, alpha=0.05, seed=0)


def test_logo_ap_is_high(logo: dict) -> None:
    aps = {g: r["ap"] for g, r in logo["generators"].items()}
    assert list(aps) == ["gan", "diffusion", "subtle"]
    assert min(aps.values()) > 0.9 and logo["mean_ap"] > 0.95
    assert (logo["n_real_train"], logo["n_real_calibration"], logo["n_real_test"]) == (
        300,
        150,
        150,
    )
    print("LOGO AP:", {g: round(a, 3) for g, a in aps.items()})


def test_fixed_threshold_collapses_on_the_unseen_subtle_generator(logo: dict) -> None:
    """Trained against strong artefacts, the probe puts the subtle generator's images below
    0.5: the fixed rule misses most of them, while the threshold calibrated on real images
    keeps its FPR near alpha and detects far more."""
    subtle = logo["generators"]["subtle"]
    cal, fixed = subtle["calibrated"], subtle["fixed"]
    assert cal["threshold"] < 0.5
    assert cal["tpr"] > fixed["tpr"] + 0.1
    assert cal["balanced_accuracy"] > fixed["balanced_accuracy"] + 0.03
    assert fixed["tpr"] < 0.5
    for r in logo["generators"].values():
        assert r["calibrated"]["fpr"] <= 0.05 + 0.05  # one draw of 150 real test rows
    print(
        "subtle: calibrated tpr/fpr/bacc",
        [round(cal[k], 3) for k in ("tpr", "fpr", "balanced_accuracy")],
        "fixed 0.5",
        [round(fixed[k], 3) for k in ("tpr", "fpr", "balanced_accuracy")],
    )


def test_conformal_threshold_fpr_guarantee_statistically() -> None:
    """With n = 19 calibration rows and alpha = 0.1 the threshold is the 18th smallest real
    score, so E[FPR] = 1 - 18 / 20 = 0.1 exactly (continuous scores). Over 200 fresh
    calibration / test draws the mean FPR sits at 0.1, while the naive empirical 90% quantile
    (no (n + 1) correction) overshoots alpha."""
    rng = np.random.default_rng(1)
    x, src = make_features(rng, n_real=400, n_gen=150)
    y = (np.array(src) != "real").astype(int)
    probe = fit_probe(x, y)
    alpha, n_cal, reps = 0.1, 19, 200
    fpr, naive = [], []
    for _ in range(reps):
        cal = probe_scores(probe, rng.normal(size=(n_cal, D)))
        test = probe_scores(probe, rng.normal(size=(500, D)))
        t = calibrate_threshold(cal, alpha)
        assert t == conformal_quantile(cal, 1 - alpha)
        fpr.append(float((test > t).mean()))
        naive.append(float((test > np.quantile(cal, 1 - alpha)).mean()))
    mean_fpr, mean_naive = float(np.mean(fpr)), float(np.mean(naive))
    assert mean_fpr <= alpha + 0.015  # sd of the mean over 200 draws is about 0.005
    assert mean_fpr >= alpha - 0.03  # and the guarantee is tight, not vacuous
    assert mean_naive > alpha + 0.02
    print(f"conformal mean FPR {mean_fpr:.4f} vs naive quantile {mean_naive:.4f}")


def test_detection_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.3 * y
    m = detection_metrics(s, y, 0.6)
    assert m["ap"] == pytest.approx(average_precision_score(y, s))
    flag = s > 0.6
    assert m["tpr"] == pytest.approx(flag[y == 1].mean())
    assert m["fpr"] == pytest.approx(flag[y == 0].mean())
    assert m["accuracy"] == pytest.approx((flag == y).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, flag))
    assert detection_metrics(s, y, np.inf)["tpr"] == 0.0
    assert calibrate_threshold(s[:5], 0.1) == np.inf  # too few rows: flag nothing


def test_attribution_matches_sklearn() -> None:
    x, src = make_features(np.random.default_rng(3), n_real=200, n_gen=200)
    r = attribution(x, src, test_fraction=0.3, seed=5)
    classes = ["real", "gan", "diffusion", "subtle"]
    assert r["classes"] == classes
    y = np.array([classes.index(s) for s in src])
    tr, te = r["train_index"], r["test_index"]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[tr], y[tr])
    pred = model.predict(x[te])
    assert r["macro_accuracy"] == pytest.approx(balanced_accuracy_score(y[te], pred))
    assert r["confusion"] == confusion_matrix(y[te], pred, labels=range(4)).tolist()
    assert r["accuracy"] == pytest.approx((pred == y[te]).mean())
    assert np.bincount(y[te]).tolist() == [60, 60, 60, 60]  # stratified
    assert r["macro_accuracy"] > 0.8
    print("attribution macro accuracy", round(r["macro_accuracy"], 3))


def test_bad_inputs() -> None:
    x, src = make_features(np.random.default_rng(4), n_real=40, n_gen=20)
    with pytest.raises(ValueError, match="two generators"):
        keep = [i for i, s in enumerate(src) if s in ("real", "gan")]
        leave_one_generator_out(x[keep], [src[i] for i in keep])
    with pytest.raises(ValueError, match="no real rows"):
        leave_one_generator_out(x, src, real="camera")
    with pytest.raises(ValueError, match="calibration rows"):
        leave_one_generator_out(x, src, alpha=0.01)
    with pytest.raises(ValueError, match="below 1"):
        leave_one_generator_out(x, src, train_fraction=0.6, calibration_fraction=0.4)
    with pytest.raises(ValueError, match="alpha"):
        calibrate_threshold([0.1, 0.2], alpha=0)
    with pytest.raises(ValueError, match="both"):
        fit_probe(x[:5], np.zeros(5))
    with pytest.raises(ValueError, match="0 \\(real\\)"):
        detection_metrics([0.1, 0.2], [0, 2], 0.5)
    with pytest.raises(ValueError, match="two sources"):
        attribution(x[:10], ["real"] * 10)
    with pytest.raises(ValueError, match="entries"):
        attribution(x, src[:-1])
