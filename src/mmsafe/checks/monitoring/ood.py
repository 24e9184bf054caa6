"""``monitoring.ood``: can the model's own outputs tell never-seen inputs from familiar ones?

Rows whose ``meta`` has a truthy ``"ood"`` are out-of-distribution (OOD); labelled rows without
that flag are in-distribution (ID). Each OOD score of :mod:`mmsafe.methods.ood` (higher = ID) is
turned into AUROC, AUPR-In, AUPR-Out and FPR@95TPR (:mod:`mmsafe.metrics.ood`): the logit scores,
kNN on the output embeddings and, when the model exposes hidden states, the relative Mahalanobis
distance (RMD) on the image tower's pooled hidden states. The headline score is chosen without
the evaluated rows' labels: the best by AUROC on the calibration split when it has OOD and ID
rows, else the first available of :attr:`OODCheck.default_headlines` (RMD, then energy).
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
from mmsafe.methods.ood import (
    energy,
    knn_score,
    layer_ensemble,
    max_logit,
    mcm,
    msp,
    relative_mahalanobis,
    relative_mahalanobis_oof,
)
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
SCORES: tuple[str, ...] = ("msp", "max_logit", "energy", "mcm", "knn", "rmd")


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
    """Semantic OOD detection with MSP, max-logit, energy, MCM, kNN and RMD scores.

    Args:
        n_boot: bootstrap resamples for the AUROC CIs (ID and OOD rows resampled separately).
        k: the neighbour of the kNN score (distance to the k-th nearest train image); kNN needs
            at least ``k`` in-distribution train rows, RMD ``k`` calibration or train rows.
        temperature: the energy score's temperature.
        mcm_tau: the MCM softmax temperature over cosine similarities.
        auroc_threshold: a headline AUROC below this raises a finding.
        max_points: the most points drawn per ROC curve.
        rmd_layers: indices into ``model.hidden_states("image", ...)`` for the RMD score;
            ``None``: every layer the model returns.
        rmd_shrinkage: the covariance shrinkage of RMD, in ``[0, 1]`` (``ShrunkCovariance``'s).
        bank_size: the most train rows in the kNN bank; a larger train split is sampled
            uniformly (from the check's random stream) and the card's ``limits`` says so.
            ``None``: every row (the bank's encoding and search grow with it).
        rmd_fit_size: the most rows the RMD Gaussians are fitted on, sampled likewise.

    The ``rmd`` score is the relative Mahalanobis distance (Ren et al., 2021) on the image
    tower's globally mean-pooled hidden states, one per layer of ``rmd_layers``: class Gaussians
    and a background Gaussian fitted on labelled in-distribution rows (the calibration split's,
    held out and drawn like the evaluated rows, when it has at least ``k``; else the train
    split's, which may carry a spurious background or label noise that deployment does not),
    each layer's score standardised on those rows' own out-of-fold scores, and the layers
    averaged (:func:`~mmsafe.methods.ood.layer_ensemble`). It needs the model's
    ``hidden_states`` capability.

    The headline ``auroc`` / ``fpr95`` are one score's, chosen on the calibration split's OOD and
    ID rows (the best AUROC there; ties go to the earlier score of :data:`SCORES`) or, when it
    has none, the first available of :attr:`default_headlines`: ``rmd``, then ``energy``. A
    feature-space score on the tower's own hidden states comes first because a contrastive head
    maps images onto the class prompts, collapsing what tells a near-OOD input apart from the
    classes it resembles, so logit scores miss it (Ren et al., 2021; Fort et al., 2021); energy,
    defined on every task's logits and a better OOD score than MSP (Liu et al., 2020), when the
    model exposes no hidden states (or neither the calibration nor the train split has ``k``
    labelled in-distribution rows). The evaluated rows' labels never choose the headline.
    """

    name = "monitoring.ood"
    conditional_metrics = {
        "mcm/*": "task:zero_shot",  # MCM needs class-prompt embeddings
        "rmd/*": "capability:hidden_states",  # RMD reads the image tower's hidden states
    }
    pillar = "monitoring"
    tasks = ("zero_shot", "fusion")
    description = "OOD detection (MSP, max-logit, energy, MCM, kNN, RMD): AUROC, AUPR, FPR@95TPR"
    higher_is_better = {
        "auroc": True,
        "fpr95": False,
        **{f"{s}/{m}": True for s in SCORES for m in ("auroc", "aupr_in", "aupr_out")},
        **{f"{s}/fpr95": False for s in SCORES},
    }
    default_headlines: ClassVar[tuple[str, ...]] = ("rmd", "energy")
    """The headline when the calibration split cannot choose: the first of these computed."""

    def __init__(
        self,
        n_boot: int = 200,
        k: int = 10,
        temperature: float = 1.0,
        mcm_tau: float = 1.0,
        auroc_threshold: float = 0.8,
        max_points: int = 200,
        rmd_layers: Sequence[int] | None = None,
        rmd_shrinkage: float = 0.01,
        bank_size: int | None = 10_000,
        rmd_fit_size: int | None = 10_000,
    ) -> None:
        if not 0.0 <= rmd_shrinkage <= 1.0:
            raise ValueError(f"rmd_shrinkage must be in [0, 1], got {rmd_shrinkage}.")
        if rmd_layers is not None and not len(rmd_layers):
            raise ValueError("rmd_layers must name at least one layer (or be None for all).")
        self.n_boot = n_boot
        self.k = k
        self.temperature = temperature
        self.mcm_tau = mcm_tau
        self.auroc_threshold = auroc_threshold
        self.max_points = max_points
        self.rmd_layers = None if rmd_layers is None else tuple(int(i) for i in rmd_layers)
        self.rmd_shrinkage = rmd_shrinkage
        self.bank_size = bank_size
        self.rmd_fit_size = rmd_fit_size

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
        rmd = self._rmd(ctx, ctx.data if data is None else data)
        if isinstance(rmd, str):
            missing["rmd"] = rmd
        else:
            out["rmd"] = rmd
        return {k: v.cpu().numpy() for k, v in out.items()}, missing

    def rmd_fit(self, ctx: AuditContext) -> tuple[str, Dataset, np.ndarray] | str:
        """``(split name, split, rows)`` the RMD Gaussians are fitted on, or why there are none.

        The calibration split's labelled in-distribution rows when it has at least ``k``: they
        are held out from training and drawn like the evaluated rows, where train rows may
        carry what the model was trained with and deployment does not (a spurious background,
        label noise). Else the train split's. Each layer is standardised on these rows' own
        scores, taken out of fold (:func:`~mmsafe.methods.ood.relative_mahalanobis_oof`).
        """
        for name, split in (("calibration", ctx.calibration), ("train", ctx.train)):
            if split is None or "image" not in split.modalities:
                continue
            rows = np.flatnonzero(ood_masks(split.meta, split.labels)[1])
            if len(rows) >= self.k:
                return name, split, ctx.sample(rows, self.rmd_fit_size, "rmd fit", "")[0]
        return (
            f"neither the calibration nor the train split has k = {self.k} labelled "
            "in-distribution image rows to fit the class Gaussians on"
        )

    def _fit_name(self, ctx: AuditContext) -> str:
        fit = self.rmd_fit(ctx)
        return fit if isinstance(fit, str) else fit[0]

    def _rmd(self, ctx: AuditContext, data: Dataset) -> Tensor | str:
        """The RMD layer ensemble on ``data``'s rows, or why it cannot be computed.

        Fit, query and reference features are each fetched once (pooled, through the engine's
        cache). Rows of ``data`` that the Gaussians were fitted on (when ``data`` is the fit
        split) get their out-of-fold scores.
        """
        if "hidden_states" not in ctx.model.capabilities():
            return f"model {getattr(ctx.model, 'name', '?')!r} exposes no hidden states"
        if "image" not in data.modalities:
            return "the scored rows have no image column"
        fit = self.rmd_fit(ctx)
        if isinstance(fit, str):
            return fit
        _, split, fit_rows = fit

        def pooled(d: Dataset, rows: np.ndarray | None = None) -> list[Tensor]:
            return ctx.engine.hidden_states(
                ctx.model, d, "image", self.rmd_layers, rows=rows, desc="ood rmd", pool=True
            )

        bank = pooled(split, fit_rows)
        labels = torch.as_tensor(np.asarray(split.labels)[fit_rows], dtype=torch.long)
        reference = [relative_mahalanobis_oof(b, labels, self.rmd_shrinkage) for b in bank]
        query = pooled(data)
        other = np.setdiff1d(np.arange(len(data)), fit_rows) if data is split else None
        scores = []
        for b, q, r in zip(bank, query, reference, strict=True):
            if other is not None:  # data is the fit split: its fit rows keep their OOF scores
                s = torch.empty(len(data), dtype=torch.float64)
                s[torch.from_numpy(fit_rows)] = r
                s[torch.from_numpy(other)] = relative_mahalanobis(
                    q[other], b, labels, self.rmd_shrinkage
                )
            else:
                s = relative_mahalanobis(q, b, labels, self.rmd_shrinkage)
            scores.append(s)
        return layer_ensemble(scores, reference)

    def _bank_rows(self, ctx: AuditContext) -> tuple[np.ndarray, dict[str, str]] | str:
        """The kNN bank's train rows (at most ``bank_size``) and its limit, or why none."""
        if "image" not in ctx.outputs.embeddings:
            return "the task's outputs have no image embeddings"
        if ctx.train is None:
            return "no 'train' split to use as the in-distribution bank"
        if "image" not in ctx.train.modalities:
            return "the 'train' split has no image column"
        keep = np.flatnonzero(~ood_masks(ctx.train.meta, ctx.train.labels)[0])
        if len(keep) < self.k:
            return f"the train split has {len(keep)} in-distribution rows, fewer than k"
        return ctx.sample(keep, self.bank_size, "knn bank", "kNN bank (train split)")

    def _bank(self, ctx: AuditContext) -> Tensor | str:
        """The in-distribution train image embeddings, or why there are none."""
        got = self._bank_rows(ctx)
        if isinstance(got, str):
            return got
        assert ctx.train is not None
        return ctx.engine.embed(ctx.model, ctx.train, "image", rows=got[0])

    def limits(self, ctx: AuditContext) -> dict[str, str]:
        """The reference banks this run capped and sampled, for the card's ``limits``."""
        bank = self._bank_rows(ctx)
        out = {} if isinstance(bank, str) else dict(bank[1])
        fit = self.rmd_fit(ctx)
        if not isinstance(fit, str):
            name, split, _ = fit
            rows = np.flatnonzero(ood_masks(split.meta, split.labels)[1])
            out |= ctx.sample(rows, self.rmd_fit_size, "rmd fit", f"RMD fit ({name} split)")[1]
        return out

    def headline(
        self, ctx: AuditContext, available: Sequence[str]
    ) -> tuple[str, str, dict[str, float]]:
        """``(score, chosen_on, calibration AUROCs)``: the headline score and how it was chosen.

        ``chosen_on`` is ``"calibration"`` (the best of ``available`` by AUROC on the calibration
        split's OOD and ID rows, the first in ``available`` on ties) or ``"default"`` (the first
        of :attr:`default_headlines` in ``available``, when the calibration split has no OOD or
        no ID rows). The evaluated rows are not looked at.
        """
        cal = ctx.calibration
        if cal is not None:
            is_ood, is_id = ood_masks(cal.meta, cal.labels)
            if is_ood.any() and is_id.any():
                scores = self.scores(ctx, cal)[0]
                aucs = {n: auroc(scores[n][is_id], scores[n][is_ood]) for n in available}
                return max(aucs, key=aucs.__getitem__), "calibration", aucs
        default = next((n for n in self.default_headlines if n in available), available[0])
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
        if chosen_on == "calibration":
            how = f"chosen by AUROC on the calibration split, {cal_aucs[head]:.3f} there"
        else:
            how = (
                "the declared default, the first computed of "
                + " then ".join(self.default_headlines)
                + ": the calibration split has no OOD rows to choose on. A feature-space score on "
                "the image tower's hidden states (rmd) comes first, because a contrastive head "
                "collapses images onto the class prompts and hides near-OOD inputs from the "
                "logit scores (Ren et al. 2021; Fort et al. 2021); energy when rmd is not "
                "computed"
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
                    "dedicated OOD detector, preferably in feature space (e.g. the relative "
                    "Mahalanobis distance on the image tower's hidden states, or kNN distance to "
                    "the training embeddings), with a threshold set on held-out in-distribution "
                    "data, route low-score inputs to abstention or human review, and add "
                    "examples of the unseen categories to training (or to the label set) where "
                    "they matter.",
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
                    **({"rmd_fit": self._fit_name(ctx)} if "rmd" in scores else {}),
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
        return self.result(
            metrics=metrics, findings=tuple(findings), plots=plots, limits=self.limits(ctx)
        )
