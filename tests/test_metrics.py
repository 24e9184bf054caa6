"""Metric functions against torchmetrics / scikit-learn and hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
)

import mmsafe.metrics as M
from mmsafe.metrics import bootstrap as boot_mod
from mmsafe.metrics import retrieval as retr_mod

TOL = 1e-6
SHAPES = [(1, 2), (7, 2), (50, 3), (300, 10), (2000, 5)]
SEEDS = [0, 1, 2]


def random_probs(n: int, c: int, seed: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of random logits with varied temperature; targets partly follow the probs."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * rng.uniform(0.5, 4.0)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    sampled = (rng.random((n, 1)) < probs.cumsum(axis=1)).argmax(axis=1)
    target = np.where(rng.random(n) < 0.7, sampled, rng.integers(0, c, n))
    return probs.astype(dtype), target.astype(np.int64)


def random_labels(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, n)
    preds = np.where(rng.random(n) < 0.6, target, rng.integers(0, c, n))
    return preds, target


def tm_ce(probs: np.ndarray, target: np.ndarray, n_bins: int, norm: str) -> float:
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm=norm)
    return float(metric(torch.from_numpy(probs), torch.from_numpy(target)))


def torch_edges_are_rounded(n_bins: int) -> bool:
    """Does torch's float32 linspace give the correctly rounded k/n edges for this n_bins?"""
    ours = (np.arange(n_bins + 1) / n_bins).astype(np.float32)
    return bool(np.array_equal(torch.linspace(0, 1, n_bins + 1).numpy(), ours))


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "c"), SHAPES)
def test_classification_matches_references(n: int, c: int, seed: int) -> None:
    preds, target = random_labels(n, c, seed)
    tp, tt = torch.from_numpy(preds), torch.from_numpy(target)

    acc = M.accuracy(preds, target)
    assert isinstance(acc, float)
    assert acc == pytest.approx(skm.accuracy_score(target, preds), abs=TOL)
    tm_acc = MulticlassAccuracy(num_classes=c, average="micro")(tp, tt)
    assert acc == pytest.approx(float(tm_acc), abs=TOL)

    f1 = M.macro_f1(preds, target, c)
    assert f1 == pytest.approx(skm.f1_score(target, preds, average="macro", zero_division=0))
    tm_f1 = MulticlassF1Score(num_classes=c, average="macro")(tp, tt)
    assert f1 == pytest.approx(float(tm_f1), abs=TOL)

    cm = M.confusion_matrix(preds, target, c)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(target, preds, labels=range(c)))
    assert cm.dtype == np.int64 and cm.sum() == n

    per_class = M.per_class_accuracy(preds, target, c)
    present = np.bincount(target, minlength=c) > 0
    ref = skm.recall_score(target, preds, labels=range(c), average=None, zero_division=0)
    np.testing.assert_allclose(per_class[present], ref[present], atol=TOL)
    assert np.isnan(per_class[~present]).all()


def test_missing_classes_follow_torchmetrics_and_sklearn_default_labels() -> None:
    target = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 3])  # class 3: predicted only; class 4: absent from both
    f1 = M.macro_f1(preds, target, 5)
    # per class: 2/3, 4/5, 0 (class 2 never predicted), 0 (class 3 never true) -> mean over 4
    assert f1 == pytest.approx((2 / 3 + 4 / 5 + 0 + 0) / 4)
    assert f1 == pytest.approx(skm.f1_score(target, preds, average="macro", zero_division=0))
    tm = MulticlassF1Score(num_classes=5, average="macro")(
        torch.from_numpy(preds), torch.from_numpy(target)
    )
    assert f1 == pytest.approx(float(tm), abs=TOL)
    # ... and deliberately not labels=range(C), which counts the never-seen class 4 as F1 = 0.
    all_labels = skm.f1_score(target, preds, average="macro", labels=range(5), zero_division=0)
    assert all_labels == pytest.approx(f1 * 4 / 5)

    per_class = M.per_class_accuracy(preds, target, 5)
    np.testing.assert_array_equal(per_class[:3], [0.5, 1.0, 0.0])
    assert np.isnan(per_class[3]) and np.isnan(per_class[4])


