"""``robustness.modality``: how much a fusion model depends on each modality.

For every modality ``m`` of a fusion task, three perturbations of ``m``'s embeddings alone (the
other modalities stay clean), each followed by the task's logits:

* **drop**: replace ``m`` by a constant, the mean embedding (of the ``train`` split when there
  is one, else of the evaluated rows) or zeros (``drop="zeros"``);
* **swap**: give each row the ``m`` of another row with a different label (a mismatched pair);
  the *follow rate* is how often the prediction then follows the partner's label;
* **noise**: add isotropic Gaussian noise of norm about ``noise_scale`` (embeddings have norm
  1) and renormalise.

The accuracy drop of each is reported with a bootstrap CI. The *reliance share* of ``m`` is
its swap cost over the sum of every modality's swap cost (negative costs count as 0): when the
modalities disagree, whose side does the model take? A share of at least
``reliance_threshold`` says the model answers from ``m`` and overrides the others. The
drop-ablation shares are
reported too (``drop_share/<m>``); they measure necessity, not dominance, and undervalue a
modality whose information the other one repeats (removing it then costs nothing, although a
conflicting value of it still changes the answer).

Over-reliance on ``m`` is flagged when two things hold: ``m`` dominates the conflicts (its
reliance share is at least ``reliance_threshold`` and its swap cost at least ``min_drop``),
and the other modalities add nothing (removing each of them costs at most
``redundancy_tolerance`` accuracy). A model that sides with ``m`` but still needs the others
is not flagged.
See ``docs/robustness.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.metrics import mean_ci
from mmsafe.metrics.bootstrap import share_ci

DropMode = Literal["mean", "zeros"]
PERTURBATIONS = ("drop", "swap", "noise")
REMEDIATION = (
    "Check the weaker modality's data for leakage of the label into the dominant one (e.g. "
    "captions that name the class), retrain the head with modality dropout "
    "(mmsafe.models.heads.fit_fusion_head(modality_dropout=0.3)), and re-audit."
)


# --------------------------------------------------------------------------- pure helpers


def mismatched_partners(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each row, the index of a random other row with a different label.

    Rows whose label no other row differs from get a random other row (any label).

    Example:
        >>> y = np.array([0, 0, 1, 1, 2])
        >>> p = mismatched_partners(y, seed=0)
        >>> bool((y[p] != y).all())
        True
    """
    y = np.asarray(labels)
    n = len(y)
    if n < 2:
        raise ValueError("swapping a modality needs at least two rows")
    rng = np.random.default_rng(int(seed))
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        pool = np.flatnonzero(y != y[i])
        if pool.size == 0:
            pool = np.delete(np.arange(n), i)
        out[i] = pool[rng.integers(pool.size)]
    return out


def embedding_noise(x: Tensor, scale: float, seed: int) -> Tensor:
    """``normalise(x + scale * z / sqrt(D))`` with ``z ~ N(0, I)``: noise of norm about ``scale``.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
        >>> y = embedding_noise(x, 0.5, seed=0)
        >>> y.shape, bool(torch.allclose(y.norm(dim=-1), torch.ones(4)))
        (torch.Size([4, 16]), True)
    """
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(tuple(x.shape), generator=gen).to(x.device, x.dtype)
    return torch.nn.functional.normalize(x + scale * z / math.sqrt(x.shape[-1]), dim=-1)


def reliance_shares(drops: Mapping[str, float]) -> dict[str, float]:
    """Each modality's share of the total accuracy cost of perturbing it (swap or drop).

    Negative costs (the perturbation helps) count as 0; all shares are NaN when no
    perturbation costs anything.

    Example:
        >>> reliance_shares({"image": 0.02, "text": 0.3, "audio": -0.1})
        {'image': 0.0625, 'text': 0.9375, 'audio': 0.0}
    """
    pos = {m: max(float(v), 0.0) for m, v in drops.items()}
    total = sum(pos.values())
    return {m: (v / total if total > 0 else math.nan) for m, v in pos.items()}


# --------------------------------------------------------------------------- the check


