"""``robustness.shilling``: how far do a few fake user profiles push an item up?

Fake profiles (:func:`~mmsafe.methods.shilling.push_profiles`) that follow real users' items
with a target are added to the users, and the recommender is retrained with the same recipe
on the poisoned histories. A retraining on the clean histories, with the same seed, is the
reference, so the uplift is the attack's and not retraining noise. Targets are drawn among the
less interacted half of the warm items. Reported per share of fake users: the targets' HR@10
among the real users (their histories excluded), its uplift over the clean retraining (a
paired CI over users x targets), and the real users' NDCG@10 (an attack that keeps it is
hard to notice).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.recommend import histories, interaction_counts, user_metrics
from mmsafe.methods.shilling import push_profiles, with_profiles
from mmsafe.metrics import mean_ci
from mmsafe.metrics.ranking import target_ranks


def share_name(share: float) -> str:
    """``share=1%`` for 0.01.

    Example:
        >>> share_name(0.01), share_name(0.025)
        ('share=1%', 'share=2.5%')
    """
    return f"share={100 * share:g}%"


@register_check
class ShillingCheck(Check):
    """Target HR@10 after retraining with injected fake profiles, against a clean retraining."""

    name = "robustness.shilling"
    pillar = "robustness"
    description = "fake user profiles (a push attack): target HR@10 uplift after retraining"
    kinds = ("recommender",)
    tasks = ("seqrec",)
    # by the last part of the name (``share=<p>%/uplift``): the shares are options
    higher_is_better = {"target_hr@10": False, "uplift": False, "ndcg@10": True}

    def __init__(
        self,
        shares: Sequence[float] = (0.01, 0.05),
        n_targets: int = 3,
        profile_length: int = 12,
        quick: bool = True,
        n_boot: int = 1000,
        min_uplift: float = 0.1,
    ) -> None:
        self.shares = tuple(float(s) for s in shares)
        if not self.shares or any(not 0 <= s <= 1 for s in self.shares):
            raise ValueError(f"shares must be fractions of the users in [0, 1], got {shares}")
        self.n_targets = int(n_targets)
        self.profile_length = int(profile_length)
        self.quick = quick
        self.n_boot = n_boot
        self.min_uplift = float(min_uplift)

    def _targets(self, ctx: AuditContext, counts: np.ndarray) -> np.ndarray:
        warm = np.flatnonzero(counts > 0)
        tail = warm[np.argsort(counts[warm], kind="stable")[: max(len(warm) // 2, 1)]]
        k = min(self.n_targets, len(tail))
        return np.sort(ctx.rng("targets").choice(tail, size=k, replace=False))

    def _retrain(self, ctx: AuditContext, data, seed: int):  # type: ignore[no-untyped-def]
        from mmsafe.models.seqrec import build_seqrec

        model = ctx.model
        return build_seqrec(
            items=model.cfg.items,  # type: ignore[attr-defined]
            encoder=getattr(model, "encoder", None),
            train_data=data,
            seed=seed,
            quick=self.quick,
            progress=False,
            name=model.name,  # type: ignore[attr-defined]
            engine=ctx.engine,
            modalities=model.cfg.modalities or None,  # type: ignore[attr-defined]
            save=False,
            device=str(ctx.engine.device),
        )

    def _hits(self, model, ctx: AuditContext, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
        """``(users x targets hits@10, per-user NDCG@10)`` of a retrained model on real users."""
        hist = histories(ctx.data)
        feats = model.item_features(ctx.engine, ctx.data.catalog)
        scores = model.scores(hist, model.item_table(feats))
        hits = np.stack([
            target_ranks(scores, np.full(len(hist), t), exclude=hist) <= 10 for t in targets
        ], axis=1).astype(np.float64)  # fmt: skip
        return hits, user_metrics(scores, ctx.data, (10,))["ndcg@10"]

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        data = ctx.data
        counts = interaction_counts(histories(data), len(data.classes))
        targets = self._targets(ctx, counts)
        seed = ctx.seed_for("retrain")
        with torch.random.fork_rng(devices=[]):
            clean_hits, clean_ndcg = self._hits(self._retrain(ctx, data, seed), ctx, targets)
        metrics = {
            "clean/target_hr@10": Metric(float(clean_hits.mean()),
                                         mean_ci(clean_hits.mean(1), self.n_boot, seed=ctx.seed)),
            "clean/ndcg@10": Metric(float(clean_ndcg.mean())),
        }  # fmt: skip
        findings, curve = [], [float(clean_hits.mean())]
        for share in self.shares:
            n_fake = int(round(share * len(data)))
            profiles = push_profiles(histories(data), targets, n_fake, self.profile_length,
                                     ctx.rng(f"profiles/{share}"))  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                model = self._retrain(ctx, with_profiles(data, profiles), seed)
            hits, ndcg = self._hits(model, ctx, targets)
            uplift = (hits - clean_hits).mean(axis=1)
            name = share_name(share)
            metrics[f"{name}/target_hr@10"] = Metric(float(hits.mean()))
            up_ci = mean_ci(uplift, self.n_boot, seed=ctx.seed)
            metrics[f"{name}/uplift"] = Metric(float(uplift.mean()), up_ci)
            metrics[f"{name}/ndcg@10"] = Metric(float(ndcg.mean()))
            curve.append(float(hits.mean()))
            up = metrics[f"{name}/uplift"]
            if up.ci is not None and up.ci[0] > self.min_uplift:
                findings.append(Finding(
                    "high" if share <= 0.01 else "medium",
                    f"{n_fake} fake profiles ({share:.0%} of the users) lift the target items' "
                    f"HR@10 from {clean_hits.mean():.3f} to {hits.mean():.3f}, while the real "
                    f"users' NDCG@10 moves from {clean_ndcg.mean():.3f} to {ndcg.mean():.3f}.",
                    {"share": share, "fake_users": n_fake, "targets": targets.tolist(),
                     "uplift": up.value, "ci": list(up.ci)},
                    "Detect and drop coordinated profiles before training (near-duplicate "
                    "sequences, new accounts concentrated on one item), cap each account's "
                    "influence, or train robustly (e.g. with a trimmed loss).",
                ))  # fmt: skip
        plots = {
            "uplift": {
                "kind": "line",
                "title": "Target items' HR@10 against the share of fake users",
                "xlabel": "share of fake users",
                "ylabel": "target HR@10",
                "series": [{"name": "targets", "x": [0.0, *self.shares], "y": curve}],
                "ylim": [0.0, 1.0],
            }
        }
        limits = {"retraining": f"the model's recipe re-run {'quick' if self.quick else 'full'}"
                                f"ly, {1 + len(self.shares)} times"}  # fmt: skip
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)
