"""``monitoring.ood``: can the model's own outputs tell never-seen inputs from familiar ones?

Rows whose ``meta`` has a truthy ``"ood"`` are out-of-distribution (OOD); labelled rows without
that flag are in-distribution (ID). Each OOD score of :mod:`mmsafe.methods.ood` (higher = ID) is
turned into AUROC, AUPR-In, AUPR-Out and FPR@95TPR (:mod:`mmsafe.metrics.ood`). The headline score
is chosen without the evaluated rows' labels: the best by AUROC on the calibration split when it
has OOD and ID rows, else :attr:`OODCheck.default_headline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.data.dataset import Dataset
from mmsafe.methods.ood import energy, knn_score, max_logit, mcm, msp
from mmsafe.metrics.ood import (
    aupr_in,
    aupr_out,
    auroc,
    auroc_bootstrap_ci,
    downsample_curve,
    fpr_at_tpr,
    roc_curve,
)

NO_OOD_REASON = "needs rows marked meta.ood (e.g. the shapes world's never-seen shapes)"
SCORES: tuple[str, ...] = ("msp", "max_logit", "energy", "mcm", "knn")


def ood_masks(meta: Sequence[dict[str, Any]], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(is_ood, is_id)``: rows flagged ``meta["ood"]``, and labelled rows that are not.

    Example:
        >>> ood_masks([{"ood": True}, {}, {"ood": False}, {}], np.array([-1, 0, 1, -1]))
        (array([ True, False, False, False]), array([False,  True,  True, False]))
    """
    is_ood = np.array([bool(m.get("ood")) for m in meta], dtype=bool)
    return is_ood, (np.asarray(labels) >= 0) & ~is_ood


def class_embeddings_of(task: Any) -> Tensor | None:
    """The class-prompt embeddings of a (possibly wrapped) zero-shot task, else ``None``."""
    while task is not None:
        emb = getattr(task, "class_embeddings_", None)
        if emb is not None:
            return emb
        task = getattr(task, "inner", None)
    return None


