"""Pixel attacks (mmsafe.methods.attacks.pixel) and the robustness.adversarial check."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import mmsafe.checks.robustness.adversarial.check  # noqa: F401  (registers the check)
from mmsafe.checks.performance.retrieval import RetrievalPerformanceCheck
from mmsafe.checks.registry import list_checks
from mmsafe.checks.robustness.adversarial.check import (
    AdversarialCheck,
    AdversarialRetrievalCheck,
    attack_success_rate,
    retrieval_hits,
    retrieval_targets,
)
from mmsafe.engine.runner import to_device
from mmsafe.methods.attacks.pixel import (
    apgd_ce,
    fgsm,
    perturbation_norm,
    pgd,
    pixel_forward,
    project,
    run_attack,
)
from mmsafe.methods.attacks.text import co_attack, retrieval_recall_at_1, sep_attack
from mmsafe.tasks.retrieval import caption_positives
from tests.conftest import ToyEncoder, audit_context, require

TOL = 1e-5  # float rounding on the budget


def _linear_forward(seed: int, classes: int = 4, shape: tuple[int, ...] = (3, 6, 6)):
    """A small random non-linear pixels -> logits map (cheap, differentiable)."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    w1 = torch.randn(d, 16, generator=g)
    w2 = torch.randn(16, classes, generator=g)

    def forward(x: Tensor) -> Tensor:
        return torch.tanh(x.flatten(1) @ w1) @ w2

    return forward


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    norm=st.sampled_from(["linf", "l2"]),
    attack=st.sampled_from(["fgsm", "pgd", "apgd"]),
    eps=st.floats(1e-3, 2.0),
    restarts=st.integers(1, 2),
)
def test_budget_and_pixel_range_always_hold(seed, norm, attack, eps, restarts) -> None:
    g = torch.Generator().manual_seed(seed)
    # include saturated pixels so that the [0, 1] clamp is exercised
    x = torch.rand(5, 3, 6, 6, generator=g).round(decimals=1)
    y = torch.randint(0, 4, (5,), generator=g)
    forward = _linear_forward(seed)
    adv = run_attack(attack, forward, x, y, eps, norm, steps=4, restarts=restarts, generator=g)
    assert adv.shape == x.shape and not adv.requires_grad
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(perturbation_norm(adv - x, norm).max()) <= eps * (1 + TOL) + TOL


def test_project_is_a_projection() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(8, 3, 4, 4, generator=g)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        p = project(d, eps, norm)
        assert float(perturbation_norm(p, norm).max()) <= eps + 1e-6
        torch.testing.assert_close(project(p, eps, norm), p)  # idempotent
        small = d * 1e-4
        torch.testing.assert_close(project(small, eps, norm), small)  # inside: unchanged
    # L2 projection scales, keeping the direction
    p = project(d, 0.5, "l2")
    cos = nn.functional.cosine_similarity(p.flatten(1), d.flatten(1))
    torch.testing.assert_close(cos, torch.ones(8))


def test_fgsm_by_hand_and_zero_budget() -> None:
    # logit_0 - logit_1 = 2 * x_0: ascent on the CE of class 0 lowers x_0 only
    w = torch.zeros(4, 2)
    w[0, 0], w[0, 1] = 1.0, -1.0

    def fwd(x: Tensor) -> Tensor:
        return x.flatten(1) @ w

    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.tensor([0, 1])
    adv = fgsm(fwd, x, y, 0.1)
    assert adv[0].flatten().tolist() == pytest.approx([0.4, 0.5, 0.5, 0.5])
    assert adv[1].flatten().tolist() == pytest.approx([0.6, 0.5, 0.5, 0.5])
    adv2 = fgsm(fwd, x, y, 0.3, "l2")  # the L2 step puts the whole budget on x_0
    assert adv2[0].flatten().tolist() == pytest.approx([0.2, 0.5, 0.5, 0.5])
    for attack in ("fgsm", "pgd"):
        assert torch.equal(run_attack(attack, fwd, x, y, 0.0, "linf", random_start=False), x)


