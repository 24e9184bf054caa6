"""WinCLIP anomaly detection: metrics against references, window maths, and the check on shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from mmsafe.checks.monitoring.anomaly import NO_GROUND_TRUTH, AnomalyCheck
from mmsafe.methods import anomaly as A
from mmsafe.metrics import anomaly as M
from tests.conftest import audit_context


# --------------------------------------------------------------------------- image metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def _f1_max_brute(s, y):
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = (pred & y).sum()
        if tp:
            p, r = tp / pred.sum(), tp / y.sum()
            best = max(best, 2 * p * r / (p + r))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(150) < 0.2
    s = np.round(rng.normal(size=150) + 1.5 * y, 1)
    assert M.f1_max(s, y) == pytest.approx(_f1_max_brute(s, y), abs=1e-12)


def test_pixel_auroc_is_flattened_auroc():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 6, 6)) < 0.2
    maps = rng.random((3, 6, 6)) + masks
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_one_class_gives_nan():
    assert np.isnan(M.auroc([0.1, 0.2], [0, 0]))
    assert np.isnan(M.f1_max([0.1, 0.2], [0, 0]))


# --------------------------------------------------------------------------- PRO / AUPRO
def _two_regions():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True  # region A: 4 px
    masks[1, 4:8, 4:8] = True  # region B: 16 px
    return masks


def test_aupro_perfect_constant_and_half():
    masks = _two_regions()
    assert M.aupro(masks.astype(float), masks) == pytest.approx(1.0)
    # constant map: one threshold, curve (0,0) -> (1,1); area to 0.3 is 0.045, / 0.3 = 0.15
    assert M.aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15)
    # region A fully found at FPR 0, region B scored like the background:
    # curve (0,0) -> (0,0.5) -> (1,1); area to 0.3 = 0.3*0.5 + 0.5*0.045 = 0.1725 -> 0.575
    half = np.zeros(masks.shape)
    half[0][masks[0]] = 1.0
    assert M.aupro(half, masks) == pytest.approx(0.575)


def test_pro_weights_regions_equally_not_pixels():
    masks = _two_regions()
    maps = np.zeros(masks.shape)
    maps[1][masks[1]] = 1.0  # the big region found, the small one missed: still PRO 0.5
    curve = M.pro_curve(maps, masks)
    assert curve.n_regions == 2
    assert curve.pro[1] == pytest.approx(0.5) and curve.fpr[1] == 0.0
    assert M.aupro(maps, masks) == pytest.approx(0.575)


def test_aupro_interpolates_at_the_limit():
    # background pixel scores spread so FPR steps past 0.3 between two thresholds
    masks = np.zeros((1, 1, 11), dtype=bool)
    masks[0, 0, 10] = True
    maps = np.linspace(1.0, 0.0, 11)[None, None, :]  # 10 background values above the defect
    # the defect is the lowest score: PRO stays 0 until FPR 1, so AUPRO = 0
    assert M.aupro(maps, masks) == pytest.approx(0.0)
    maps2 = maps.copy()
    maps2[0, 0, 10] = 0.85  # above 8 of the 10 background pixels: found at FPR 0.2
    # curve: (0,0), (0.1,0), (0.2,0), (0.2,1), ... -> area over [0.2, 0.3] = 0.1 -> 1/3
    assert M.aupro(maps2, masks) == pytest.approx(0.1 / 0.3)
    # limit 0.25 falls inside the flat part: area 0.05 / 0.25
    assert M.aupro(maps2, masks, fpr_limit=0.25) == pytest.approx(0.2)


def test_regions_are_eight_connected():
    m = np.eye(5, dtype=bool)[None]
    assert M.label_regions(m)[1] == 1


# --------------------------------------------------------------------------- windows / scoring
def test_window_boxes_cover_every_pixel():
    for size, win, stride in [(32, 12, 4), (32, 20, 4), (10, 4, 3), (8, 16, 4)]:
        cover = A.window_coverage(A.window_boxes(size, win, stride), size)
        assert bool(cover.any(dim=0).all())
    assert len(A.window_boxes(32, 12, 4)) == 36 and len(A.window_boxes(32, 20, 4)) == 16


def test_harmonic_aggregate_matches_loop():
    rng = np.random.default_rng(0)
    boxes = A.window_boxes(10, 4, 3)
    cover = A.window_coverage(boxes, 10)
    s = torch.tensor(rng.uniform(0.05, 1.0, (2, len(boxes))), dtype=torch.float32)
    maps = A.harmonic_aggregate(s, cover)
    for n in range(2):
        for y, x in [(0, 0), (5, 4), (9, 9)]:
            vals = s[n][cover[:, y, x]].numpy()
            assert maps[n, y, x].item() == pytest.approx(len(vals) / np.sum(1 / vals), rel=1e-5)


def test_crop_windows_matches_manual_crop():
    px = torch.rand(2, 3, 8, 8)
    boxes = A.window_boxes(8, 4, 4)
    crops = A.crop_windows(px, boxes, 4)  # no resize
    assert torch.equal(crops[1], px[0, :, 0:4, 4:8]) and torch.equal(crops[4 + 3], px[1, :, 4:, 4:])


# --------------------------------------------------------------------------- native resolution
OLD_WINDOWS, OLD_STRIDE = (12, 20), 4  # the pixel defaults before windows were fractions


def test_default_windows_at_32_px_are_the_old_pixel_windows():
    check = AnomalyCheck()
    assert tuple(w * 32 for w in check.windows) == OLD_WINDOWS and check.stride * 32 == OLD_STRIDE
    for frac, px in zip(check.windows, OLD_WINDOWS, strict=True):
        new = A.scaled_window_boxes(32, frac, check.stride)
        assert np.array_equal(new, A.window_boxes(32, px, OLD_STRIDE))
    assert [len(A.scaled_window_boxes(32, w, A.STRIDE)) for w in A.WINDOWS] == [36, 16]
    # any whole-pixel window and stride of a 32-px image gives the pixel boxes exactly
    for win in range(1, 33):
        for stride in range(1, 9):
            assert np.array_equal(
                A.scaled_window_boxes(32, win / 32, stride / 32), A.window_boxes(32, win, stride)
            ), (win, stride)


def test_old_pixel_options_are_rejected_with_the_conversion():
    with pytest.raises(ValueError, match=r"no longer in pixels .* 12/32 = 0.375"):
        AnomalyCheck(windows=(12, 20))
    with pytest.raises(ValueError, match="stride"):
        AnomalyCheck(stride=4)
    with pytest.raises(ValueError, match="at least one"):
        AnomalyCheck(windows=())


@pytest.mark.parametrize("side", [16, 32, 64, 100, 128, 250, 256])
def test_window_count_does_not_grow_with_the_resolution(side):
    for frac, n in zip(A.WINDOWS, (36, 16), strict=True):
        boxes = A.scaled_window_boxes(side, frac, A.STRIDE)
        assert len(boxes) == n  # the 32-px count at every size
        win = int(np.floor(frac * side + 0.5))
        assert (boxes[:, 2:] == win).all()  # a fixed fraction of the side
        assert boxes[:, :2].min() == 0 and (boxes[:, :2] + boxes[:, 2:]).max() == side
        assert bool(A.window_coverage(boxes, side).any(dim=0).all())  # every pixel covered
    # the old pixel windows on the same image: thousands of them at 250 px
    if side == 250:
        assert len(A.window_boxes(250, 12, 4)) + len(A.window_boxes(250, 20, 4)) == 7202


def test_embed_windows_crops_at_the_image_grid_in_bounded_chunks(toy_model):
    images = [np.full((100, 100, 3), i, np.uint8) for i in range(30)]
    calls = []

    def record(px):
        calls.append(tuple(px.shape))
        return torch.nn.functional.normalize(torch.rand(len(px), 3), dim=-1)

    emb = A.embed_windows(toy_model, images, batch_size=64, encode_pixels=record)
    assert emb.image_size == 100  # the images' own side, not the model's 8 px
    assert {w: e.shape[:2] for w, e in emb.windows.items()} == {
        A.WINDOWS[0]: (30, 36),
        A.WINDOWS[1]: (30, 16),
    }
    crops = [c for c in calls if c[0] != 1 and c[-1] == 8]
    assert all(c[1:] == (3, 8, 8) for c in calls)  # everything at the model's input size
    assert max(c[0] for c in crops) <= 64  # never more than batch_size crops at once
    per_chunk = A.crop_chunk(emb.boxes, 8, 64)
    assert per_chunk == 64 // 36
    assert len(calls) == 3 * int(np.ceil(30 / per_chunk))  # whole images + 2 scales per chunk
    # a large input size is bounded by memory too: at most CROP_BUDGET crop values per chunk
    boxes = {w: A.scaled_window_boxes(250, w, A.STRIDE) for w in A.WINDOWS}
    n = A.crop_chunk(boxes, 224, 10_000)
    assert n * 36 * 3 * 224**2 <= A.CROP_BUDGET < (n + 1) * 36 * 3 * 224**2
    assert A.crop_chunk(boxes, 1024, 10_000) == 1  # always at least one image


def test_native_window_crops_keep_the_whole_images_pixel_density(toy_model):
    """``min_side``: each window is encoded at its share of the input size, not enlarged to it."""
    images = [np.full((100, 100, 3), i, np.uint8) for i in range(5)]
    sides = []

    def record(px):
        sides.append(int(px.shape[-1]))
        return torch.nn.functional.normalize(torch.rand(len(px), 3), dim=-1)

    input_size = 64
    model = _SizedModel(toy_model, input_size)
    native = A.embed_windows(model, images, encode_pixels=record, min_side=8)
    # 12/32 and 20/32 of a 100-px image: 38 and 62 px windows; at 64 px input: 24 and 40 px
    assert sorted(set(sides) - {input_size}) == [
        round(38 * input_size / 100),
        round(62 * input_size / 100),
    ]
    sides.clear()
    enlarged = A.embed_windows(model, images, encode_pixels=record)
    assert set(sides) == {input_size}  # every crop at the input size
    assert native.boxes.keys() == enlarged.boxes.keys()
    assert all((native.boxes[w] == enlarged.boxes[w]).all() for w in native.boxes)
    # the floor: a tower's minimum side wins over a tiny native window
    assert A.crop_side(12, 250, 96, 32) == 32 and A.crop_side(94, 250, 96, None) == 96


def test_window_scale_option_follows_the_model(toy_model):

    assert AnomalyCheck().crop_min_side(toy_model) is None  # fixed-size tower: WinCLIP resize
    assert AnomalyCheck(window_scale="input").crop_min_side(toy_model) is None
    with pytest.raises(ValueError, match="min_input_size"):
        AnomalyCheck(window_scale="native").crop_min_side(toy_model)
    with pytest.raises(ValueError, match="window_scale"):
        AnomalyCheck(window_scale="huge")
    sized = _SizedModel(toy_model, 64, min_input_size=16)
    assert AnomalyCheck().crop_min_side(sized) == 16  # auto: native on a flexible tower
    assert AnomalyCheck(window_scale="input").crop_min_side(sized) is None


class _SizedModel:
    """A stand-in model with a chosen input size (and optionally a flexible image tower)."""

    def __init__(self, inner, input_size, min_input_size=None):
        self.inner, self.input_size, self.min_input_size = inner, input_size, min_input_size
        self.name = "sized"

    def eval(self):
        return self

    def preprocess(self, modality, values):
        from mmsafe.models.base import images_to_tensor

        return images_to_tensor(values, self.input_size)


def test_fast_pixel_metrics_equal_the_definitions():
    """The argsort-free metrics give the stable-argsort definitions' numbers to the last bit."""
    rng = np.random.default_rng(0)
    for trial in range(6):
        masks = rng.random((3, 9, 9)) < 0.15
        masks[0, 0, 0], masks[-1, -1, -1] = True, False
        maps = rng.random(masks.shape) + masks * 0.4
        if trial % 2:
            maps = np.round(maps, 1)  # ties
        s, t = maps.ravel(), masks.ravel()
        order = np.argsort(-s, kind="mergesort")
        last = np.r_[np.flatnonzero(np.diff(s[order])), len(s) - 1]
        tp = np.cumsum(t[order])[last]
        fp = last + 1 - tp
        roc = np.trapezoid(np.r_[0.0, tp / t.sum()], np.r_[0.0, fp / (~t).sum()])
        regions, k = M.label_regions(masks)
        lab = regions.ravel()
        weight = np.where(lab == 0, 0.0, 1.0 / (k * np.bincount(lab)[lab]))
        pro = np.minimum(np.cumsum(weight[order])[last], 1.0)
        fpr = np.cumsum(lab[order] == 0)[last] / (lab == 0).sum()
        want = M.area_up_to(np.r_[0.0, fpr], np.r_[0.0, pro], 0.3) / 0.3
        for m in (maps, maps.astype(np.float32)):
            ref = m.astype(np.float64)
            assert M.pixel_auroc(m, masks) == M.pixel_auroc(ref, masks)
            if m.dtype == np.float64:
                assert M.pixel_auroc(m, masks) == roc and M.aupro(m, masks) == want
            got = M.pixel_metrics(m, M.PixelTruth.of(masks))
            assert got == (M.pixel_auroc(ref, masks), M.aupro(ref, masks))