@register_check
class ModalityCheck(Check):
    """Drop, swap and noise one modality at a time; flag over-reliance on a single modality.

    Args:
        drop: what replaces a dropped modality: ``mean`` (mean embedding) or ``zeros``.
        noise_scale: norm of the embedding noise relative to the unit embedding norm.
        reliance_threshold: a reliance (swap-cost) share at or above this, with a swap cost of
            at least ``min_drop``, marks a dominant modality...
        min_drop: see ``reliance_threshold``.
        redundancy_tolerance: ...which is flagged when removing every other modality costs at
            most this much accuracy (they add nothing).
        n_boot: bootstrap resamples for the CIs.
    """

    name = "robustness.modality"
    pillar = "robustness"
    requires = ("labels",)
    tasks = ("fusion",)
    description = "accuracy when each modality is dropped, swapped or noised; over-reliance"
    higher_is_better = {
        f"{k}/{m}": hib
        for m in ("image", "text")
        for k, hib in (
            ("accuracy_drop/drop", False),
            ("accuracy_drop/swap", False),
            ("accuracy_drop/noise", False),
            ("follow_rate", False),
            ("reliance", False),
            ("drop_share", False),
        )
    }

    def __init__(
        self,
        drop: DropMode = "mean",
        noise_scale: float = 1.0,
        reliance_threshold: float = 0.65,
        min_drop: float = 0.1,
        redundancy_tolerance: float = 0.02,
        n_boot: int = 1000,
    ) -> None:
        if drop not in ("mean", "zeros"):
            raise ValueError(f"drop must be 'mean' or 'zeros', got {drop!r}")
        if not noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        self.drop = drop
        self.noise_scale = noise_scale
        self.reliance_threshold = reliance_threshold
        self.min_drop = min_drop
        self.redundancy_tolerance = redundancy_tolerance
        self.n_boot = n_boot

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and len(ctx.task.modalities) < 2:
            return f"task {ctx.task.name!r} reads one modality; nothing to compare"
        return reason

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        keep = ctx.outputs.labels >= 0
        labels = ctx.outputs.labels[keep]
        emb = {m: e[torch.as_tensor(keep)] for m, e in ctx.outputs.embeddings.items()}
        mods = list(ctx.task.modalities)

        def correct(embeddings: Mapping[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                pred = ctx.task.logits(embeddings).argmax(dim=-1).cpu().numpy()
            return (pred == labels).astype(np.float64), pred

        clean, _ = correct(emb)
        partners = mismatched_partners(labels, ctx.seed_for("partners"))
        metrics: dict[str, Metric] = {
            "clean_accuracy": Metric(
                float(clean.mean()), mean_ci(clean, self.n_boot, seed=ctx.seed)
            )
        }
        costs = np.zeros((len(labels), len(mods)))  # swap cost per row and modality
        drop_costs = np.zeros_like(costs)
        acc: dict[tuple[str, str], float] = {}
        follow: dict[str, float] = {}
        for j, m in enumerate(mods):
            x = emb[m]
            variants = {
                "drop": self._constant(ctx, m, x).expand_as(x),
                "swap": x[torch.as_tensor(partners)],
                "noise": embedding_noise(x, self.noise_scale, ctx.seed_for(f"noise-{m}")),
            }
            for p, xv in variants.items():
                ok, pred = correct({**emb, m: xv})
                acc[(m, p)] = float(ok.mean())
                diff = clean - ok
                metrics[f"accuracy/{p}/{m}"] = Metric(acc[(m, p)])
                metrics[f"accuracy_drop/{p}/{m}"] = Metric(
                    float(diff.mean()), mean_ci(diff, self.n_boot, seed=ctx.seed)
                )
                if p == "drop":
                    drop_costs[:, j] = diff
                if p == "swap":
                    costs[:, j] = diff
                if p == "swap":
                    follows = (pred == labels[partners]).astype(np.float64)
                    follow[m] = float(follows.mean())
                    metrics[f"follow_rate/{m}"] = Metric(
                        follow[m], mean_ci(follows, self.n_boot, seed=ctx.seed)
                    )
        shares = reliance_shares({m: costs[:, j].mean() for j, m in enumerate(mods)})
        reliance_ci = share_ci(costs, self.n_boot, seed=ctx.seed)
        drop_shares = reliance_shares({m: drop_costs[:, j].mean() for j, m in enumerate(mods)})
        drop_ci = share_ci(drop_costs, self.n_boot, seed=ctx.seed)
        for j, m in enumerate(mods):
            metrics[f"reliance/{m}"] = Metric(shares[m], reliance_ci[j])
            metrics[f"drop_share/{m}"] = Metric(drop_shares[m], drop_ci[j])

        findings = [
            Finding(
                "info",
                f"Each modality perturbed alone on {len(labels)} labelled rows: dropped "
                f"({self._drop_source(ctx)}), swapped with a row of another label, and noised "
                f"in embedding space (noise norm ~{self.noise_scale:g}).",
                {"rows": len(labels), "drop": self.drop, "noise_scale": self.noise_scale},
            )
        ]
        findings += self._reliance_findings(metrics, mods, shares, follow)
        plots = {
            "modality_accuracy": {
                "kind": "heatmap",
                "title": "Accuracy with one modality perturbed",
                "rows": mods,
                "columns": ["clean", *PERTURBATIONS],
                "values": [
                    [metrics["clean_accuracy"].value, *(acc[(m, p)] for p in PERTURBATIONS)]
                    for m in mods
                ],
                "vlim": [0.0, 1.0],
            },
            "reliance": {
                "kind": "bar",
                "title": "Reliance: share of the accuracy lost when each modality is swapped",
                "labels": mods,
                "values": [None if math.isnan(shares[m]) else shares[m] for m in mods],
                "reference": self.reliance_threshold,
                "reference_label": "over-reliance threshold",
                "ylim": [0.0, 1.0],
            },
        }
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        findings.sort(key=lambda f: order[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    # ------------------------------------------------------------------ parts
    def _constant(self, ctx: AuditContext, m: str, x: Tensor) -> Tensor:
        if self.drop == "zeros":
            return torch.zeros(1, x.shape[1], dtype=x.dtype)
        if ctx.train is not None and m in ctx.train.modalities:
            ref = ctx.engine.embed(ctx.model, ctx.train, [m], desc="modality means")[m]
        else:
            ref = ctx.outputs.embeddings[m]
        return ref.float().mean(dim=0, keepdim=True).to(x.dtype)

    def _drop_source(self, ctx: AuditContext) -> str:
        if self.drop == "zeros":
            return "zero embedding"
        return "mean embedding of the " + ("train split" if ctx.train is not None else "rows")

    def _reliance_findings(
        self,
        metrics: Mapping[str, Metric],
        mods: list[str],
        shares: Mapping[str, float],
        follow: Mapping[str, float],
    ) -> list[Finding]:
        out = []
        swap = {o: metrics[f"accuracy_drop/swap/{o}"].value for o in mods}
        drop = {o: metrics[f"accuracy_drop/drop/{o}"].value for o in mods}
        for m in mods:
            others = [o for o in mods if o != m]
            dominant = shares[m] >= self.reliance_threshold and swap[m] >= self.min_drop
            others_idle = all(drop[o] <= self.redundancy_tolerance for o in others)
            if dominant and others_idle:
                other_txt = ", ".join(
                    f"a mismatched {o} costs {swap[o]:+.3f} and is followed on {follow[o]:.0%}"
                    for o in others
                )
                out.append(
                    Finding(
                        "high" if shares[m] >= 0.9 else "medium",
                        f"Over-reliance on {m}: a mismatched {m} from another row costs "
                        f"{swap[m]:.3f} accuracy and the prediction follows it on "
                        f"{follow[m]:.0%} of rows ({other_txt}); {m} takes {shares[m]:.0%} of "
                        f"the total swap cost. Removing {m} costs {drop[m]:+.3f}, removing "
                        + " or ".join(f"{o} {drop[o]:+.3f}" for o in others)
                        + f": the model answers from {m} alone.",
                        {
                            "modality": m,
                            "reliance": shares[m],
                            "swap_cost": swap,
                            "drop_cost": drop,
                            "follow_rate": dict(follow),
                        },
                        REMEDIATION,
                    )
                )
            elif drop[m] <= 0 < self.min_drop <= max(drop[o] for o in others):
                out.append(
                    Finding(
                        "info",
                        f"Removing {m} costs nothing ({drop[m]:+.3f}) while removing "
                        + " or ".join(f"{o} costs {drop[o]:.3f}" for o in others)
                        + f": the other modalities repeat what {m} says, although a mismatched "
                        f"{m} still costs {swap[m]:.3f}.",
                        {"drop_cost": drop, "swap_cost": swap},
                    )
                )
        return out


@register_check
class ModalitySeqRecCheck(Check):
    """``robustness.modality`` on a recommender: what each item modality carries.

    For each item modality ``m`` the recommender reads (image, title, or precomputed features),
    every item's ``m`` features are

    * **dropped**: replaced by the catalogue's mean (items without an image or a title);
    * **swapped**: each item gets another item's ``m`` (image and title disagree everywhere);

    and the users are ranked again. The NDCG@10 cost of each, with a paired bootstrap CI, and
    the swap-cost shares are reported. Where the items' image and title are embedded in one
    space, items whose two modalities disagree far more than the catalogue's others
    (:func:`~mmsafe.methods.recommend.alignment_outliers`) are flagged: the planted mismatch of
    ``shapes-rec``, or bad listings in real data.
    """

    name = "robustness.modality_seqrec"
    pillar = "robustness"
    aliases = ("robustness.modality",)
    description = "NDCG@10 when an item modality is dropped or swapped; mismatched items"
    kinds = ("recommender",)
    tasks = ("seqrec",)
    higher_is_better = {
        "clean/ndcg@10": True,
        **{f"{p}/{m}/ndcg@10": True for p in ("drop", "swap") for m in ("image", "text")},
        **{f"{p}_cost/{m}": False for p in ("drop", "swap") for m in ("image", "text")},
        **{f"reliance_share/{m}": False for m in ("image", "text")},
        "mismatch/flagged_share": False,
    }

    def __init__(self, n_boot: int = 1000, k: float = 3.0, min_cost_share: float = 0.5) -> None:
        self.n_boot = n_boot
        self.k = float(k)
        self.min_cost_share = float(min_cost_share)

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and not ctx.outputs.embeddings:
            reason = "the recommender reads no item content (an ID-based model)"
        return reason

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        from mmsafe.methods.recommend import alignment_outliers, user_metrics

        feats = dict(ctx.outputs.embeddings)

        def ndcg(features: Mapping[str, Tensor]) -> np.ndarray:
            with torch.inference_mode():
                logits = ctx.task.logits(features).float().cpu()
            return user_metrics(logits, ctx.data, (10,))["ndcg@10"]

        clean = ndcg(feats)
        metrics = {"clean/ndcg@10": Metric(float(clean.mean()), mean_ci(clean, self.n_boot,
                                                                       seed=ctx.seed))}  # fmt: skip
        perm = ctx.rng("swap").permutation(len(ctx.data.classes))
        costs: dict[str, float] = {}
        findings = []
        for m, x in feats.items():
            short = "image" if m.startswith("image") else "text"
            changed = {
                "drop": x.mean(dim=0, keepdim=True).expand_as(x),
                "swap": x[torch.as_tensor(perm)],
            }
            for kind, values in changed.items():
                scores = ndcg({**feats, m: values})
                diff = clean - scores
                metrics[f"{kind}/{short}/ndcg@10"] = Metric(float(scores.mean()))
                metrics[f"{kind}_cost/{short}"] = Metric(
                    float(diff.mean()), mean_ci(diff, self.n_boot, seed=ctx.seed)
                )
            costs[short] = metrics[f"drop_cost/{short}"].value
            cost = metrics[f"drop_cost/{short}"]
            if clean.mean() > 0 and cost.value >= self.min_cost_share * clean.mean():
                findings.append(Finding(
                    "medium",
                    f"Items missing their {short} (replaced by the catalogue's mean) cost the "
                    f"recommender {cost.value:.3f} of its {clean.mean():.3f} NDCG@10: it has no "
                    f"fallback for a missing {short}.",
                    {"drop_cost": cost.value, "ci": cost.ci, "clean": float(clean.mean())},
                    "Train with modality dropout on item features, or fall back to the other "
                    "modality (or an ID embedding) for items missing one.",
                ))  # fmt: skip
        swaps = {m: max(metrics[f"swap_cost/{m}"].value, 0.0) for m in costs}
        total = sum(swaps.values())
        for m, c in swaps.items():
            metrics[f"reliance_share/{m}"] = Metric(c / total if total > 0 else math.nan)
        flagged_share, flagged = math.nan, np.zeros(0, bool)
        model = ctx.model
        if getattr(model, "encoder", None) is not None and {"image", "text"} <= set(feats):
            cos, flagged = alignment_outliers(feats["image"].numpy(), feats["text"].numpy(),
                                              self.k)  # fmt: skip
            flagged_share = float(flagged.mean())
            if flagged.any():
                ids = [ctx.data.classes[i] for i in np.flatnonzero(flagged)]
                findings.append(Finding(
                    "low",
                    f"{len(ids)} items' titles match their images far worse than the others' "
                    f"(standardised similarity over {self.k:g} robust SDs below the median).",
                    {"items": ids[:50], "z": [round(float(cos[i]), 4)
                                                   for i in np.flatnonzero(flagged)[:50]]},
                    "Review these listings: a title that names another product than the image "
                    "shows misleads both users and the recommender.",
                ))  # fmt: skip
        metrics["mismatch/flagged_share"] = Metric(flagged_share)
        plots = {
            "drop_swap": {
                "kind": "bar",
                "title": "NDCG@10 with one item modality dropped or swapped",
                "labels": ["clean", *[f"{k} {m}" for m in costs for k in ("drop", "swap")]],
                "values": [
                    metrics["clean/ndcg@10"].value,
                    *[metrics[f"{k}/{m}/ndcg@10"].value for m in costs for k in ("drop", "swap")],
                ],
                "ylim": [0.0, 1.0],
            }
        }
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)