def test_restarts_never_hurt_and_seeded_runs_repeat() -> None:
    forward = _linear_forward(3, classes=6)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 6, 6, generator=g)
    with torch.no_grad():
        y = forward(x).argmax(-1)  # every row starts correct

    def acc(adv: Tensor) -> float:
        with torch.no_grad():
            return float((forward(adv).argmax(-1) == y).float().mean())

    one = pgd(forward, x, y, 0.01, steps=3, generator=torch.Generator().manual_seed(5))
    again = pgd(forward, x, y, 0.01, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, again)
    many = pgd(forward, x, y, 0.01, steps=3, restarts=4, generator=torch.Generator().manual_seed(5))
    # the first restart draws the same start as ``one``; later ones only replace rows not fooled
    assert acc(many) <= acc(one)
    apgd = apgd_ce(forward, x, y, 0.01, steps=6, generator=torch.Generator().manual_seed(5))
    assert acc(apgd) < 1.0


def test_attack_success_rate_and_validation() -> None:
    assert attack_success_rate(np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0])) == pytest.approx(
        2 / 3
    )
    assert np.isnan(attack_success_rate(np.zeros(3), np.zeros(3)))
    fwd = _linear_forward(0)
    x, y = torch.rand(2, 3, 6, 6), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="norm"):
        fgsm(fwd, x, y, 0.1, "l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        pgd(fwd, x, y, -0.1)
    with pytest.raises(ValueError, match="norms"):
        AdversarialCheck(norms=("l1",))
    with pytest.raises(ValueError, match="attacks"):
        AdversarialCheck(attacks=("cw",))
    with pytest.raises(ValueError, match="unknown norm"):
        AdversarialCheck(eps={"l1": [0.1]})
    with pytest.raises(ValueError, match="positive eps"):
        AdversarialCheck(eps={"linf": [0.0]})


# --------------------------------------------------------------------------- the check (toy)


@pytest.mark.parametrize("task", ["zero_shot", "fusion"])
def test_check_on_toy_encoder_is_jsonable(task: str, colour_data) -> None:
    assert "robustness.adversarial" in list_checks("robustness.*")
    ctx = audit_context(ToyEncoder(), colour_data, task=task)
    check = AdversarialCheck(
        eps={"linf": [8 / 255, 32 / 255], "l2": [0.5, 2.0]}, steps=3, max_rows=30, n_boot=50
    )
    res = check.run(ctx)
    assert res.status == "ok"
    card = res.to_dict()
    json.dumps(card)
    m = {k: v.value for k, v in res.metrics.items()}
    labels = ctx.outputs.labels
    rows = np.flatnonzero(labels >= 0)
    assert len(rows) > 30  # so max_rows subsamples
    clean = m["clean_accuracy"]
    assert 0.0 < clean <= 1.0
    for norm in ("linf", "l2"):
        for atk in ("fgsm", "pgd", "worst"):
            for e in check.eps[norm]:
                key = f"{norm}/{atk}/eps={e:.4g}"
                r, asr = m[f"{key}/robust_accuracy"], m[f"{key}/attack_success_rate"]
                assert 0.0 <= r <= clean + 1e-9
                # ASR = flipped / initially correct, with wrong rows never counted as correct
                assert asr == pytest.approx(1 - r / clean)
                assert m[f"{norm}/worst/eps={e:.4g}/robust_accuracy"] <= r + 1e-9
        plot = res.plots[f"accuracy_vs_eps_{norm}"]
        assert plot["kind"] == "line" and [s["name"] for s in plot["series"]] == [
            "fgsm",
            "pgd",
            "worst",
        ]
        assert plot["series"][0]["x"] == [0.0, *check.eps[norm]]
        assert plot["series"][0]["y"][0] == pytest.approx(clean)
    assert any(f.evidence.get("rows") == 30 for f in res.findings)


def test_check_runs_on_retrieval_without_labels(colour_data) -> None:
    """Retrieval is scored by image-caption pairs: the retrieval variant needs no labels."""
    colour_data.labels = np.full(len(colour_data), -1, dtype=np.int64)
    ctx = audit_context(ToyEncoder(), colour_data, task="retrieval")
    assert not ctx.data.labelled.any()
    check = AdversarialRetrievalCheck(eps={"linf": [8 / 255, 32 / 255], "l2": [0.5, 2.0]},
                                      steps=3, max_rows=30, n_boot=20, co_attack=True)  # fmt: skip
    assert check.skip_reason(ctx) is None
    assert AdversarialCheck().skip_reason(ctx).startswith("not applicable to task 'retrieval'")
    res = check.run(ctx)
    assert res.status == "ok"
    json.dumps(res.to_dict())
    m = {k: v.value for k, v in res.metrics.items()}
    for d in ("i2t", "t2i"):
        for k in (1, 5):
            assert 0.0 <= m[f"clean/{d}_R@{k}"] <= 1.0
            for norm in ("linf", "l2"):
                for e in check.eps[norm]:
                    for atk in ("fgsm", "pgd"):
                        key = f"{norm}/{{}}/eps={e:.4g}/{d}_R@{k}"
                        assert m[key.format("worst")] <= m[key.format(atk)] + 1e-9
    key = f"linf/pgd/eps={8 / 255:.4g}"
    assert m[f"{key}/R@1_drop"] == pytest.approx(m["clean/mean_R@1"] - m[f"{key}/mean_R@1"])
    assert set(res.plots) == {"recall_vs_eps_linf", "recall_vs_eps_l2"}
    assert any(f.evidence.get("rows") == 30 for f in res.findings)
    # the toy encoder has no token embedding: Co-Attack is reported as skipped, not a failure
    assert any("Co-Attack skipped" in f.message for f in res.findings)


# --------------------------------------------------------------------------- tiny-clip


@pytest.fixture(scope="module")
def clip_batch(shapes_quick):
    """Up to 48 correctly classified test rows of the quick tiny-clip (zero-shot): pixels, labels,
    the pixels -> logits map, and the context."""
    world, model = shapes_quick
    ctx = audit_context(model, world)
    model = model.eval()
    labels = ctx.outputs.labels
    rows = np.flatnonzero((labels >= 0) & (ctx.outputs.preds == labels))[:48]
    x = to_device(model.preprocess("image", [ctx.data.modalities["image"][i] for i in rows]), "cpu")
    y = torch.as_tensor(labels[rows], dtype=torch.long)
    forward = pixel_forward(model, ctx.task)
    with torch.no_grad():
        assert bool((forward(x).argmax(-1) == y).all())  # same as the engine's clean outputs
    return x, y, forward, ctx


def _acc(forward, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((forward(x).argmax(-1) == y).float().mean())


def test_agrees_with_torchattacks(clip_batch) -> None:
    torchattacks = require("torchattacks")
    x, y, forward, ctx = clip_batch

    class PixelsToLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = ctx.model

        def forward(self, px: Tensor) -> Tensor:
            return forward(px)

    net = PixelsToLogits().eval()
    cases = [
        ("fgsm", "linf", 2 / 255, torchattacks.FGSM(net, eps=2 / 255)),
        (
            "pgd",
            "linf",
            2 / 255,
            torchattacks.PGD(net, eps=2 / 255, alpha=0.5 / 255, steps=5, random_start=False),
        ),
        (
            "pgd",
            "l2",
            0.25,
            torchattacks.PGDL2(net, eps=0.25, alpha=0.25 / 4, steps=5, random_start=False),
        ),
    ]
    for name, norm, eps, ref_attack in cases:
        if name == "fgsm":
            ours = fgsm(forward, x, y, eps, norm)
        else:
            ours = pgd(forward, x, y, eps, norm, steps=5, step_size=ref_attack.alpha,
                       random_start=False)  # fmt: skip
        ref = ref_attack(x, y)
        a_ours, a_ref = _acc(forward, ours, y), _acc(forward, ref, y)
        assert abs(a_ours - a_ref) <= 0.01 + 1e-9, (name, norm, a_ours, a_ref)
        # the same deterministic algorithm: the adversarial images nearly coincide
        assert float((ours - ref).abs().mean()) < 0.05 * eps, (name, norm)
        assert float(perturbation_norm(ref - x, norm).max()) <= eps * (1 + TOL) + TOL


def test_apgd_agrees_with_torchattacks(shapes_quick) -> None:
    """APGD-CE vs ``torchattacks.APGD(loss="ce")``: same model, rows, eps, steps and restarts.

    The random starts differ (mmsafe: uniform in the ball; torchattacks: scaled to the ball's
    corner), as do the checkpoints at few steps (mmsafe: ``ceil(p_j * steps)`` as in the paper;
    torchattacks: the reference code's integer periods), so the rows each attack fools differ a
    little: measured on 400 rows, 1 to 3 rows apart between seeds of either implementation and
    between the two. So the comparison uses every correctly classified row of the quick world
    (749), where 1 pp is 7 rows and that noise grows to about 4.
    """
    torchattacks = require("torchattacks")
    world, model = shapes_quick
    ctx = audit_context(model, world)
    model = model.eval()
    forward = pixel_forward(model, ctx.task)
    x = to_device(model.preprocess("image", list(world.modalities["image"])), "cpu")
    y = torch.as_tensor(world.labels, dtype=torch.long)
    with torch.no_grad():
        ok = (y >= 0) & (forward(x).argmax(-1) == y)
    x, y = x[ok], y[ok]
    assert len(y) >= 600, len(y)

    class PixelsToLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, px: Tensor) -> Tensor:
            return forward(px)

    eps, steps = 1 / 255, 10
    ours = apgd_ce(
        forward, x, y, eps, "linf", steps=steps, generator=torch.Generator().manual_seed(0)
    )
    ref = torchattacks.APGD(
        PixelsToLogits().eval(), norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0
    )(x, y).detach()
    with torch.no_grad():
        r_ours = (forward(ours).argmax(-1) == y).numpy()
        r_ref = (forward(ref).argmax(-1) == y).numpy()
    assert float(perturbation_norm(ref - x, "linf").max()) <= eps * (1 + TOL) + TOL
    assert 0.2 < r_ref.mean() < 0.9  # the budget leaves rows on both sides
    assert abs(r_ours.mean() - r_ref.mean()) <= 0.01, (r_ours.mean(), r_ref.mean())
    # not two different attacks that happen to fool as many rows: mostly the same rows
    assert (r_ours != r_ref).mean() <= 0.03, (r_ours != r_ref).mean()


def test_tiny_clip_robust_accuracy_falls_with_eps_and_pgd_beats_fgsm(clip_batch) -> None:
    _, _, _, ctx = clip_batch
    check = AdversarialCheck(steps=5, max_rows=60, n_boot=50, max_drop=0.1)
    res = check.run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    clean = m["clean_accuracy"]
    # Measured (60 of the 162 labelled test rows, seed 0, 5 steps): clean 0.617; L-inf FGSM
    # 0.450 0.317 0.133, PGD 0.417 0.200 0.067; L2 FGSM 0.500 0.283 0.133, PGD 0.483 0.217 0.033
    for norm in ("linf", "l2"):
        for atk in ("fgsm", "pgd"):
            ys = [m[f"{norm}/{atk}/eps={e:.4g}/robust_accuracy"] for e in check.eps[norm]]
            assert all(a >= b - 0.02 for a, b in zip([clean, *ys], ys, strict=False)), (
                norm,
                atk,
                ys,
            )
            assert ys[-1] < clean - 0.2
        for e in check.eps[norm]:
            key = f"{norm}/{{}}/eps={e:.4g}/robust_accuracy"
            assert m[key.format("pgd")] <= m[key.format("fgsm")] + 0.02, (norm, e)
    worst = m[f"linf/worst/eps={check.eps['linf'][0]:.4g}/robust_accuracy"]
    flagged = [f for f in res.findings if f.severity in ("medium", "high")]
    assert (clean - worst > 0.1) == any(f.evidence["norm"] == "linf" for f in flagged)
    assert flagged  # measured drop at 1/255: 0.617 -> 0.417


def test_early_stop_is_never_weaker_and_clean_logits_skip_wrong_rows(shapes_quick) -> None:
    forward = _linear_forward(3, classes=6)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 6, 6, generator=g)
    with torch.no_grad():
        y = forward(x).argmax(-1)
    full = pgd(forward, x, y, 0.01, steps=4, generator=torch.Generator().manual_seed(5))
    fast = pgd(forward, x, y, 0.01, steps=4, generator=torch.Generator().manual_seed(5),
               early_stop=True, restarts=2)  # fmt: skip
    assert _acc(forward, fast, y) <= _acc(forward, full, y)
    assert float(perturbation_norm(fast - x, "linf").max()) <= 0.01 + 1e-6
    # rows the cached clean logits misclassify come back untouched
    wrong = torch.arange(64) % 2 == 0
    y_mixed = torch.where(wrong, (y + 1) % 6, y)
    with torch.no_grad():
        clean_logits = forward(x)
    adv = run_attack("pgd", forward, x, y_mixed, 0.05, "linf", steps=3, clean_logits=clean_logits)
    assert torch.equal(adv[wrong], x[wrong]) and not torch.equal(adv[~wrong], x[~wrong])
    # fusion: the forward carries per-row captions, and early stop subsets them (select)
    world, model = shapes_quick
    fctx = audit_context(model, world, task="fusion")
    rows = np.flatnonzero(fctx.outputs.labels >= 0)[:16]
    px = to_device(model.preprocess("image", [fctx.data.modalities["image"][i] for i in rows]),
                   "cpu")  # fmt: skip
    fwd = pixel_forward(model.eval(), fctx.task, {"text": fctx.outputs.embeddings["text"][rows]})
    yy = torch.as_tensor(fctx.outputs.labels[rows])
    adv = run_attack("pgd", fwd, px, yy, 4 / 255, "linf", steps=3, early_stop=True,
                     clean_logits=fctx.outputs.logits[rows])  # fmt: skip
    assert _acc(fwd, adv, yy) <= float(
        (fctx.outputs.preds[rows] == fctx.outputs.labels[rows]).mean()
    )