def test_zero_shot_and_memory_bank_scores():
    protos = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), dim=-1)
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    s = A.zero_shot_scores(e, protos, 10.0)
    ref = torch.softmax(10.0 * e @ protos.T, dim=-1)[:, 1]
    assert torch.allclose(s, ref) and s[1] > 0.5 > s[0]
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    nn = A.nearest_neighbour_scores(e, bank)
    assert nn[0].item() == pytest.approx(0.0, abs=1e-6)
    assert nn[1].item() == pytest.approx(1 - 2**-0.5, abs=1e-6)


def test_prompt_ensemble_is_state_times_template():
    normal, anomalous = A.prompt_ensemble("circle")
    assert len(normal) == len(A.NORMAL_STATES) * len(A.TEMPLATES)
    assert len(anomalous) == len(A.ANOMALOUS_STATES) * len(A.TEMPLATES)
    assert "a photo of a damaged circle." in anomalous


def test_patch_distances_match_brute_force():
    rng = np.random.default_rng(0)
    q = torch.tensor(rng.normal(size=(2, 3, 4, 5)), dtype=torch.float32)
    refs = torch.tensor(rng.normal(size=(2, 3, 4, 5)), dtype=torch.float32)
    bank = A.PatchMemoryBank.from_feature_maps(refs)
    assert bank.features.shape == (2 * 4 * 5, 3) and bank.k == 2
    d = A.patch_distances(q, bank, chunk=7)  # chunks that do not divide the rows
    rows = refs.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    for n, y, x in [(0, 0, 0), (1, 3, 4), (0, 2, 1)]:
        brute = np.linalg.norm(rows - q[n, :, y, x].numpy(), axis=1).min()
        assert d[n, y, x].item() == pytest.approx(brute, rel=1e-5)
    # a reference scores zero against its own bank; a map's maximum is the image score
    assert float(A.patch_distances(refs, bank).abs().max()) < 1e-3
    scores = A.patch_anomaly(q, bank, image_size=8)
    assert scores.maps.shape == (2, 8, 8)
    assert torch.allclose(scores.image, scores.maps.flatten(1).max(dim=1).values)


