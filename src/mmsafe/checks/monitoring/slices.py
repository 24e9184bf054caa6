"""``monitoring.slices``: where does the model fail systematically (DOMINO slice discovery)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.slices import (
    Init,
    MixtureResult,
    SliceTable,
    default_vocabulary,
    discover_slices,
    rank_phrases,
)

MIN_ROWS_PER_SLICE = 10
"""The mixture gets at most ``n_labelled // MIN_ROWS_PER_SLICE`` components."""


@dataclass(frozen=True)
class SliceDiscovery:
    """The fitted slices of one evaluation set.

    Attributes:
        rows: positions (in ``ctx.data``) of the labelled rows the mixture was fitted on.
        z: ``(N, D)`` their image embeddings.
        labels: ``(N,)`` their labels.
        preds: ``(N,)`` the model's predictions.
        mixture: the fitted mixture (memberships are over ``rows``).
        table: per-slice statistics and the ranking (``table.order[0]`` is slice 1).
    """

    rows: np.ndarray
    z: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    mixture: MixtureResult
    table: SliceTable

    def members(self, rank: int) -> np.ndarray:
        """Positions (in ``ctx.data``) of the rows hard-assigned to the slice ranked ``rank``."""
        s = self.table.order[rank - 1]
        return self.rows[self.mixture.hard == s]