# --------------------------------------------------------------------------- retrieval (tiny-clip)


@pytest.fixture(scope="module")
def retrieval_ctx(shapes_quick):
    """The quick tiny-clip on the retrieval task over the 180 test pairs (170 distinct captions)."""
    world, model = shapes_quick
    model.eval()
    return audit_context(model, world, task="retrieval")


def _r1(metrics: dict[str, float], key: str) -> tuple[float, float]:
    return metrics[f"{key}/i2t_R@1"], metrics[f"{key}/t2i_R@1"]


def test_retrieval_helpers() -> None:
    first, target = retrieval_targets(["b", "a", "b", "c"])
    assert first.tolist() == [1, 0, 3] and target.tolist() == [1, 0, 1, 2]
    g = torch.Generator().manual_seed(0)
    img = nn.functional.normalize(torch.randn(12, 5, generator=g), dim=-1)
    txt = nn.functional.normalize(torch.randn(12, 5, generator=g), dim=-1)
    pos = np.eye(12, dtype=bool) | (np.arange(12)[:, None] % 4 == np.arange(12)[None] % 4)
    hits = retrieval_hits(img, txt, pos, ks=(1, 5, 12))
    r1 = retrieval_recall_at_1(img, txt, pos)
    assert (hits["i2t_R@1"].mean(), hits["t2i_R@1"].mean()) == pytest.approx(r1)
    assert (hits["i2t_R@12"] == 1).all() and (hits["i2t_R@5"] >= hits["i2t_R@1"]).all()