def test_as_feature_map_lays_tokens_on_the_grid():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # CLS + 2x2 patches
    fmap = A.as_feature_map(tokens)
    assert fmap.shape == (2, 3, 2, 2)
    assert torch.equal(fmap[1, :, 1, 0], tokens[1, 3])  # patch 2 (row 1, col 0) = token 3
    with pytest.raises(ValueError):
        A.as_feature_map(torch.zeros(2, 6, 3))


# --------------------------------------------------------------------------- the check
def test_check_skips_without_defect_ground_truth(toy_model, colour_data):
    ctx = audit_context(toy_model, colour_data)
    assert AnomalyCheck().skip_reason(ctx) == NO_GROUND_TRUTH


def test_check_runs_on_toy_with_planted_defects(toy_model, colour_data):
    # plant white squares in a third of the evaluated images; the toy encoder (mean RGB) should
    # notice them through the few-shot memory bank
    data = colour_data
    rng = np.random.default_rng(0)
    for i, m in enumerate(data.meta):
        m["defect"], m["defect_mask"] = None, None
        if data.splits[i] == "test" and rng.random() < 0.35:
            mask = np.zeros((8, 8), dtype=bool)
            mask[2:5, 2:5] = True
            data.modalities["image"][i] = data.modalities["image"][i].copy()
            data.modalities["image"][i][mask] = 255
            m["defect"], m["defect_mask"] = "blob", mask
    ctx = audit_context(toy_model, data)
    check = AnomalyCheck(windows=(4 / 8, 6 / 8), stride=2 / 8, n_boot=20)  # 4 and 6 px of 8
    assert check.skip_reason(ctx) is None
    res = check.run(ctx)
    names = set(res.metrics)
    for method in ("zero_shot", "few_shot_k1", "few_shot_k2", "few_shot_k4", "memory_k4"):
        for key in ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "aupro"):
            assert f"{method}/{key}" in names
    for name, v in res.metrics.items():
        assert name.startswith("n_") or 0.0 <= v.value <= 1.0
    assert res.plots["top_anomalies"]["kind"] == "table"
    # the toy encoder exposes no hidden states: the patch bank is skipped, with a finding
    assert not any(n.startswith("patch_") for n in names)
    assert any("patch memory bank was skipped" in f.message for f in res.findings)
    # calibration has no defective row to choose on, and the toy has no feature maps: the
    # headline is the declared default's next family, WinCLIP+ at its largest k
    assert res.metrics["image_auroc"] == res.metrics["few_shot_k4/image_auroc"]
    assert res.metrics["image_auroc"].ci is not None
    assert res.metrics["aupro"] == res.metrics["few_shot_k4/aupro"]
    info = next(f for f in res.findings if "headline_method" in f.evidence)
    assert (info.evidence["headline_method"], info.evidence["chosen_on"]) == (
        "few_shot_k4",
        "default",
    )
    assert "declared default" in info.message
    res.to_dict()  # JSON-able