def test_classification_edge_cases() -> None:
    y = np.array([0, 1, 2, 2, 1])
    assert M.accuracy(y, y) == 1.0
    assert M.macro_f1(y, y, 4) == 1.0
    np.testing.assert_array_equal(M.per_class_accuracy(y, y, 4)[:3], [1.0, 1.0, 1.0])
    wrong = (y + 1) % 3
    assert M.accuracy(wrong, y) == 0.0
    assert M.macro_f1(wrong, y, 3) == 0.0
    np.testing.assert_array_equal(M.per_class_accuracy(wrong, y, 3), [0.0, 0.0, 0.0])
    # one sample
    assert M.accuracy([1], [1]) == 1.0
    assert M.macro_f1([1], [1], 3) == 1.0
    assert M.macro_f1([0], [1], 3) == 0.0
    np.testing.assert_array_equal(M.confusion_matrix([0], [1], 2), [[0, 0], [1, 0]])
    # torch tensors and lists are accepted
    assert M.accuracy(torch.tensor([0, 1]), [0, 0]) == 0.5


@pytest.mark.parametrize(
    ("preds", "target", "num_classes", "match"),
    [
        ([], [], 2, "empty"),
        ([0, 1], [0], 2, "same length"),
        ([0.0, 1.0], [0, 1], 2, "integer"),
        ([0, 1], [0, -1], 2, "negative"),
        ([0, 2], [0, 1], 2, "num_classes=2"),
        ([[0, 1]], [[0, 1]], 2, "1-D"),
        ([0, 1], [0, 1], 0, "positive integer"),
        ([0, 1], [0, 1], 2.0, "positive integer"),
    ],
)
def test_classification_rejects_bad_input(preds, target, num_classes, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.macro_f1(np.asarray(preds), np.asarray(target, dtype=int), num_classes)


def test_accuracy_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        M.accuracy(np.array([], dtype=int), np.array([], dtype=int))


# ------------------------------------------------------------------------------ calibration


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "c"), SHAPES)
@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 20])
def test_calibration_errors_match_torchmetrics(n: int, c: int, seed: int, n_bins: int) -> None:
    probs, target = random_probs(n, c, seed)
    ece = M.expected_calibration_error(probs, target, n_bins=n_bins)
    mce = M.maximum_calibration_error(probs, target, n_bins=n_bins)
    rms = M.root_mean_square_calibration_error(probs, target, n_bins=n_bins)
    assert isinstance(ece, float)
    assert ece == pytest.approx(tm_ce(probs, target, n_bins, "l1"), abs=TOL)
    assert mce == pytest.approx(tm_ce(probs, target, n_bins, "max"), abs=TOL)
    assert rms == pytest.approx(tm_ce(probs, target, n_bins, "l2"), abs=TOL)
    assert 0.0 <= ece <= rms + 1e-12 <= mce + 2e-12 <= 1.0 + 2e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_bins", [5, 10])
def test_calibration_at_bin_edges_matches_torchmetrics(dtype, n_bins: int) -> None:
    assert torch_edges_are_rounded(n_bins)  # precondition for an exact edge comparison
    tops = [0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0, 0.3, 0.7]
    rows, targets = [], []
    for i, top in enumerate(tops):
        rest = (1.0 - top) / 4
        for correct in (True, False, i % 2 == 0):
            rows.append([top, rest, rest, rest, rest])
            targets.append(0 if correct else 1 + i % 4)
    probs, target = np.array(rows, dtype=dtype), np.array(targets)
    for norm, fn in [
        ("l1", M.expected_calibration_error),
        ("max", M.maximum_calibration_error),
        ("l2", M.root_mean_square_calibration_error),
    ]:
        assert fn(probs, target, n_bins=n_bins) == pytest.approx(
            tm_ce(probs, target, n_bins, norm), abs=TOL
        )


def test_confidence_one_is_its_own_bin_like_torchmetrics() -> None:
    probs = np.array([[1.0, 0.0], [0.92, 0.08]])
    target = np.array([1, 0])  # the certain prediction is wrong, the 0.92 one right
    # separate bins: 0.5 * |0 - 1| + 0.5 * |1 - 0.92| = 0.54 (pooled it would be 0.46)
    assert M.expected_calibration_error(probs, target, n_bins=10) == pytest.approx(0.54)
    assert tm_ce(probs, target, 10, "l1") == pytest.approx(0.54)
    assert M.maximum_calibration_error(probs, target, n_bins=10) == pytest.approx(1.0)
    # the diagram pools it into its last (closed) bin instead
    d = M.reliability_diagram(probs, target, n_bins=10)
    assert d.bin_count[-1] == 2
    assert d.bin_confidence[-1] == pytest.approx(0.96)
    assert d.bin_accuracy[-1] == pytest.approx(0.5)


