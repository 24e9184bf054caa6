"""``performance.retrieval``: image-to-text and text-to-image recall@K, with CIs."""

from __future__ import annotations

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Metric
from mmsafe.checks.registry import register_check
from mmsafe.metrics import best_positive_rank, mean_ci

RECALL_KS = (1, 5, 10)


@register_check
class RetrievalPerformanceCheck(Check):
    """How well the model retrieves the matching caption (and image), with bootstrap 95% CIs."""

    name = "performance.retrieval"
    pillar = "performance"
    aliases = ("performance",)
    description = "retrieval R@1/5/10, image-to-text and text-to-image"
    tasks = ("retrieval",)
    higher_is_better = {f"{d}_R@{k}": True for d in ("i2t", "t2i") for k in RECALL_KS}

    def __init__(self, n_boot: int = 1000) -> None:
        self.n_boot = n_boot

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        out = ctx.outputs
        sim = out.logits.double().numpy()
        pos = out.positives if out.positives is not None else np.eye(len(sim), dtype=bool)
        metrics = {}
        for direction, s, p in (("i2t", sim, pos), ("t2i", sim.T, pos.T)):
            rank = best_positive_rank(s, p)
            for k in RECALL_KS:
                hits = (rank < k).astype(float)
                ci = mean_ci(hits, self.n_boot, seed=ctx.seed)
                metrics[f"{direction}_R@{k}"] = Metric(float(hits.mean()), ci)
        plots = {
            "recall_at_k": {
                "kind": "bar",
                "title": "Recall@K",
                "labels": list(metrics),
                "values": [m.value for m in metrics.values()],
                "ylim": [0.0, 1.0],
            }
        }
        return self.result(metrics=metrics, plots=plots)