PLANTED = ("zero_shot", "few_shot_k1", "memory_k1", "patch_k1")


def _planted_defects(data, seed: int = 0):
    """Defects (no masks) on a third of calibration and test rows, and planted method scores.

    Calibration: ``zero_shot`` separates defective from normal rows perfectly, the others are
    noise. Test: ``few_shot_k1`` separates perfectly, ``zero_shot`` only partly (AUROC ~0.64).
    """
    rng = np.random.default_rng(seed)
    for split, m in zip(data.splits, data.meta, strict=True):
        bad = split != "train" and rng.random() < 0.35
        m["defect"], m["defect_mask"] = ("blob" if bad else None), None
        m["planted"] = {name: rng.normal() for name in PLANTED}
        if split == "calibration":
            m["planted"]["zero_shot"] = bad + rng.uniform(0, 0.5)
        else:
            m["planted"]["zero_shot"] = bad / 2 + rng.normal()
            m["planted"]["few_shot_k1"] = 2 * bad + rng.uniform()
    return data


class _PlantedAnomaly(AnomalyCheck):
    """The check with its method scores replaced by the planted ones; records what it scored."""

    def __init__(self, **kw):
        super().__init__(shots=(1,), **kw)
        self.scored: list[list[str]] = []

    def _methods(self, ctx, data, ref_split, ref_rows, usable):  # noqa: D102
        self.scored.append(list(data.ids))
        n = len(data.ids)
        out = {
            name: A.AnomalyScores(
                torch.tensor([m["planted"][name] for m in data.meta]), torch.zeros(n, 8, 8)
            )
            for name in PLANTED
        }
        return out, 8, []


