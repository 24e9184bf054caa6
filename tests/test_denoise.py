"""``mmsafe harden denoise`` (GUIDER-style): the pure pieces against hand-computed values, and
the hardener on shapes-rec's planted misclicks, with a clean control (``misclick=0``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsafe.cli import app
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.harden.base import get_hardener, list_hardeners
from mmsafe.harden.denoise import DenoiseHardener, noise_recovery
from mmsafe.methods.denoise import (
    clean_probabilities,
    content_kernel,
    dbpr_loss,
    expected_f1_threshold,
    flag_quality,
    item_similarity,
    ot_distillation_loss,
    sinkhorn,
    topic_hmm_noise,
)

WORLD = "shapes-rec:n_users=800"


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


# --------------------------------------------------------------------------- pure pieces


def test_dbpr_loss_matches_hand_computation():
    pos = torch.tensor([2.0, 0.0, 1.0])
    neg = torch.tensor([[0.0, 1.0], [0.0, 0.0], [5.0, 5.0]])
    clean = torch.tensor([1.0, 0.6, 0.2])  # the third is below the threshold: filtered out
    per = [(_softplus(2.0) + _softplus(1.0)) / 2, _softplus(0.0)]
    expected = (1.0 * per[0] + 0.6 * per[1]) / 1.6
    got = float(dbpr_loss(pos, neg, clean, threshold=0.5))
    assert got == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.397489, abs=1e-5)
    # threshold 0 keeps every interaction, weighted; unit weights give plain BPR
    plain = float(dbpr_loss(pos, neg, torch.ones(3), threshold=0.0))
    per3 = per + [_softplus(-4.0)]
    assert plain == pytest.approx(sum(per3) / 3, abs=1e-6)
    # everything filtered: 0, not NaN
    assert float(dbpr_loss(pos, neg, torch.zeros(3))) == 0.0


def test_sinkhorn_marginals_and_exact_two_by_two():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # 2x2: the exact plan moves as much mass as possible along the free diagonal
    plan = sinkhorn(t([[0.0, 1.0], [1.0, 0.0]]), t([0.7, 0.3]), t([0.4, 0.6]), eps=0.005)
    exact = t([[0.4, 0.3], [0.0, 0.3]])
    assert torch.allclose(plan, exact, atol=1e-4)
    # an asymmetric cost: the exact plan is a vertex of the transport polytope
    cost = t([[1.0, 3.0], [2.0, 1.0]])
    plan = sinkhorn(cost, t([0.5, 0.5]), t([0.3, 0.7]), eps=0.05, iterations=500)
    assert torch.allclose(plan, t([[0.3, 0.2], [0.0, 0.5]]), atol=1e-4)
    assert float((plan * cost).sum()) == pytest.approx(0.3 + 0.6 + 0.5, abs=1e-3)
    # a random problem: both marginals hold, and no mass is negative
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 7, generator=g, dtype=torch.float64)
    a = torch.rand(5, generator=g, dtype=torch.float64)
    b = torch.rand(7, generator=g, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    plan = sinkhorn(cost, a, b, eps=0.05, iterations=500)
    assert torch.allclose(plan.sum(1), a, atol=1e-6)
    assert torch.allclose(plan.sum(0), b, atol=1e-6)
    assert (plan >= 0).all()


def test_ot_distillation_ignores_noisy_targets_and_pulls_states():
    states = torch.tensor([[1.0, 0.2], [0.1, 1.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = ot_distillation_loss(states, targets, torch.tensor([1.0, 1.0, 0.0]), eps=0.01)
    # the clean targets match the states (small cost); the noisy one carries no mass
    assert 0 <= float(loss) < 0.05
    loss.backward()
    assert states.grad is not None and torch.isfinite(states.grad).all()
    noisy_only = ot_distillation_loss(states, targets, torch.tensor([0.0, 0.0, 1.0]), eps=0.01)
    assert float(noisy_only) > 1.5  # every state is sent to the far (noisy) target


def test_content_kernel_and_flag_quality():
    f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    k = content_kernel(f, k=2)
    assert np.allclose(k.sum(axis=1), 1.0)
    assert k[0, 1] == k[2, 3] == 0.5 and k[0, 2] == 0.0
    q = flag_quality([np.array([True, True, False, False])], [[True, False, True, False]])
    assert q == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "flagged": 2, "noisy": 2}


def test_clean_probabilities_on_a_toy_chain():
    # two topics of 3 items (content = topic one-hot + a little noise); users stay in topic 0
    rng = np.random.default_rng(0)
    feats = np.repeat(np.eye(2), 3, axis=0) + 0.01 * rng.normal(size=(6, 2))
    seqs = [rng.choice(3, size=8) for _ in range(60)]
    seqs[0] = np.array([0, 1, 2, 4, 0, 1, 2, 0])  # item 4 (topic 1) is a misclick
    p, info = clean_probabilities(seqs, [feats], k=3, calibrate=0.0, states=2)
    assert len(p) == 60 and all(len(x) == len(s) for x, s in zip(p, seqs, strict=True))
    assert info["states"] == 2 and 0 < info["noise_share"] < 0.1
    # flagged at the automatic (expected-F1) threshold, and only it
    flags = np.concatenate([x < info["threshold"] for x in p])
    assert flags[3] and flags.sum() == 1
    assert p[0][3] < 0.5 and min(float(np.delete(p[0], 3).min()), *(x.min() for x in p[1:])) > 0.9
    # the item-level model alone (no HMM) flags it too, less sharply
    p0, info0 = clean_probabilities(seqs, [feats], k=3, calibrate=0.0, states=0)
    assert info0["states"] == 0 and p0[0][3] < 0.6 < min(np.delete(p0[0], 3))


def _chain(rng, n_users=300, misclick=0.1):
    """4 topics of 5 items on a ring (topic t -> t + 1), misclicks uniform over the 20 items."""
    seqs, truth = [], []
    for _ in range(n_users):
        topic = rng.integers(4)
        s = []
        for _ in range(10):
            s.append(5 * topic + rng.integers(5))
            topic = (topic + 1) % 4 if rng.random() < 0.9 else topic
        noisy = rng.random(10) < misclick
        seqs.append(np.where(noisy, rng.integers(20, size=10), s))
        truth.append(noisy & (seqs[-1] // 5 != np.asarray(s) // 5))  # off-topic misclicks
    return seqs, truth


def test_topic_hmm_finds_the_misclicks_of_a_known_chain():
    seqs, truth = _chain(np.random.default_rng(0))
    topic = np.repeat(np.arange(4), 5)
    oracle = (topic[:, None] == topic[None, :]).astype(float)  # the true topics as similarity
    p, info = topic_hmm_noise(seqs, oracle, states=4)
    assert info["states"] == 4 and len(set(info["topics"].tolist())) == 4
    assert 0.05 < info["noise_share"] < 0.12  # 0.1 planted, a quarter of them on-topic
    q = flag_quality([x > 0.5 for x in p], truth)
    assert q["precision"] > 0.85 and q["recall"] > 0.7  # measured 0.91, 0.79
    # the sequence-neighbour profiles recover the topics from the histories alone, with
    # content that says nothing (random features)
    noise = np.random.default_rng(1).normal(size=(20, 8))
    sim = item_similarity(noise, seqs, calibrate=0.0, transitions=1.0, k=5)
    nearest = np.argsort(-sim + 10 * np.eye(20), axis=1)[:, :4]
    assert (topic[nearest] == topic[:, None]).mean() > 0.95


def test_expected_f1_threshold():
    # flagging the top j: expected F1 2 * sum(top j) / (j + sum): j = 2 gives 3.4 / 3.85
    assert expected_f1_threshold([np.array([0.9, 0.8]), np.array([0.1, 0.05])]) == 0.8
    assert expected_f1_threshold([np.zeros(3)]) == 1.0  # nothing is noisy: flag nothing


# --------------------------------------------------------------------------- on shapes-rec


@pytest.fixture(scope="module")
def encoder(shapes_quick):
    return shapes_quick[1]


@pytest.fixture(scope="module")
def recovery(encoder, mmsafe_cache):
    return noise_recovery(encoder, WORLD, quick=True, cache_dir=mmsafe_cache)


def test_flags_the_planted_misclicks(recovery):
    # measured (n_users=800, quick tiny-clip, automatic threshold 0.64): precision 0.79,
    # recall 0.69, F1 0.74 (goal: 0.7; before the HMM and the sequence-neighbour similarity:
    # precision 0.52, recall 0.70, F1 0.59 at a threshold chosen on these labels)
    assert recovery["f1"] >= 0.7
    assert recovery["precision"] >= 0.7
    assert recovery["recall"] >= 0.6
    summary = recovery["summary"]
    assert summary["flag_f1"] == pytest.approx(recovery["f1"])
    assert 0.07 < summary["estimated_noise_share"] < 0.12  # measured 0.091; planted 0.095
    assert 0.5 < summary["threshold"] < 0.8  # the expected-F1 threshold, from no label


def test_denoised_training_recovers_ndcg(recovery):
    a, b, c = recovery["ndcg_plain"], recovery["ndcg_denoised"], recovery["ndcg_clean"]
    print({k: recovery[k] for k in ("ndcg_plain", "ndcg_denoised", "ndcg_clean",
                                     "recovered_share", "precision", "recall", "f1")})  # fmt: skip
    # measured (defaults: flagged interactions imputed, softmax, no OT, raw serving histories):
    # a 0.279, b 0.317, c 0.332, recovered share 0.72 (before: b 0.287, 0.16). Seeds 1 and 2
    # recover less (0.33, 0.26; before 0.22, 0.17). Dropping the flagged interactions instead
    # recovers 0.20; dropping the planted ones themselves only 0.23: a removed misclick does
    # not give back the click it replaced
    assert c > a + 0.03  # the noise costs NDCG
    assert recovery["recovered_share"] > 0.4 and b > a + 0.02


def test_clean_control_flags_few(recovery):
    # flagging reads only the items' content and the histories: no retraining needed
    world = load_world(WORLD + ",misclick=0")
    flagged = DenoiseHardener().flag(recovery["plain_model"], world, Engine(progress=False))
    share = float(np.concatenate(flagged).mean())
    noisy_share = recovery["summary"]["flagged_share"]
    print({"clean_control_flagged_share": share, "noisy_world_flagged_share": noisy_share})
    assert share < 0.01  # measured 0.002 (the noisy world: 0.084); before: 0.014


def _tiny(encoder, world, epochs=2):
    """An untrained mm-sasrec whose recipe is two epochs: the CLI wiring, not the science."""
    from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender, catalog_features

    feats = catalog_features(Engine(progress=False), world.catalog, ["image", "text"], encoder)
    cfg = SeqRecConfig(len(world.catalog), feature_dims=tuple(f.shape[1] for f in feats.values()))
    torch.manual_seed(0)
    model = SeqRecommender(cfg, encoder).eval()
    model.training_info = {"hyperparameters": {"epochs": epochs, "patience": 1}}
    return model


def test_registered_and_cli_runs_the_flow(encoder, mmsafe_cache, tmp_path, monkeypatch):
    assert "denoise" in list_hardeners() and get_hardener("denoise") is DenoiseHardener
    spec = "shapes-rec:n_users=200"
    model = _tiny(encoder, load_world(spec))
    import mmsafe.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: model)
    out = tmp_path / "denoised"
    args = ["harden", "denoise", "--model", "mm-sasrec", "--data", spec, "--out", str(out),
            "--cache-dir", str(mmsafe_cache), "--ot-weight", "0.05", "--loss", "dbpr"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "denoise" in res.output and "flag_f1" in res.output and "ndcg@10" in res.output
    doc = json.loads((out / "denoised" / "flags.json").read_text())
    assert doc["params"]["ot_weight"] == 0.05 and doc["params"]["loss"] == "dbpr"
    assert doc["params"]["flagged"] == "impute" and doc["summary"]["threshold"] > 0
    assert len(doc["users"]) == 200
    assert (out / "denoised" / "model.safetensors").is_file()
    after = json.loads((out / "after" / "card.json").read_text())
    assert "performance.ranking" in after["checks"]
    # an ID model has no content to read: exit 2 before any audit, no traceback
    from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender

    id_model = SeqRecommender(SeqRecConfig(len(load_world(spec).catalog), items="id"))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: id_model)
    res = CliRunner().invoke(app, [*args[:-6], "--out", str(tmp_path / "id")])
    assert res.exit_code == 2 and "content" in res.output
    assert not (tmp_path / "id" / "before").exists()
