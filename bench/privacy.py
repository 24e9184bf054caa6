"""Privacy benchmarks: LiRA shadow models on cached features, and unlearning vs retraining.

One process, tiny-clip (quick-trained on the world, from the model cache) on the shapes world,
fusion heads trained on frozen, cached image + text embeddings:

(a) **LiRA** against a fusion head with N shadow heads
(:func:`mmsafe.checks.controllability.privacy.
    lira_fusion_scores`). The encoder runs once over every row (the embedding pass is timed);
    each shadow is then a head training on cached features. The "uncached" column estimates
    what shadows would cost if each re-ran the encoder (embedding time x N + shadow time).
    Members are the labelled train rows, non-members the labelled calibration + test rows; the
    AUC of the loss attack is printed beside LiRA's, overall and on the world's duplicated items.

(a2) **LiRA against the encoder** with N shadow tiny-clips
(:func:`mmsafe.checks.controllability.privacy.
    encoder_shadow_statistics`, size xs, quick schedule), each trained from scratch on a random
    half of the same members + non-members; the target's cosine attack is printed beside it.

(b) **Unlearning vs retraining** (:func:`mmsafe.harden.unlearn.compare_unlearning`): forget the
    duplicated train items (every copy) from an over-fitted MLP head, with MultiDelete and with
    gradient ascent, and retrain the same recipe without them. Prints forget-set membership AUC
    (forget rows vs held-out rows), accuracies, and the retrain / unlearn time ratio.

    MMSAFE_CACHE_DIR=/tmp/demo-cache .venv/bin/python bench/privacy.py [--shadows 8 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from mmsafe.checks.controllability.privacy import (
    _pool,
    encoder_shadow_statistics,
    lira_fusion_scores,
)
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.harden.unlearn import compare_unlearning
from mmsafe.methods.privacy import (
    content_ids,
    cosine_scores,
    lira_scores,
    loss_scores,
    membership_auc,
    tpr_at_fpr,
)
from mmsafe.models.heads import fit_fusion_head
from mmsafe.models.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="shapes:n=900,train_defects=0")
    p.add_argument("--shadows", type=int, nargs="+", default=[8, 16])
    p.add_argument("--encoder-shadows", type=int, nargs="*", default=[4, 8])
    p.add_argument("--lira-epochs", type=int, default=30, help="epochs of target + shadow heads")
    p.add_argument("--hidden", type=int, default=128, help="MLP width of the unlearning head")
    p.add_argument("--epochs", type=int, default=200, help="epochs of the unlearning head")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cache = os.environ.get("MMSAFE_CACHE_DIR")
    print(f"python {platform.python_version()}, torch {torch.__version__}, 1 thread, {args.data}")

    world = load_data(args.data)
    t0 = time.perf_counter()
    model = load_model("tiny-clip", data=world, quick=True, cache_dir=cache, progress=False)
    print(f"tiny-clip ready in {time.perf_counter() - t0:.1f} s (cache: {cache})")

    engine = Engine(progress=False, seed=args.seed)
    parts = {}
    t0 = time.perf_counter()
    for split in ("train", "calibration", "test"):
        d = world.split(split)
        d = d.subset(np.flatnonzero(d.labelled))
        parts[split] = (d, engine.embed(model, d, ("image", "text")))
    embed_s = time.perf_counter() - t0
    train, e_tr = parts["train"]
    y_tr = torch.as_tensor(train.labels)
    held = [parts["calibration"], parts["test"]]
    e_held = {m: torch.cat([e[m] for _, e in held]) for m in ("image", "text")}
    y_held = np.concatenate([d.labels for d, _ in held])
    dup = np.array([bool(m.get("n_copies") or m.get("dup_of")) for m in train.meta])
    print(
        f"{len(train)} labelled train rows ({int(dup.sum())} duplicated), {len(y_held)} "
        f"held-out rows; embedding pass over all of them: {embed_s:.2f} s"
    )

    # (a) LiRA ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    head = fit_fusion_head(
        e_tr, y_tr, num_classes=len(world.classes), epochs=args.lira_epochs, seed=args.seed
    )
    head_s = time.perf_counter() - t0
    e_all = {m: torch.cat([e_tr[m], e_held[m]]) for m in e_tr}
    y_all = np.concatenate([train.labels, y_held])
    member = np.r_[np.ones(len(train), bool), np.zeros(len(y_held), bool)]
    dup_all = np.r_[dup, np.zeros(len(y_held), bool)]
    with torch.inference_mode():
        loss = loss_scores(head(e_all).double().numpy(), y_all)
    print("\n## (a) LiRA with shadow heads on cached features\n")
    print(f"target head: linear concat, {args.lira_epochs} epochs, trained in {head_s:.2f} s\n")
    print(
        "| attack | shadows | time (s) | s / shadow | uncached est. (s) | AUC | "
        "AUC duplicated | AUC unique |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def row(name: str, k: int, secs: float, s: np.ndarray) -> None:
        a = membership_auc(s, member)
        a_dup = membership_auc(s[member & dup_all | ~member], dup_all[member & dup_all | ~member])
        uniq = member & ~dup_all
        a_uni = membership_auc(s[uniq | ~member], uniq[uniq | ~member])
        per = f"{secs / k:.3f}" if k else "-"
        unc = f"{embed_s * k + secs:.1f}" if k else "-"
        print(
            f"| {name} | {k or '-'} | {secs:.2f} | {per} | {unc} | {a:.3f} | {a_dup:.3f} | "
            f"{a_uni:.3f} |"
        )

    row("loss threshold", 0, 0.0, loss)
    everyone = _pool([train, *(d for d, _ in held)])
    items = content_ids(everyone.modalities["image"], [str(t) for t in everyone.modalities["text"]])
    for k in args.shadows:
        for online in (True, False):
            for draw, it in (("per row", None), ("per item", items)):
                t0 = time.perf_counter()
                s = lira_fusion_scores(
                    head, e_all, y_all, k, seed=args.seed, online=online, items=it
                )
                name = f"LiRA {'online' if online else 'offline'}, {draw}"
                row(name, k, time.perf_counter() - t0, s)

    # (a2) encoder LiRA ------------------------------------------------------------------
    if args.encoder_shadows:
        print("\n## (a2) LiRA against the encoder with shadow tiny-clips (xs, quick)\n")
        pool = _pool([train, *(d for d, _ in held)])
        img = torch.cat([e_tr["image"], e_held["image"]]).double().numpy()
        txt = torch.cat([e_tr["text"], e_held["text"]]).double().numpy()
        print("| attack | shadows | time (s) | s / shadow | AUC | TPR@1% | AUC duplicated |")
        print("|---|---|---|---|---|---|---|")

        def erow(name: str, k: int, secs: float, s: np.ndarray) -> None:
            sel = member & dup_all | ~member
            per = f"{secs / k:.1f}" if k else "-"
            print(
                f"| {name} | {k or '-'} | {secs:.1f} | {per} | {membership_auc(s, member):.3f} | "
                f"{tpr_at_fpr(s, member, 0.01):.3f} | {membership_auc(s[sel], dup_all[sel]):.3f} |"
            )

        erow("cosine threshold", 0, 0.0, cosine_scores(img, txt))
        for k in args.encoder_shadows:
            es = encoder_shadow_statistics(
                model, pool, k, seed=args.seed, engine=engine, target_embeddings=(img, txt)
            )
            for online in (True, False):
                s = lira_scores(es.target, es.shadow, es.inside, online=online)
                erow(f"LiRA encoder {'online' if online else 'offline'}", k, es.seconds, s)

    # (b) unlearning ----------------------------------------------------------------------
    print("\n## (b) Unlearning the duplicated items vs retraining from scratch\n")
    t0 = time.perf_counter()
    big = fit_fusion_head(
        e_tr,
        y_tr,
        num_classes=len(world.classes),
        hidden=args.hidden,
        epochs=args.epochs,
        weight_decay=0.0,
        seed=args.seed,
    )
    print(
        f"original head: MLP hidden {args.hidden}, {args.epochs} epochs, weight decay 0, "
        f"trained in {time.perf_counter() - t0:.2f} s; forget set {int(dup.sum())} rows "
        f"({int(dup.sum()) // 6} items x 6 copies)\n"
    )
    print(
        "| method | forget AUC original | forget AUC unlearned | forget AUC retrained | "
        "AUC gap | retain acc (u / r) | test acc (o / u / r) | unlearn s | retrain s | "
        "retrain / unlearn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    test_d, e_te = parts["test"]
    for method in ("multidelete", "gradient_ascent"):
        r = compare_unlearning(
            big,
            e_tr,
            y_tr,
            dup,
            e_held,
            y_held,
            test=e_te,
            test_labels=test_d.labels,
            method=method,
            seed=args.seed,
        )
        print(
            f"| {method} | {r.original.forget_auc:.3f} | {r.unlearned.forget_auc:.3f} | "
            f"{r.retrained.forget_auc:.3f} | {r.auc_gap:+.3f} | "
            f"{r.unlearned.retain_accuracy:.3f} / {r.retrained.retain_accuracy:.3f} | "
            f"{r.original.test_accuracy:.3f} / {r.unlearned.test_accuracy:.3f} / "
            f"{r.retrained.test_accuracy:.3f} | {r.unlearn_seconds:.2f} | "
            f"{r.retrain_seconds:.2f} | {r.time_ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