def test_headline_is_chosen_on_calibration_not_on_the_evaluated_rows(toy_model, colour_data):
    ctx = audit_context(toy_model, _planted_defects(colour_data))
    check = _PlantedAnomaly(n_boot=50)
    res = check.run(ctx)
    m = res.metrics
    # the evaluated rows favour few_shot_k1; the headline is the calibration split's zero_shot
    assert m["few_shot_k1/image_auroc"].value == 1.0 and m["zero_shot/image_auroc"].value < 0.9
    assert m["image_auroc"] == m["zero_shot/image_auroc"]  # value and CI
    assert m["image_auroc"].ci is not None and m["image_auroc"].ci[1] < 1.0
    info = next(f for f in res.findings if "headline_method" in f.evidence)
    assert (info.evidence["headline_method"], info.evidence["chosen_on"]) == (
        "zero_shot",
        "calibration",
    )
    assert "calibration split" in info.message
    # scored: the evaluated rows, then the calibration rows without the 1-shot reference
    evaluated, selection = check.scored
    assert evaluated == ctx.data.ids
    ref_split, order = check._references(ctx, 0)
    assert ref_split is ctx.calibration
    reference = ctx.calibration.ids[order[0]]
    assert set(selection) == set(ctx.calibration.ids) - {reference}
    rows = [ctx.calibration.ids.index(i) for i in selection]
    y = [ctx.calibration.meta[i]["defect"] is not None for i in rows]
    for name in PLANTED:
        s = [ctx.calibration.meta[i]["planted"][name] for i in rows]
        want = roc_auc_score(y, s)
        assert info.evidence["calibration_image_auroc"][name] == pytest.approx(want, abs=1e-12)
    # the low-AUROC finding and the maps follow the headline too
    low = [f for f in res.findings if f.severity in ("medium", "high")]
    assert low and "(zero_shot)" in low[0].message
    assert "(zero_shot" in res.plots["top_anomalies"]["title"]