def test_retrieval_check_pgd_and_co_attack_match_the_functions(retrieval_ctx) -> None:
    """Through the check, on all 180 pairs: PGD lowers R@1 monotonically in eps, Co-Attack beats
    Sep-Attack, and every number equals the one from calling the attack functions directly.

    Measured (quick tiny-clip, 5 steps, no random start): clean TR/IR R@1 0.294/0.322; PGD
    1/255 0.111/0.144, 2/255 0.039/0.044, 4/255 0/0; Co-Attack (1 byte) 0.044/0.089,
    0.022/0.039, 0/0; Sep-Attack 0.178/0.156, 0.133/0.144, 0.072/0.094.
    """
    ctx = retrieval_ctx
    model = ctx.model.eval()
    eps = [1 / 255, 2 / 255, 4 / 255]
    check = AdversarialCheck(norms=("linf",), eps={"linf": eps}, attacks=("pgd",), steps=5,
                             max_rows=None, batch_size=256, random_start=False, n_boot=20,
                             co_attack=True)  # fmt: skip
    res = check.run(ctx)
    assert res.status == "ok"
    json.dumps(res.to_dict())
    m = {k: v.value for k, v in res.metrics.items()}
    texts = [str(t) for t in ctx.data.modalities["text"]]
    pos = caption_positives(texts)
    img0, txt0 = ctx.outputs.embeddings["image"], ctx.outputs.embeddings["text"]
    clean = _r1(m, "clean")
    # retrieval_recall_at_1 averages in float32: equal to 1e-6 is an equal count of hits
    assert clean == pytest.approx(retrieval_recall_at_1(img0, txt0, pos), abs=1e-6)
    perf = RetrievalPerformanceCheck(n_boot=10).run(ctx).metrics
    assert clean == pytest.approx((perf["i2t_R@1"].value, perf["t2i_R@1"].value))
    assert m["clean/i2t_R@5"] == pytest.approx(perf["i2t_R@5"].value)

    pgd_r1 = [_r1(m, f"linf/pgd/eps={e:.4g}") for e in eps]
    for d in (0, 1):
        ys = [clean[d], *[r[d] for r in pgd_r1]]
        assert ys[1] < ys[0] - 0.1, ys  # a real attack at the smallest budget
        assert all(b <= a + 0.02 for a, b in zip(ys, ys[1:], strict=False)), ys
    for e in eps:
        co, sep = _r1(m, f"linf/co_attack/eps={e:.4g}"), _r1(m, f"linf/sep_attack/eps={e:.4g}")
        assert co[0] <= sep[0] and co[1] <= sep[1], (e, co, sep)
    # 1/255 costs ~57 % of the clean R@1 (relative drop > 2 * max_drop): a high finding
    assert any(f.severity == "high" and f.evidence.get("norm") == "linf" for f in res.findings)
    assert [s["name"] for s in res.plots["recall_vs_eps_linf"]["series"]] == [
        f"{n} {d}" for n in ("pgd", "worst", "co_attack", "sep_attack") for d in ("i2t", "t2i")
    ]

    # the same rows, attacked by calling the functions directly
    x = model.preprocess("image", ctx.data.modalities["image"])
    first, target = retrieval_targets(texts)
    gallery = txt0[torch.as_tensor(first)]

    def forward(px: Tensor) -> Tensor:
        return ctx.task.logits({"image": model.encode({"image": px})["image"], "text": gallery})

    y = torch.as_tensor(target)
    for e, r in zip(eps, pgd_r1, strict=True):
        adv = pgd(forward, x, y, e, "linf", steps=5, random_start=False)
        assert float(perturbation_norm(adv - x, "linf").max()) <= e + 1e-6
        with torch.no_grad():
            emb = model.encode({"image": adv})["image"]
        assert retrieval_recall_at_1(emb, txt0, pos) == pytest.approx(r, abs=1e-6), e
    tb = model.preprocess("text", texts)
    e = 2 / 255
    co = co_attack(model, x, tb, e, steps=5, n_flips=1, random_start=False)
    sep = sep_attack(model, x, tb, e, steps=5, n_flips=1, random_start=False)
    for name, direct in (("co_attack", co), ("sep_attack", sep)):
        r1 = retrieval_recall_at_1(direct.image_embedding, direct.text_embedding, pos)
        assert r1 == pytest.approx(_r1(m, f"linf/{name}/eps={e:.4g}"), abs=1e-6), name


