"""``controllability.fairness``: do the model's predictions treat groups alike?

On the labelled evaluated rows it computes, per group of the sensitive feature (the ``group``
column, meta attributes, or their intersection), the accuracy and the one-vs-rest TPR, FPR and
selection rate of each class, with fairlearn's ``MetricFrame``; and the between-group gaps
(statistical-parity difference and ratio, equalized-odds and equal-opportunity differences,
accuracy difference), macro-averaged over classes and for the worst class, with bootstrap 95%
CIs. For a fusion task it attributes the gaps to the modalities: the same metrics with one
modality replaced by its mean training embedding; with ``text_variants`` it also compares
accuracy and gaps across caption variants (translations in meta columns, or paraphrases and
other text perturbations). See ``docs/fairness.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.data.dataset import Dataset
from mmsafe.methods.perturb import TEXT_PERTURBATIONS, perturb_texts
from mmsafe.metrics import bootstrap_ci, mean_ci
from mmsafe.metrics.fairness import (
    FairnessReport,
    encode_groups,
    fairness_bootstrap,
    group_fairness,
)
from mmsafe.tasks.fusion import fusion_head_of

HEADLINE = (
    "statistical_parity_difference",
    "statistical_parity_ratio",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "accuracy_difference",
)
"""Summaries reported as metrics (macro over classes), each also as ``<name>_worst``."""
GAPS = ("equalized_odds_difference", "statistical_parity_difference", "accuracy_difference")
"""The gaps a finding is raised on, and that the modality attribution reports."""
GROUP_COLUMN = "group"
"""The name of the dataset's ``group`` column among the sensitive features."""
SEP = "&"
"""Joins the values of several sensitive features into one intersectional group name."""


def sensitive_features(data: Dataset, attributes: Sequence[str] | None) -> dict[str, list[str]]:
    """The sensitive feature columns of ``data``: ``{name: one string per row}``.

    With ``attributes=None``: the ``group`` column (when the data has one) plus every meta key
    that starts with ``group_`` and is present in every row. Otherwise exactly the named
    columns: ``"group"`` is the group column, any other name a meta key (a row without it gets
    ``"?"``).

    Example:
        >>> ds = Dataset(name="d", ids=["a", "b"], modalities={"text": ["x", "y"]},
        ...              labels=np.array([0, 1]), classes=["n", "y"], groups=["g1", "g2"],
        ...              meta=[{"group_age": "old"}, {"group_age": "young"}])
        >>> sensitive_features(ds, None)
        {'group': ['g1', 'g2'], 'group_age': ['old', 'young']}
    """
    cols: dict[str, list[str]] = {}
    if attributes is None:
        if data.groups is not None:
            cols[GROUP_COLUMN] = [str(g) for g in data.groups]
        keys = sorted({k for m in data.meta for k in m if str(k).startswith("group_")})
        for k in keys:
            if all(k in m for m in data.meta):
                cols[k] = [str(m[k]) for m in data.meta]
        return cols
    for name in attributes:
        if name == GROUP_COLUMN:
            if data.groups is None:
                raise ValueError("attribute 'group' requested but the data has no group column")
            cols[name] = [str(g) for g in data.groups]
        else:
            cols[name] = [str(m.get(name, "?")) for m in data.meta]
    return cols


def intersect(columns: Mapping[str, Sequence[str]]) -> list[str]:
    """One group name per row: the values of all features joined by ``&``.

    Example:
        >>> intersect({"a": ["x", "y"], "b": ["1", "2"]})
        ['x&1', 'y&2']
    """
    return [SEP.join(vals) for vals in zip(*columns.values(), strict=True)]


