"""controllability.explain, mmsafe.methods.explain: modality Shapley, DIME, IG (pixels, text),
Grad-CAM."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import mmsafe.checks.controllability.explain  # noqa: F401  (registers the check)
from mmsafe.checks.controllability.explain import ExplainCheck, share_cis
from mmsafe.checks.registry import list_checks
from mmsafe.methods.explain import (
    ZERO_TOKEN,
    ExplainError,
    coalition_masks,
    coalition_values,
    cross_grid,
    curve_auc,
    deletion_curve,
    dime_decompose,
    grad_cam,
    image_cam_layer,
    integrated_gradients,
    modality_shares,
    random_saliency,
    random_token_saliency,
    shapley_values,
    text_baseline_ids,
    text_embedding_layer,
    text_integrated_gradients,
    token_deletion_curve,
    token_words,
)
from mmsafe.models.heads import FusionConfig, FusionHead
from tests.conftest import QUICK_WORLD_SPEC, ToyEncoder, audit_context, make_colour_data


def brute_force_shapley(v: np.ndarray, m: int) -> np.ndarray:
    """Average marginal contribution over all ``m!`` orders (the definition)."""
    phi = np.zeros(m)
    orders = list(itertools.permutations(range(m)))
    for order in orders:
        s = 0
        for j in order:
            phi[j] += v[s | 1 << j] - v[s]
            s |= 1 << j
    return phi / len(orders)


def table(fn, m: int) -> np.ndarray:
    """Value table of ``fn(x)`` with ``x`` the 0/1 presence vector of each coalition."""
    return np.array([fn(mask.astype(float)) for mask in coalition_masks(m)])


# --------------------------------------------------------------------------- Shapley


def test_shapley_hand_computed() -> None:
    # additive: v = 2 x1 + 3 x2 -> each modality gets its own term
    assert shapley_values(table(lambda x: 2 * x[0] + 3 * x[1], 2), 2).tolist() == [2.0, 3.0]
    # pure interaction: v = x1 x2 -> split equally
    assert shapley_values(table(lambda x: x[0] * x[1], 2), 2).tolist() == [0.5, 0.5]
    # three players: v = x1 x2 + 4 x3 (+ a constant, which nobody gets)
    phi = shapley_values(table(lambda x: x[0] * x[1] + 4 * x[2] + 7, 3), 3)
    assert phi == pytest.approx([0.5, 0.5, 4.0])
    # majority game of 3: v = 1 when at least two are present -> 1/3 each
    phi = shapley_values(table(lambda x: float(x.sum() >= 2), 3), 3)
    assert phi == pytest.approx([1 / 3] * 3)
    # batched rows
    rows = np.stack([table(lambda x: x[0], 2), table(lambda x: x[1] - x[0], 2)])
    assert shapley_values(rows, 2).tolist() == [[1.0, 0.0], [-1.0, 1.0]]
    with pytest.raises(ValueError):
        shapley_values(np.zeros(3), 2)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 4),
    data=st.data(),
)
def test_shapley_efficiency_and_definition(m: int, data) -> None:
    v = data.draw(arrays(np.float64, 2**m, elements=st.floats(-10, 10)))
    phi = shapley_values(v, m)
    assert phi.sum() == pytest.approx(v[-1] - v[0], abs=1e-9)
    assert phi == pytest.approx(brute_force_shapley(v, m), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 4), data=st.data())
def test_shapley_symmetry_and_null_player(m: int, data) -> None:
    # symmetric in players 0 and 1: v(S) depends on S only through swap-invariant features
    w = data.draw(arrays(np.float64, (m, m), elements=st.floats(-3, 3)))
    sym = w.copy()
    sym[1], sym[:, 1] = sym[0], sym[:, 0]
    sym[1, 1] = sym[0, 0]
    sym[0, 1] = sym[1, 0]

    def v_sym(x: np.ndarray) -> float:
        return float(x @ sym @ x)

    phi = shapley_values(table(v_sym, m), m)
    assert phi[0] == pytest.approx(phi[1], abs=1e-9)

    # null player: the last player never changes the value
    def v_null(x: np.ndarray) -> float:
        y = x.copy()
        y[-1] = 0.0
        return float(y @ w @ y + np.sin(y).sum())

    assert shapley_values(table(v_null, m), m)[-1] == pytest.approx(0.0, abs=1e-12)


def test_coalition_values_replace_absent_modalities_by_null() -> None:
    def fn(e):  # class 0 logit = a + 2 b + 4 c; class 1 = a * b
        a, b, c = e["a"][:, 0], e["b"][:, 0], e["c"][:, 0]
        return torch.stack([a + 2 * b + 4 * c, a * b], dim=-1)

    emb = {"a": torch.tensor([[1.0], [3.0]]), "b": torch.ones(2, 1), "c": torch.ones(2, 1)}
    null = {"a": torch.zeros(1), "b": torch.tensor([0.5]), "c": torch.zeros(1)}
    v = coalition_values(fn, emb, null, torch.tensor([0, 1]), output="logit")
    # coalitions: {}, {a}, {b}, {a,b}, {c}, {a,c}, {b,c}, {a,b,c}
    assert v[0].tolist() == [1.0, 2.0, 2.0, 3.0, 5.0, 6.0, 6.0, 7.0]
    assert v[1].tolist() == [0.0, 1.5, 0.0, 3.0, 0.0, 1.5, 0.0, 3.0]
    phi = shapley_values(v, 3)
    assert phi[0] == pytest.approx([1.0, 1.0, 4.0])  # additive class: own contributions
    assert phi[1] == pytest.approx([2.25, 0.75, 0.0])  # c is a null player for a * b
    probs = coalition_values(fn, emb, null, torch.tensor([0, 1]))
    assert ((probs >= 0) & (probs <= 1)).all()
    assert modality_shares(phi[:1]) == pytest.approx([1 / 6, 1 / 6, 4 / 6])
    assert all(math.isnan(s) for s in modality_shares(np.zeros((3, 2))))


def test_share_cis_cover_the_share() -> None:
    rng = np.random.default_rng(0)
    phi = np.stack([rng.normal(1, 0.3, 200), rng.normal(3, 0.3, 200)], axis=1)
    s = modality_shares(phi)
    for (lo, hi), v in zip(share_cis(phi, 200, seed=0), s, strict=True):
        assert lo <= v <= hi and hi - lo < 0.1


# --------------------------------------------------------------------------- DIME


def _linear_head(seed: int = 0, hidden: int | None = None) -> FusionHead:
    torch.manual_seed(seed)
    head = FusionHead(FusionConfig(("image", "text"), (5, 4), num_classes=3, hidden=hidden))
    return head.eval()


def test_dime_additive_fusion_head_has_no_interaction() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(30, 5, generator=g), torch.randn(30, 4, generator=g)
    head = _linear_head()
    target = head({"image": img, "text": txt}).argmax(-1).numpy()
    # a linear concat head is additive in its logits: DIME finds no interaction
    grid = cross_grid(head, ("image", img), ("text", txt), output="logit")
    parts = dime_decompose(grid, target)
    assert np.abs(parts["interaction"]).max() < 1e-5
    assert np.abs(parts["uni_a"]).mean() > 0.05 and np.abs(parts["uni_b"]).mean() > 0.05
    total = parts["base"] + parts["uni_a"] + parts["uni_b"] + parts["interaction"]
    assert total == pytest.approx(parts["value"])
    with torch.no_grad():
        logits = head({"image": img, "text": txt})
    assert parts["value"] == pytest.approx(logits[np.arange(30), target].numpy(), abs=1e-5)
    # its softmax probability (and an MLP head) is not additive: the interaction shows up
    probs = dime_decompose(cross_grid(head, ("image", img), ("text", txt)), target)
    assert np.abs(probs["interaction"]).mean() > 1e-3
    mlp = _linear_head(hidden=16)
    inter = dime_decompose(cross_grid(mlp, ("image", img), ("text", txt), "logit"), target)
    assert np.abs(inter["interaction"]).mean() > 1e-3


def test_dime_recovers_known_interaction() -> None:
    a = np.array([0.0, 1.0, 2.0, 3.0])
    b = np.array([1.0, -1.0, 2.0, 0.0])
    grid = 2 * a[:, None] + b[None, :] + a[:, None] * b[None, :]
    parts = dime_decompose(grid, np.zeros(4, int))
    ac, bc = a - a.mean(), b - b.mean()
    assert parts["interaction"] == pytest.approx(ac * bc)  # centred product: the pure interaction
    assert parts["uni_a"] == pytest.approx((2 + b.mean()) * ac)
    with pytest.raises(ValueError):
        cross_grid(lambda e: e["a"], ("a", torch.zeros(3, 1)), ("b", torch.zeros(2, 1)))


# --------------------------------------------------------------------------- pixels


def _smooth_forward():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )

    def forward(x, *extra):
        logits = 8 * net(x)
        if extra:
            logits = logits + extra[0]
        return torch.softmax(logits, dim=-1)

    return forward


def test_integrated_gradients_completeness() -> None:
    forward = _smooth_forward()
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 0, 1])
    shift = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    attr, delta = integrated_gradients(forward, x, target, n_steps=64, extra=(shift,))
    assert attr.shape == x.shape
    with torch.no_grad():
        fx = forward(x, shift)[torch.arange(5), target]
        fb = forward(torch.zeros_like(x), shift)[torch.arange(5), target]
    total = attr.sum(dim=(1, 2, 3))
    assert total == pytest.approx((fx - fb).numpy(), abs=1e-4)
    assert delta.abs().max() < 1e-4
    assert float((fx - fb).abs().mean()) > 1e-2  # not trivially zero


def test_deletion_curve_and_auc() -> None:
    def forward(x):  # score = sum of the top-left 2x2 block of channel 0
        return x[:, :1, :2, :2].sum(dim=(1, 2, 3))[:, None]

    x = torch.ones(1, 3, 4, 4)
    good = torch.zeros(1, 4, 4)
    good[0, :2, :2] = 1.0
    best = deletion_curve(forward, x, good, [0], steps=4)
    worst = deletion_curve(forward, x, -good, [0], steps=4)
    assert best.tolist() == [[4.0, 0.0, 0.0, 0.0, 0.0]]
    assert worst.tolist() == [[4.0, 4.0, 4.0, 4.0, 0.0]]
    assert curve_auc(best)[0] < curve_auc(worst)[0]
    rnd = deletion_curve(forward, x, random_saliency((1, 4, 4), 0), [0], steps=4)
    assert curve_auc(best)[0] <= curve_auc(rnd)[0] <= curve_auc(worst)[0]
    assert torch.equal(random_saliency((2, 3), 5), random_saliency((2, 3), 5))


# --------------------------------------------------------------------------- text tokens


def _text_forward(model, prompts: list[str]):
    """Softmax over the cosine similarity of a text to fixed prompt embeddings."""
    with torch.no_grad():
        proto = model.encode({"text": model.preprocess("text", prompts)})["text"]

    def forward(ids, mask, *extra):
        e = model.encode({"text": {"input_ids": ids, "attention_mask": mask}})["text"]
        return torch.softmax(10 * e @ proto.T, dim=-1)

    return forward


def test_text_ig_completeness_on_tiny_clip(shapes_quick) -> None:
    world, model = shapes_quick
    forward = _text_forward(model, [f"a {c}" for c in world.classes])
    batch = model.preprocess("text", list(world.modalities["text"][:8]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    layer = text_embedding_layer(model)
    with torch.no_grad():
        target = forward(ids, mask).argmax(-1)
    for kind, steps in (("pad", 64), ("zeros", 64)):
        base = text_baseline_ids(model, ids, mask, kind)
        attr, delta = text_integrated_gradients(forward, layer, ids, mask, base, target, steps)
        assert attr.shape == ids.shape
        assert float(attr[base == ids].abs().max()) == 0.0  # specials and padding get nothing
        # our own completeness: f(x) - f(baseline) from the deletion curve's two ends
        ends = token_deletion_curve(forward, layer, ids, mask, base, attr, target, steps=1)
        gap = ends[:, 0] - ends[:, 1]
        assert np.abs(gap).mean() > 0.05  # not trivially zero
        assert attr.sum(1).numpy() == pytest.approx(gap, abs=0.01), kind
        assert float(delta.abs().max()) < 0.01, kind  # captum's convergence delta agrees
        assert np.abs(attr.sum(1).numpy() - gap) == pytest.approx(delta.abs().numpy(), abs=1e-4)
    # the zero baseline really is the zero embedding
    with torch.no_grad():
        zero = torch.full_like(ids, ZERO_TOKEN).masked_fill(~mask.bool(), 0)
        direct = token_deletion_curve(forward, layer, ids, mask, zero, attr, target, steps=1)
        layer.weight.data, saved = torch.zeros_like(layer.weight), layer.weight.data
        try:
            want = forward(ids, mask)[torch.arange(8), target].numpy()
        finally:
            layer.weight.data = saved
    assert direct[:, 1] == pytest.approx(want, abs=1e-5)


def test_token_deletion_and_words_on_tiny_clip(shapes_quick) -> None:
    world, model = shapes_quick
    batch = model.preprocess("text", ["a red  square!", "big circle"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = text_baseline_ids(model, ids, mask, "zeros")
    words = token_words(model, ids, base)
    assert [w for w, _ in words[0]] == ["a", "red", "square!"]
    assert [w for w, _ in words[1]] == ["big", "circle"]
    sal = random_token_saliency(ids, 0)
    assert torch.equal(sal, random_token_saliency(ids, 0))
    forward = _text_forward(model, [f"a {c}" for c in world.classes])
    curve = token_deletion_curve(forward, text_embedding_layer(model), ids, mask, base, sal, [1, 0])
    with torch.no_grad():
        assert curve[:, 0] == pytest.approx(forward(ids, mask)[[0, 1], [1, 0]].numpy(), abs=1e-5)


def test_token_words_follow_tokenizer_piece_markers() -> None:
    class Tok:
        pieces = {1: "▁a", 2: "▁sq", 3: "uare", 4: "red</w>", 5: "ci", 6: "rcle</w>", 9: "<s>"}

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

    model = torch.nn.Module()
    model.tokenizer = Tok()
    ids = torch.tensor([[9, 1, 2, 3], [9, 4, 5, 6]])
    base = ids.masked_fill(ids != 9, ZERO_TOKEN)
    words = token_words(model, ids, base)
    assert words == [[("a", [1]), ("square", [2, 3])], [("red", [1]), ("circle", [2, 3])]]


def test_text_ig_needs_a_token_embedding_layer() -> None:
    with pytest.raises(ExplainError, match="token-embedding layer"):
        text_embedding_layer(ToyEncoder())
    with pytest.raises(ValueError, match="zeros"):
        text_baseline_ids(ToyEncoder(), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), "x")


def _class_word_quantiles(items: list[dict]) -> tuple[np.ndarray, int]:
    """Per row whose caption names its target class: the share of the caption's other words
    attributed less than the class word (1 = the class word is the top word; 0.5 on average for
    attributions that ignore the words). Also the number of rows whose top word is the class's.
    """
    quantiles, top = [], 0
    for item in items:
        cls = item["caption"].rsplit(" · ", 1)[1]
        words = [w.strip(".,;:!?\"'()[]{}").lower() for w in item["tokens"]]
        scores = list(zip(words, item["scores"], strict=True))
        top += max(scores, key=lambda t: t[1])[0] == cls
        own = [v for w, v in scores if w == cls]
        others = [v for w, v in scores if w != cls]
        if own and others:
            quantiles.append(np.mean(np.array(others) < max(own)))
    return np.array(quantiles), top


def test_text_top_words_are_the_leaked_label(shapes_quick) -> None:
    # Measured (32 rows, 16 steps, pad baseline, caption_label=1.0): 25 rows name their target
    # class (the others' target is a wrong prediction); in those the class word is the top word
    # in 23 and second (after "background", which the spurious tone makes predictive) in 2:
    # mean quantile 0.99. Six of the 23 are near-ties with "background" (within 10%), so the
    # assertions are on the quantile and on a majority, which those flips cannot move much.
    # Completeness error 0.04%; token deletion AUC 0.316 vs 0.461 random (gap CI 0.128-0.162).
    ctx = _ctx(shapes_quick, QUICK_WORLD_SPEC + ",caption_label=1.0", "fusion")
    res = ExplainCheck(n_boot=200, ig_rows=0, text_examples=32).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["text_ig/rows"] == 32
    assert m["text_ig/completeness_error"] < 0.01
    assert m["text_ig/convergence_delta"] < 0.01
    assert m["text_ig/deletion_auc"] < m["text_ig/deletion_auc_random"]
    assert res.metrics["text_ig/deletion_gap"].ci[0] > 0
    items = res.plots["text_attributions"]["items"]
    assert len(items) == 32 and all(len(i["tokens"]) == len(i["scores"]) for i in items)
    quantiles, top = _class_word_quantiles(items)
    assert m["text_ig/class_word_top_rate"] == pytest.approx(top / 32)
    # Uninformative attributions give each row's quantile mean 0.5 and sd <= 0.41 (3 words), so
    # the mean of >= 16 rows has sd <= 0.1: 0.9 is 4 sd above chance, and 0.09 below the
    # measured 0.99, which the six near-ties flipping would lower by 0.03.
    assert len(quantiles) >= 16, len(quantiles)
    assert quantiles.mean() >= 0.9, quantiles
    assert np.mean(quantiles == 1.0) > 0.5, quantiles  # the class word is the top word mostly
    top_words = next(f for f in res.findings if "Text Integrated" in f.message).evidence
    assert set(top_words["top_words"]) <= set(ctx.data.classes)
    assert all(len(ranked) <= 5 for ranked in top_words["top_words"].values())
    from mmsafe.report.plots import render_plot

    html = render_plot(res.plots["text_attributions"])
    assert html.count("<span") == sum(len(i["tokens"]) for i in items)
    assert render_plot(res.plots["text_top_words"]).startswith("<table")
    json.dumps(res.to_dict())


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_finds_the_bright_patch_and_beats_random_deletion() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        conv.bias.fill_(-0.5)
    stage = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.MaxPool2d(2))

    def forward(x):  # class 0 score: how much bright red there is; class 1: constant
        s = stage(x).mean(dim=(1, 2, 3))
        return torch.stack([10 * s, torch.ones_like(s)], -1)

    g = torch.Generator().manual_seed(0)
    x = 0.4 * torch.rand(6, 3, 8, 8, generator=g)
    for i in range(6):
        r, c = 2 * (i % 3), 2 * (i // 3) + 2
        x[i, 0, r : r + 2, c : c + 2] = 1.0
    cam = grad_cam(forward, stage, x, [0] * 6)
    assert cam.shape == (6, 8, 8) and float(cam.min()) >= 0
    assert grad_cam(forward, stage, x, [0] * 6, upsample=False).shape == (6, 4, 4)
    peak = cam.flatten(1).argmax(1)
    assert all(x[i, 0].flatten()[peak[i]] == 1.0 for i in range(6))  # the map peaks on the patch
    auc = curve_auc(deletion_curve(forward, x, cam, [0] * 6, steps=16))
    rnd = curve_auc(deletion_curve(forward, x, random_saliency((6, 8, 8), 0), [0] * 6, steps=16))
    assert (auc < rnd).all() and auc.mean() < 0.5 * rnd.mean()


def test_grad_cam_layer_on_tiny_clip_and_clean_error(shapes_quick) -> None:
    world, model = shapes_quick
    px = model.preprocess("image", list(world.modalities["image"][:3]))
    with torch.no_grad():
        proto = model.encode({"text": model.preprocess("text", list(world.classes))})["text"]

    def forward(x):
        return model.encode({"image": x})["image"] @ proto.T

    cam = grad_cam(forward, image_cam_layer(model), px, [0, 1, 2])
    assert cam.shape == (3, *px.shape[-2:]) and float(cam.min()) >= 0
    with pytest.raises(ExplainError, match="not supported"):
        image_cam_layer(ToyEncoder())


# --------------------------------------------------------------------------- the check


def test_registered_options_and_skips(colour_data) -> None:
    assert "controllability.explain" in list_checks("controllability.*")
    ctx = audit_context(ToyEncoder(), colour_data, task="retrieval")
    assert "not applicable" in ExplainCheck().skip_reason(ctx)
    zs = audit_context(ToyEncoder(), colour_data)
    assert ExplainCheck().skip_reason(zs) is None
    assert "ig_rows" in ExplainCheck(ig_rows=0).skip_reason(zs)
    bad_options = (
        {"target": "x"},
        {"null": "median"},
        {"output": "z"},
        {"ig_baseline": "blur"},
        {"text_baseline": "unk"},
        {"text_steps": 0},
    )
    for bad in bad_options:
        with pytest.raises(ValueError):
            ExplainCheck(**bad)  # type: ignore[arg-type]


def test_toy_fusion_metrics_match_direct_computation() -> None:
    data = make_colour_data(n=150)
    ctx = audit_context(ToyEncoder(), data, task="fusion")
    res = ExplainCheck(null="zeros", n_boot=100, ig_rows=4, gallery=2).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    assert res.status == "ok" and m["rows"] == 50
    emb = ctx.outputs.embeddings
    pred = ctx.outputs.preds
    with torch.no_grad():
        p_all = torch.softmax(ctx.task.logits(emb), -1)[torch.arange(50), pred]
        zeros = {k: torch.zeros_like(v) for k, v in emb.items()}
        p_none = torch.softmax(ctx.task.logits(zeros), -1)[torch.arange(50), pred]
    assert m["value/all"] == pytest.approx(float(p_all.mean()), abs=1e-6)
    assert m["value/none"] == pytest.approx(float(p_none.mean()), abs=1e-6)
    assert m["shapley/efficiency_error"] < 1e-5
    assert m["shapley_mean/image"] + m["shapley_mean/text"] == pytest.approx(
        m["value/all"] - m["value/none"], abs=1e-6
    )
    assert m["shapley_share/image"] + m["shapley_share/text"] == pytest.approx(1.0)
    shares = [m[f"dime/unimodal_share/{k}"] for k in ("image", "text")]
    assert sum(shares) + m["dime/interaction_share"] == pytest.approx(1.0)
    for c in data.classes:
        assert m[f"shapley_share/{c}/image"] + m[f"shapley_share/{c}/text"] == pytest.approx(1.0)
    assert m["ig/rows"] == 4
    assert {"modality_shares", "modality_shares_per_class", "dime_shares", "deletion_curve"} <= set(
        res.plots
    )
    assert len(res.plots["attribution_maps"]["items"]) == 2
    # the toy encoder has neither a token-embedding layer nor a conv feature map: noted, not failed
    skipped = [f.message for f in res.findings if "skipped" in f.message]
    assert any("Text Integrated Gradients skipped" in t and "token-embedding" in t for t in skipped)
    assert any("Grad-CAM skipped" in t and "not supported" in t for t in skipped)
    assert not any(k.startswith(("text_ig/", "gradcam/")) for k in m)
    json.dumps(res.to_dict())


# --------------------------------------------------------------------------- tiny-clip worlds


def _ctx(shapes_quick, spec: str, task: str):
    from mmsafe.data.loading import load_data

    _, model = shapes_quick
    return audit_context(model, load_data(spec), task=task)


def test_ig_on_tiny_clip_is_complete_and_beats_random_deletion(shapes_quick) -> None:
    # Measured (64 test rows, 32 steps, mean-pixel baseline): deletion AUC 0.277 vs 0.319 for
    # random orders, gap 0.042 (CI 0.024-0.060), completeness error 1.9%; with a tiny-clip trained
    # under other numerics (1 thread, AVX2 kernels) gap 0.043 (CI 0.026-0.056). On the default 16
    # rows the gap's CI is about 3 times as wide and its lower end fell to -0.012 with that model,
    # so the test uses 64 rows. With the black baseline the gap (0.012, CI -0.022..0.046 on 16
    # rows) is not significant, so it is not asserted.
    ctx = _ctx(shapes_quick, QUICK_WORLD_SPEC, "zero_shot")
    res = ExplainCheck(n_boot=200, gallery=4, ig_baseline="mean", ig_rows=64).run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["ig/completeness_error"] < 0.1
    assert m["ig/deletion_auc"] < m["ig/deletion_auc_random"]
    assert res.metrics["ig/deletion_gap"].ci[0] > 0
    assert not any(k.startswith(("shapley", "text_ig")) for k in m)  # zero-shot: pixels only
    assert len(res.plots["attribution_maps"]["items"]) == 4
    # Grad-CAM runs on the CNN's last stage; it is reported, not asserted to be faithful here
    # (measured: AUC 0.342 vs 0.454 random pixels, 0.448 random 4x4 cells; gap CI spans 0)
    assert 0 <= m["gradcam/deletion_auc"] <= 1
    assert len(res.plots["gradcam_maps"]["items"]) == 4
    assert [s["name"] for s in res.plots["deletion_curve"]["series"]][-1] == "Grad-CAM order"


def test_text_share_grows_when_caption_leaks_label(shapes_quick) -> None:
    # Measured (180 rows each): text share 0.496 (CI 0.463-0.527) on the normal world, 0.623
    # (CI 0.595-0.647) when every caption names the shape.
    check = ExplainCheck(n_boot=200, ig_rows=0, text_rows=0)
    normal = check.run(_ctx(shapes_quick, QUICK_WORLD_SPEC, "fusion"))
    leaky = check.run(_ctx(shapes_quick, QUICK_WORLD_SPEC + ",caption_label=1.0", "fusion"))
    t_normal = normal.metrics["shapley_share/text"].value
    t_leaky = leaky.metrics["shapley_share/text"].value
    assert t_leaky > t_normal + 0.05, (t_normal, t_leaky)
    assert leaky.metrics["shapley_share/text"].ci[0] > normal.metrics["shapley_share/text"].ci[1]