def test_calibration_edge_cases() -> None:
    certain = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = np.array([0, 1, 2])
    wrong = np.array([1, 2, 0])
    for fn in (
        M.expected_calibration_error,
        M.maximum_calibration_error,
        M.root_mean_square_calibration_error,
    ):
        assert fn(certain, y) == 0.0
        assert fn(certain, wrong) == 1.0
    assert M.brier_score(certain, y) == 0.0
    assert M.brier_score(certain, wrong) == 2.0
    assert M.negative_log_likelihood(certain, y) == 0.0
    assert M.negative_log_likelihood(certain, wrong) == pytest.approx(-math.log(1e-12))
    assert M.negative_log_likelihood(certain, wrong, eps=1e-6) == pytest.approx(-math.log(1e-6))
    assert M.uncertainty_calibration_error(certain, y) == 0.0
    assert M.uncertainty_calibration_error(certain, wrong) == 1.0
    # one sample: ECE is |correct - confidence|
    assert M.expected_calibration_error([[0.3, 0.7]], [1]) == pytest.approx(0.3)
    assert M.expected_calibration_error([[0.3, 0.7]], [0]) == pytest.approx(0.7)
    # argmax ties go to the lowest class index (as in torch / numpy)
    assert M.expected_calibration_error([[0.5, 0.5]], [0], n_bins=4) == pytest.approx(0.5)
    assert tm_ce(np.array([[0.5, 0.5]]), np.array([0]), 4, "l1") == pytest.approx(0.5)


@st.composite
def calibrated_groups(draw):
    """Groups of k binary predictions with confidence a/k of which exactly a are right."""
    groups = draw(
        st.lists(
            st.integers(1, 12).flatmap(lambda k: st.tuples(st.just(k), st.integers(0, k))),
            min_size=1,
            max_size=8,
        )
    )
    rows, target = [], []
    for k, a in groups:
        a = max(a, k - a)  # confidence >= 0.5 so class 0 is the top label
        conf = a / k
        rows += [[conf, 1.0 - conf]] * k
        target += [0] * a + [1] * (k - a)
    return np.array(rows), np.array(target)


@settings(max_examples=60, deadline=None)
@given(data=calibrated_groups(), n_bins=st.integers(1, 30))
def test_ece_is_zero_when_confidence_equals_accuracy(data, n_bins: int) -> None:
    probs, target = data
    assert M.expected_calibration_error(probs, target, n_bins=n_bins) < 1e-12
    assert M.maximum_calibration_error(probs, target, n_bins=n_bins) < 1e-12


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 60),
    c=st.integers(2, 6),
    n_bins=st.integers(1, 25),
)
def test_calibration_properties(seed: int, n: int, c: int, n_bins: int) -> None:
    probs, target = random_probs(n, c, seed)
    ece = M.expected_calibration_error(probs, target, n_bins=n_bins)
    rms = M.root_mean_square_calibration_error(probs, target, n_bins=n_bins)
    mce = M.maximum_calibration_error(probs, target, n_bins=n_bins)
    uce = M.uncertainty_calibration_error(probs, target, n_bins=n_bins)
    assert 0.0 <= ece <= rms + 1e-12 <= mce + 2e-12 <= 1.0 + 2e-12
    assert 0.0 <= uce <= 1.0
    assert 0.0 <= M.brier_score(probs, target) <= 2.0
    d = M.reliability_diagram(probs, target, n_bins=n_bins)
    assert sum(d.bin_count) == n
    assert len(d.bin_edges) == n_bins + 1 and d.n_bins == n_bins
    weights = np.array(d.bin_count) / n
    gaps = [
        abs(a - c) if a is not None else 0.0
        for a, c in zip(d.bin_accuracy, d.bin_confidence, strict=True)
    ]
    if probs.max(axis=1).astype(np.float32).max() < 1.0:
        assert float(np.dot(weights, gaps)) == pytest.approx(ece, abs=1e-12)


