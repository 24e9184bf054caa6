"""Text, joint (Co-Attack) and universal attacks (mmsafe.methods.attacks.text) and their check
options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsafe.checks.robustness.adversarial.check import AdversarialCheck
from mmsafe.methods.attacks.pixel import perturbation_norm, pixel_forward
from mmsafe.methods.attacks.text import (
    AttackError,
    caption_vocabulary,
    char_edits,
    co_attack,
    decode_tokens,
    embedding_cosine,
    hotflip,
    retrieval_recall_at_1,
    sep_attack,
    substitution_attack,
    token_embedding,
    universal_perturbation,
)
from mmsafe.tasks.retrieval import caption_positives
from tests.conftest import COLOURS, ToyEncoder, audit_context

# --------------------------------------------------------------------------- black-box (toy)

TEXTS = [f"a {' '.join([COLOURS[i % 3]] * (1 + i % 3))} square" for i in range(30)]
LABELS = np.array([i % 3 for i in range(30)])
VOCAB = caption_vocabulary(TEXTS)


def colour_margin(texts, rows) -> np.ndarray:
    """A black box: counts of the colour words; margin = true count - best other count."""
    counts = np.array([[t.split().count(c) for c in COLOURS] for t in texts], dtype=float)
    y = LABELS[np.asarray(rows)]
    true = counts[np.arange(len(y)), y]
    counts[np.arange(len(y)), y] = -np.inf
    return true - counts.max(axis=1) - 0.5  # ties count as wrong; clean margin >= 0.5


def test_substitution_budget_zero_and_asr_rises_with_budget() -> None:
    zero = substitution_attack(colour_margin, TEXTS, 0, VOCAB)
    assert not zero.success.any() and zero.texts == TEXTS and (zero.queries == 0).all()
    asr = []
    for budget in (1, 5, 20, 60, 200):
        res = substitution_attack(colour_margin, TEXTS, budget, VOCAB, seed=1)
        assert (res.queries <= budget).all()
        assert res.attacked.all()  # every toy row starts correct
        assert (colour_margin(res.texts, range(30))[res.success] < 0).all()
        asr.append(res.success.mean())
    assert asr == sorted(asr) and asr[0] < 0.5 < asr[-1], asr


@settings(max_examples=20, deadline=None)
@given(b1=st.integers(0, 40), extra=st.integers(0, 60), seed=st.integers(0, 100))
def test_substitution_queries_bounded_and_monotone(b1: int, extra: int, seed: int) -> None:
    clean = colour_margin(TEXTS, range(30))
    small = substitution_attack(colour_margin, TEXTS, b1, VOCAB, clean_margin=clean, seed=seed)
    big = substitution_attack(
        colour_margin, TEXTS, b1 + extra, VOCAB, clean_margin=clean, seed=seed
    )
    # without the clean margin, the first query of each row is spent on measuring it
    plain = substitution_attack(colour_margin, TEXTS, b1 + extra + 1, VOCAB, seed=seed)
    assert (plain.queries <= b1 + extra + 1).all()
    assert not (big.success & ~plain.success).any()
    assert (small.queries <= b1).all() and (big.queries <= b1 + extra).all()
    assert not (small.success & ~big.success).any()  # success is monotone in the budget


def test_char_edits_and_vocabulary() -> None:
    edits = char_edits("red")
    assert "rde" in edits and "rd" in edits and "red" not in edits and len(set(edits)) == len(edits)
    assert "ted" in edits  # keyboard neighbour of r
    assert caption_vocabulary(["a b", "b."]) == ["b", "a"]


def test_hotflip_needs_token_embedding() -> None:
    with pytest.raises(AttackError, match="token-embedding"):
        token_embedding(ToyEncoder())
    toy = ToyEncoder()
    batch = toy.preprocess("text", ["red"])
    with pytest.raises(AttackError, match="substitution_attack"):
        hotflip(toy, batch, lambda e, r: e.sum(-1))  # type: ignore[arg-type]


def test_hotflip_on_random_hf_clip() -> None:
    from mmsafe.models.hf import CLIP_MEAN, CLIP_STD, HFClip

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "bos_token_id": 97, "eos_token_id": 98,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    model = HFClip(transformers.CLIPModel(cfg), None, source="random", image_mean=CLIP_MEAN,
                   image_std=CLIP_STD).eval()  # fmt: skip
    assert token_embedding(model) is model.model.text_model.embeddings.token_embedding
    ids = torch.tensor([[97, 5, 6, 7, 98], [97, 8, 9, 98, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        clean = model.encode({"text": batch})["text"]
    res = hotflip(model, batch, lambda e, r: 1 - (e * clean[r]).sum(-1), n_flips=2)
    changed = (res.batch["input_ids"] != ids).sum(1)
    assert (changed == res.n_flips).all() and (changed <= 2).all() and res.n_flips.sum() > 0
    assert (res.batch["input_ids"][:, 0] == 97).all()  # special tokens are never edited
    assert (res.loss > 0).all()


# --------------------------------------------------------------------------- tiny-clip


@pytest.fixture(scope="module")
def shapes_test(shapes_quick):
    """The quick tiny-clip and its test split: pixels, token batch, captions, positives."""
    world, model = shapes_quick
    model = model.eval()
    test = world.split("test")
    texts = [str(t) for t in test.modalities["text"]]
    pixels = model.preprocess("image", test.modalities["image"])
    return model, world, pixels, model.preprocess("text", texts), texts


def test_hotflip_on_tiny_clip_flips_bytes_and_gets_stronger(shapes_test) -> None:
    model, _, _, batch, texts = shapes_test
    sub = {k: v[:40] for k, v in batch.items()}
    with torch.no_grad():
        clean = model.encode({"text": sub})["text"]

    def objective(e, r):
        return 1 - (e * clean[r]).sum(-1)

    losses = []
    for k in (0, 1, 3):
        res = hotflip(model, sub, objective, n_flips=k)
        assert ((res.batch["input_ids"] != sub["input_ids"]).sum(1) <= k).all()
        assert len(res.texts) == 40 and all(
            len(t) == len(s) for t, s in zip(res.texts, texts, strict=False)
        )
        losses.append(float(res.loss.mean()))
    assert decode_tokens(model, sub) == texts[:40]
    assert losses[0] == pytest.approx(0.0, abs=1e-5) and losses[0] < losses[1] < losses[2]


def _r1_hits(image_emb, text_emb, pos) -> np.ndarray:
    """Per-row recall@1 hits, image->text then text->image (``retrieval_recall_at_1``'s rows)."""
    sim = (image_emb.float() @ text_emb.float().T).cpu()
    ar = torch.arange(sim.shape[0])
    pos = torch.as_tensor(pos)
    return torch.cat([pos[ar, sim.argmax(dim=1)], pos[sim.argmax(dim=0), ar]]).numpy()


def test_co_attack_beats_independent_attacks_on_retrieval(shapes_test) -> None:
    """The paper's claim: at the same budgets, Co-Attack lowers retrieval R@1 more than the
    independent text-only + image-only attacks (Sep-Attack), for several seeds.

    Measured (180 test rows, quick tiny-clip, eps 2/255, 10 steps, 1 byte flipped): clean TR/IR
    R@1 0.29/0.32; Co-Attack 0.02/0.02; Sep-Attack 0.13-0.15/0.12-0.18. With a tiny-clip trained
    under other numerics (1 thread, AVX2 kernels), seed 1 gave Co 0.033/0.075 vs Sep 0.125/0.117:
    an IR gap of 5 of 120 rows, which a fixed per-seed margin of 0.05 (6 rows) failed. So each
    seed is judged by a paired sign test on its 240 TR + IR hits: the rows only Sep-Attack
    still retrieves must outnumber those only Co-Attack retrieves by 2.33 sd (one-sided 99%).
    """
    model, _, pixels, batch, texts = shapes_test
    for seed in range(3):
        rows = np.sort(np.random.default_rng(seed).choice(len(texts), 120, replace=False))
        pos = caption_positives([texts[i] for i in rows])
        sub = {k: v[rows] for k, v in batch.items()}
        kw = {"steps": 5, "n_flips": 1}
        co = co_attack(
            model, pixels[rows], sub, 2 / 255, generator=torch.Generator().manual_seed(seed), **kw
        )
        sep = sep_attack(
            model, pixels[rows], sub, 2 / 255, generator=torch.Generator().manual_seed(seed), **kw
        )
        assert float(perturbation_norm(co.pixels - pixels[rows], "linf").max()) <= 2 / 255 + 1e-6
        assert co.texts == sep.texts  # the same text step: only the image objective differs
        with torch.no_grad():
            clean = model.encode({"image": pixels[rows], "text": sub})
        c_tr, c_ir = retrieval_recall_at_1(clean["image"], clean["text"], pos)
        s_tr, s_ir = retrieval_recall_at_1(sep.image_embedding, sep.text_embedding, pos)
        assert s_tr < c_tr and s_ir < c_ir  # the baseline is a real attack
        co_hits = _r1_hits(co.image_embedding, co.text_embedding, pos)
        sep_hits = _r1_hits(sep.image_embedding, sep.text_embedding, pos)
        assert sep_hits[:120].mean() == pytest.approx(s_tr) and sep_hits[120:].mean() == (
            pytest.approx(s_ir)
        )
        only_sep, only_co = int((sep_hits & ~co_hits).sum()), int((co_hits & ~sep_hits).sum())
        assert only_sep - only_co > 2.33 * np.sqrt(only_sep + only_co), (seed, only_sep, only_co)


def test_universal_perturbation_beats_random_noise(shapes_test, shapes_quick) -> None:
    model, world, pixels, _, _ = shapes_test
    train = world.split("train")
    train_px = model.preprocess("image", train.modalities["image"][:192])
    eps = 8 / 255  # measured: cos 0.857 vs 0.984 (noise); zero-shot acc 0.488 vs 0.685
    delta = universal_perturbation(model, train_px, eps, epochs=2,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert delta.shape == (1, *pixels.shape[1:])
    assert float(delta.abs().max()) <= eps + 1e-7
    g = torch.Generator().manual_seed(1)
    noise = eps * torch.sign(torch.rand(delta.shape, generator=g) - 0.5)  # same L-inf norm
    cos_u = float(embedding_cosine(model, pixels, delta).mean())
    cos_n = float(embedding_cosine(model, pixels, noise).mean())
    assert cos_u < cos_n - 0.05, (cos_u, cos_n)
    ctx = audit_context(model, world)
    forward = pixel_forward(model, ctx.task)
    labels = torch.as_tensor(ctx.outputs.labels)
    keep = labels >= 0
    px = model.preprocess("image", ctx.data.modalities["image"])
    with torch.no_grad():

        def acc(d):
            pred = forward((px + d).clamp(0, 1)).argmax(-1)
            return float((pred == labels)[keep].float().mean())

        assert acc(delta) < acc(noise) - 0.05, (acc(delta), acc(noise), acc(0 * noise))


def test_check_runs_new_attacks_on_fusion(shapes_quick) -> None:
    world, model = shapes_quick
    ctx = audit_context(model, world, task="fusion")
    check = AdversarialCheck(
        norms=("linf",), eps={"linf": [2 / 255]}, attacks=("pgd",), steps=3, max_rows=24,
        n_boot=20, text_attacks=("substitution", "hotflip"), query_budgets=(5, 40),
        flips=(1, 3), co_attack=True, universal=True, universal_rows=64, universal_epochs=1,
    )  # fmt: skip
    res = check.run(ctx)
    assert res.status == "ok"
    json.dumps(res.to_dict())
    m = {k: v.value for k, v in res.metrics.items()}
    clean = m["clean_accuracy"]
    e = "0.007843"
    for key in ("text/substitution/queries=5", "text/substitution/queries=40",
                "text/hotflip/flips=1", "text/hotflip/flips=3", f"linf/co_attack/eps={e}",
                f"linf/universal/eps={e}"):  # fmt: skip
        r = m[f"{key}/robust_accuracy"]
        assert 0.0 <= r <= clean + 1e-9
        assert m[f"{key}/attack_success_rate"] == pytest.approx(1 - r / clean)
    assert (
        m["text/substitution/queries=40/robust_accuracy"]
        <= m["text/substitution/queries=5/robust_accuracy"]
    )
    assert m["text/hotflip/flips=3/robust_accuracy"] <= m["text/hotflip/flips=1/robust_accuracy"]
    assert m["text/substitution/queries=5/mean_queries"] <= 5
    assert 0 < m[f"linf/universal/eps={e}/embedding_cosine"] <= 1
    names = [s["name"] for s in res.plots["accuracy_vs_eps_linf"]["series"]]
    assert names == ["pgd", "worst", "co_attack", "universal"]
    assert {"accuracy_vs_queries", "accuracy_vs_flips"} <= set(res.plots)


def test_check_skips_text_attacks_when_task_reads_no_text(colour_data) -> None:
    ctx = audit_context(ToyEncoder(), colour_data, task="zero_shot")
    check = AdversarialCheck(norms=("linf",), attacks=("fgsm",), max_rows=10, n_boot=10,
                             text_attacks=("substitution",), co_attack=True)  # fmt: skip
    res = check.run(ctx)
    msgs = " ".join(f.message for f in res.findings)
    assert "Text attacks skipped" in msgs and "Co-Attack skipped" in msgs
    assert not any(k.startswith("text/") for k in res.metrics)
    with pytest.raises(ValueError, match="text_attacks"):
        AdversarialCheck(text_attacks=("bert",))
    with pytest.raises(ValueError, match="linf"):
        AdversarialCheck(norms=("l2",), co_attack=True)


def test_check_runs_co_attack_on_zero_shot(shapes_quick) -> None:
    """Zero-shot Co-Attack: the true class's prompt is flipped, then the image pushed away from
    its clean embedding and the adversarial prompt's."""
    world, model = shapes_quick
    ctx = audit_context(model, world, task="zero_shot")
    check = AdversarialCheck(norms=("linf",), eps={"linf": [1 / 255, 4 / 255]}, attacks=("pgd",),
                             steps=3, max_rows=40, n_boot=20, co_attack=True)  # fmt: skip
    res = check.run(ctx)
    assert res.status == "ok"
    m = {k: v.value for k, v in res.metrics.items()}
    clean = m["clean_accuracy"]
    small, large = (m[f"linf/co_attack/eps={e:.4g}/robust_accuracy"] for e in (1 / 255, 4 / 255))
    assert 0.0 <= large <= small <= clean
    assert large < clean - 0.2  # a 4/255 joint attack flips many of the correct rows