def caption_variants(
    data: Dataset, names: Sequence[str], severity: int = 3, seed: int = 0
) -> dict[str, list[str]]:
    """The captions of each text variant: a meta key or a built-in text perturbation.

    A name that is a meta key present in every row (e.g. ``text_de``, a translation) gives
    those captions; a name of :data:`mmsafe.methods.perturb.TEXT_PERTURBATIONS` (e.g.
    ``paraphrase``) perturbs the ``text`` column at ``severity``.

    Raises:
        ValueError: a name that is neither.

    Example:
        >>> ds = Dataset(name="d", ids=["a"], modalities={"text": ["a red circle"]},
        ...              labels=np.array([0]), classes=["c"], meta=[{"text_de": "ein Kreis"}])
        >>> caption_variants(ds, ["text_de", "case_noise"], severity=5, seed=3)
        {'text_de': ['ein Kreis'], 'case_noise': ['A reD CIrCLe']}
    """
    texts = [str(t) for t in data.modalities["text"]]
    out: dict[str, list[str]] = {}
    for name in names:
        if data.meta and all(name in m for m in data.meta):
            out[name] = [str(m[name]) for m in data.meta]
        elif name in TEXT_PERTURBATIONS:
            out[name] = perturb_texts(texts, name, severity, seed)
        else:
            raise ValueError(
                f"text variant {name!r} is neither a meta key present in every row nor a text "
                f"perturbation ({', '.join(TEXT_PERTURBATIONS)})"
            )
    return out


def spread(correct: np.ndarray) -> float:
    """``max - min`` of the column means of ``(N, V)`` per-row correctness.

    Example:
        >>> spread(np.array([[1, 0], [1, 1]]))
        0.5
    """
    means = np.asarray(correct, dtype=np.float64).mean(axis=0)
    return float(means.max() - means.min())