def test_headline_without_a_calibration_split_is_the_declared_default(toy_model, colour_data):
    ctx = audit_context(toy_model, _planted_defects(colour_data))
    ctx = dataclasses.replace(ctx, calibration=None)  # the references come from train
    check = _PlantedAnomaly(n_boot=0)
    res = check.run(ctx)
    assert len(check.scored) == 1  # only the evaluated rows were scored
    assert AnomalyCheck.default_headline[0] == "patch"
    assert res.metrics["image_auroc"] == res.metrics["patch_k1/image_auroc"]
    info = next(f for f in res.findings if "headline_method" in f.evidence)
    assert (info.evidence["headline_method"], info.evidence["chosen_on"]) == ("patch_k1", "default")
    assert info.evidence["calibration_image_auroc"] == {}
    assert "declared default" in info.message


@pytest.fixture(scope="module")
def defect_aware(mmsafe_cache):
    """The quick demo's tiny-clip: its training captions name defects (``train_defects=0.1``).

    Same world and cache as ``mmsafe demo --quick`` in test_cli, so the session trains it once.
    """
    from mmsafe.cli import QUICK_WORLD
    from mmsafe.data.loading import load_data
    from mmsafe.models.loading import load_model

    world = load_data(QUICK_WORLD)
    return load_model("tiny-clip", data=world, quick=True, cache_dir=mmsafe_cache, progress=False)


def test_planted_defects_found_on_shapes(defect_aware, shapes_quick):
    """On shapes (30% defects), zero- and few-shot detectors find the planted defects.

    Measured with a quick tiny-clip (14 s of training, zero-shot class accuracy ~0.5) whose
    captions name defects on 10% of its training images. 270 evaluated rows, 82 defective:
    zero-shot image AUROC 0.859, WinCLIP+ 0.842/0.876/0.845 (k = 1, 2, 4), pixel AUROC
    0.80-0.86, AUPRO 0.36-0.53. The same check with the session model, which never read a
    defect word, gives zero-shot 0.61-0.66.

    The patch memory bank on the second CNN stage (``patch_k{k}``) reaches the issue's 0.9:
    image AUROC 0.966 / 0.976 / 0.936 (k = 1 / 2 / 4, seed 0), pixel AUROC 0.979-0.983, AUPRO
    0.933-0.947. Bounds: measured minus 0.05 for image AUROC (the k = 4 reference draw is the
    weakest; over reference seeds 0-2 the mean is 0.958 +- 0.017), and never below the WinCLIP+
    window methods with the same references.
    """
    from mmsafe.data.worlds import make_shapes

    world = make_shapes(n=1500, seed=3, defects=0.3)
    res = AnomalyCheck(n_boot=0).run(audit_context(defect_aware, world))
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["n_defective"] == 82
    assert m["zero_shot/image_auroc"] > 0.8
    for k in (1, 2, 4):
        assert m[f"few_shot_k{k}/image_auroc"] > 0.8
        assert m[f"few_shot_k{k}/pixel_auroc"] > 0.75
    measured = {1: 0.966, 2: 0.976, 4: 0.936}
    for k, value in measured.items():
        assert m[f"patch_k{k}/image_auroc"] > value - 0.05
        assert m[f"patch_k{k}/image_auroc"] >= m[f"few_shot_k{k}/image_auroc"]
        assert m[f"patch_k{k}/image_auroc"] >= m[f"memory_k{k}/image_auroc"]
        assert m[f"patch_k{k}/pixel_auroc"] > 0.95
        assert m[f"patch_k{k}/aupro"] > 0.85
    assert m["aupro"] > 0.85  # far above a constant map's 0.15
    assert m["image_auroc"] > 0.9  # the bar
    # shapes has defects in calibration: the headline method is chosen there, and the headline
    # figures are that method's evaluated-row figures
    info = next(f for f in res.findings if "headline_method" in f.evidence)
    head, cal_aucs = info.evidence["headline_method"], info.evidence["calibration_image_auroc"]
    assert info.evidence["chosen_on"] == "calibration"
    assert set(cal_aucs) == {k.split("/")[0] for k in m if "/" in k}
    assert head == max(cal_aucs, key=cal_aucs.__getitem__)
    assert res.metrics["image_auroc"] == res.metrics[f"{head}/image_auroc"]
    assert res.metrics["aupro"] == res.metrics[f"{head}/aupro"]
    assert res.plots["top_anomaly_maps"]["kind"] == "images"
    assert len(res.plots["top_anomaly_maps"]["items"]) == 10

    # the zero-shot prompts work because the text tower knows the defect words
    naive = AnomalyCheck(n_boot=0, shots=()).run(audit_context(shapes_quick[1], world))
    assert naive.metrics["zero_shot/image_auroc"].value < m["zero_shot/image_auroc"] - 0.1


