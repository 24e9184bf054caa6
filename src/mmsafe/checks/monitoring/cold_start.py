"""``monitoring.cold_start``: a recommender's quality on cold items against warm ones.

Cold items are those the histories (what the model trains on) hold at most
``max_interactions`` times. Users whose held-out next item is cold are scored apart from the
others: an ID-based model cannot rank an item it never saw, while an ID-free model reads the
item's content and should.
"""

from __future__ import annotations

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.recommend import cold_items, histories, user_metrics
from mmsafe.metrics import bootstrap_ci, mean_ci

MEASURES = ("hr@10", "ndcg@10")


def _gap(values: np.ndarray, cold: np.ndarray) -> float:
    if cold.all() or not cold.any():
        return float("nan")
    return float(values[~cold].mean() - values[cold].mean())


@register_check
class ColdStartCheck(Check):
    """HR@10 and NDCG@10 on users whose next item is cold, against warm, with the gap's CI."""

    name = "monitoring.cold_start"
    pillar = "monitoring"
    description = "recommender quality on cold-start items against warm ones"
    kinds = ("recommender",)
    tasks = ("seqrec",)
    higher_is_better = {
        **{f"{s}/{m}": True for s in ("cold", "warm") for m in MEASURES},
        **{f"gap/{m}": False for m in MEASURES},
        "cold/item_share": False,
        "cold/target_share": False,
    }

    def __init__(self, max_interactions: int = 2, n_boot: int = 1000,
                 max_gap: float = 0.1) -> None:  # fmt: skip
        self.max_interactions = int(max_interactions)
        self.n_boot = n_boot
        self.max_gap = float(max_gap)

    def _cold(self, ctx: AuditContext) -> np.ndarray:
        return cold_items(histories(ctx.data), len(ctx.data.classes), self.max_interactions)

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and not self._cold(ctx)[ctx.data.labels].any():
            reason = (f"no user's next item is cold (seen <= {self.max_interactions} times in "
                      "the histories)")  # fmt: skip
        return reason

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        cold_item = self._cold(ctx)
        cold = cold_item[ctx.data.labels]
        per_user = user_metrics(ctx.outputs.logits, ctx.data, (10,))
        metrics: dict[str, Metric] = {
            "cold/item_share": Metric(float(cold_item.mean())),
            "cold/target_share": Metric(float(cold.mean())),
        }
        for m in MEASURES:
            v = per_user[m]
            for name, rows in (("cold", cold), ("warm", ~cold)):
                part = v[rows]
                ci = mean_ci(part, self.n_boot, seed=ctx.seed) if len(part) else None
                metrics[f"{name}/{m}"] = Metric(float(part.mean()) if len(part) else np.nan, ci)
            gap_ci = bootstrap_ci(_gap, v, cold, n_boot=self.n_boot, seed=ctx.seed)
            metrics[f"gap/{m}"] = Metric(_gap(v, cold), gap_ci)
        findings = []
        gap = metrics["gap/ndcg@10"]
        if gap.ci is not None and gap.ci[0] > self.max_gap:
            severe = metrics["cold/hr@10"].value < 0.05
            findings.append(Finding(
                "high" if severe else "medium",
                f"Cold items are recommended far worse than warm ones: NDCG@10 "
                f"{metrics['cold/ndcg@10'].value:.3f} against {metrics['warm/ndcg@10'].value:.3f} "
                f"({int(cold.sum())} users whose next item is cold)."
                + (" The model all but never ranks a cold item in the top 10." if severe else ""),
                {"gap/ndcg@10": gap.value, "ci": list(gap.ci), "cold_users": int(cold.sum()),
                 "cold_items": int(cold_item.sum())},  # fmt: skip
                "Represent items by their content (an ID-free model such as mm-sasrec), or "
                "blend content into ID embeddings for items with few interactions.",
            ))  # fmt: skip
        plots = {
            "cold_vs_warm": {
                "kind": "bar",
                "title": "HR@10 and NDCG@10: cold against warm next items",
                "labels": [f"{s} {m}" for m in MEASURES for s in ("cold", "warm")],
                "values": [metrics[f"{s}/{m}"].value for m in MEASURES for s in ("cold", "warm")],
                "ylim": [0.0, 1.0],
            }
        }
        limits = {"cold items": f"seen at most {self.max_interactions} times in the histories"}
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)
