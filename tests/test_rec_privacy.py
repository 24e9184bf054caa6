"""controllability.rec_privacy: membership inference on interactions, on an overtrained
recommender (the planted flaw) and an untrained one (the control)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsafe.audit import run_audit
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.methods.privacy import membership_auc
from mmsafe.methods.recommend import membership_pairs
from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender, SeqRecTrainConfig, fit_seqrec

CHECK = "controllability.rec_privacy"


@pytest.fixture(scope="module")
def world():
    return load_world("shapes-rec:n_users=300,n_items=80")


def _audit(model, world):
    return run_audit(model, world, task="seqrec", checks=CHECK, options={CHECK: {"n_boot": 300}},
                     engine=Engine(progress=False)).card["checks"][CHECK]  # fmt: skip


def test_an_overtrained_model_gives_its_training_interactions_away(world):
    torch.manual_seed(0)
    model = SeqRecommender(SeqRecConfig(len(world.classes), items="id", dropout=0.0))
    recipe = SeqRecTrainConfig(epochs=40, lr=5e-3, weight_decay=0.0, patience=10**6,
                               restore_best=False)  # fmt: skip
    fit_seqrec(model, {}, world, recipe)
    entry = _audit(model, world)
    auc = entry["metrics"]["mia/auc"]
    assert auc["ci"][0] > 0.75
    assert [f["severity"] for f in entry["findings"]] == ["high"]


def test_an_untrained_model_is_the_control(world):
    torch.manual_seed(0)
    model = SeqRecommender(SeqRecConfig(len(world.classes), items="id")).eval()
    entry = _audit(model, world)
    lo, hi = entry["metrics"]["mia/auc"]["ci"]
    assert lo < 0.5 < hi
    assert not entry["findings"]


def test_pairs_score_the_last_training_item_and_the_label(world):
    """The AUC is computed on hand-checked pairs: member = sequence[-2] given what precedes it."""
    torch.manual_seed(1)
    model = SeqRecommender(SeqRecConfig(len(world.classes), items="id")).eval()
    table = model.item_table({})
    hist = [np.asarray(s) for s in world.modalities["sequence"]]
    final = model.scores(hist, table)
    member, non_member = membership_pairs(model, {}, world, final)
    u = 3
    by_hand = torch.log_softmax(model.scores([hist[u][:-2]], table)[0].double(), -1)
    assert member[u] == pytest.approx(float(by_hand[hist[u][-2]]), abs=1e-5)  # float32 batches
    assert non_member[u] == pytest.approx(
        float(torch.log_softmax(final[u].double(), -1)[world.labels[u]]), abs=1e-9
    )
    entry = _audit(model, world)
    ok = np.isfinite(member)
    is_member = np.r_[np.ones(ok.sum()), np.zeros(ok.sum())]
    expect = membership_auc(np.r_[member[ok], non_member[ok]], is_member)
    assert entry["metrics"]["mia/auc"]["value"] == pytest.approx(expect, abs=1e-12)
