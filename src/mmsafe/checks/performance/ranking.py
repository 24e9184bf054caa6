"""``performance.ranking``: a recommender's full-ranking HR/NDCG/MRR, beside its baselines.

Leave-one-out over users: each user's held-out next item is ranked against every item of the
catalogue (the user's history excluded). The same metrics are reported for two baselines
trained on the same histories: popularity (interaction counts) and the ID-based SASRec, so a
reader sees what the model's content buys.
"""

from __future__ import annotations

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.recommend import histories, interaction_counts, user_metrics
from mmsafe.metrics import bootstrap_ci, mean_ci

KS = (10, 20)
NAMES = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg")) + ("mrr",)
BASELINES = ("popularity", "sasrec-id")


def _ratio(a: np.ndarray, b: np.ndarray) -> float:
    den = float(b.mean())
    return float(a.mean()) / den if den > 0 else float("nan")


@register_check
class RankingCheck(Check):
    """Full-ranking HR@K, NDCG@K and MRR with bootstrap CIs, and the baselines beside them."""

    name = "performance.ranking"
    pillar = "performance"
    aliases = ("performance",)
    description = "recommender HR/NDCG@10,20 and MRR (full ranking) vs popularity and ID-SASRec"
    kinds = ("recommender",)
    tasks = ("seqrec",)
    higher_is_better = {
        **{n: True for n in NAMES},
        **{f"{b}/{n}": True for b in BASELINES for n in NAMES},
        "lift/ndcg@10_vs_popularity": True,
    }

    def __init__(self, n_boot: int = 1000, id_baseline: bool = True, quick: bool = False) -> None:
        self.n_boot = n_boot
        self.id_baseline = id_baseline
        self.quick = quick

    def _id_scores(self, ctx: AuditContext) -> torch.Tensor:
        """Scores of an ID-based SASRec fitted on the same histories.

        It is kept in the engine's on-disk cache when there is one, so a warm audit loads it.
        """
        from mmsafe.models.seqrec import build_seqrec

        cache = ctx.engine.cache_dir
        base = build_seqrec(
            items="id",
            train_data=ctx.data,
            seed=ctx.seed_for("sasrec-id"),
            quick=self.quick,
            progress=False,
            name="sasrec-id",
            cache_dir=cache,
            save=cache is not None,
            device=str(ctx.engine.device),
        )
        ctx.engine.count("training_passes", int(base.training_info.get("epochs", 0)))
        return base.scores(histories(ctx.data), base.item_table({}))

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        data = ctx.data
        n_items = len(data.classes)
        runs = {"": user_metrics(ctx.outputs.logits, data, KS)}
        pop = interaction_counts(histories(data), n_items).astype(np.float64)
        runs["popularity/"] = user_metrics(np.broadcast_to(pop, (len(data), n_items)), data, KS)
        if self.id_baseline:
            runs["sasrec-id/"] = user_metrics(self._id_scores(ctx), data, KS)
        metrics: dict[str, Metric] = {}
        for prefix, per_user in runs.items():
            for n in NAMES:
                v = per_user[n]
                metrics[prefix + n] = Metric(
                    float(v.mean()), mean_ci(v, self.n_boot, seed=ctx.seed)
                )
        own, base = runs[""]["ndcg@10"], runs["popularity/"]["ndcg@10"]
        lift = Metric(_ratio(own, base), bootstrap_ci(_ratio, own, base, n_boot=self.n_boot,
                                                      seed=ctx.seed))  # fmt: skip
        metrics["lift/ndcg@10_vs_popularity"] = lift
        findings = []
        if (
            own.mean() <= base.mean()
            or metrics["ndcg@10"].ci[1] < metrics["popularity/ndcg@10"].ci[0]
        ):  # type: ignore[index]
            findings.append(Finding(
                "high",
                f"The model ranks no better than popularity: NDCG@10 {own.mean():.3f} against "
                f"{base.mean():.3f} for recommending the most interacted items to everyone.",
                {"ndcg@10": float(own.mean()), "popularity/ndcg@10": float(base.mean())},
                "Check that the model trained (validation NDCG in its training info), that "
                "histories are in time order, and that item features separate the items.",
            ))  # fmt: skip
        elif lift.value < 1.5:
            findings.append(Finding(
                "medium",
                f"The model adds little over popularity: {lift.value:.2f}x its NDCG@10.",
                {"lift": lift.value},
                "Compare with the ID-based SASRec baseline; train longer or on richer features.",
            ))  # fmt: skip
        if "sasrec-id/" in runs:
            ident = runs["sasrec-id/"]["ndcg@10"]
            if metrics["ndcg@10"].ci[1] < metrics["sasrec-id/ndcg@10"].ci[0]:  # type: ignore[index]
                findings.append(Finding(
                    "low",
                    f"The ID-based SASRec ranks better (NDCG@10 {ident.mean():.3f} against "
                    f"{own.mean():.3f}): the item content does not yet pay its way on warm items.",
                    {"ndcg@10": float(own.mean()), "sasrec-id/ndcg@10": float(ident.mean())},
                    "Fine-tune the item towers (mmsafe adapt) or fuse an ID embedding; check "
                    "monitoring.cold_start, where content models should win.",
                ))  # fmt: skip
        labels = ["model", *[p.rstrip("/") for p in runs if p]]
        plots = {
            "ndcg_vs_baselines": {
                "kind": "bar",
                "title": "NDCG@10: the model and its baselines",
                "labels": labels,
                "values": [metrics[f"{p}ndcg@10"].value for p in runs],
                "ylim": [0.0, 1.0],
            }
        }
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)
