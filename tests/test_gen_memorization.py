"""generative.memorization methods: tiled L2, the copy descriptor, planted-copy detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mmsafe.methods.generative.memorization import (
    CopyMatches,
    augment_views,
    control_threshold,
    copy_matches,
    fit_copy_descriptor,
    replication_report,
    tiled_l2,
)

torch.set_num_threads(1)

SIZE = 32


def _blobs(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Random images of 2-4 coloured ellipses / rectangles on a coloured background."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = np.empty((n, SIZE, SIZE, 3), np.float32)
    for i in range(n):
        img = np.tile(rng.uniform(0, 1, 3), (SIZE, SIZE, 1))
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(4, SIZE - 4, 2)
            ry, rx = rng.uniform(3, 9, 2)
            if rng.random() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            img[mask] = rng.uniform(0, 1, 3)
        out[i] = img
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _edit(images: torch.Tensor, rng: np.random.Generator, *, shift: int = 2) -> torch.Tensor:
    """Near-copies: a shift of up to ``shift`` px, contrast / brightness jitter, pixel noise."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    out = []
    for im in images:
        dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, 2))
        if shift:  # shift, repeating the edge pixels into the uncovered border
            padded = torch.nn.functional.pad(im[None], (shift,) * 4, mode="replicate")[0]
            im = padded[:, shift - dy : shift - dy + SIZE, shift - dx : shift - dx + SIZE]
        im = (im - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05)
        out.append((im + 0.03 * torch.randn(im.shape, generator=g)).clamp(0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def world():
    """200 training images; 20 of them planted, each copied twice among 150 generations."""
    rng = np.random.default_rng(0)
    train = _blobs(200, rng)
    planted = np.sort(rng.choice(200, 20, replace=False))
    source = np.repeat(planted, 2)
    generated = torch.cat([_edit(train[source], rng), _blobs(110, rng)])
    truth = np.r_[np.ones(40, bool), np.zeros(110, bool)]
    control = _blobs(150, rng)  # fresh draws only: no generation is a copy
    held_out = _blobs(150, rng)  # another control, to calibrate a threshold on
    descriptor = fit_copy_descriptor(train, seed=0)
    return {
        "rng": rng,
        "train": train,
        "planted": planted,
        "source": source,
        "generated": generated,
        "truth": truth,
        "control": control,
        "held_out": held_out,
        "descriptor": descriptor,
    }


# ------------------------------------------------------------------------------ tiled L2
def _tiled_by_hand(a: np.ndarray, b: np.ndarray, tiles: int) -> float:
    h, w = a.shape[1:]
    rows = [round(i * h / tiles) for i in range(tiles + 1)]
    cols = [round(i * w / tiles) for i in range(tiles + 1)]
    best = 0.0
    for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
        for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
            diff = a[:, r0:r1, c0:c1] - b[:, r0:r1, c0:c1]
            best = max(best, math.sqrt(float((diff**2).sum()) / diff.size))
    return best


@pytest.mark.parametrize(("tiles", "side"), [(4, 16), (3, 10), (1, 8)])
def test_tiled_l2_matches_hand_computation(tiles, side):
    g = torch.Generator().manual_seed(tiles)
    a, b = torch.rand(3, 3, side, side, generator=g), torch.rand(4, 3, side, side, generator=g)
    d = tiled_l2(a, b, tiles)
    assert d.shape == (3, 4) and d.dtype == torch.float64
    for i in range(3):
        for j in range(4):
            expected = _tiled_by_hand(a[i].double().numpy(), b[j].double().numpy(), tiles)
            assert float(d[i, j]) == pytest.approx(expected, rel=1e-10)
    assert torch.allclose(tiled_l2(a, a, tiles).diagonal(), torch.zeros(3, dtype=torch.float64))


def test_tiled_l2_accepts_uint8_hwc_and_sees_a_local_change():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(tiled_l2(u8, u8), tiled_l2(as_float, as_float))
    a = torch.full((1, 3, 16, 16), 0.5)
    b = a.clone()
    b[..., :4, :4] = 1.0  # one of 16 tiles changes completely
    assert tiled_l2(a, b, 4).item() == pytest.approx(0.5)
    assert tiled_l2(a, b, 1).item() == pytest.approx(0.5 / 4)  # diluted by the plain RMS


# ------------------------------------------------------------------------------ descriptor
@pytest.mark.slow
def test_descriptor_matches_augmented_views_to_their_source(world):
    d, train = world["descriptor"], world["train"]
    assert d.final_loss < 1.0
    emb = d.embed(train)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(train)), atol=1e-5)
    g = torch.Generator().manual_seed(5)
    views = d.embed(augment_views(train, generator=g))  # the training-time edits
    edits = d.embed(_edit(train, np.random.default_rng(5)))  # the copies' edits
    for v in (views, edits):
        sim = v @ emb.T
        own = sim.diagonal()
        others = sim.masked_fill(torch.eye(len(train), dtype=torch.bool), -2).max(dim=1).values
        assert (sim.argmax(dim=1) == torch.arange(len(train))).float().mean() >= 0.95
        assert float((own - others).median()) > 0.2
    # uint8 HWC input gives the same descriptors as float CHW
    u8 = (train[:5] * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.allclose(d.embed(u8), d.embed(u8.permute(0, 3, 1, 2).float() / 255))


# ------------------------------------------------------------------------------ detection
@pytest.mark.slow
def test_planted_copies_are_found_with_the_descriptor(world):
    m = copy_matches(world["generated"], world["train"], descriptor=world["descriptor"])
    assert m.space == "descriptor" and m.k == 50 and m.threshold == 0.5
    rep = replication_report(m, planted=set(world["planted"].tolist()), copy_truth=world["truth"])
    assert rep["precision"] >= 0.9 and rep["recall"] >= 0.9
    assert rep["copy_precision"] >= 0.9 and rep["copy_recall"] >= 0.9
    flagged = np.flatnonzero(m.copy & world["truth"])
    assert (m.nearest[flagged] == world["source"][flagged]).all()
    assert (m.similarity[world["truth"]] > np.nanmax(m.similarity[~world["truth"]]) - 0.1).all()
    assert rep["pairs"][0][0] in flagged
    ratios = [m.ratio[g] for g, _ in rep["pairs"]]
    assert ratios == sorted(ratios)


@pytest.mark.slow
def test_control_without_copies_is_rarely_flagged(world):
    m = copy_matches(world["control"], world["train"], descriptor=world["descriptor"])
    assert m.copy.mean() <= 0.05
    assert replication_report(m)["replication_rate_ci"][0] < 0.05
    plain = copy_matches(world["control"], world["train"])  # Carlini: tiled L2, 0.5
    assert plain.space == "tiled_l2" and plain.copy.mean() <= 0.05


@pytest.mark.slow
def test_tiled_l2_finds_unshifted_copies_and_misses_shifted_ones(world):
    rng = np.random.default_rng(1)
    train, planted = world["train"], world["planted"]
    exact = _edit(train[planted], rng, shift=0)
    gen = torch.cat([exact, world["control"][:60]])
    truth = np.r_[np.ones(len(planted), bool), np.zeros(60, bool)]
    m = copy_matches(gen, train)
    rep = replication_report(m, planted=set(planted.tolist()), copy_truth=truth)
    assert rep["copy_precision"] >= 0.9 and rep["copy_recall"] >= 0.9
    assert (m.nearest[: len(planted)] == planted).all()
    # a 2-pixel shift moves every tile: pixel distances lose most shifted copies
    shifted = copy_matches(world["generated"][:40], train)
    found = copy_matches(world["generated"][:40], train, descriptor=world["descriptor"])
    assert found.copy.mean() > shifted.copy.mean() + 0.3


@pytest.mark.slow
def test_control_threshold_bounds_the_false_positive_rate(world):
    d, train = world["descriptor"], world["train"]
    held = copy_matches(world["held_out"], train, descriptor=d)
    t = control_threshold(held, fpr=0.02)
    assert 0 < t <= 0.5 and held.with_threshold(t).copy.mean() <= 0.02
    control = copy_matches(world["control"], train, descriptor=d).with_threshold(t)
    assert control.copy.mean() <= 0.05 and control.threshold == t
    found = copy_matches(world["generated"], train, descriptor=d).with_threshold(t)
    assert found.copy[world["truth"]].mean() >= 0.9


# ------------------------------------------------------------------------------ report
def _matches(nearest, ratio, copy) -> CopyMatches:
    n = len(nearest)
    return CopyMatches(
        nearest=np.asarray(nearest),
        similarity=np.full(n, np.nan),
        tiled_l2=np.zeros(n),
        ratio=np.asarray(ratio, dtype=float),
        copy=np.asarray(copy, dtype=bool),
        space="tiled_l2",
        k=50,
        threshold=0.5,
    )


def test_replication_report_counts_and_wilson_intervals():
    m = _matches([3, 3, 8, 5, 1, 2], [0.2, 0.1, 0.3, 0.9, 0.05, 0.7], [1, 1, 1, 0, 1, 0])
    rep = replication_report(
        m, planted=[3, 8, 9, 11], copy_truth=[1, 1, 0, 0, 0, 1], level=0.9, max_pairs=3
    )
    assert rep["n_generations"] == 6 and rep["n_copies"] == 4
    assert rep["replication_rate"] == pytest.approx(4 / 6)
    ci = stats.binomtest(4, 6).proportion_ci(confidence_level=0.9, method="wilson")
    assert rep["replication_rate_ci"] == pytest.approx((ci.low, ci.high))
    assert rep["replicated"] == [1, 3, 8]
    assert rep["pairs"] == [(4, 1), (1, 3), (0, 3)]
    assert rep["precision"] == pytest.approx(2 / 3) and rep["recall"] == pytest.approx(2 / 4)
    assert rep["copy_precision"] == pytest.approx(2 / 4) and rep["copy_recall"] == pytest.approx(
        2 / 3
    )
    empty = replication_report(_matches([0, 1], [0.9, 0.8], [0, 0]), planted=[1])
    assert empty["replicated"] == [] and math.isnan(empty["precision"]) and empty["recall"] == 0


# ------------------------------------------------------------------------------ validation
def test_validation_errors():
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="same image size"):
        tiled_l2(x, torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiled_l2(x * 2, x)
    with pytest.raises(ValueError, match="uint8"):
        tiled_l2(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), x)
    with pytest.raises(ValueError, match="tiles"):
        tiled_l2(x, x, tiles=9)
    with pytest.raises(ValueError, match="needs a `descriptor`"):
        copy_matches(x, x, space="descriptor")
    with pytest.raises(ValueError, match="threshold"):
        copy_matches(x, x, threshold=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        fit_copy_descriptor(x[:1])
    with pytest.raises(ValueError, match="copy_truth"):
        replication_report(copy_matches(x, x), copy_truth=[True])
