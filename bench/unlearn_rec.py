"""Unlearning users of a recommender against retraining from scratch (issue 15).

An ID-SASRec overtrained on ``shapes-rec`` (no dropout, no weight decay, no early stopping: its
users' training items are recognisable) forgets a random share of its users with each method of
``mmsafe harden unlearn-rec``; a model retrained without them with the same recipe and seed is
the reference. Prints, per forget draw, the forget users' membership AUC and the retained users'
test NDCG@10 of the original, unlearned and retrained models, and the wall-time ratio.
Goal: both within 0.05 of the retrained model's.

    .venv/bin/python bench/unlearn_rec.py [--world shapes-rec:n_users=600,n_items=80]
        [--draws 5] [--share 0.1] [--methods neggrad,finetune]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.harden.unlearn_rec import compare_rec_unlearning
from mmsafe.models.seqrec import SeqRecConfig, SeqRecommender, SeqRecTrainConfig, fit_seqrec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="shapes-rec:n_users=600,n_items=80")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--methods", default="neggrad,finetune")
    args = ap.parse_args()

    world = load_world(args.world)
    recipe = SeqRecTrainConfig(epochs=40, lr=5e-3, weight_decay=0.0, patience=10**6,
                               restore_best=False)  # fmt: skip
    torch.manual_seed(0)
    model = SeqRecommender(SeqRecConfig(len(world.classes), items="id", dropout=0.0))
    fit_seqrec(model, {}, world, recipe)
    model.training_info = {"hyperparameters": dataclasses.asdict(recipe)}
    engine = Engine(progress=False)
    n_forget = max(int(round(args.share * len(world))), 1)
    print(f"{args.world}: {len(world)} users, forget {n_forget} per draw")
    print("| draw | method | forget AUC orig / unlearned / retrained | NDCG@10 unlearned / "
          "retrained | AUC gap | NDCG gap | matches | retrain / unlearn time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    gaps: dict[str, list[tuple[float, float]]] = {}
    for draw in range(args.draws):
        rows = np.random.default_rng(draw).choice(len(world), n_forget, replace=False)
        ids = [world.ids[i] for i in sorted(rows)]
        for method in args.methods.split(","):
            r = compare_rec_unlearning(model, world, ids, method=method, engine=engine)
            gaps.setdefault(method, []).append((r.auc_gap, r.ndcg_gap))
            print(f"| {draw} | {method} | {r.original.forget_auc:.3f} / "
                  f"{r.unlearned.forget_auc:.3f} / {r.retrained.forget_auc:.3f} | "
                  f"{r.unlearned.test_ndcg:.4f} / {r.retrained.test_ndcg:.4f} | "
                  f"{r.auc_gap:+.3f} | {r.ndcg_gap:+.4f} | {r.matches_retraining} | "
                  f"{r.time_ratio:.1f}x |", flush=True)  # fmt: skip
    for method, g in gaps.items():
        a = np.abs(np.array(g))
        print(f"{method}: mean |AUC gap| {a[:, 0].mean():.3f} (max {a[:, 0].max():.3f}); "
              f"mean |NDCG gap| {a[:, 1].mean():.4f} (max {a[:, 1].max():.4f}); "
              f"within 0.05 on both: {int(((a <= 0.05).all(axis=1)).sum())}/{len(a)}")  # fmt: skip


if __name__ == "__main__":
    main()
