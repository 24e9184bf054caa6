"""robustness.shilling: fake profiles push an item up an ID-based SASRec; no fakes, no uplift."""

from __future__ import annotations

import numpy as np
import pytest

from mmsafe.audit import run_audit
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.methods.shilling import push_profiles, with_profiles
from mmsafe.models.seqrec import build_seqrec

CHECK = "robustness.shilling"


@pytest.fixture(scope="module")
def card():
    world = load_world("shapes-rec:n_users=400,n_items=100")
    model = build_seqrec(items="id", train_data=world, quick=True, progress=False, save=False)
    opts = {CHECK: {"shares": [0.0, 0.05], "n_targets": 3, "n_boot": 300}}
    return run_audit(model, world, task="seqrec", checks=CHECK, options=opts,
                     engine=Engine(progress=False)).card["checks"][CHECK]  # fmt: skip


def test_five_percent_fake_users_push_the_targets_up_an_id_model(card):
    up = card["metrics"]["share=5%/uplift"]
    assert up["ci"][0] > 0.1
    assert [f["severity"] for f in card["findings"]] == ["medium"]
    assert (
        card["metrics"]["share=5%/target_hr@10"]["value"]
        > card["metrics"]["clean/target_hr@10"]["value"]
    )


def test_no_fake_users_is_the_control(card):
    assert card["metrics"]["share=0%/uplift"]["value"] == 0.0
    assert card["metrics"]["share=0%/ndcg@10"]["value"] == card["metrics"]["clean/ndcg@10"]["value"]


def test_profiles_follow_real_items_with_the_target():
    world = load_world("shapes-rec:n_users=30,n_items=40")
    hist = [np.asarray(s) for s in world.modalities["sequence"]]
    profiles = push_profiles(hist, [7, 8], 4, 6, np.random.default_rng(0))
    assert [int(p[1]) for p in profiles] == [7, 8, 7, 8]
    assert all(len(p) == 6 and set(p[1::2].tolist()) == {int(p[1])} for p in profiles)
    poisoned = with_profiles(world, profiles)
    assert len(poisoned) == len(world) + 4 and poisoned.catalog is world.catalog
    assert poisoned.labels[-1] == profiles[-1][-1]
    assert list(poisoned.modalities["sequence"][-1]) == list(profiles[-1][:-1])
