"""monitoring.label_noise: confident learning finds the shapes world's flipped train labels,
and flags next to nothing when no label is flipped (the control)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmsafe.audit import run_audit
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.methods.label_noise import confident_joint, crossval_probs
from tests.conftest import QUICK_WORLD_SPEC, make_colour_data

CHECK = "monitoring.label_noise"


def _by_hand(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning written out row by row (Northcutt et al., 2021, eq. 1-2)."""
    c = probs.shape[1]
    t = np.array([probs[labels == j, j].mean() for j in range(c)])
    joint, issues = np.zeros((c, c), int), np.zeros(len(labels), bool)
    for i, p in enumerate(probs):
        confident = [j for j in range(c) if p[j] >= t[j]]
        if confident:
            star = max(confident, key=lambda j: p[j])
            joint[labels[i], star] += 1
            issues[i] = star != labels[i]
    return joint, issues


def test_confident_joint_matches_the_definition_row_by_row():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.7, size=300)
    labels = np.r_[np.arange(4), rng.integers(0, 4, 296)]
    found = confident_joint(probs, labels)
    joint, issues = _by_hand(probs, labels)
    assert (found.joint == joint).all() and (found.issues == issues).all()
    assert found.noise_rate == pytest.approx(1 - np.trace(joint) / joint.sum())
    assert found.self_confidence == pytest.approx(probs[np.arange(300), labels])


def test_crossval_probs_equal_sklearns_cross_val_predict():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 5)) + y[:, None]
    ours = crossval_probs(x, y, 3, folds=5, c=0.5, seed=7)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
    ref = cross_val_predict(clf, x, y, method="predict_proba",
                            cv=StratifiedKFold(5, shuffle=True, random_state=7))  # fmt: skip
    assert ours == pytest.approx(ref, abs=1e-9)


def _audit(model, data):
    return run_audit(model, data, task="zero_shot", checks=CHECK, options={CHECK: {"n_boot": 300}},
                     engine=Engine(progress=False)).card["checks"][CHECK]  # fmt: skip


def test_finds_the_flipped_train_labels(shapes_quick):
    world, model = shapes_quick
    entry = _audit(model, world)
    m = {k: v["value"] for k, v in entry["metrics"].items()}
    train = world.split("train")
    truth = {i for i, meta in zip(train.ids, train.meta, strict=True) if meta.get("noisy_label")}
    assert m["rows"] == len(train) and len(truth) > 30
    (finding,) = entry["findings"]
    flagged = set(finding["evidence"]["flagged_ids"])
    assert len(flagged) == m["flagged"]
    precision, recall = len(flagged & truth) / len(flagged), len(flagged & truth) / len(truth)
    assert precision > 0.8 and recall > 0.5
    assert m["estimated_noise_rate"] == pytest.approx(len(truth) / len(train), abs=0.04)
    assert finding["severity"] in ("medium", "high")
    table = entry["plots"]["examples"]["rows"]
    assert table and all(row[1] != row[2] for row in table)  # given label vs suggested class


def test_clean_labels_are_the_control(shapes_quick):
    _, model = shapes_quick
    clean = load_data(QUICK_WORLD_SPEC + ",label_noise=0")
    entry = _audit(model, clean)
    assert entry["metrics"]["flagged_share"]["value"] < 0.02
    assert not entry["findings"]


def test_a_train_split_of_one_class_skips_and_says_why(toy_model):
    data = make_colour_data()
    train = np.array([s == "train" for s in data.splits])
    data.labels[train] = 0  # every train label the same class: nothing to contrast
    entry = _audit(toy_model, data)
    assert entry["status"] == "skipped" and "two classes" in entry["reason"]
    data.labels[np.flatnonzero(train)[:2]] = 1  # two rows of a second class: it runs
    assert _audit(toy_model, data)["status"] == "ok"