def test_references_come_from_calibration_never_test(shapes_quick):
    world, model = shapes_quick
    ctx = audit_context(model, world)
    split, order = AnomalyCheck()._references(ctx, seed=0)
    assert split is ctx.calibration and len(order) >= 4
    refs = {split.ids[i] for i in order}
    assert not refs & set(ctx.data.ids)
    assert all(split.meta[i]["defect"] is None for i in order)


# --------------------------------------------------------------------------- native resolution
@pytest.fixture(scope="module")
def native_worlds():
    """``{side: (world with 30% defects, the same world without them)}``: twins row by row.

    Each flaw of the shapes world draws from its own stream, so with ``defects=0`` every image
    is its twin's without the scratch or hole: the clean control of the defective one.
    """
    from mmsafe.data.worlds import make_shapes

    return {
        side: (
            make_shapes(n=400, seed=3, image_size=side, defects=0.3),
            make_shapes(n=400, seed=3, image_size=side, defects=0.0),
        )
        for side in (32, 100, 128)
    }


@pytest.mark.parametrize("side", [32, 100, 128])
def test_windows_maps_and_masks_at_the_images_own_resolution(defect_aware, native_worlds, side):
    """Measured (quick defect-aware tiny-clip, 72 evaluated rows, 25 defective, k = 4): WinCLIP+
    image AUROC 0.745 at 128 px and 0.746 at 100 px; every defective image scores above its clean
    twin (100%), zero-shot on 92% of them."""
    from mmsafe.checks.monitoring.anomaly import defect_masks, defect_rows

    world, clean = native_worlds[side]
    check = AnomalyCheck(n_boot=0, shots=(1, 4))
    ctx, twin = audit_context(defect_aware, world), audit_context(defect_aware, clean)
    assert check.skip_reason(twin) is not None  # no defect ground truth: nothing to score
    rows = defect_rows(ctx.data, 300, 0)
    data = ctx.data.subset(rows)
    ref_split, order = check._references(ctx, 0)
    refs = order[:4]
    before = ctx.engine.accounting()["modalities"]["image"]
    methods, image_size, findings = check._methods(ctx, data, ref_split, refs, [1, 4])
    after = ctx.engine.accounting()["modalities"]["image"]
    assert image_size == side and not findings
    for scores in methods.values():
        assert scores.maps.shape == (len(rows), side, side)
    masks = defect_masks(data.meta, (side, side))
    assert masks is not None and masks.shape == (len(rows), side, side)
    # per image the 36 + 16 windows of a 32-px image, and one feature-map pass; only the 4
    # references' whole images are new (the evaluated rows' are the task's cached outputs)
    n = len(rows) + len(refs)
    assert after["rows_encoded"] - before["rows_encoded"] == 52 * n + n + len(refs)
    assert after["variants"] == before["variants"] + 1  # the hidden states are a variant
    assert after["duplication"] == 1.0
    check._methods(ctx, data, ref_split, refs, [1, 4])  # again: crops and maps are cached
    assert ctx.engine.accounting()["modalities"]["image"] == after

    # the planted defects are found: above chance, and above each image's clean twin
    is_defect = np.array([m["defect"] is not None for m in data.meta])
    twins, _, _ = check._methods(twin, twin.data.subset(rows), twin.calibration, refs, [1, 4])
    for name, floor in (("few_shot_k4", 0.9), ("zero_shot", 0.8)):
        s, c = methods[name].image.numpy(), twins[name].image.numpy()
        assert np.mean(s[is_defect] > c[is_defect]) >= floor, name
        assert np.array_equal(s[~is_defect], c[~is_defect])  # identical normal images
    if side != 32:
        assert M.auroc(methods["few_shot_k4"].image.numpy(), is_defect) > 0.65