def _f(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


@register_check
class FairnessCheck(Check):
    """Group fairness of the predictions: per-group rates, parity and odds gaps, with CIs.

    Args:
        attributes: the sensitive features: ``"group"`` for the group column, other names are
            meta keys. ``None``: the group column plus every ``group_*`` meta key present in all
            rows. With several, the headline metrics use their intersection and each single
            feature is reported too (``<metric>/<feature>``).
        min_group_size: groups with fewer labelled rows are left out (and named in a finding).
        max_gap: a macro gap (equalized odds, statistical parity, accuracy) above this raises a
            finding: ``medium`` when the CI's lower bound is above it, ``low`` otherwise.
        n_boot: bootstrap resamples.
        text_variants: caption variants to compare (tasks that read text): meta keys holding
            another caption per row (e.g. a translation, ``text_de``) or text perturbations
            (``paraphrase``, ``case_noise``, ...; see :func:`caption_variants`). Reported: the
            accuracy and group gaps under each variant, and the accuracy spread across the
            original captions and the variants (equal performance across variants).
        variant_severity: severity (1-5) of perturbation variants.
    """

    name = "controllability.fairness"
    conditional_metrics = {"*/without_*": "multimodal", "*/attributed_to_*": "multimodal"}
    pillar = "controllability"
    requires = ("labels",)
    tasks = ("zero_shot", "fusion")
    description = (
        "per-group accuracy/TPR/FPR/selection rate, parity and equalized-odds gaps (fairlearn), "
        "per-modality bias attribution for fusion"
    )
    higher_is_better = {
        **{m: False for m in HEADLINE if m != "statistical_parity_ratio"},
        **{f"{m}_worst": False for m in HEADLINE if m != "statistical_parity_ratio"},
        "statistical_parity_ratio": True,
        "statistical_parity_ratio_worst": True,
    }

    def __init__(
        self,
        attributes: Sequence[str] | None = None,
        min_group_size: int = 10,
        max_gap: float = 0.1,
        n_boot: int = 1000,
        text_variants: Sequence[str] = (),
        variant_severity: int = 3,
    ) -> None:
        if min_group_size < 1:
            raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
        self.text_variants = tuple(text_variants)
        self.variant_severity = int(variant_severity)
        self.attributes = None if attributes is None else tuple(attributes)
        self.min_group_size = min_group_size
        self.max_gap = max_gap
        self.n_boot = n_boot

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        try:
            cols = sensitive_features(ctx.data, self.attributes)
        except ValueError as e:
            return str(e)
        if not cols:
            return "needs a 'group' column (or group_* meta attributes)"
        keep = ctx.data.labelled
        names, counts = np.unique(np.asarray(intersect(cols))[keep], return_counts=True)
        if (counts >= self.min_group_size).sum() < 2:
            return (
                f"needs at least 2 groups with >= {self.min_group_size} labelled rows "
                f"(found {dict(zip(names.tolist(), counts.tolist(), strict=True))})"
            )
        return None

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        out = ctx.outputs
        cols = sensitive_features(ctx.data, self.attributes)
        joint = np.asarray(intersect(cols))
        keep = out.labels >= 0
        names, counts = np.unique(joint[keep], return_counts=True)
        sizes = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
        small = {n: c for n, c in sizes.items() if c < self.min_group_size}
        if len(sizes) - len(small) < 2:
            return self.result(
                status="skipped",
                reason=f"needs at least 2 groups with >= {self.min_group_size} labelled rows "
                f"(found {sizes})",
            )
        keep &= ~np.isin(joint, list(small))
        target, preds = out.labels[keep], out.preds[keep]
        n_classes = len(ctx.data.classes)
        feature = SEP.join(cols)

        report = group_fairness(target, preds, joint[keep], n_classes)
        metrics = self._metrics(report, target, preds, joint[keep], ctx.seed, ctx.data.classes)
        findings: list[Finding] = [
            Finding(
                "info",
                f"Sensitive feature: {feature!r} ({len(report.groups)} groups, "
                f"{int(keep.sum())} labelled rows). Multiclass rates are one-vs-rest per class; "
                "gaps are averaged over classes (macro) and reported for the worst class.",
                {
                    "feature": feature,
                    "groups": dict(zip(report.groups, report.counts.tolist(), strict=True)),
                },
            )
        ]
        if small:
            findings.append(
                Finding(
                    "info",
                    f"{len(small)} group(s) with fewer than {self.min_group_size} labelled rows "
                    "left out: " + ", ".join(f"{n} ({c})" for n, c in small.items()) + ".",
                    {"left_out": small},
                )
            )
        if len(cols) > 1:
            for name, col in cols.items():
                single = group_fairness(target, preds, np.asarray(col)[keep], n_classes)
                for m in HEADLINE:
                    metrics[f"{m}/{name}"] = Metric(single.summary[m])
        findings += self._gap_findings(metrics, report, feature)

        plots: dict[str, dict[str, Any]] = self._plots(report, ctx.data.classes)
        attribution = self._modality_attribution(ctx, keep, joint[keep], report, metrics)
        findings += attribution[0]
        plots.update(attribution[1])
        if self.text_variants:
            variants = self._variants(ctx, keep, joint[keep], report, metrics)
            findings += variants[0]
            plots.update(variants[1])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    def _metrics(
        self,
        report: FairnessReport,
        target: np.ndarray,
        preds: np.ndarray,
        groups: np.ndarray,
        seed: int,
        classes: Sequence[str],
    ) -> dict[str, Metric]:
        codes, names = encode_groups(groups)
        assert names == report.groups
        cis = fairness_bootstrap(
            target, preds, codes, len(names), report.n_classes, self.n_boot, seed=seed
        )
        metrics: dict[str, Metric] = {}
        for m in HEADLINE:
            metrics[m] = Metric(report.summary[m], cis[m])
            if m != "accuracy_difference":
                metrics[f"{m}_worst"] = Metric(report.summary[f"{m}_worst"], cis[f"{m}_worst"])
        for k, g in enumerate(names):
            metrics[f"accuracy/{g}"] = Metric(float(report.accuracy[k]), cis[f"accuracy/{k}"])
            metrics[f"tpr/{g}"] = Metric(float(report.tpr_macro[k]), cis[f"tpr/{k}"])
            metrics[f"fpr/{g}"] = Metric(float(report.fpr_macro[k]), cis[f"fpr/{k}"])
            for c, cname in enumerate(classes):
                metrics[f"selection_rate/{g}/{cname}"] = Metric(
                    float(report.selection_rate[k, c]), cis[f"selection_rate/{k}/{c}"]
                )
        return metrics

    def _gap_findings(
        self, metrics: Mapping[str, Metric], report: FairnessReport, feature: str
    ) -> list[Finding]:
        out = []
        for m in GAPS:
            v = metrics[m]
            if not v.value > self.max_gap:
                continue
            lo = v.ci[0] if v.ci is not None else float("nan")
            sure = bool(np.isfinite(lo) and lo > self.max_gap)
            k = int(np.nanargmax(report.accuracy)), int(np.nanargmin(report.accuracy))
            out.append(
                Finding(
                    "medium" if sure else "low",
                    f"{m.replace('_', ' ').capitalize()} across {feature!r} groups is "
                    f"{v.value:.3f} (95% CI {_ci(v)}), above {self.max_gap:g}"
                    + ("" if sure else "; the CI reaches below it")
                    + f". Accuracy ranges from {report.accuracy[k[1]]:.3f} "
                    f"({report.groups[k[1]]}) to {report.accuracy[k[0]]:.3f} "
                    f"({report.groups[k[0]]}).",
                    {
                        "metric": m,
                        "value": v.value,
                        "ci": None if v.ci is None else list(v.ci),
                        "threshold": self.max_gap,
                        "worst_class_value": _f(report.summary.get(f"{m}_worst", np.nan)),
                    },
                    "Look for a spurious correlation between the group and the classes in the "
                    "training data (monitoring.slices), rebalance or reweight the groups, or "
                    "post-process per group (fairlearn.postprocessing.ThresholdOptimizer); "
                    "re-audit afterwards.",
                )
            )
        return out

    def _plots(self, report: FairnessReport, classes: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = [
            [g, int(n), float(a), _f(t), _f(f)]
            for g, n, a, t, f in zip(
                report.groups,
                report.counts,
                report.accuracy,
                report.tpr_macro,
                report.fpr_macro,
                strict=True,
            )
        ]
        return {
            "accuracy_per_group": {
                "kind": "bar",
                "title": "Accuracy per group",
                "labels": list(report.groups),
                "values": [_f(a) for a in report.accuracy],
                "reference": report.summary["overall_accuracy"],
                "reference_label": "overall",
                "ylim": [0.0, 1.0],
            },
            "selection_rate": {
                "kind": "heatmap",
                "title": "Selection rate P(pred = class | group)",
                "rows": list(report.groups),
                "columns": list(classes),
                "values": [[_f(v) for v in row] for row in report.selection_rate],
                "vlim": [0.0, 1.0],
            },
            "per_group": {
                "kind": "table",
                "title": "Per-group rates (TPR/FPR: one-vs-rest, macro over classes)",
                "columns": ["group", "rows", "accuracy", "TPR", "FPR"],
                "rows": rows,
            },
        }

    def _modality_attribution(
        self,
        ctx: AuditContext,
        keep: np.ndarray,
        groups: np.ndarray,
        report: FairnessReport,
        metrics: dict[str, Metric],
    ) -> tuple[list[Finding], dict[str, dict[str, Any]]]:
        """Gaps with each modality replaced by its mean training embedding (fusion only)."""
        head = fusion_head_of(ctx.task)
        if ctx.task.name != "fusion" or head is None or len(ctx.task.modalities) < 2:
            return [
                Finding(
                    "info",
                    f"Per-modality bias attribution skipped: task {ctx.task.name!r} is not a "
                    "fusion task, so no modality can be ablated.",
                )
            ], {}
        null = head.null_embeddings
        emb = {m: e[torch.as_tensor(keep)] for m, e in ctx.outputs.embeddings.items()}
        n_classes = report.n_classes
        gaps: dict[str, dict[str, float]] = {
            "full": {m: report.summary[m] for m in GAPS},
        }
        target = ctx.outputs.labels[keep]
        for mod in ctx.task.modalities:
            if mod not in null:
                continue
            x = emb[mod]
            ablated = {**emb, mod: null[mod].to(x.device, x.dtype).expand_as(x)}
            with torch.inference_mode():
                preds = ctx.task.logits(ablated).argmax(dim=-1).cpu().numpy()
            r = group_fairness(target, preds, groups, n_classes)
            gaps[f"without_{mod}"] = {m: r.summary[m] for m in GAPS}
            metrics[f"accuracy/without_{mod}"] = Metric(r.summary["overall_accuracy"])
            for m in GAPS:
                metrics[f"{m}/without_{mod}"] = Metric(r.summary[m])
                # positive: the gap shrinks without the modality, i.e. the modality carries it
                metrics[f"{m}/attributed_to_{mod}"] = Metric(report.summary[m] - r.summary[m])
        eod = "equalized_odds_difference"
        parts = {k: v[eod] for k, v in gaps.items()}
        top = max(
            (k for k in parts if k != "full"), key=lambda k: parts["full"] - parts[k], default=None
        )
        findings = [
            Finding(
                "info",
                "Per-modality attribution (each modality replaced by its mean training "
                "embedding): equalized-odds difference "
                + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in parts.items())
                + (
                    f"; removing {top.removeprefix('without_')} shrinks it most."
                    if top is not None and parts["full"] - parts[top] > 0
                    else "; no modality's removal shrinks it."
                ),
                {"gaps": gaps},
            )
        ]
        plot = {
            "modality_attribution": {
                "kind": "bar",
                "title": "Equalized-odds difference with a modality ablated",
                "labels": [k.replace("_", " ") for k in parts],
                "values": [_f(v) for v in parts.values()],
                "reference": self.max_gap,
                "reference_label": "max_gap",
            }
        }
        return findings, plot

    def _variants(
        self,
        ctx: AuditContext,
        keep: np.ndarray,
        groups: np.ndarray,
        report: FairnessReport,
        metrics: dict[str, Metric],
    ) -> tuple[list[Finding], dict[str, dict[str, Any]]]:
        """Accuracy and group gaps with the captions replaced by each variant."""
        if "text" not in ctx.task.modalities or "text" not in ctx.data.modalities:
            return [
                Finding(
                    "info",
                    f"Caption-variant fairness skipped: task {ctx.task.name!r} does not read "
                    "the captions (zero-shot classifies the image against fixed prompts).",
                )
            ], {}
        data = ctx.data.subset(keep)
        captions = caption_variants(data, self.text_variants, self.variant_severity, ctx.seed)
        emb = {m: e[torch.as_tensor(keep)] for m, e in ctx.outputs.embeddings.items()}
        target = ctx.outputs.labels[keep]
        correct = [ctx.outputs.preds[keep] == target]
        rows = [["original", report.summary["overall_accuracy"]]]
        rows[0] += [report.summary[m] for m in GAPS]
        for name, texts in captions.items():
            text = ctx.engine.embed_values(ctx.model, "text", texts, desc=f"variant {name}")
            with torch.inference_mode():
                logits = ctx.task.logits({**emb, "text": text.to(emb["text"].device)})
            preds = logits.argmax(dim=-1).cpu().numpy()
            ok = preds == target
            correct.append(ok)
            r = group_fairness(target, preds, groups, report.n_classes)
            metrics[f"variant_accuracy/{name}"] = Metric(
                float(ok.mean()), mean_ci(ok, self.n_boot, seed=ctx.seed)
            )
            for m in GAPS:
                metrics[f"{m}/variant_{name}"] = Metric(r.summary[m])
            rows.append([name, float(ok.mean()), *(r.summary[m] for m in GAPS)])
        matrix = np.stack(correct, axis=1).astype(np.float64)
        value = spread(matrix)
        ci = bootstrap_ci(spread, matrix, n_boot=self.n_boot, seed=ctx.seed)
        metrics["variant_accuracy_spread"] = Metric(value, ci)
        worst = min(rows, key=lambda r: r[1])
        sure = bool(np.isfinite(ci[0]) and ci[0] > self.max_gap)
        findings = []
        if value > self.max_gap:
            findings.append(
                Finding(
                    "medium" if sure else "low",
                    f"Accuracy differs by {value:.3f} (95% CI [{ci[0]:.3f}, {ci[1]:.3f}]) across "
                    f"caption variants, above {self.max_gap:g}; lowest under {worst[0]!r} "
                    f"({worst[1]:.3f}).",
                    {"spread": value, "ci": list(ci), "accuracy": {r[0]: r[1] for r in rows}},
                    "Train or fine-tune on the caption variants (translations, paraphrases), or "
                    "normalise captions before they reach the model; re-audit afterwards.",
                )
            )
        plot = {
            "caption_variants": {
                "kind": "table",
                "title": "Accuracy and group gaps per caption variant",
                "columns": ["captions", "accuracy", *(m.replace("_", " ") for m in GAPS)],
                "rows": [[r[0], *(_f(v) for v in r[1:])] for r in rows],
            }
        }
        return findings, plot


def _ci(m: Metric) -> str:
    return "n/a" if m.ci is None else f"[{m.ci[0]:.3f}, {m.ci[1]:.3f}]"