def test_uncertainty_calibration_error_hand_computed() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    target = np.array([0, 1, 1, 1])
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)  # noqa: E731
    u_09, u_08 = h(0.9), h(0.8)  # 0.469, 0.722
    # 2 bins: [0, .5) holds u=0 (right) and u=.469 (wrong); [.5, 1] holds u=1 (wrong: tie -> 0)
    # and u=.722 (right).
    expected = 0.5 * abs(0.5 - (0 + u_09) / 2) + 0.5 * abs(0.5 - (1 + u_08) / 2)
    assert M.uncertainty_calibration_error(probs, target, n_bins=2) == pytest.approx(expected)
    # 1 bin: |mean error - mean uncertainty|
    expected_1 = abs(0.5 - (0 + 1 + u_09 + u_08) / 4)
    assert M.uncertainty_calibration_error(probs, target, n_bins=1) == pytest.approx(expected_1)
    # C = 4: entropy normalised by log 4, uniform wrong prediction is perfectly calibrated
    assert M.uncertainty_calibration_error(np.full((3, 4), 0.25), [1, 2, 3]) == pytest.approx(0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "c"), SHAPES)
def test_brier_and_nll_match_sklearn(n: int, c: int, seed: int) -> None:
    probs, target = random_probs(n, c, seed)
    probs = (probs + 1e-6) / (1 + c * 1e-6)  # keep every probability above both clip levels
    brier = M.brier_score(probs, target)
    ref = skm.brier_score_loss(target, probs, labels=list(range(c)), scale_by_half=False)
    assert brier == pytest.approx(ref, abs=TOL)
    if c == 2:  # sklearn's customary binary Brier is half the multiclass formula
        assert brier == pytest.approx(2 * skm.brier_score_loss(target, probs[:, 1]), abs=TOL)
    nll = M.negative_log_likelihood(probs, target)
    assert nll == pytest.approx(skm.log_loss(target, probs, labels=list(range(c))), abs=TOL)


def test_brier_and_nll_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    target = np.array([1, 0])
    assert M.brier_score(probs, target) == pytest.approx(((0.49 + 0.64 + 0.01) + 2.0) / 2)
    assert M.negative_log_likelihood(probs, target) == pytest.approx(
        (-math.log(0.2) - math.log(1e-12)) / 2
    )


def test_reliability_diagram_is_json_and_nan_free() -> None:
    probs = np.array([[0.95, 0.05], [0.55, 0.45], [0.6, 0.4], [1.0, 0.0]])
    target = np.array([0, 1, 0, 0])
    d = M.reliability_diagram(probs, target, n_bins=5)
    assert d.bin_edges == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert d.bin_count == (0, 0, 1, 1, 2)  # 0.55 | 0.6 (edge goes right) | 0.95, 1.0
    assert d.bin_confidence[:2] == (None, None)
    assert d.bin_accuracy == (None, None, 0.0, 1.0, 1.0)
    assert d.bin_confidence[4] == pytest.approx(0.975)
    text = json.dumps(d.to_dict(), allow_nan=False)
    assert json.loads(text)["bin_count"] == [0, 0, 1, 1, 2]
    with pytest.raises(AttributeError):
        d.bin_count = ()  # type: ignore[misc]


def test_calibration_accepts_torch_and_float32() -> None:
    probs, target = random_probs(500, 4, 7, dtype=np.float32)
    t_probs = torch.from_numpy(probs).requires_grad_(True)
    ece = M.expected_calibration_error(t_probs, torch.from_numpy(target))
    assert ece == pytest.approx(tm_ce(probs, target, 15, "l1"), abs=TOL)


@pytest.mark.parametrize(
    ("probs", "target", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (np.array([0.2, 0.8]), np.array([1]), "2-D"),
        (np.ones((2, 1)), np.array([0, 0]), "at least 2"),
        (np.array([[2.0, -1.0]]), np.array([0]), "softmax"),
        (np.array([[0.5, 0.4]]), np.array([0]), "sum to 1"),
        (np.array([[np.nan, 0.5]]), np.array([0]), "NaN"),
        (np.array([[0.5, 0.5]]), np.array([0, 1]), "rows"),
        (np.array([[0.5, 0.5]]), np.array([2]), "num_classes=2"),
        (np.array([[0.5, 0.5]]), np.array([0.0]), "integer"),
    ],
)
def test_calibration_rejects_bad_input(probs, target, match) -> None:
    for fn in (
        M.expected_calibration_error,
        M.uncertainty_calibration_error,
        M.brier_score,
        M.negative_log_likelihood,
        M.reliability_diagram,
    ):
        with pytest.raises(ValueError, match=match):
            fn(probs, target)