def test_check_at_128_px_scores_pixels_and_shows_small_thumbnails(defect_aware, native_worlds):
    import base64
    import io

    from PIL import Image

    world, _ = native_worlds[128]
    res = AnomalyCheck(n_boot=0, shots=(1, 4)).run(audit_context(defect_aware, world))
    assert not any("Pixel metrics were skipped" in f.message for f in res.findings)
    for key in ("aupro", "few_shot_k4/pixel_auroc", "patch_k4/aupro"):
        assert 0.0 <= res.metrics[key].value <= 1.0
    assert res.metrics["few_shot_k4/pixel_auroc"].value > 0.6
    items = res.plots["top_anomaly_maps"]["items"]
    sizes = {Image.open(io.BytesIO(base64.b64decode(i["png"]))).size for i in items}
    assert sizes == {(192, 96)}  # image + overlay, 96 px high, whatever the resolution


def test_patch_layers_default_to_the_models_own():
    from mmsafe.models.base import EncoderModel
    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    class Stage0(TinyClip):
        patch_layers = (0,)

    cfg = TinyClipConfig.for_size("xs")
    assert EncoderModel.patch_layers == TinyClip.patch_layers == (1,)
    assert AnomalyCheck().layers_for(TinyClip(cfg)) == (1,)
    assert AnomalyCheck().layers_for(Stage0(cfg)) == (0,)
    assert AnomalyCheck(patch_layers=(0, 2)).layers_for(Stage0(cfg)) == (0, 2)  # option wins
    assert AnomalyCheck().layers_for(object()) == (1,)  # a duck-typed model without one
    assert AnomalyCheck(patch_layers=()).layers_for(Stage0(cfg)) == ()  # off


def test_engine_hidden_states_are_cached_and_counted(toy_model):
    from mmsafe.data.worlds import make_shapes
    from mmsafe.engine import Engine
    from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig

    model = TinyClip(TinyClipConfig.for_size("xs")).eval()
    world = make_shapes(n=60, seed=1, duplicates=0)
    assert len(world) == 60
    engine = Engine(batch_size=16, progress=False)
    stage0, stage1 = engine.hidden_states(model, world, "image", (0, 1))
    with torch.inference_mode():
        direct = model.hidden_states("image", model.preprocess("image", world.modalities["image"]))
    torch.testing.assert_close(stage0, direct[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stage1, direct[1], rtol=1e-5, atol=1e-6)
    acc = engine.accounting()["modalities"]["image"]
    assert (acc["rows_encoded"], acc["distinct_row_variants"], acc["variants"]) == (60, 60, 1)
    # a subset's rows are its parent's: served from the cache, in the asked order
    sub = world.subset([7, 3, 3])
    again = engine.hidden_states(model, sub, "image", (0, 1))
    assert torch.equal(again[1], stage1[[7, 3, 3]])
    assert engine.accounting()["modalities"]["image"]["rows_encoded"] == 60
    # other layers are another pass (and another variant); a bad layer or no capability fails
    # before anything is counted
    engine.hidden_states(model, world, "image", (1,), rows=[0, 1])
    acc = engine.accounting()["modalities"]["image"]
    assert (acc["rows_encoded"], acc["variants"], acc["duplication"]) == (62, 2, 1.0)
    with pytest.raises(IndexError):
        engine.hidden_states(model, world, "image", (9,))
    with pytest.raises(NotImplementedError):
        engine.hidden_states(toy_model, world, "image", (1,))
    assert engine.accounting()["modalities"]["image"]["rows_encoded"] == 62
