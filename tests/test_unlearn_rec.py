"""harden unlearn-rec: forget users of an overtrained recommender, checked against retraining.

The planted flaw is an ID-SASRec trained to memorise its users (no dropout, no weight decay,
no early stopping): a loss attack tells the forget users' training items from their held-out
ones with AUC ~0.9, while a model retrained without them scores ~0.5 (the reference).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsafe.cli import app
from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.harden.base import get_hardener, list_hardeners
from mmsafe.harden.unlearn_rec import (
    RecUnlearnReport,
    RecUnlearnScores,
    UnlearnRecHardener,
    compare_rec_unlearning,
    forget_auc,
)
from mmsafe.methods.privacy import membership_auc
from mmsafe.methods.recommend import membership_pairs
from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender, SeqRecTrainConfig, fit_seqrec

SPEC = "shapes-rec:n_users=600,n_items=80"
RECIPE = SeqRecTrainConfig(epochs=40, lr=5e-3, weight_decay=0.0, patience=10**6,
                           restore_best=False)  # fmt: skip


@pytest.fixture(scope="module")
def world():
    return load_world(SPEC)


@pytest.fixture(scope="module")
def overtrained(world):
    torch.manual_seed(0)
    model = SeqRecommender(SeqRecConfig(len(world.classes), items="id", dropout=0.0),
                           name="sasrec-id")  # fmt: skip
    fit_seqrec(model, {}, world, RECIPE)
    model.training_info = {"hyperparameters": dataclasses.asdict(RECIPE)}
    return model


@pytest.fixture(scope="module")
def forget_ids(world):
    rows = np.random.default_rng(0).choice(len(world), len(world) // 10, replace=False)
    return [world.ids[i] for i in sorted(rows)]


@pytest.fixture(scope="module")
def reports(overtrained, world, forget_ids):
    engine = Engine(progress=False)
    return {m: compare_rec_unlearning(overtrained, world, forget_ids, method=m, engine=engine)
            for m in ("neggrad", "finetune")}  # fmt: skip


def test_forget_auc_is_the_privacy_checks_attack_on_the_forget_users(overtrained, world):
    users = world.subset(np.arange(40))
    table = overtrained.item_table({})
    hist = [np.asarray(s) for s in users.modalities["sequence"]]
    member, non_member = membership_pairs(overtrained, {}, users, overtrained.scores(hist, table))
    expect = membership_auc(np.r_[member, non_member], np.r_[np.ones(40), np.zeros(40)])
    assert forget_auc(overtrained, {}, users) == pytest.approx(expect, abs=1e-12)


def test_the_planted_flaw_and_the_retrained_reference(reports):
    r = reports["neggrad"]
    assert r.n_forget == 60 and r.n_retain == 540
    assert r.original.forget_auc > 0.85  # memorised
    assert abs(r.retrained.forget_auc - 0.5) < 0.1  # never seen
    # the original model does not match retraining: the criterion can fail
    control = dataclasses.replace(r, unlearned=r.original)
    assert not control.matches_retraining and control.auc_gap > 0.3


def test_neggrad_forgets_like_retraining_and_keeps_quality(reports):
    r = reports["neggrad"]
    assert r.original.forget_auc - r.unlearned.forget_auc > 0.3
    assert abs(r.auc_gap) < 0.1
    assert abs(r.ndcg_gap) <= 0.05
    assert r.time_ratio > 1  # cheaper than retraining


def test_finetuning_alone_is_the_weak_baseline(reports):
    assert reports["finetune"].unlearned.forget_auc > reports["neggrad"].unlearned.forget_auc + 0.2
    assert not reports["finetune"].matches_retraining


def test_report_round_trips_to_json(reports):
    d = json.loads(json.dumps(reports["neggrad"].to_dict()))
    assert set(d) >= {"original", "unlearned", "retrained", "auc_gap", "matches_retraining"}
    assert "model" not in d
    s = RecUnlearnScores(0.9, 0.3)
    table = RecUnlearnReport("neggrad", s, s, s, 1, 9).to_markdown()
    assert "| original | 0.900 | 0.3000 | - |" in table


def test_cli_runs_the_flow_and_rejects_bad_lists(tmp_path, monkeypatch):
    assert "unlearn-rec" in list_hardeners() and get_hardener("unlearn-rec") is UnlearnRecHardener
    import mmsafe.models.loading as loading

    spec, recipe = "shapes-rec:n_users=150,n_items=40", SeqRecTrainConfig(epochs=3)
    small = load_world(spec)
    torch.manual_seed(0)
    model = SeqRecommender(SeqRecConfig(len(small.classes), items="id"), name="sasrec-id")
    fit_seqrec(model, {}, small, recipe)
    model.training_info = {"hyperparameters": dataclasses.asdict(recipe)}
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: model)
    ids = small.ids[:15]
    forget = tmp_path / "forget.txt"
    forget.write_text("# users who asked to be forgotten\n" + "\n".join(ids) + "\n")
    out = tmp_path / "out"
    args = ["harden", "unlearn-rec", "--model", "sasrec-id", "--data", spec, "--forget",
            str(forget), "--epochs", "1", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "matches_retraining" in res.output
    doc = json.loads((out / "unlearned" / "unlearn.json").read_text())
    assert doc["forget_ids"] == list(ids) and doc["n_forget"] == 15 and doc["n_retain"] == 135
    assert doc["retrained"]["seconds"] > 0 and doc["method"] == "neggrad"
    assert (out / "unlearned" / "model.safetensors").is_file()
    after = json.loads((out / "after" / "card.json").read_text())["checks"]
    assert {"performance.ranking", "controllability.rec_privacy"} <= set(after)
    # a user the data does not have: exit 2 naming the file and line, before any audit
    forget.write_text(f"{ids[0]}\nnobody\n")
    bad = tmp_path / "bad"
    res = CliRunner().invoke(app, [*args[:-1], str(bad)])
    assert res.exit_code == 2 and "forget.txt" in res.output and "line 2" in res.output
    assert "Traceback" not in res.output and not (bad / "before").exists()
    # the fusion-head unlearner points a recommender's user here
    head = ["--model", "sasrec-id", "--data", spec, "--forget", str(forget)]
    res = CliRunner().invoke(app, ["harden", "unlearn", *head, "--out", str(tmp_path / "head")])
    assert res.exit_code == 2 and "unlearn-rec" in res.output