def test_calibration_rejects_bad_options() -> None:
    probs, target = np.array([[0.5, 0.5]]), np.array([0])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            M.expected_calibration_error(probs, target, n_bins=bad)
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="eps"):
            M.negative_log_likelihood(probs, target, eps=bad)


# -------------------------------------------------------------------------------- retrieval


def brute_force_ranks(sim: np.ndarray, pos: np.ndarray) -> np.ndarray:
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.array([np.flatnonzero(pos[q][order[q]])[0] for q in range(len(sim))])


def test_recall_at_k_hand_computed() -> None:
    sim = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # positive 0 is top           -> rank 0
            [0.4, 0.4, 0.9, 0.1],  # positive 1 ties with 0 (lower index first) -> rank 2
            [0.2, 0.8, 0.1, 0.3],  # positives 2 and 3: best is 3 -> rank 1
        ]
    )
    pos = np.zeros((3, 4), dtype=bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = pos[2, 3] = True
    np.testing.assert_array_equal(M.best_positive_rank(sim, pos), [0, 2, 1])
    assert M.recall_at_k(sim, pos, 1) == pytest.approx(1 / 3)
    assert M.recall_at_k(sim, pos, 2) == pytest.approx(2 / 3)
    assert M.recall_at_k(sim, pos, 3) == 1.0
    assert M.recall_at_k(sim, pos, 100) == 1.0  # k beyond the gallery is allowed
    # a constant matrix ranks the gallery in index order
    np.testing.assert_array_equal(M.best_positive_rank(np.zeros((2, 3)), np.eye(2, 3)), [0, 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_recall_matches_stable_argsort_with_ties(seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    q, g = 37, 23
    sim = rng.integers(0, 5, size=(q, g)).astype(np.float32)  # many ties
    pos = rng.random((q, g)) < 0.1
    pos[np.arange(q), rng.integers(0, g, q)] = True
    ranks = M.best_positive_rank(sim, pos)
    np.testing.assert_array_equal(ranks, brute_force_ranks(sim, pos))
    monkeypatch.setattr(retr_mod, "_CHUNK_ELEMENTS", 50)  # several chunks of 2 queries
    np.testing.assert_array_equal(M.best_positive_rank(sim, pos), ranks)
    recalls = [M.recall_at_k(sim, pos, k) for k in range(1, g + 1)]
    assert np.all(np.diff(recalls) >= 0)
    assert recalls[-1] == 1.0
    for k in (1, 3, 10):
        assert recalls[k - 1] == pytest.approx(np.mean(ranks < k))


def test_retrieval_recalls_both_directions() -> None:
    rng = np.random.default_rng(3)
    n_img, n_txt = 20, 40
    sim = rng.normal(size=(n_img, n_txt))
    pos = np.zeros((n_img, n_txt), dtype=bool)
    pos[np.arange(n_txt) % n_img, np.arange(n_txt)] = True  # two captions per image
    sim[pos] += 1.0
    out = M.retrieval_recalls(sim, pos, ks=(1, 5, 10, n_img))
    assert list(out) == [
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        f"i2t_R@{n_img}",
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
        f"t2i_R@{n_img}",
    ]
    for k in (1, 5, 10):
        assert out[f"i2t_R@{k}"] == M.recall_at_k(sim, pos, k)
        assert out[f"t2i_R@{k}"] == M.recall_at_k(sim.T, pos.T, k)
        assert out[f"t2i_R@{k}"] == pytest.approx(np.mean(brute_force_ranks(sim.T, pos.T) < k))
    assert out[f"t2i_R@{n_img}"] == 1.0
    assert out["i2t_R@1"] <= out["i2t_R@5"] <= out["i2t_R@10"]
    assert 0.0 < out["t2i_R@1"] < 1.0  # an informative, not a degenerate, example
    # hand example: image 1's caption is outranked by caption 0
    assert M.retrieval_recalls([[0.9, 0.5], [0.8, 0.3]], np.eye(2, dtype=bool), ks=(1, 2)) == {
        "i2t_R@1": 0.5,
        "i2t_R@2": 1.0,
        "t2i_R@1": 0.5,
        "t2i_R@2": 1.0,
    }


def test_retrieval_rejects_bad_input() -> None:
    eye = np.eye(3, dtype=bool)
    no_pos = eye.copy()
    no_pos[1, 1] = False
    with pytest.raises(ValueError, match="no positive"):
        M.recall_at_k(np.zeros((3, 3)), no_pos, 1)
    wide = np.zeros((2, 3), dtype=bool)
    wide[0, 0] = wide[1, 1] = True  # every image has a caption but text 2 has no image
    assert M.recall_at_k(np.zeros((2, 3)), wide, 1) == 0.5
    with pytest.raises(ValueError, match="texts"):
        M.retrieval_recalls(np.zeros((2, 3)), wide)
    with pytest.raises(ValueError, match="same shape"):
        M.recall_at_k(np.zeros((3, 2)), eye, 1)
    with pytest.raises(ValueError, match="NaN"):
        M.recall_at_k(np.full((3, 3), np.nan), eye, 1)
    with pytest.raises(ValueError, match="boolean"):
        M.recall_at_k(np.zeros((3, 3)), eye * 2, 1)
    with pytest.raises(ValueError, match="empty"):
        M.recall_at_k(np.zeros((0, 3)), np.zeros((0, 3), dtype=bool), 1)
    for k in (0, 1.5):
        with pytest.raises(ValueError, match="`k`"):
            M.recall_at_k(np.zeros((3, 3)), eye, k)
    with pytest.raises(ValueError, match="ks"):
        M.retrieval_recalls(np.zeros((3, 3)), eye, ks=())


# -------------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_estimate_and_narrows() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (250, 4000):
        x = (rng.random(n) < 0.7).astype(float)
        lo, hi = M.mean_ci(x, n_boot=500)
        assert lo <= x.mean() <= hi
        blo, bhi = M.bootstrap_ci(np.mean, x, n_boot=500)
        assert blo <= x.mean() <= bhi
        widths.append(hi - lo)
    # the width scales like 1/sqrt(N): 16x the data -> about a quarter of the width
    assert widths[1] < 0.4 * widths[0]
    assert widths[0] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 250), rel=0.25)


@pytest.mark.parametrize("chunk", [None, 700])
def test_mean_ci_equals_bootstrap_ci_of_mean(chunk, monkeypatch) -> None:
    if chunk is not None:  # several index chunks (with odd sizes) per call
        monkeypatch.setattr(boot_mod, "_CHUNK_ELEMENTS", chunk)
    x = np.random.default_rng(1).normal(size=333)
    fast = M.mean_ci(x, n_boot=300, seed=5)
    slow = M.bootstrap_ci(np.mean, x, n_boot=300, seed=5)
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert M.mean_ci(x, n_boot=300, seed=5) == fast  # deterministic
    assert M.mean_ci(x, n_boot=300, seed=6) != fast


def test_bootstrap_resamples_arrays_together_and_ignores_nan() -> None:
    x = np.arange(50) % 7
    assert M.bootstrap_ci(lambda a, b: np.mean(a == b), x, x.copy(), n_boot=50) == (1.0, 1.0)

    returned: list[float] = []

    def stat(a: np.ndarray) -> float:  # NaN whenever the first resampled element is odd
        value = math.nan if a[0] % 2 else float(a.mean())
        returned.append(value)
        return value

    lo, hi = M.bootstrap_ci(stat, np.arange(40.0), n_boot=400, level=0.9, seed=2)
    values = np.array(returned)
    valid = values[~np.isnan(values)]
    assert values.size == 400 and 100 < valid.size < 300
    np.testing.assert_allclose((lo, hi), np.percentile(valid, [5, 95]))

    assert all(math.isnan(v) for v in M.bootstrap_ci(lambda a: math.nan, np.ones(5), n_boot=20))


def test_bootstrap_accepts_2d_rows_and_torch() -> None:
    probs, target = random_probs(200, 3, 0)
    lo, hi = M.bootstrap_ci(
        M.expected_calibration_error, torch.from_numpy(probs), target, n_boot=100
    )
    assert 0.0 <= lo <= M.expected_calibration_error(probs, target) <= hi <= 1.0


def test_bootstrap_coverage_of_bernoulli_mean() -> None:
    p, n, reps = 0.3, 200, 300
    rng = np.random.default_rng(12345)
    covered = 0
    for r in range(reps):
        x = rng.random(n) < p
        lo, hi = M.mean_ci(x, n_boot=400, seed=r)
        covered += lo <= p <= hi
    assert 0.90 <= covered / reps <= 0.99


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        M.bootstrap_ci(np.mean, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="at least one array"):
        M.bootstrap_ci(np.mean)
    with pytest.raises(ValueError, match="empty"):
        M.bootstrap_ci(np.mean, np.ones(0))
    with pytest.raises(ValueError, match="empty"):
        M.mean_ci(np.ones(0))
    with pytest.raises(ValueError, match="NaN"):
        M.mean_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="1-D"):
        M.mean_ci(np.ones((2, 2)))
    for kwargs, match in [
        ({"n_boot": 0}, "n_boot"),
        ({"level": 1.0}, "level"),
        ({"level": 0}, "level"),
        ({"seed": 1.5}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            M.mean_ci(np.ones(3), **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_vectorised_calibration_bootstrap_equals_the_generic_bootstrap(seed, n_bins):
    from mmsafe.metrics import (
        bootstrap_ci,
        brier_score,
        calibration_bootstrap,
        expected_calibration_error,
        maximum_calibration_error,
        negative_log_likelihood,
        uncertainty_calibration_error,
    )

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(300, 4)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p[:4] = np.eye(4)  # confidence exactly 1.0 (the extra torchmetrics bin)
    y = rng.integers(0, 4, 300)
    fast = calibration_bootstrap(p, y, n_bins=n_bins, n_boot=100, seed=seed)
    fns = {
        "ece": lambda a, b: expected_calibration_error(a, b, n_bins=n_bins),
        "mce": lambda a, b: maximum_calibration_error(a, b, n_bins=n_bins),
        "uce": lambda a, b: uncertainty_calibration_error(a, b, n_bins=n_bins),
        "brier": brier_score,
        "nll": negative_log_likelihood,
    }
    for name, fn in fns.items():
        ref = bootstrap_ci(fn, p, y, n_boot=100, seed=seed)
        np.testing.assert_allclose(fast[name], ref, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_classes", [2, 5])
def test_vectorised_macro_f1_bootstrap_equals_the_generic_bootstrap(seed, n_classes):
    from mmsafe.metrics import bootstrap_ci, macro_f1, macro_f1_bootstrap

    rng = np.random.default_rng(seed)
    t = rng.integers(0, n_classes, 80)
    p = np.where(rng.random(80) < 0.6, t, rng.integers(0, n_classes, 80))
    ref = bootstrap_ci(lambda a, b: macro_f1(a, b, n_classes), p, t, n_boot=300, seed=seed)
    fast = macro_f1_bootstrap(p, t, n_classes, n_boot=300, seed=seed)
    np.testing.assert_allclose(fast, ref, atol=1e-12)


def test_grouped_mean_ci_overall_equals_mean_ci_and_groups_are_sensible():
    from mmsafe.metrics import grouped_mean_ci, mean_ci

    rng = np.random.default_rng(3)
    g = rng.integers(0, 3, 400)
    v = (rng.random(400) < np.array([0.9, 0.5, 0.2])[g]).astype(float)
    overall, per = grouped_mean_ci(v, g, 4, n_boot=500, seed=7)
    assert overall == pytest.approx(mean_ci(v, n_boot=500, seed=7), abs=1e-12)
    for k in range(3):
        lo, hi = per[k]
        assert lo <= v[g == k].mean() <= hi
        assert hi - lo < 0.25
    assert all(math.isnan(x) for x in per[3])  # a group with no row


def test_ece_null_quantile_holds_its_level_on_calibrated_models_and_has_power():
    """On a calibrated model (labels drawn from its own probabilities) ECE exceeds the null 95%
    quantile about 5% of the time; an overconfident one (logits x 3) nearly always."""
    from mmsafe.metrics import ece_null_quantile, expected_calibration_error

    rng = np.random.default_rng(0)
    alarms, power, draws = 0, 0, 200
    for i in range(draws):
        logits = rng.normal(scale=2.0, size=(180, 5))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = np.array([rng.choice(5, p=p) for p in probs])
        null = ece_null_quantile(probs, seed=i)
        alarms += expected_calibration_error(probs, y) > null
        sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
        power += expected_calibration_error(sharp, y) > ece_null_quantile(sharp, seed=i)
    # the top-label correctness is exactly Bernoulli(conf) here, so the level is 5%: a
    # binomial(200, 0.05) count exceeds 20 with probability < 0.1%
    assert alarms <= 20
    assert power >= 0.95 * draws