@register_check
class SlicesCheck(Check):
    """Discover coherent, error-prone slices of the evaluation rows and describe them in words.

    Fits DOMINO's error-aware Gaussian mixture (see :mod:`mmsafe.methods.slices` and
    ``docs/slices.md``)
    to the image embeddings of the labelled rows, with their labels and predicted probabilities;
    ranks the components by the lower 95% bound of their error rate; tests each with a one-sided
    Fisher exact test (error rate above the other rows), Benjamini-Hochberg adjusted; and
    describes the ``top_k`` by the phrases whose text embeddings best match the slice's mean
    embedding shift.

    Args:
        n_slices: mixture components (capped at ``n_labelled // 10``).
        gamma: weight of the label and prediction terms of the mixture (DOMINO's gamma); larger
            makes slices purer in error type, smaller makes them more coherent in embedding space.
        top_k: how many slices to report.
        alpha: false discovery rate of the significance tests.
        vocabulary: candidate description phrases; ``None`` builds them from the class names and
            the captions (:func:`mmsafe.methods.slices.default_vocabulary`).
        init: mixture initialisation, ``"confusion"`` (DOMINO's) or ``"kmeans++"``.
        n_examples: example rows shown per slice.
        n_phrases: phrases in each slice's description.
    """

    name = "monitoring.slices"
    pillar = "monitoring"
    requires = ("labels",)
    tasks = ("zero_shot", "fusion")
    description = "DOMINO error-aware mixture: top-k error slices, BH-tested, described in words"
    higher_is_better = {"accuracy": True, "p_adjusted": True, "n_significant": False}

    def __init__(
        self,
        n_slices: int = 16,
        gamma: float = 5.0,
        top_k: int = 5,
        alpha: float = 0.05,
        vocabulary: Sequence[str] | None = None,
        init: Init = "confusion",
        n_examples: int = 5,
        n_phrases: int = 3,
    ) -> None:
        self.n_slices = n_slices
        self.gamma = gamma
        self.top_k = top_k
        self.alpha = alpha
        self.vocabulary = None if vocabulary is None else list(vocabulary)
        self.init = init
        self.n_examples = n_examples
        self.n_phrases = n_phrases

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        if "image" not in ctx.outputs.embeddings:
            return "needs image embeddings"
        n = int((ctx.outputs.labels >= 0).sum())
        if n < 2 * MIN_ROWS_PER_SLICE:
            return f"needs at least {2 * MIN_ROWS_PER_SLICE} labelled rows, got {n}"
        return None

    def discover(self, ctx: AuditContext) -> SliceDiscovery:
        """Fit the mixture and score its slices on the labelled evaluation rows (no text)."""
        out = ctx.outputs
        rows = np.flatnonzero(out.labels >= 0)
        z = out.embeddings["image"].double().numpy()[rows]
        labels, probs = out.labels[rows], out.probs[rows]
        k = max(1, min(self.n_slices, len(rows) // MIN_ROWS_PER_SLICE))
        fit, table = discover_slices(
            z,
            labels,
            probs,
            n_slices=k,
            gamma=self.gamma,
            alpha=self.alpha,
            seed=ctx.seed,
            init=self.init,
        )
        return SliceDiscovery(rows, z, labels, probs.argmax(axis=1), fit, table)

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        found = self.discover(ctx)
        data, rows, z, labels, preds = ctx.data, found.rows, found.z, found.labels, found.preds
        fit, table = found.mixture, found.table
        k = len(table.size)
        hard = fit.hard
        texts = data.modalities.get("text")
        phrases = self.vocabulary or default_vocabulary(
            data.classes, [] if texts is None else [str(texts[i]) for i in rows]
        )
        t = ctx.engine.embed_values(ctx.model, "text", phrases, desc="slice vocabulary")
        t = t.double().numpy()
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)

        overall_acc = 1.0 - table.overall_error
        metrics: dict[str, Metric] = {
            "overall_accuracy": Metric(overall_acc),
            "n_slices": Metric(float(k)),
            "n_significant": Metric(float(table.significant.sum())),
        }
        reported = [int(s) for s in table.order if table.size[s] > 0][: self.top_k]
        summary, examples, findings = [], [], []
        for rank, s in enumerate(reported, start=1):
            members = hard == s
            order, _ = rank_phrases(z, members, t)
            words = [phrases[i] for i in order[: self.n_phrases]]
            acc = 1.0 - float(table.error_rate[s])
            lo, hi = (float(v) for v in table.accuracy_ci[s])
            metrics[f"slice{rank}/size"] = Metric(float(table.size[s]))
            metrics[f"slice{rank}/accuracy"] = Metric(acc, (lo, hi))
            metrics[f"slice{rank}/p_adjusted"] = Metric(float(table.p_adjusted[s]))
            top_rows = _example_rows(fit.memberships[:, s], members, preds != labels)
            top_rows = top_rows[: self.n_examples]
            summary.append(
                [
                    rank,
                    int(table.size[s]),
                    acc,
                    f"[{lo:.2f}, {hi:.2f}]",
                    float(table.p_adjusted[s]),
                    "; ".join(words),
                ]
            )
            for i in top_rows:
                examples.append(
                    [
                        rank,
                        data.ids[rows[i]],
                        "" if texts is None else str(texts[rows[i]]),
                        data.classes[labels[i]],
                        data.classes[preds[i]],
                        float(fit.memberships[i, s]),
                    ]
                )
            if table.significant[s]:
                findings.append(
                    self._finding(
                        rank,
                        s,
                        table,
                        overall_acc,
                        words,
                        labels,
                        preds,
                        members,
                        [data.ids[rows[i]] for i in top_rows],
                        data.classes,
                    )
                )
        plots = {
            "slices": {
                "kind": "table",
                "title": f"Top {len(reported)} of {k} slices by error rate (lower 95% bound)",
                "columns": ["rank", "size", "accuracy", "accuracy 95% CI", "p_adj", "description"],
                "rows": summary,
            },
            "slice_examples": {
                "kind": "table",
                "title": "Example rows of each reported slice (errors first)",
                "columns": ["slice", "id", "caption", "label", "predicted", "membership"],
                "rows": examples,
            },
        }
        findings.sort(key=lambda f: {"high": 0, "medium": 1, "low": 2, "info": 3}[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    def _finding(
        self,
        rank: int,
        s: int,
        table: SliceTable,
        overall_acc: float,
        words: list[str],
        labels: np.ndarray,
        preds: np.ndarray,
        members: np.ndarray,
        example_ids: list[str],
        classes: Sequence[str],
    ) -> Finding:
        acc = 1.0 - float(table.error_rate[s])
        gap = overall_acc - acc
        wrong = members & (preds != labels)
        confusions = Counter(
            f"{classes[a]} -> {classes[b]}"
            for a, b in zip(labels[wrong], preds[wrong], strict=True)
        ).most_common(3)
        severity = "high" if gap >= 0.3 else "medium" if gap >= 0.1 else "low"
        return Finding(
            severity,
            f"Slice {rank} ({int(table.size[s])} rows, accuracy {acc:.2f} vs {overall_acc:.2f} "
            f"overall, adjusted p = {float(table.p_adjusted[s]):.2g}) is best described as: "
            + "; ".join(f'"{w}"' for w in words)
            + ".",
            {
                "rank": rank,
                "size": int(table.size[s]),
                "accuracy": acc,
                "overall_accuracy": overall_acc,
                "p_adjusted": float(table.p_adjusted[s]),
                "description": words,
                "top_confusions": dict(confusions),
                "example_ids": example_ids,
            },
            "Inspect the example rows; if the description names an attribute the label should "
            "not depend on (a background, a style), collect or reweight training data where it "
            "varies independently of the class, then re-audit.",
        )


def _example_rows(membership: np.ndarray, members: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Row positions of a slice's members: misclassified first, then by decreasing membership."""
    idx = np.flatnonzero(members)
    return idx[np.lexsort((-membership[idx], ~wrong[idx]))]
