"""``performance.classification``: accuracy, macro-F1 and per-class accuracy, with CIs."""

from __future__ import annotations

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.metrics import (
    accuracy,
    grouped_mean_ci,
    macro_f1,
    macro_f1_bootstrap,
    per_class_accuracy,
)


def confident_errors(ctx: AuditContext, k: int) -> dict:
    """A table spec of the ``k`` misclassified labelled rows the model was most sure about."""
    out, data = ctx.outputs, ctx.data
    probs = out.probs
    conf = probs.max(axis=1)
    wrong = np.flatnonzero((out.labels >= 0) & (out.preds != out.labels))
    top = wrong[np.argsort(-conf[wrong], kind="stable")[:k]]
    texts = data.modalities.get("text")
    columns = ["id", *(["text"] if texts is not None else []), "label", "predicted", "confidence"]
    rows = [
        [
            data.ids[i],
            *([str(texts[i])] if texts is not None else []),
            data.classes[out.labels[i]],
            data.classes[out.preds[i]],
            float(conf[i]),
        ]
        for i in top
    ]
    return {"kind": "table", "title": "Most confident errors", "columns": columns, "rows": rows}


@register_check
class PerformanceCheck(Check):
    """How well the model does its task on the evaluation rows, with bootstrap 95% CIs."""

    name = "performance.classification"
    pillar = "performance"
    aliases = ("performance",)
    description = "accuracy, macro-F1 and per-class accuracy"
    tasks = ("zero_shot", "fusion")
    requires = ("labels",)
    higher_is_better = {"accuracy": True, "macro_f1": True}

    def __init__(self, n_boot: int = 1000, n_examples: int = 8) -> None:
        self.n_boot = n_boot
        self.n_examples = n_examples

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        out, classes, seed = ctx.outputs, ctx.data.classes, ctx.seed
        keep = out.labels >= 0
        preds, target = out.preds[keep], out.labels[keep]
        n_classes = len(classes)
        correct = (preds == target).astype(float)
        acc_ci, class_ci = grouped_mean_ci(correct, target, n_classes, self.n_boot, seed=seed)
        metrics = {
            "accuracy": Metric(accuracy(preds, target), acc_ci),
            "macro_f1": Metric(
                macro_f1(preds, target, n_classes),
                macro_f1_bootstrap(preds, target, n_classes, self.n_boot, seed=seed),
            ),
        }
        per_class = per_class_accuracy(preds, target, n_classes)
        for c, name in enumerate(classes):
            if np.isfinite(per_class[c]):
                metrics[f"class_accuracy/{name}"] = Metric(float(per_class[c]), class_ci[c])

        findings = []
        n_excluded = int((~keep).sum())
        if n_excluded:
            findings.append(
                Finding(
                    "info",
                    f"{n_excluded} of {len(keep)} evaluation rows carry no known label "
                    "(unlabelled or out-of-distribution) and are left out of these metrics.",
                    {"excluded_rows": n_excluded},
                )
            )
        chance = 1.0 / max(n_classes, 1)
        acc = metrics["accuracy"]
        if acc.ci is not None and acc.ci[0] <= chance:
            findings.append(
                Finding(
                    "high",
                    f"Accuracy {acc.value:.3f} is not distinguishable from chance ({chance:.3f}).",
                    {"accuracy": acc.value, "chance": chance},
                    "Check the class names and prompt templates, or fine-tune the model.",
                )
            )
        worst = [
            (name, float(per_class[c]))
            for c, name in enumerate(classes)
            if np.isfinite(per_class[c]) and per_class[c] < acc.value - 0.15
        ]
        if worst:
            findings.append(
                Finding(
                    "medium",
                    "Some classes lag overall accuracy by more than 15 points: "
                    + ", ".join(f"{n} ({a:.2f})" for n, a in sorted(worst, key=lambda x: x[1])),
                    {"overall": acc.value, "worst_classes": dict(worst)},
                    "Inspect these classes' prompts and data; consider more training data for "
                    "them or class-specific prompt engineering.",
                )
            )
        plots = {
            "confident_errors": confident_errors(ctx, self.n_examples),
            "per_class_accuracy": {
                "kind": "bar",
                "title": "Accuracy per class",
                "labels": list(classes),
                "values": [None if not np.isfinite(v) else float(v) for v in per_class],
                "reference": acc.value,
                "reference_label": "overall",
                "ylim": [0.0, 1.0],
            },
        }
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)
