"""``controllability.rec_fairness``: does a recommender treat user groups and item groups alike?

Three parts, each with bootstrap 95% CIs over users (see ``docs/rec_fairness.md``):

1. **user groups** (the data's ``group`` column, a sensitive attribute): NDCG@10 and HR@10 per
   group, and the gap between the best and the worst group;
2. **item exposure**: position-discounted exposure of each user's top-10 list summed per item;
   its Gini over items, the catalogue coverage, and how each item group's exposure share
   compares with its share of the catalogue (``catalog.groups``, an item meta attribute, or
   popularity head/tail);
3. **leakage** (FMMRec-style): the cross-validated AUC of a logistic probe predicting the
   user's group from the user representation, beside the same probe on permuted groups.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.rec_fairness import (
    balanced_permutation,
    exposure_bootstrap,
    exposure_summary,
    group_gap_bootstrap,
    macro_auc,
    macro_auc_bootstrap,
    macro_auc_resamples,
    popularity_item_groups,
    probe_probabilities,
    top_k_items,
    user_exposure,
)
from mmsafe.methods.recommend import histories, interaction_counts, user_metrics
from mmsafe.metrics.bootstrap import percentile_interval
from mmsafe.metrics.fairness import encode_groups

K = 10
MEASURES = (f"ndcg@{K}", f"hr@{K}")
POPULARITY = "popularity"


def user_representations(model: Any, sequences: list[np.ndarray], features: Any) -> np.ndarray:
    """``(N, H)`` the recommender's user states: its last hidden state over each history.

    ``model.user_states(pad_histories(sequences), model.item_table(features))``, batched, in
    eval mode and without gradients.
    """
    from mmsafe.models.seqrec import pad_histories

    was = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            table = model.item_table(features)
            for s in range(0, len(sequences), 1024):
                padded = pad_histories(sequences[s : s + 1024], model.cfg.max_len)
                out.append(model.user_states(padded, table).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _f(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _ci(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


@register_check
class RecFairnessCheck(Check):
    """User-group quality gaps, item-group exposure and sensitive-attribute leakage.

    Args:
        n_boot: bootstrap resamples (over users).
        item_attribute: the item groups for exposure: ``None`` reads ``catalog.groups`` (and
            falls back to popularity head/tail when the catalog has none), ``"popularity"``
            always uses head/tail, any other name an item meta key (e.g. ``favoured_by_b``).
        head_share: the share of items, by interaction count in the histories, that forms the
            ``head`` when item groups come from popularity.
        min_group_size: user groups with fewer users are left out (and named in a finding).
        n_splits: folds of the leakage probe's cross-validation.
        max_probe_users: the probe reads at most this many users (sampled; ``None``: all).
        n_permutations: permutations of the groups behind ``leakage/auc_permuted`` (the mean
            AUC of the probe refitted on each).
        max_gap: a user-group NDCG@10 gap above this, with a CI above 0, raises a finding.
        min_exposure_ratio: an exposure ratio below this raises a finding.
        exposure_reference: what a group's exposure is compared with: ``interactions`` (its
            share of the histories' interactions: exposure in proportion to observed demand)
            or ``catalogue`` (its share of the items: a stricter, demand-blind parity).
        leak_auc: a leakage AUC whose CI lies above this raises a ``medium`` finding.
        high_leak_auc: ... above this, ``high``.
    """

    name = "controllability.rec_fairness"
    pillar = "controllability"
    kinds = ("recommender",)
    tasks = ("seqrec",)
    requires = ("groups",)
    description = (
        "recommender fairness: NDCG/HR gap across user groups, item-group exposure (Gini, "
        "coverage, exposure vs catalogue share), user-attribute leakage (probe AUC)"
    )
    higher_is_better = {
        f"users/ndcg@{K}_gap": False,
        f"users/ndcg@{K}_min_group": True,
        f"users/hr@{K}_gap": False,
        f"users/hr@{K}_min_group": True,
        "items/exposure_ratio": True,
        "items/exposure_gini": False,
        f"items/coverage@{K}": True,
        "leakage/auc": False,
        "leakage/auc_permuted": False,
    }

    def __init__(
        self,
        n_boot: int = 1000,
        item_attribute: str | None = None,
        head_share: float = 0.2,
        min_group_size: int = 20,
        n_splits: int = 5,
        max_probe_users: int | None = 20000,
        n_permutations: int = 5,
        max_gap: float = 0.05,
        min_exposure_ratio: float = 0.5,
        exposure_reference: str = "interactions",
        leak_auc: float = 0.6,
        high_leak_auc: float = 0.75,
    ) -> None:
        if min_group_size < n_splits:
            raise ValueError(f"min_group_size ({min_group_size}) must be >= n_splits ({n_splits})")
        self.n_boot = n_boot
        self.item_attribute = item_attribute
        self.head_share = float(head_share)
        self.min_group_size = int(min_group_size)
        self.n_splits = int(n_splits)
        self.max_probe_users = max_probe_users
        self.n_permutations = max(1, int(n_permutations))
        self.max_gap = float(max_gap)
        self.min_exposure_ratio = float(min_exposure_ratio)
        if exposure_reference not in ("interactions", "catalogue"):
            raise ValueError(
                f"exposure_reference must be 'interactions' or 'catalogue', "
                f"got {exposure_reference!r}"
            )
        self.exposure_reference = exposure_reference
        self.leak_auc = float(leak_auc)
        self.high_leak_auc = float(high_leak_auc)

    # ------------------------------------------------------------------ groups
    def _user_groups(self, ctx: AuditContext) -> tuple[np.ndarray, dict[str, int]]:
        """Rows kept (groups of at least ``min_group_size`` users) and every group's size."""
        groups = np.asarray([str(g) for g in ctx.data.groups or []])
        names, counts = np.unique(groups, return_counts=True)
        sizes = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
        small = [n for n, c in sizes.items() if c < self.min_group_size]
        return ~np.isin(groups, small), sizes

    def _item_groups(self, ctx: AuditContext) -> tuple[list[str], str, dict[str, str]]:
        """One group per item, where they come from, and the card's ``limits``."""
        catalog = ctx.data.catalog
        assert catalog is not None
        n_items = len(catalog)
        popularity = (
            f"popularity: the top {self.head_share:.0%} of items by interaction count in the "
            "histories are 'head', the rest 'tail'"
        )
        attr = self.item_attribute
        if attr == POPULARITY or (attr is None and catalog.groups is None):
            groups = popularity_item_groups(histories(ctx.data), n_items, self.head_share)
            fallback = f"the catalog has no item groups; fell back to {popularity}"
            limits = {} if attr == POPULARITY else {"item groups": fallback}
            return groups, popularity, limits
        if attr is None:
            return [str(g) for g in catalog.groups or []], "the catalog's item groups", {}
        return [str(m.get(attr, "?")) for m in catalog.meta], f"item attribute {attr!r}", {}

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        if not hasattr(ctx.model, "user_states") or not hasattr(ctx.model, "item_table"):
            return "the recommender exposes no user representation (user_states, item_table)"
        keep, sizes = self._user_groups(ctx)
        if len({str(g) for g, k in zip(ctx.data.groups or [], keep, strict=True) if k}) < 2:
            return f"needs at least 2 user groups with >= {self.min_group_size} users ({sizes})"
        attr = self.item_attribute
        meta = ctx.data.catalog.meta if ctx.data.catalog is not None else []
        if attr not in (None, POPULARITY) and not (
            len(meta) == len(ctx.data.classes) and all(attr in m for m in meta)
        ):
            return f"item attribute {attr!r} is not in every item's meta"
        return None

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        keep, sizes = self._user_groups(ctx)
        data = ctx.data.subset(keep) if not keep.all() else ctx.data
        user_groups = np.asarray([str(g) for g in ctx.data.groups or []])[keep]
        codes, names = encode_groups(user_groups)
        scores = ctx.outputs.logits[torch.as_tensor(keep)] if not keep.all() else ctx.outputs.logits
        metrics: dict[str, Metric] = {}
        findings: list[Finding] = []
        plots: dict[str, dict[str, Any]] = {}
        limits: dict[str, str] = {}
        small = {n: c for n, c in sizes.items() if n not in names}
        findings.append(Finding(
            "info",
            f"User groups: {', '.join(f'{n} ({sizes[n]})' for n in names)}"
            + (f"; left out (fewer than {self.min_group_size} users): "
               + ", ".join(f"{n} ({c})" for n, c in small.items()) if small else "")
            + ".",
            {"user_groups": {n: sizes[n] for n in names}, "left_out": small},
        ))  # fmt: skip

        self._users(ctx, data, scores, codes, names, metrics, findings, plots)
        limits.update(self._items(ctx, data, scores, metrics, findings, plots))
        limits.update(self._leakage(ctx, data, codes, names, metrics, findings))
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)

    def _users(
        self,
        ctx: AuditContext,
        data: Any,
        scores: Any,
        codes: np.ndarray,
        names: list[str],
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> None:
        per_user = user_metrics(scores, data, (K,))
        stats = {}
        for m in MEASURES:
            s = group_gap_bootstrap(per_user[m], codes, len(names), self.n_boot, seed=ctx.seed)
            stats[m] = s
            metrics[f"users/{m}_gap"] = Metric(s["gap"], s["gap_ci"])
            metrics[f"users/{m}_min_group"] = Metric(s["min"], s["min_ci"])
        nd = stats[f"ndcg@{K}"]
        per_group = {
            n: {m: {"value": float(stats[m]["means"][g]), "ci": list(stats[m]["means_ci"][g])}
                for m in MEASURES} for g, n in enumerate(names)
        }  # fmt: skip
        best, worst = names[nd["best"]], names[nd["worst"]]
        gap = metrics[f"users/ndcg@{K}_gap"]
        if gap.value > self.max_gap and gap.ci is not None and gap.ci[0] > 0:
            findings.append(Finding(
                "medium",
                "Recommendation quality differs across user groups: NDCG@10 "
                f"{nd['means'][nd['best']]:.3f} for {best!r} against "
                f"{nd['means'][nd['worst']]:.3f} for {worst!r} (gap {gap.value:.3f}, "
                f"95% CI {_ci(gap.ci)}, above {self.max_gap:g}).",
                {"gap": gap.value, "ci": list(gap.ci), "best": best, "worst": worst,
                 "per_group": per_group},
                "Look at what the worst-served group interacts with (its items may be colder, "
                "rarer or worse described); reweight its users in training, or re-rank for "
                "calibrated recommendation (Steck, 2018) so each user's list matches the "
                "topics of its history; re-audit afterwards.",
            ))  # fmt: skip
        else:
            findings.append(Finding(
                "info",
                "NDCG@10 per user group: " + ", ".join(
                    f"{n} {nd['means'][g]:.3f}" for g, n in enumerate(names))
                + f" (gap {gap.value:.3f}, 95% CI {_ci(gap.ci)}).",
                {"per_group": per_group},
            ))  # fmt: skip
        plots["ndcg_per_user_group"] = {
            "kind": "bar",
            "title": "NDCG@10 per user group",
            "labels": list(names),
            "values": [_f(v) for v in nd["means"]],
            "reference": float(per_user[f"ndcg@{K}"].mean()),
            "reference_label": "all users",
            "ylim": [0.0, 1.0],
        }
        plots["user_groups"] = {
            "kind": "table",
            "title": "Per user group: users, NDCG@10 and HR@10 (95% CI)",
            "columns": ["group", "users", "NDCG@10", "CI", "HR@10", "CI"],
            "rows": [
                [n, int((codes == g).sum()),
                 _f(stats[MEASURES[0]]["means"][g]), _ci(stats[MEASURES[0]]["means_ci"][g]),
                 _f(stats[MEASURES[1]]["means"][g]), _ci(stats[MEASURES[1]]["means_ci"][g])]
                for g, n in enumerate(names)
            ],
        }  # fmt: skip

    def _items(
        self,
        ctx: AuditContext,
        data: Any,
        scores: Any,
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> dict[str, str]:
        item_groups, source, limits = self._item_groups(ctx)
        item_codes, item_names = encode_groups(item_groups)
        n_items = len(item_groups)
        top = top_k_items(scores, histories(data), K)
        exposure = user_exposure(top, n_items)
        weights = None
        if self.exposure_reference == "interactions":
            weights = interaction_counts(histories(data), n_items)
        summary = exposure_summary(np.asarray(exposure.sum(axis=0)).ravel(), item_codes,
                                   len(item_names), weights)  # fmt: skip
        cis = exposure_bootstrap(exposure, item_codes, len(item_names), self.n_boot,
                                 seed=ctx.seed, item_weights=weights)  # fmt: skip
        ref_name = ("their share of the histories' interactions"
                    if weights is not None else "their share of the catalogue")  # fmt: skip
        metrics["items/exposure_ratio"] = Metric(summary["ratio"], cis["ratio"])
        metrics["items/exposure_gini"] = Metric(summary["gini"], cis["gini"])
        metrics[f"items/coverage@{K}"] = Metric(summary["coverage"])  # no CI: see limits
        # the share of the held-out next items in each group: what exposure by merit would give
        labels = np.bincount(item_codes[data.labels], minlength=len(item_names)) / len(data)
        per_group = {
            n: {"items": int((item_codes == g).sum()),
                "catalog_share": float(summary["catalog_share"][g]),
                "reference_share": float(summary["reference_share"][g]),
                "exposure_share": _f(summary["share"][g]),
                "exposure_share_ci": list(cis["share"][g]),
                "next_item_share": float(labels[g])}
            for g, n in enumerate(item_names)
        }  # fmt: skip
        ratio = summary["ratio"]
        if len(item_names) < 2:
            findings.append(Finding(
                "info", f"Item exposure: one item group only ({source}); the ratio is 1.",
                {"item_groups": per_group},
            ))  # fmt: skip
        elif np.isfinite(ratio) and ratio < self.min_exposure_ratio:
            rel = summary["share"] / summary["reference_share"]
            lo, hi = item_names[int(np.nanargmin(rel))], item_names[int(np.nanargmax(rel))]
            findings.append(Finding(
                "medium",
                f"Exposure is far from proportional to {ref_name} ({source}): {lo!r} items "
                f"get {summary['share'][int(np.nanargmin(rel))]:.1%} of the top-10 exposure for "
                f"{summary['reference_share'][int(np.nanargmin(rel))]:.1%}, "
                f"{hi!r} items {summary['share'][int(np.nanargmax(rel))]:.1%} for "
                f"{summary['reference_share'][int(np.nanargmax(rel))]:.1%} (ratio {ratio:.3f}, "
                f"95% CI {_ci(cis['ratio'])}, below {self.min_exposure_ratio:g}). The users' "
                f"held-out next items are {labels[int(np.nanargmin(rel))]:.1%} {lo!r} items.",
                {"ratio": ratio, "ci": list(cis["ratio"]), "source": source,
                 "gini": summary["gini"], "coverage@10": summary["coverage"],
                 "item_groups": per_group},
                "Re-rank for fair exposure (e.g. exposure-aware re-ranking with an amortised "
                "exposure budget per item group, Singh & Joachims 2018; FA*IR), or calibrated "
                "recommendation; debias popularity in training (inverse-propensity weighting); "
                "re-audit with the quality cost beside the exposure gain.",
            ))  # fmt: skip
        else:
            findings.append(Finding(
                "info",
                f"Item exposure ({source}): ratio {ratio:.3f}, Gini {summary['gini']:.3f}, "
                f"coverage@10 {summary['coverage']:.3f}.",
                {"item_groups": per_group},
            ))  # fmt: skip
        plots["exposure_vs_catalog_share"] = {
            "kind": "bar",
            "title": "Top-10 exposure share against catalogue share (and next-item share) per "
                     f"item group ({source})",
            "labels": [f"{n} {w}" for n in item_names
                       for w in ("exposure", "catalogue", "next items")],
            "values": [_f(v) for g in range(len(item_names))
                       for v in (summary["share"][g], summary["catalog_share"][g], labels[g])],
            "ylim": [0.0, 1.0],
        }  # fmt: skip
        limits["exposure"] = (
            "each user's top-10 with its history excluded, ties to the lower item position; "
            "exposure 1/log2(1 + rank)"
        )
        limits[f"coverage@{K}"] = (
            "no CI: a bootstrap resample repeats users, so it covers fewer items and the whole "
            "percentile interval would sit below the estimate"
        )
        return limits

    def _leakage(
        self,
        ctx: AuditContext,
        data: Any,
        codes: np.ndarray,
        names: list[str],
        metrics: dict[str, Metric],
        findings: list[Finding],
    ) -> dict[str, str]:
        rows, limits = ctx.sample(np.arange(len(codes)), self.max_probe_users, "probe",
                                  "leakage probe")  # fmt: skip
        seqs = histories(data)
        states = user_representations(ctx.model, [seqs[i] for i in rows], ctx.outputs.embeddings)
        y = codes[rows]
        seed = ctx.seed_for("probe-folds")
        probs = probe_probabilities(states, y, seed=seed, n_splits=self.n_splits)
        auc = Metric(macro_auc(probs, y), macro_auc_bootstrap(probs, y, self.n_boot,
                                                              seed=ctx.seed))  # fmt: skip
        # the chance control: the same probe on permuted groups (balanced against the true
        # ones), averaged over permutations: one permutation's AUC scatters by ~0.7 / sqrt(N)
        rng = ctx.rng("permute")
        values, resamples = [], []
        for _ in range(self.n_permutations):
            permuted = balanced_permutation(y, rng)
            p = probe_probabilities(states, permuted, seed=seed, n_splits=self.n_splits)
            values.append(macro_auc(p, permuted))
            resamples.append(macro_auc_resamples(p, permuted, self.n_boot, seed=ctx.seed))
        with np.errstate(invalid="ignore"):
            pooled = np.mean(resamples, axis=0)
        perm = Metric(float(np.mean(values)), percentile_interval(pooled, 0.95))
        metrics["leakage/auc"] = auc
        metrics["leakage/auc_permuted"] = perm
        lo = auc.ci[0] if auc.ci is not None else float("nan")
        evidence = {"auc": auc.value, "ci": list(auc.ci or ()), "auc_permuted": perm.value,
                    "ci_permuted": list(perm.ci or ()), "users": int(len(rows)),
                    "groups": list(names)}  # fmt: skip
        if np.isfinite(lo) and lo > self.leak_auc:
            findings.append(Finding(
                "high" if lo > self.high_leak_auc else "medium",
                f"The user representation encodes the sensitive attribute: a linear probe "
                f"predicts the user's group with AUC {auc.value:.3f} (95% CI {_ci(auc.ci)}; "
                f"{perm.value:.3f} on permuted groups, the chance control).",
                evidence,
                "Debias the user representation: adversarial training against an attribute "
                "discriminator on the user state, or filter the attribute out of each "
                "modality's item features (FMMRec, Chen et al. 2024); re-audit leakage and "
                "NDCG together (the quality cost).",
            ))  # fmt: skip
        else:
            findings.append(Finding(
                "info",
                f"Attribute leakage: probe AUC {auc.value:.3f} (95% CI {_ci(auc.ci)}), "
                f"{perm.value:.3f} on permuted groups.",
                evidence,
            ))  # fmt: skip
        if perm.ci is not None and np.isfinite(perm.ci[0]) and perm.ci[0] > 0.55:
            findings.append(Finding(
                "low",
                f"The probe's chance control is above chance (AUC {perm.value:.3f} on permuted "
                "groups): the leakage figure is not to be trusted.",
                {"auc_permuted": perm.value, "ci": list(perm.ci)},
                "Audit more users, or fewer folds; report the issue.",
            ))  # fmt: skip
        limits["leakage probe folds"] = (
            f"{self.n_splits}-fold stratified cross-validation; the AUC's CI resamples the "
            "cross-validated probabilities (the probe is not refitted)"
        )
        return limits
