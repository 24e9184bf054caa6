"""generative.quality methods: FID / KID against torchmetrics, CMMD and PR/DC against hand code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from mmsafe.methods.generative.quality import (
    QUALITY_METRICS,
    cmmd,
    density_coverage,
    extract_features,
    fid,
    kid,
    knn_radii,
    precision_recall,
    quality_bootstrap,
    quality_metrics,
    quality_vs_sample_size,
    torchmetrics_feature,
)

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")


def _sets(n_real: int = 120, n_fake: int = 100, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, d)) @ rng.normal(size=(d, d)) / math.sqrt(d)
    fake = 0.3 + 1.2 * rng.normal(size=(n_fake, d)) @ rng.normal(size=(d, d)) / math.sqrt(d)
    return real, fake


# ------------------------------------------------------------------------------ torchmetrics
@pytest.mark.parametrize(("n_real", "n_fake", "d"), [(120, 100, 16), (20, 25, 32)])
def test_fid_matches_torchmetrics(n_real, n_fake, d):
    real, fake = _sets(n_real, n_fake, d)
    metric = FrechetInceptionDistance(feature=torchmetrics_feature(nn.Identity(), num_features=d))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected = float(metric.compute())
    assert fid(real, fake) == pytest.approx(expected, abs=1e-6, rel=1e-9)
    assert fid(torch.from_numpy(real).float(), fake) == pytest.approx(expected, rel=1e-5)


def test_fid_and_kid_match_torchmetrics_on_images_through_an_extractor():
    torch.manual_seed(0)
    extractor = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(12)
    )
    g = torch.Generator().manual_seed(1)
    real_img = torch.rand(40, 3, 16, 16, generator=g)
    fake_img = (torch.rand(40, 3, 16, 16, generator=g) * 0.8 + 0.1).clamp(0, 1)
    wrapped = torchmetrics_feature(extractor, example=real_img[:2])  # no num_features attribute
    assert wrapped.num_features == 12
    fid_tm = FrechetInceptionDistance(feature=wrapped)
    kid_tm = KernelInceptionDistance(feature=wrapped, subsets=4, subset_size=30)
    for metric in (fid_tm, kid_tm):
        metric.update(real_img, real=True)
        metric.update(fake_img, real=False)
    real, fake = (
        extract_features(extractor, real_img, batch_size=16),
        extract_features(extractor, fake_img),
    )
    assert real.dtype == torch.float64 and real.shape == (40, 12)
    assert fid(real, fake) == pytest.approx(float(fid_tm.compute()), abs=1e-6)
    torch.manual_seed(7)
    mean_tm, std_tm = kid_tm.compute()
    mean, std = kid(real, fake, subsets=4, subset_size=30, seed=7)
    assert mean == pytest.approx(float(mean_tm), abs=1e-6)
    assert std == pytest.approx(float(std_tm), abs=1e-6)


@pytest.mark.parametrize(
    ("subsets", "subset_size", "degree", "coef"), [(5, 40, 3, 1.0), (3, 80, 2, 0.5)]
)
def test_kid_matches_torchmetrics(subsets, subset_size, degree, coef):
    real, fake = _sets()
    metric = KernelInceptionDistance(
        feature=torchmetrics_feature(nn.Identity(), num_features=16),
        subsets=subsets,
        subset_size=subset_size,
        degree=degree,
        coef=coef,
    )
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(123)
    mean_tm, std_tm = metric.compute()
    mean, std = kid(
        real, fake, subsets=subsets, subset_size=subset_size, degree=degree, coef=coef, seed=123
    )
    assert mean == pytest.approx(float(mean_tm), abs=1e-6)
    assert std == pytest.approx(float(std_tm), abs=1e-6)
    assert std > 0


def test_kid_is_unbiased_near_zero_for_one_distribution():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    mean, _ = kid(x, y, subsets=20, subset_size=100)
    assert abs(mean) < 0.02
    assert kid(x, y + 1.0, subsets=5, subset_size=100)[0] > 0.5


# ------------------------------------------------------------------------------ CMMD
def _cmmd_by_hand(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0):
    def k(a, b):
        return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) / (2 * sigma**2))

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return scale * (kxx + kyy - 2 * kxy)


def test_cmmd_matches_the_official_formula_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 5, size=(6, 3)), rng.normal(2, 5, size=(9, 3))
    assert cmmd(x, y) == pytest.approx(_cmmd_by_hand(x, y), rel=1e-10)
    assert cmmd(x, y, sigma=2.0, scale=1.0) == pytest.approx(
        _cmmd_by_hand(x, y, 2.0, 1.0), rel=1e-10
    )
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    assert cmmd(x, y, normalize=True) == pytest.approx(_cmmd_by_hand(xn, yn), rel=1e-10)
    # the V-statistic includes the diagonal: a set against itself is exactly 0, never negative
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(x, x[::-1].copy()) == pytest.approx(0.0, abs=1e-9)


def test_cmmd_known_value():
    # two single points at distance 10: 1000 * (1 + 1 - 2 exp(-100 / 200))
    assert cmmd([[0.0, 0.0]], [[6.0, 8.0]]) == pytest.approx(1000 * (2 - 2 * math.exp(-0.5)))


# ------------------------------------------------------------------------------ PR / DC
def _radii_by_hand(x: np.ndarray, k: int) -> np.ndarray:
    out = []
    for i in range(len(x)):
        d = sorted(float(np.linalg.norm(x[i] - x[j])) for j in range(len(x)) if j != i)
        out.append(d[k - 1])
    return np.array(out)


def _prdc_by_hand(real, fake, k_pr, k_dc):
    rr, rf = _radii_by_hand(real, k_pr), _radii_by_hand(fake, k_pr)
    rd = _radii_by_hand(real, k_dc)

    def inside(p, q, radius):
        return np.linalg.norm(p - q) <= radius

    precision = np.mean([any(inside(f, r, rr[i]) for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(inside(r, f, rf[j]) for j, f in enumerate(fake)) for r in real])
    density = sum(inside(f, r, rd[i]) for f in fake for i, r in enumerate(real)) / (
        k_dc * len(fake)
    )
    coverage = np.mean([any(inside(f, r, rd[i]) for f in fake) for i, r in enumerate(real)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_radii_match_sklearn_and_brute_force(k):
    x = np.random.default_rng(k).normal(size=(40, 5))
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    np.testing.assert_allclose(knn_radii(x, k), dist[:, k], rtol=1e-12)
    np.testing.assert_allclose(knn_radii(x, k), _radii_by_hand(x, k), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_density_coverage_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(35, 3))
    fake = np.r_[rng.normal(0.5, 1.0, size=(25, 3)), rng.normal(4.0, 0.3, size=(5, 3))]
    hand = _prdc_by_hand(real, fake, 3, 5)
    pr = precision_recall(real, fake, k=3)
    dc = density_coverage(real, fake, k=5)
    for name in ("precision", "recall"):
        assert pr[name] == pytest.approx(hand[name], abs=1e-12)
    for name in ("density", "coverage"):
        assert dc[name] == pytest.approx(hand[name], abs=1e-12)
    assert 0 < pr["precision"] < 1 and 0 < pr["recall"] <= 1
    both = quality_metrics(real, fake, metrics=("precision", "recall", "density", "coverage"))
    assert both == pytest.approx({**pr, **dc})


def test_precision_recall_see_mode_collapse_and_outliers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 2))
    collapsed = rng.normal(0, 0.2, size=(300, 2))  # faithful but not diverse
    pr = precision_recall(real, collapsed)
    assert pr["precision"] > 0.95 and pr["recall"] < 0.5
    off = rng.normal(6.0, 1.0, size=(300, 2))  # nowhere near the real data
    assert precision_recall(real, off)["precision"] < 0.05


# ------------------------------------------------------------------------------ bootstrap, sizes
def test_bootstrap_intervals_bracket_the_estimates_and_are_deterministic():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(150, 4)), rng.normal(0.3, 1.0, size=(150, 4))
    point = quality_metrics(real, fake)
    ci = quality_bootstrap(real, fake, n_boot=60, seed=1)
    assert set(ci) == set(QUALITY_METRICS)
    for name in QUALITY_METRICS:
        lo, hi = ci[name]
        assert lo <= hi, name
        # the resamples are centred on the estimate: the interval holds it (KID: up to noise)
        slack = 0.02 if name == "kid" else 0.0
        assert lo - slack <= point[name] <= hi + slack, (name, lo, point[name], hi)
    assert ci["fid"][0] > 0.1  # the shift of 0.3 in 4 dims (FID 0.36) is detected
    assert quality_bootstrap(real, fake, n_boot=60, seed=1) == ci


def test_bootstrap_knn_radii_ignore_rows_drawn_twice():
    # same distribution: precision ~ 0.9; radii from duplicated rows (distance 0) would pull
    # every resampled precision / recall far below the estimate
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    point = precision_recall(real, fake)
    ci = quality_bootstrap(real, fake, metrics=("precision", "recall"), n_boot=60)
    for name in ("precision", "recall"):
        lo, hi = ci[name]
        assert lo < point[name] < hi
        assert (hi - lo) < 0.15


def test_quality_vs_sample_size_shows_fid_bias_and_flat_kid():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(320, 8)), rng.normal(size=(320, 8))
    rows = quality_vs_sample_size(real, fake, metrics=("fid", "kid", "precision"), repeats=3)
    assert [r["n"] for r in rows] == [40, 80, 160, 320]
    fids = [r["fid"] for r in rows]
    assert fids == sorted(fids, reverse=True) and fids[0] > 2 * fids[-1]
    assert all(abs(r["kid"]) < 0.05 for r in rows)
    assert math.isnan(rows[-1]["fid_std"]) and rows[0]["fid_std"] > 0
    assert rows[-1]["fid"] == pytest.approx(fid(real, fake))
    custom = quality_vs_sample_size(real, fake, sizes=[10, 20], metrics="fid", repeats=2)
    assert [r["n"] for r in custom] == [10, 20]


# ------------------------------------------------------------------------------ validation
def test_validation_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="same number of features"):
        fid(x, np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid(np.zeros(10), x)
    with pytest.raises(ValueError, match="NaN"):
        cmmd(np.full((3, 3), np.nan), x)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid(x[:1], x)
    with pytest.raises(ValueError, match="`k` must be smaller"):
        precision_recall(x, x, k=10)
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, x, subset_size=20)
    with pytest.raises(ValueError, match="metrics"):
        quality_metrics(x, x, metrics=("is",))
    with pytest.raises(ValueError, match="sizes"):
        quality_vs_sample_size(x, x, sizes=[50], metrics="fid")
    with pytest.raises(ValueError, match="n_boot"):
        quality_bootstrap(x, x, n_boot=0)
    with pytest.raises(ValueError, match="num_features"):
        torchmetrics_feature(nn.Flatten())