@register_check
class OODCheck(Check):
    """Semantic OOD detection with MSP, max-logit, energy, MCM and kNN scores.

    Args:
        n_boot: bootstrap resamples for the AUROC CIs (ID and OOD rows resampled separately).
        k: the neighbour of the kNN score (distance to the k-th nearest train image).
        temperature: the energy score's temperature.
        mcm_tau: the MCM softmax temperature over cosine similarities.
        auroc_threshold: a headline AUROC below this raises a finding.
        max_points: the most points drawn per ROC curve.

    The headline ``auroc`` / ``fpr95`` are one score's, chosen on the calibration split's OOD and
    ID rows (the best AUROC there; ties go to the earlier score of :data:`SCORES`) or, when it
    has none, :attr:`default_headline`: the energy score, defined on every task's logits and a
    better OOD score than MSP (Liu et al., 2020). The evaluated rows' labels never choose it.
    """

    name = "monitoring.ood"
    conditional_metrics = {"mcm/*": "task:zero_shot"}  # MCM needs class-prompt embeddings
    pillar = "monitoring"
    tasks = ("zero_shot", "fusion")
    description = "OOD detection (MSP, max-logit, energy, MCM, kNN): AUROC, AUPR, FPR@95TPR"
    higher_is_better = {
        "auroc": True,
        "fpr95": False,
        **{f"{s}/{m}": True for s in SCORES for m in ("auroc", "aupr_in", "aupr_out")},
        **{f"{s}/fpr95": False for s in SCORES},
    }
    default_headline: ClassVar[str] = "energy"

    def __init__(
        self,
        n_boot: int = 200,
        k: int = 10,
        temperature: float = 1.0,
        mcm_tau: float = 1.0,
        auroc_threshold: float = 0.8,
        max_points: int = 200,
    ) -> None:
        self.n_boot = n_boot
        self.k = k
        self.temperature = temperature
        self.mcm_tau = mcm_tau
        self.auroc_threshold = auroc_threshold
        self.max_points = max_points

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        is_ood, is_id = ood_masks(ctx.data.meta, ctx.outputs.labels)
        if not is_ood.any():
            return NO_OOD_REASON
        if not is_id.any():
            return "needs labelled in-distribution rows (without meta.ood) to compare with"
        return None

    # ------------------------------------------------------------------ scores
    def scores(
        self, ctx: AuditContext, data: Dataset | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """``({score: (N,) values}, {score: why it was not computed})`` over ``data``.

        ``data`` defaults to the evaluated rows, ``ctx.data``; other rows (the calibration split)
        are run through the task by the engine.
        """
        outputs = (
            ctx.outputs
            if data is None or data is ctx.data
            else ctx.engine.outputs(ctx.model, ctx.task, data)
        )
        logits = outputs.logits
        out = {
            "msp": msp(logits),
            "max_logit": max_logit(logits),
            "energy": energy(logits, T=self.temperature),
        }
        missing: dict[str, str] = {}
        image = outputs.embeddings.get("image")
        class_emb = class_embeddings_of(ctx.task)
        if image is None:
            missing["mcm"] = "the task's outputs have no image embeddings"
        elif class_emb is None:
            missing["mcm"] = (
                f"task {ctx.task.name!r} has no class-prompt embeddings (MCM needs zero_shot)"
            )
        else:
            out["mcm"] = mcm(image, class_emb, tau=self.mcm_tau)
        bank = self._bank(ctx)
        if isinstance(bank, str):
            missing["knn"] = bank
        else:
            assert image is not None
            out["knn"] = knn_score(image, bank, k=self.k)
        return {k: v.cpu().numpy() for k, v in out.items()}, missing

    def _bank(self, ctx: AuditContext) -> Tensor | str:
        """The in-distribution train image embeddings, or why there are none."""
        if "image" not in ctx.outputs.embeddings:
            return "the task's outputs have no image embeddings"
        if ctx.train is None:
            return "no 'train' split to use as the in-distribution bank"
        if "image" not in ctx.train.modalities:
            return "the 'train' split has no image column"
        keep = ~ood_masks(ctx.train.meta, ctx.train.labels)[0]
        if keep.sum() < self.k:
            return f"the train split has {int(keep.sum())} in-distribution rows, fewer than k"
        emb = ctx.engine.embed(ctx.model, ctx.train, ["image"])["image"]
        return emb[torch.from_numpy(keep)]

    def headline(
        self, ctx: AuditContext, available: Sequence[str]
    ) -> tuple[str, str, dict[str, float]]:
        """``(score, chosen_on, calibration AUROCs)``: the headline score and how it was chosen.

        ``chosen_on`` is ``"calibration"`` (the best of ``available`` by AUROC on the calibration
        split's OOD and ID rows, the first in ``available`` on ties) or ``"default"``
        (:attr:`default_headline`, when the calibration split has no OOD or no ID rows). The
        evaluated rows are not looked at.
        """
        cal = ctx.calibration
        if cal is not None:
            is_ood, is_id = ood_masks(cal.meta, cal.labels)
            if is_ood.any() and is_id.any():
                scores = self.scores(ctx, cal)[0]
                aucs = {n: auroc(scores[n][is_id], scores[n][is_ood]) for n in available}
                return max(aucs, key=aucs.__getitem__), "calibration", aucs
        default = self.default_headline if self.default_headline in available else available[0]
        return default, "default", {}

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        is_ood, is_id = ood_masks(ctx.data.meta, ctx.outputs.labels)
        scores, missing = self.scores(ctx)
        metrics: dict[str, Metric] = {}
        curves = {}
        for name, s in scores.items():
            s_in, s_out = s[is_id], s[is_ood]
            ci = auroc_bootstrap_ci(s_in, s_out, n_boot=self.n_boot, seed=ctx.seed)
            metrics[f"{name}/auroc"] = Metric(auroc(s_in, s_out), ci)
            metrics[f"{name}/aupr_in"] = Metric(aupr_in(s_in, s_out))
            metrics[f"{name}/aupr_out"] = Metric(aupr_out(s_in, s_out))
            metrics[f"{name}/fpr95"] = Metric(fpr_at_tpr(s_in, s_out, 0.95))
            curves[name] = roc_curve(s_in, s_out, drop_intermediate=True)
        ranking = sorted(scores, key=lambda n: -metrics[f"{n}/auroc"].value)  # stable on ties
        head, chosen_on, cal_aucs = self.headline(ctx, list(scores))
        metrics["auroc"] = metrics[f"{head}/auroc"]
        metrics["fpr95"] = metrics[f"{head}/fpr95"]
        n_in, n_out = int(is_id.sum()), int(is_ood.sum())
        how = (
            f"chosen by AUROC on the calibration split, {cal_aucs[head]:.3f} there"
            if chosen_on == "calibration"
            else "the declared default: the calibration split has no OOD rows to choose on"
        )

        findings = []
        head_auc = metrics["auroc"].value
        if head_auc < self.auroc_threshold:
            findings.append(
                Finding(
                    "medium",
                    f"OOD inputs are hard to tell apart: the headline score ({head}) reaches "
                    f"AUROC {head_auc:.3f} < {self.auroc_threshold:.2f}, and at a threshold "
                    f"keeping 95% of in-distribution rows it still accepts "
                    f"{metrics['fpr95'].value:.0%} of the OOD rows.",
                    {"headline_method": head, "auroc": head_auc, "fpr95": metrics["fpr95"].value},
                    "Do not treat the model's confidence as a novelty detector. Deploy a "
                    "dedicated OOD detector (e.g. kNN distance to the training embeddings) with a "
                    "threshold set on held-out in-distribution data, route low-score inputs to "
                    "abstention or human review, and add examples of the unseen categories to "
                    "training (or to the label set) where they matter.",
                )
            )
        findings.append(
            Finding(
                "info",
                f"Headline OOD score: {head} ({how}); on the evaluated rows AUROC "
                f"{head_auc:.3f}, FPR@95TPR {metrics['fpr95'].value:.3f} over {n_in} "
                f"in-distribution and {n_out} OOD rows. Every score on the evaluated rows: "
                + ", ".join(f"{n} {metrics[f'{n}/auroc'].value:.3f}" for n in ranking)
                + ".",
                {
                    "headline_method": head,
                    "chosen_on": chosen_on,
                    "calibration_auroc": cal_aucs,
                    "ranking": {n: metrics[f"{n}/auroc"].value for n in ranking},
                    "n_in": n_in,
                    "n_ood": n_out,
                },
            )
        )
        if missing:
            findings.append(
                Finding(
                    "info",
                    "Not computed: "
                    + "; ".join(f"{n} ({why})" for n, why in missing.items())
                    + ".",
                    {"not_computed": dict(missing)},
                )
            )

        series = []
        for name in ranking:
            x, y = downsample_curve(curves[name].fpr, curves[name].tpr, self.max_points)
            auc = metrics[f"{name}/auroc"].value
            series.append({"name": f"{name} ({auc:.3f})", "x": x, "y": y})
        plots = {
            "roc": {
                "kind": "line",
                "title": "OOD detection ROC (in-distribution = positive)",
                "xlabel": "FPR (OOD rows accepted)",
                "ylabel": "TPR (in-distribution rows accepted)",
                "ylim": [0.0, 1.0],
                "series": series,
            },
            "auroc": {
                "kind": "bar",
                "title": "OOD detection AUROC per score",
                "labels": list(ranking),
                "values": [metrics[f"{n}/auroc"].value for n in ranking],
                "reference": 0.5,
                "reference_label": "chance",
                "ylim": [0.0, 1.0],
            },
        }
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)
