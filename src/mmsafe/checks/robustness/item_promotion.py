"""``robustness.item_promotion``: can a new item's image buy it a place in everyone's top 10?

A white-box L-inf PGD on the pixels of a **cold** item (one the histories hold at most
``max_interactions`` times: a new upload, whose image its seller controls) that maximises its
rank for every user (:mod:`mmsafe.methods.attacks.promotion`). The attacked image goes through
the recommender's encoder into the item's image feature, and every user is ranked again
through ``task.logits`` (full ranking, each user's history excluded). Reported, as means over
the attacked items (see ``docs/item_promotion.md``):

* ``clean/target_hr@10``, ``clean/target_mean_rank``: how the targets rank before the attack;
* per budget ``eps=<k>/255/target_hr@10``, ``.../target_mean_rank`` and ``.../rank_uplift``
  (clean rank minus attacked rank, per user and item);
* the control ``random/eps=<k>/255/target_hr@10`` (and ``.../target_mean_rank``): a random
  +-eps perturbation at the largest budget, which should not promote;
* a line plot of the targets' HR@10 against eps.

Confidence intervals resample the users and the attacked items independently (a crossed
bootstrap of the ``users x targets`` matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.attacks.promotion import (
    crossed_mean_ci,
    eps_name,
    exclusion_mask,
    item_scorer,
    promote_item,
    random_sign,
    replace_item,
)
from mmsafe.methods.recommend import cold_items, histories
from mmsafe.metrics.ranking import hit_rate, target_ranks

K = 10
FINDING_EPS = 8 / 255
"""Findings read the budgets up to this one (a change a person would hardly see)."""
HIGH_HR, MEDIUM_HR = 0.5, 0.2
REMEDIATION = (
    "Adversarially train the item (image) tower or fine-tune the encoder robustly; purify item "
    "images on upload (JPEG re-encoding, resizing, denoising) before they are embedded; "
    "rate-limit how fast a new item's exposure may grow and cap it until interactions confirm "
    "it; review new items' images, e.g. flag those whose embedding moves far under small "
    "perturbations."
)


@dataclass
class PromotionRun:
    """What the attack produced, before it is summarised.

    Attributes:
        targets: the attacked (cold) items, sorted.
        users: the rows whose scores the attack objective read.
        clean_pixels: ``{item: (1, 3, H, W)}`` clean pixels.
        pixels: ``{(item, eps): attacked pixels}``; ``(item, "random")`` for the control.
        ranks: ``{"clean" | eps | "random": (N_users, n_targets) expected ranks}``.
        hits: the same keys: ``(N_users, n_targets)`` expected HR@10.
    """

    targets: np.ndarray
    users: np.ndarray
    clean_pixels: dict[int, Tensor] = field(default_factory=dict)
    pixels: dict[tuple[int, Any], Tensor] = field(default_factory=dict)
    ranks: dict[Any, np.ndarray] = field(default_factory=dict)
    hits: dict[Any, np.ndarray] = field(default_factory=dict)


@register_check
class ItemPromotionCheck(Check):
    """PGD on a cold item's image to push it up every user's ranking; HR@10 and rank uplift.

    Args:
        eps: L-inf budgets on ``[0, 1]`` pixels (``0`` allowed: it must change nothing).
        steps: PGD iterations per budget.
        n_targets: cold items attacked (drawn from the check's ``targets`` stream).
        max_interactions: an item the histories hold at most this many times is cold.
        n_boot: bootstrap resamples (users and targets, crossed).
        max_users: users the attack objective reads (a seeded sample; ``None``: all). Every
            user is evaluated.
    """

    name = "robustness.item_promotion"
    pillar = "robustness"
    kinds = ("recommender",)
    tasks = ("seqrec",)
    description = "PGD on a cold item's image (Linf) to promote it into users' top 10; HR@10"
    higher_is_better = {
        "target_hr@10": False,
        "target_mean_rank": True,
        "rank_uplift": False,
    }

    def __init__(
        self,
        eps: Sequence[float] = (2 / 255, 4 / 255, 8 / 255, 16 / 255),
        steps: int = 10,
        n_targets: int = 5,
        max_interactions: int = 2,
        n_boot: int = 1000,
        max_users: int | None = None,
    ) -> None:
        self.eps = tuple(sorted({float(e) for e in eps}))
        if not self.eps or min(self.eps) < 0:
            raise ValueError(f"eps must be one or more budgets >= 0, got {list(eps)}")
        if len({eps_name(e) for e in self.eps}) < len(self.eps):
            raise ValueError(f"eps budgets must differ in their names, got {list(eps)}")
        if steps < 1 or n_targets < 1 or n_boot < 1 or max_interactions < 0:
            raise ValueError("steps, n_targets and n_boot must be >= 1, max_interactions >= 0")
        if max_users is not None and max_users < 1:
            raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
        self.steps = int(steps)
        self.n_targets = int(n_targets)
        self.max_interactions = int(max_interactions)
        self.n_boot = int(n_boot)
        self.max_users = max_users

    # ------------------------------------------------------------------ scope
    def _cold(self, ctx: AuditContext) -> np.ndarray:
        return np.flatnonzero(
            cold_items(histories(ctx.data), len(ctx.data.classes), self.max_interactions)
        )

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and "item_pixels" not in ctx.model.capabilities():
            reason = (f"{ctx.model.name} does not read item images through an encoder (no "
                      "'item_pixels' capability): there are no pixels to attack")  # fmt: skip
        if reason is None and not len(self._cold(ctx)):
            reason = (f"no cold items (seen <= {self.max_interactions} times in the "
                      "histories) to promote")  # fmt: skip
        return reason

    # ------------------------------------------------------------------ attack
    def promote(self, ctx: AuditContext) -> PromotionRun:
        """Attack every target at every budget, add the control, and rank all users again."""
        model = ctx.model
        encoder = model.encoder  # type: ignore[attr-defined]
        device = ctx.engine.device
        model.to(device).eval()
        encoder.to(device).eval()
        hist = histories(ctx.data)
        n_items = len(ctx.data.classes)
        cold = self._cold(ctx)
        pick = ctx.rng("targets").choice(len(cold), size=min(self.n_targets, len(cold)),
                                         replace=False)  # fmt: skip
        users, _ = ctx.sample(np.arange(len(hist)), self.max_users, "users", "attack users")
        run = PromotionRun(targets=np.sort(cold[pick]), users=users)
        features = dict(ctx.outputs.embeddings)
        clean_scores = ctx.outputs.logits
        exclude = exclusion_mask([hist[u] for u in users], n_items).to(device)
        gen = ctx.torch_generator("random-signs")
        catalog = ctx.data.catalog
        assert catalog is not None
        for t in run.targets.tolist():
            raw = encoder.preprocess("image", [catalog.modalities["image"][t]])
            x = raw.to(device)
            run.clean_pixels[t] = x
            scorer = item_scorer(model, ctx.task, features, t, users, hist, clean_scores)
            for e in self.eps:
                run.pixels[(t, e)] = promote_item(scorer, x, t, exclude, e, self.steps, K)
            run.pixels[(t, "random")] = random_sign(x, self.eps[-1], gen)
        clean = [_rank(clean_scores, t, hist) for t in run.targets.tolist()]
        run.ranks["clean"] = np.concatenate([c[0] for c in clean], axis=1)
        run.hits["clean"] = np.concatenate([c[1] for c in clean], axis=1)
        for key in (*self.eps, "random"):
            cols = [
                _rank(_scores(ctx, features, t, run.clean_pixels[t], run.pixels[(t, key)]), t, hist)
                for t in run.targets.tolist()
            ]
            run.ranks[key] = np.concatenate([c[0] for c in cols], axis=1)
            run.hits[key] = np.concatenate([c[1] for c in cols], axis=1)
        return run

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        # attack steps and the final encodes of attacked images cannot be cached: counted apart
        with ctx.engine.counting(ctx.model.encoder, "attack_iterations"):  # type: ignore[attr-defined]
            promoted = self.promote(ctx)
        return self.report(ctx, promoted)

    # ------------------------------------------------------------------ report
    def report(self, ctx: AuditContext, run: PromotionRun) -> CheckResult:
        """Metrics, findings and the plot of a :class:`PromotionRun`."""

        def metric(values: np.ndarray) -> Metric:
            return Metric(float(values.mean()), crossed_mean_ci(values, self.n_boot, seed=ctx.seed))

        metrics = {
            "clean/target_hr@10": metric(run.hits["clean"]),
            "clean/target_mean_rank": metric(run.ranks["clean"]),
        }
        for e in self.eps:
            key = f"eps={eps_name(e)}"
            metrics[f"{key}/target_hr@10"] = metric(run.hits[e])
            metrics[f"{key}/target_mean_rank"] = metric(run.ranks[e])
            metrics[f"{key}/rank_uplift"] = metric(run.ranks["clean"] - run.ranks[e])
        control = f"random/eps={eps_name(self.eps[-1])}"
        metrics[f"{control}/target_hr@10"] = metric(run.hits["random"])
        metrics[f"{control}/target_mean_rank"] = metric(run.ranks["random"])
        findings = [self._setup_finding(ctx, run), *self._findings(run, metrics)]
        hr = [metrics["clean/target_hr@10"].value]
        hr += [metrics[f"eps={eps_name(e)}/target_hr@10"].value for e in self.eps]
        plots = {
            "target_hr_vs_eps": {
                "kind": "line",
                "title": "Attacked cold items' HR@10 vs the image budget (eps 0 = clean)",
                "xlabel": "eps (L-inf, x 1/255)",
                "ylabel": "target HR@10 (mean over items)",
                "series": [
                    {"name": "PGD", "x": [0.0, *(255 * e for e in self.eps)], "y": hr},
                    {
                        "name": "random sign",
                        "x": [0.0, 255 * self.eps[-1]],
                        "y": [hr[0], metrics[f"{control}/target_hr@10"].value],
                    },
                ],
                "ylim": [0.0, 1.0],
            }
        }
        n_cold = len(self._cold(ctx))
        limits = {"attacked items": f"{len(run.targets)} of {n_cold} cold items, sampled uniformly"}
        if len(run.users) < len(ctx.data):
            limits["attack users"] = (
                f"the objective read {len(run.users)} of {len(ctx.data)} users (sampled "
                "uniformly); every user is evaluated"
            )
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)

    def _setup_finding(self, ctx: AuditContext, run: PromotionRun) -> Finding:
        per_target = {f"eps={eps_name(e)}": _per_target(run.hits[e]) for e in self.eps}
        return Finding(
            "info",
            f"Attacked the images of {len(run.targets)} cold items (seen <= "
            f"{self.max_interactions} times in the histories) with white-box L-inf PGD "
            f"({self.steps} steps, pixels in [0, 1]) to enter the top {K} of {len(run.users)} "
            f"users, and ranked all {len(ctx.data)} users again. See docs/item_promotion.md.",
            {
                "targets": run.targets.tolist(),
                "eps": [eps_name(e) for e in self.eps],
                "attack_users": len(run.users),
                "per_target_hr@10": {"clean": _per_target(run.hits["clean"]), **per_target},
            },
        )

    def _findings(self, run: PromotionRun, metrics: dict[str, Metric]) -> list[Finding]:
        small = [e for e in self.eps if 0 < e <= FINDING_EPS + 1e-12]
        clean = metrics["clean/target_hr@10"].value
        for level, threshold in (("high", HIGH_HR), ("medium", MEDIUM_HR)):
            reached = [e for e in small if metrics[f"eps={eps_name(e)}/target_hr@10"].value
                       >= threshold]  # fmt: skip
            if not reached:
                continue
            e = reached[0]
            m = metrics[f"eps={eps_name(e)}/target_hr@10"]
            uplift = metrics[f"eps={eps_name(e)}/rank_uplift"].value
            return [Finding(
                level,  # type: ignore[arg-type]
                f"An imperceptible change to a new item's image (L-inf eps {eps_name(e)}) "
                f"lifts it into the top {K} of {m.value:.0%} of users (from {clean:.0%}; mean "
                f"rank up {uplift:.1f} places): the ranking of new items can be bought by "
                f"whoever uploads their images.",
                {"eps": e, "clean_hr@10": clean, "attacked_hr@10": m.value,
                 "ci": None if m.ci is None else list(m.ci), "rank_uplift": uplift,
                 "threshold": threshold, "targets": run.targets.tolist()},  # fmt: skip
                REMEDIATION,
            )]  # fmt: skip
        return []


def _per_target(hits: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in hits.mean(axis=0)]


def _scores(
    ctx: AuditContext, features: dict[str, Tensor], item: int, clean: Tensor, pixels: Tensor
) -> Tensor:
    """``(N, I)`` scores of every user with ``item``'s image feature from ``pixels``.

    Unchanged pixels keep the item's cached clean feature (so ``eps = 0`` reproduces the clean
    scores bit for bit, whatever batch the engine embedded it in).
    """
    if torch.equal(pixels, clean):
        edited = features
    else:
        with torch.no_grad():
            row = ctx.model.encoder.encode({"image": pixels})["image"][0]  # type: ignore[attr-defined]
        edited = replace_item(features, item, "image", row.float().cpu())
    with torch.inference_mode():
        return ctx.task.logits(edited).float().cpu()


def _rank(scores: Tensor, item: int, hist: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 1)`` expected rank and HR@10 of ``item`` for each user (full ranking, tie-aware)."""
    ranks, ties = target_ranks(scores, np.full(len(hist), item), exclude=hist, return_ties=True)
    return ranks[:, None], hit_rate(ranks, K, ties=ties)[:, None]
