"""``calibration``: does the model's confidence match its accuracy?"""

from __future__ import annotations

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.metrics import (
    brier_score,
    calibration_bootstrap,
    ece_null_quantile,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
    uncertainty_calibration_error,
)


@register_check
class CalibrationCheck(Check):
    """Top-label ECE, MCE, UCE, Brier and NLL with bootstrap CIs, and a reliability diagram.

    Args:
        n_bins: equal-width confidence bins over [0, 1].
        n_boot: bootstrap resamples for the CIs.
        ece_threshold: ECE above this raises a finding, when it is also above what a perfectly
            calibrated model shows on as many rows (the 95% quantile of consistency-resampled
            ECE, :func:`~mmsafe.metrics.ece_null_quantile`): on a few hundred rows, ECE is
            biased up by about 0.1 even for a calibrated model.
    """

    name = "monitoring.calibration"
    aliases = ("calibration",)
    pillar = "monitoring"
    requires = ("labels",)
    tasks = ("zero_shot", "fusion")
    description = "ECE / MCE / UCE (n bins), Brier, NLL, reliability diagram"
    higher_is_better = {"ece": False, "mce": False, "uce": False, "brier": False, "nll": False}

    def __init__(self, n_bins: int = 15, n_boot: int = 200, ece_threshold: float = 0.05) -> None:
        self.n_bins = n_bins
        self.n_boot = n_boot
        self.ece_threshold = ece_threshold

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        keep = ctx.outputs.labels >= 0
        probs, target = ctx.outputs.probs[keep], ctx.outputs.labels[keep]
        b = self.n_bins
        fns = {
            "ece": lambda p, t: expected_calibration_error(p, t, n_bins=b),
            "mce": lambda p, t: maximum_calibration_error(p, t, n_bins=b),
            "uce": lambda p, t: uncertainty_calibration_error(p, t, n_bins=b),
            "brier": brier_score,
            "nll": negative_log_likelihood,
        }
        cis = calibration_bootstrap(probs, target, n_bins=b, n_boot=self.n_boot, seed=ctx.seed)
        metrics = {name: Metric(fn(probs, target), cis[name]) for name, fn in fns.items()}
        confidence = probs.max(axis=1)
        acc = float((probs.argmax(axis=1) == target).mean())
        metrics["mean_confidence"] = Metric(float(confidence.mean()))
        metrics["accuracy"] = Metric(acc)

        diagram = reliability_diagram(probs, target, n_bins=b)
        plots = {
            "reliability": {
                "kind": "reliability",
                "title": f"Reliability diagram ({b} bins, ECE {metrics['ece'].value:.3f})",
                "bin_edges": list(diagram.bin_edges),
                "confidence": list(diagram.bin_confidence),
                "accuracy": list(diagram.bin_accuracy),
                "count": list(diagram.bin_count),
            }
        }
        null = ece_null_quantile(probs, n_bins=b, seed=ctx.seed)
        return self.result(
            metrics=metrics, findings=self._findings(metrics, null), plots=plots,
            limits={"finding": f"ECE above {self.ece_threshold} and above {null:.3f}, the 95% "
                    "quantile of a calibrated model's ECE on these rows"},
        )  # fmt: skip

    def _findings(self, metrics: dict[str, Metric], null: float) -> tuple[Finding, ...]:
        ece = metrics["ece"].value
        if not np.isfinite(ece) or ece <= max(self.ece_threshold, null):
            return ()
        gap = metrics["mean_confidence"].value - metrics["accuracy"].value
        kind = "overconfident" if gap > 0 else "underconfident"
        return (
            Finding(
                "high" if ece > 3 * self.ece_threshold else "medium",
                f"The model is {kind}: ECE {ece:.3f} exceeds {self.ece_threshold:.3f} and the "
                f"{null:.3f} a calibrated model would show on these rows "
                f"(mean confidence {metrics['mean_confidence'].value:.3f} vs accuracy "
                f"{metrics['accuracy'].value:.3f}).",
                {
                    "ece": ece,
                    "mean_confidence": metrics["mean_confidence"].value,
                    "accuracy": metrics["accuracy"].value,
                    "calibrated_ece_q95": null,
                },
                "Fit temperature scaling on a held-out calibration split, then re-audit.",
            ),
        )
