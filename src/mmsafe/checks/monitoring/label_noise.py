"""``monitoring.label_noise``: which training labels are wrong?

Confident learning (:mod:`mmsafe.methods.label_noise`) over the labelled ``train`` rows (or the
evaluated rows when the data has no ``train`` split): every row's class probabilities come from
a logistic regression on the frozen embeddings of all its modalities, fitted on the other
folds; rows whose confident class is not their label are flagged. The labels are the data's,
not the model's, so the check audits the data a model is trained or evaluated on.
"""

from __future__ import annotations

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.data.dataset import Dataset
from mmsafe.methods.label_noise import confident_joint, crossval_probs
from mmsafe.metrics import mean_ci


@register_check
class LabelNoiseCheck(Check):
    """Label issues by confident learning on out-of-fold multimodal probabilities.

    Args:
        split: the split whose labels are audited (``train``; the evaluated rows when the data
            has no such split).
        folds: cross-validation folds of the probability model.
        medium_share: a flagged share above it (95% CI lower bound) is a medium finding.
        high_share: ... and above it, a high one.
        n_examples: flagged rows listed (lowest probability of their label first).
        n_boot: bootstrap resamples of the flagged share's CI.
    """

    name = "monitoring.label_noise"
    pillar = "monitoring"
    tasks = ("zero_shot", "fusion")
    requires = ("labels",)
    description = "label issues in the training labels (confident learning, out-of-fold)"
    higher_is_better = {
        "flagged_share": False,
        "flagged": False,
        "estimated_noise_rate": False,
        "rows": True,
    }

    def __init__(
        self,
        split: str = "train",
        folds: int = 5,
        medium_share: float = 0.03,
        high_share: float = 0.1,
        n_examples: int = 10,
        n_boot: int = 1000,
    ) -> None:
        self.split = split
        self.folds = int(folds)
        self.medium_share = float(medium_share)
        self.high_share = float(high_share)
        self.n_examples = int(n_examples)
        self.n_boot = n_boot

    def _audited(self, ctx: AuditContext) -> tuple[Dataset, str]:
        """The rows whose labels are audited, and how the card names them."""
        data = {"train": ctx.train, "calibration": ctx.calibration}.get(self.split) or ctx.data
        return data, f"the {self.split!r} split" if data is not ctx.data else "the evaluated rows"

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None:
            data, source = self._audited(ctx)
            labels = np.asarray(data.labels)[np.asarray(data.labelled, dtype=bool)]
            if (np.bincount(labels, minlength=1) >= 2).sum() < 2:
                reason = f"needs two or more labelled rows of each of two classes in {source}"
        return reason

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        data, source = self._audited(ctx)
        keep = np.flatnonzero(data.labelled)
        rows = data.subset(keep)
        mods = [m for m in ctx.model.modalities if m in rows.modalities]
        feats = np.concatenate(
            [ctx.engine.embed(ctx.model, rows, m, desc=f"{self.name}/{m}").numpy() for m in mods],
            axis=1,
        )
        labels = np.asarray(rows.labels, dtype=np.int64)
        probs = crossval_probs(feats, labels, len(data.classes), folds=self.folds,
                               seed=ctx.seed_for("folds") % 2**32)  # fmt: skip
        found = confident_joint(probs, labels)
        flagged = found.issues.astype(np.float64)
        ci = mean_ci(flagged, self.n_boot, seed=ctx.seed)
        metrics = {
            "rows": Metric(float(len(labels))),
            "flagged": Metric(float(flagged.sum())),
            "flagged_share": Metric(float(flagged.mean()), ci),
            "estimated_noise_rate": Metric(found.noise_rate),
        }
        order = np.flatnonzero(found.issues)
        order = order[np.argsort(found.self_confidence[order], kind="stable")]
        classes = data.classes
        examples = [
            [rows.ids[i], classes[labels[i]], classes[found.suggested[i]],
             round(float(found.self_confidence[i]), 3)]
            for i in order[: self.n_examples]
        ]  # fmt: skip
        findings = []
        if ci[0] > self.medium_share:
            severity = "high" if ci[0] > self.high_share else "medium"
            findings.append(Finding(
                severity,
                f"{int(flagged.sum())} of {len(labels)} labelled rows of {source} "
                f"({flagged.mean():.1%}, 95% CI [{ci[0]:.1%}, {ci[1]:.1%}]) carry a label their "
                f"own image and text confidently contradict; the estimated noise rate is "
                f"{found.noise_rate:.1%}.",
                {"flagged_ids": [rows.ids[i] for i in order], "share": float(flagged.mean()),
                 "ci": list(ci)},
                "Review the flagged rows (the table lists the most confident first) and relabel "
                "or drop them; or train with a noise-robust loss.",
            ))  # fmt: skip
        plots = {
            "examples": {
                "kind": "table",
                "title": "Rows whose label their content contradicts (least supported first)",
                "columns": ["id", "label", "suggested", "p(label)"],
                "rows": examples,
            },
            "per_class": {
                "kind": "bar",
                "title": "Flagged share per given label",
                "labels": list(classes),
                "values": [
                    float(found.issues[labels == j].mean()) if (labels == j).any() else 0.0
                    for j in range(len(classes))
                ],  # fmt: skip
                "ylim": [0.0, 1.0],
            },
        }
        limits = {"rows": source, "probabilities": f"{self.folds}-fold logistic regression on "
                  f"the frozen {'+'.join(mods)} embeddings"}  # fmt: skip
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)