@pytest.mark.parametrize("seed", [1, 2])
def test_retrieval_co_attack_beats_sep_attack_through_the_check(retrieval_ctx, seed) -> None:
    """The paper's claim through the check: another seeded subsample of 120 pairs and random
    starts per seed; Co-Attack's R@1 is below Sep-Attack's by a margin, in both directions.
    HotFlip on the captions alone lowers R@1 more with more flipped tokens.

    Measured (eps 2/255, 5 steps; TR/IR R@1): seed 1 clean 0.358/0.375, Co 0.033/0.058 vs Sep
    0.158/0.192, HotFlip 1/2 bytes 0.067/0.067, 0/0.008; seed 2 clean 0.325/0.350, Co
    0.042/0.042 vs Sep 0.192/0.167, HotFlip 0.058/0.083, 0.008/0.008.
    """
    ctx = dataclasses.replace(retrieval_ctx, seed=seed)  # the context is frozen: a copy
    check = AdversarialCheck(norms=("linf",), eps={"linf": [2 / 255]}, attacks=("pgd",),
                             steps=5, max_rows=120, n_boot=20, co_attack=True,
                             text_attacks=("hotflip",), flips=(1, 2))  # fmt: skip
    res = check.run(ctx)
    m = {k: v.value for k, v in res.metrics.items()}
    assert any(f.evidence.get("rows") == 120 for f in res.findings)
    clean = _r1(m, "clean")
    co, sep = _r1(m, "linf/co_attack/eps=0.007843"), _r1(m, "linf/sep_attack/eps=0.007843")
    for d in (0, 1):
        assert sep[d] < clean[d]  # the baseline is a real attack
        assert co[d] <= sep[d] - 0.05, (seed, co, sep)
    assert (
        m["linf/co_attack/eps=0.007843/attack_success_rate"]
        > m["linf/sep_attack/eps=0.007843/attack_success_rate"]
    )
    one, two = _r1(m, "text/hotflip/flips=1"), _r1(m, "text/hotflip/flips=2")
    assert all(t <= o + 1e-9 < c for c, o, t in zip(clean, one, two, strict=True)), (one, two)
    assert "recall_vs_flips" in res.plots
