"""``robustness.shift``: how far performance falls under corrupted inputs, per modality.

Every image corruption and text perturbation of :mod:`mmsafe.methods.perturb` is applied at five
severities to the evaluated rows, one modality at a time; only the perturbed modality is
re-embedded, and the task's logits are recomputed from the clean embeddings of the other
modalities. Reported per modality (see ``docs/robustness.md``):

* the score per corruption x severity (accuracy, or R@1 for retrieval) and its heatmap;
* mean corruption accuracy (mCA), the mean over corruptions and severities;
* relative robustness ``RR = mCA / clean`` (a ratio; Taori et al.'s *relative* robustness of an
  intervention is the raw gain under shift, which :func:`relative_gain` gives);
* MultiModal Impact ``MMI = mean_p (clean - S_p) / clean`` (Qiu et al., working formula);
  with one clean score this equals ``1 - RR``;
* effective robustness ``ER = mCA - beta(clean)`` (Taori et al.), where ``beta`` is the line
  fitted in logit space through a *family* of ``(clean, shifted)`` accuracy points of standard
  models, given as a check option; without a family ER is not reported, and a finding says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.engine.variants import corruption_variant
from mmsafe.methods.perturb import IMAGE_CORRUPTIONS, SEVERITIES, TEXT_PERTURBATIONS
from mmsafe.metrics import best_positive_rank, mean_ci, resample_counts

EPS = 1e-4
REMEDIATION = (
    "Train or fine-tune with corruption augmentations (AugMix-style image corruptions, typo and "
    "paraphrase augmentation for text), ensemble fine-tuned and zero-shot weights (WiSE-FT), "
    "and monitor inputs for corruption in deployment (monitoring.ood)."
)

# --------------------------------------------------------------------------- pure metrics


def logit(p: Any) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[1e-4, 1 - 1e-4]``.

    Example:
        >>> float(logit(0.5))
        0.0
    """
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(q / (1 - q))


def sigmoid(z: Any) -> np.ndarray:
    """The inverse of :func:`logit`.

    Example:
        >>> round(float(sigmoid(logit(0.8))), 6)
        0.8
    """
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def fit_logit_trend(points: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Least-squares line ``logit(shifted) = a * logit(clean) + b`` through a model family.

    Args:
        points: ``(clean accuracy, shifted accuracy)`` pairs of standard models, at least two
            with different clean accuracies.

    Returns:
        ``(a, b)``.

    Example:
        >>> a, b = fit_logit_trend([(0.5, 0.4), (sigmoid(1.0), sigmoid(0.5 + logit(0.4)))])
        >>> round(a, 6), round(b, 6) == round(float(logit(0.4)), 6)
        (0.5, True)
    """
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 2:
        raise ValueError("a family needs at least two (clean, shifted) accuracy pairs")
    if not ((arr > 0) & (arr < 1)).all():
        raise ValueError(f"family accuracies must lie in (0, 1), got {arr.tolist()}")
    x, y = logit(arr[:, 0]), logit(arr[:, 1])
    if np.ptp(x) == 0:
        raise ValueError("a family needs at least two different clean accuracies")
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def effective_robustness(clean: Any, shifted: Any, trend: tuple[float, float]) -> np.ndarray:
    """Taori et al.'s ``rho = shifted - sigmoid(a * logit(clean) + b)``.

    Positive: more accurate under shift than the family trend predicts from clean accuracy.

    Example:
        >>> round(float(effective_robustness(0.5, 0.6, (1.0, 0.0))), 6)
        0.1
    """
    a, b = trend
    return np.asarray(shifted, dtype=np.float64) - sigmoid(a * logit(clean) + b)


def relative_robustness(clean: float, shifted: float) -> float:
    """``shifted / clean``: the share of clean performance kept under shift (NaN if clean is 0).

    Example:
        >>> relative_robustness(0.8, 0.4)
        0.5
    """
    return float(shifted) / float(clean) if clean > 0 else math.nan


def relative_gain(shifted_before: float, shifted_after: float) -> float:
    """Taori et al.'s relative robustness of an intervention: ``acc2(f') - acc2(f)``.

    Example:
        >>> round(relative_gain(0.5, 0.6), 6)
        0.1
    """
    return float(shifted_after) - float(shifted_before)


def multimodal_impact(clean: float, scores: Any) -> float:
    """MMI: the mean relative drop ``(clean - S_p) / clean`` over perturbations and levels.

    The working formula of Qiu et al. (DMLR 2024); lower is more robust, negative when a
    perturbation helps. NaN when ``clean`` is 0.

    Example:
        >>> multimodal_impact(0.8, [0.8, 0.6, 0.4])
        0.25
    """
    s = np.asarray(scores, dtype=np.float64)
    if not clean > 0:
        return math.nan
    return float(np.mean((clean - s) / clean))


def ratio_ci(
    num: np.ndarray, den: np.ndarray, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``sum(num) / sum(den)`` over resampled rows.

    Example:
        >>> ratio_ci(np.full(50, 0.5), np.ones(50), n_boot=100, seed=0)
        (0.5, 0.5)
    """
    stats = []
    for counts in resample_counts(len(num), n_boot, seed):
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append((counts @ num) / (counts @ den))
    s = np.concatenate(stats)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    lo, hi = np.percentile(s, [100 * alpha, 100 * (1 - alpha)])
    return (float(lo), float(hi))


def _er_ci(
    clean: np.ndarray, shifted: np.ndarray, trend: tuple[float, float], n_boot: int, seed: int
) -> tuple[float, float]:
    """Bootstrap CI of ER over resampled rows (the family trend is held fixed)."""
    n = len(clean)
    stats = [
        effective_robustness(c @ clean / n, c @ shifted / n, trend)
        for c in resample_counts(n, n_boot, seed)
    ]
    s = np.concatenate(stats)
    lo, hi = np.percentile(s, [2.5, 97.5])
    return (float(lo), float(hi))


def _probs_correct(logits: Tensor, labels: np.ndarray) -> np.ndarray:
    return (logits.argmax(dim=-1).cpu().numpy() == labels).astype(np.float64)


def _retrieval_hits(logits: Tensor, positives: np.ndarray) -> np.ndarray:
    """Per-row R@1, averaged over image-to-text and text-to-image."""
    sim = logits.double().cpu().numpy()
    i2t = best_positive_rank(sim, positives) < 1
    t2i = best_positive_rank(sim.T, positives.T) < 1
    return (i2t.astype(np.float64) + t2i) / 2


# --------------------------------------------------------------------------- the check


@register_check
class ShiftCheck(Check):
    """Accuracy under ImageNet-C-style image corruptions and graded text perturbations.

    Args:
        image_corruptions: names from :data:`mmsafe.methods.perturb.IMAGE_CORRUPTIONS`; ``None``
            runs all of them.
        text_perturbations: names from :data:`mmsafe.methods.perturb.TEXT_PERTURBATIONS`; ``None``
            runs all of them (only on tasks that read the rows' text).
        severities: which of the severities 1-5 to run.
        family: ``[(clean, shifted), ...]`` accuracies of a family of standard models under the
            same image corruptions (shifted = their mean corruption accuracy); enables
            effective robustness for the image modality.
        text_family: the same for the text perturbations.
        max_rows: evaluate at most this many rows (a seeded subsample; ``None``: all).
        min_relative_robustness: a modality whose RR falls below this raises a finding.
        max_er_drop: an ER below ``-max_er_drop`` (CI excluding 0) raises a finding.
        n_boot: bootstrap resamples for the CIs.
    """

    name = "robustness.shift"
    conditional_metrics = {"*/text": "reads:text", "*/text/*": "reads:text"}
    pillar = "robustness"
    description = "accuracy per corruption x severity per modality; mCA, RR, ER, MultiModal Impact"
    tasks = ("zero_shot", "fusion")
    requires = ("labels",)
    higher_is_better = {
        f"{k}/{m}": hib
        for m in ("image", "text")
        for k, hib in (
            ("mean_corruption_accuracy", True),
            ("mean_corruption_R@1", True),
            ("relative_robustness", True),
            ("effective_robustness", True),
            ("mmi", False),
        )
    }

    def __init__(
        self,
        image_corruptions: Sequence[str] | None = None,
        text_perturbations: Sequence[str] | None = None,
        severities: Sequence[int] = SEVERITIES,
        family: Sequence[Sequence[float]] | None = None,
        text_family: Sequence[Sequence[float]] | None = None,
        max_rows: int | None = 1000,
        min_relative_robustness: float = 0.8,
        max_er_drop: float = 0.05,
        n_boot: int = 1000,
    ) -> None:
        self.image_corruptions = tuple(image_corruptions or IMAGE_CORRUPTIONS)
        self.text_perturbations = tuple(text_perturbations or TEXT_PERTURBATIONS)
        self.severities = tuple(int(s) for s in severities)
        unknown = [c for c in self.image_corruptions if c not in IMAGE_CORRUPTIONS] + [
            t for t in self.text_perturbations if t not in TEXT_PERTURBATIONS
        ]
        if unknown:
            raise ValueError(
                f"unknown corruption(s) {unknown}; image: {', '.join(IMAGE_CORRUPTIONS)}; "
                f"text: {', '.join(TEXT_PERTURBATIONS)}"
            )
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise ValueError(f"severities must be a non-empty subset of {SEVERITIES}")
        self.trends = {
            m: None if fam is None else fit_logit_trend(fam)
            for m, fam in (("image", family), ("text", text_family))
        }
        self.family = None if family is None else [list(map(float, p)) for p in family]
        self.text_family = (
            None if text_family is None else [list(map(float, p)) for p in text_family]
        )
        self.max_rows = max_rows
        self.min_relative_robustness = min_relative_robustness
        self.max_er_drop = max_er_drop
        self.n_boot = n_boot

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        rows, emb, score, score_name, modalities, n_total = self._setup(ctx)
        clean = score(emb)
        clean_value = float(clean.mean())
        metrics: dict[str, Metric] = {
            f"clean_{score_name}": Metric(clean_value, mean_ci(clean, self.n_boot, seed=ctx.seed))
        }
        findings: list[Finding] = []
        plots: dict[str, dict[str, Any]] = {}
        curves = []
        findings.append(
            Finding(
                "info",
                f"Scored {len(rows)} of {n_total} rows under {len(self.image_corruptions)} image "
                f"corruptions and {len(self.text_perturbations)} text perturbations at "
                f"severities {list(self.severities)}; one modality perturbed at a time, the "
                "others clean. Image parameters follow ImageNet-C (spatial ones CIFAR-10-C, "
                "scaled to the image size); see docs/robustness.md.",
                {"rows": len(rows), "severities": list(self.severities), "score": score_name},
            )
        )
        if "text" not in modalities:
            findings.append(
                Finding(
                    "info",
                    f"Text perturbations skipped: task {ctx.task.name!r} does not read the "
                    "rows' text (zero-shot prompts are fixed).",
                )
            )
        for m in modalities:
            names = self.image_corruptions if m == "image" else self.text_perturbations
            if not names:
                continue
            shifted_emb = self._shifted_embeddings(ctx, m, rows)
            table = np.stack(
                [
                    np.stack([score({**emb, m: shifted_emb[(k, s)]}) for s in self.severities])
                    for k in names
                ]
            )  # (K, S, N)
            metrics.update(self._modality_metrics(m, names, table, clean, score_name, ctx.seed))
            findings += self._modality_findings(m, names, table, clean_value, metrics, score_name)
            cells = table.mean(axis=2)
            plots[f"heatmap_{m}"] = {
                "kind": "heatmap",
                "title": f"{score_name} under {m} corruptions (clean {clean_value:.3f})",
                "rows": list(names),
                "columns": ["clean", *[str(s) for s in self.severities]],
                "values": [[clean_value, *map(float, r)] for r in cells],
                "vlim": [0.0, 1.0],
            }
            curves.append(
                {
                    "name": m,
                    "x": [0, *self.severities],
                    "y": [clean_value, *map(float, cells.mean(axis=0))],
                }
            )
        if curves:
            plots["severity_curve"] = {
                "kind": "line",
                "title": f"Mean {score_name} over corruptions by severity (0 = clean)",
                "xlabel": "severity",
                "ylabel": score_name,
                "series": curves,
                "ylim": [0.0, 1.0],
            }
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        findings.sort(key=lambda f: order[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    # ------------------------------------------------------------------ parts
    def _setup(
        self, ctx: AuditContext
    ) -> tuple[
        np.ndarray,
        dict[str, Tensor],
        Callable[[Mapping[str, Tensor]], np.ndarray],
        str,
        list[str],
        int,
    ]:
        """``(rows, clean embeddings, score, score name, modalities, rows in all)``.

        ``score(embeddings)`` gives each scored row's score (1 correct / 0 wrong, or R@1) from
        the embeddings of those rows, with one modality swapped for its shifted version.
        """
        rows = self._rows(ctx)
        emb = {m: e[torch.as_tensor(rows)] for m, e in ctx.outputs.embeddings.items()}
        retrieval = ctx.task.kind == "retrieval"
        labels = ctx.outputs.labels[rows]
        positives = None
        if retrieval:
            pos = ctx.outputs.positives
            positives = np.eye(len(rows), dtype=bool) if pos is None else pos[np.ix_(rows, rows)]

        def score(embeddings: Mapping[str, Tensor]) -> np.ndarray:
            with torch.inference_mode():
                logits = ctx.task.logits(embeddings).float().cpu()
            if positives is not None:
                return _retrieval_hits(logits, positives)
            return _probs_correct(logits, labels)

        n_total = len(ctx.outputs.labels) if retrieval else int((ctx.outputs.labels >= 0).sum())
        modalities = [m for m in ("image", "text") if m in ctx.task.modalities]
        return rows, emb, score, "R@1" if retrieval else "accuracy", modalities, n_total

    def _rows(self, ctx: AuditContext) -> np.ndarray:
        labels = ctx.outputs.labels
        rows = (
            np.arange(len(labels)) if ctx.task.kind == "retrieval" else np.flatnonzero(labels >= 0)
        )
        if self.max_rows is not None and len(rows) > self.max_rows:
            rng = ctx.rng("rows")
            rows = np.sort(rng.choice(rows, size=self.max_rows, replace=False))
        return rows

    def _shifted_embeddings(
        self, ctx: AuditContext, m: str, rows: np.ndarray
    ) -> dict[tuple[str, int], Tensor]:
        """Embeddings of ``rows`` under every corruption x severity of modality ``m``.

        One :func:`corruption_variant` per cell: the same seed at every severity (a higher one
        perturbs the same way, more), shared through the engine's cache with the checks that
        ask for the same corruption (``monitoring.conformal``).
        """
        names = self.image_corruptions if m == "image" else self.text_perturbations
        return {
            (k, s): ctx.engine.embed(
                ctx.model, ctx.data, m, variant=corruption_variant(m, k, s, ctx.seed), rows=rows
            )
            for k in names
            for s in self.severities
        }

    def _modality_metrics(
        self,
        m: str,
        names: Sequence[str],
        table: np.ndarray,
        clean: np.ndarray,
        score_name: str,
        seed: int,
    ) -> dict[str, Metric]:
        per_row = table.mean(axis=(0, 1))  # each row's mean score over every cell
        mca = float(per_row.mean())
        c = float(clean.mean())
        rr_ci = ratio_ci(per_row, clean, self.n_boot, seed)
        out = {
            f"mean_corruption_{score_name}/{m}": Metric(
                mca, mean_ci(per_row, self.n_boot, seed=seed)
            ),
            f"relative_robustness/{m}": Metric(relative_robustness(c, mca), rr_ci),
            f"mmi/{m}": Metric(
                multimodal_impact(c, table.mean(axis=2).ravel()), (1 - rr_ci[1], 1 - rr_ci[0])
            ),
        }
        trend = self.trends[m]
        if trend is not None:
            er = float(effective_robustness(c, mca, trend))
            out[f"effective_robustness/{m}"] = Metric(
                er, _er_ci(clean, per_row, trend, self.n_boot, seed)
            )
        cells = table.mean(axis=2)
        for i, k in enumerate(names):
            out[f"{score_name}/{m}/{k}"] = Metric(float(cells[i].mean()))
        for j, s in enumerate(self.severities):
            out[f"{score_name}/{m}/severity_{s}"] = Metric(float(cells[:, j].mean()))
        return out

    def _modality_findings(
        self,
        m: str,
        names: Sequence[str],
        table: np.ndarray,
        clean: float,
        metrics: Mapping[str, Metric],
        score_name: str,
    ) -> list[Finding]:
        out = []
        rr = metrics[f"relative_robustness/{m}"]
        mca = metrics[f"mean_corruption_{score_name}/{m}"].value
        per_k = table.mean(axis=(1, 2))
        worst = np.argsort(per_k, kind="stable")[:3]
        worst_txt = ", ".join(f"{names[i]} ({per_k[i]:.3f})" for i in worst)
        evidence = {
            "clean": clean,
            "mean_corruption": mca,
            "relative_robustness": rr.value,
            "worst": {names[i]: float(per_k[i]) for i in worst},
        }
        if rr.value < self.min_relative_robustness:
            out.append(
                Finding(
                    "high" if rr.value < self.min_relative_robustness - 0.2 else "medium",
                    f"Under {m} corruptions the model keeps {rr.value:.0%} of its clean "
                    f"{score_name} (mean {mca:.3f} vs clean {clean:.3f}; threshold "
                    f"{self.min_relative_robustness:.0%}). Worst: {worst_txt}.",
                    evidence,
                    REMEDIATION,
                )
            )
        trend = self.trends[m]
        if trend is None:
            opt = "family" if m == "image" else "text_family"
            out.append(
                Finding(
                    "info",
                    f"Effective robustness ({m}) not computed: no model family given. Pass "
                    f"{opt}=[[clean, shifted], ...] accuracies of standard models under the same "
                    "corruptions to measure the gain over the logit-linear trend.",
                )
            )
        else:
            er = metrics[f"effective_robustness/{m}"]
            predicted = float(sigmoid(trend[0] * logit(clean) + trend[1]))
            if er.value < -self.max_er_drop and er.ci is not None and er.ci[1] < 0:
                out.append(
                    Finding(
                        "medium",
                        f"Effective robustness ({m}) is {er.value:+.3f}: the mean corruption "
                        f"{score_name} {mca:.3f} is below the {predicted:.3f} the model family's "
                        "trend predicts from the clean score.",
                        {**evidence, "effective_robustness": er.value, "trend": list(trend)},
                        REMEDIATION,
                    )
                )
        return out


@register_check
class ShiftRetrievalCheck(ShiftCheck):
    """``robustness.shift`` on retrieval: R@1 per corruption x severity per modality.

    The same options as :class:`ShiftCheck`; its metrics are named for R@1 (``clean_R@1``,
    ``R@1/image/<corruption>``, ...), since one check keeps one metric schema. The old name
    ``robustness.shift`` still selects it on ``--task retrieval``.
    """

    name = "robustness.shift_retrieval"
    aliases = ("robustness.shift",)
    tasks = ("retrieval",)
    requires = ()  # retrieval is scored by pairs
    description = "R@1 per corruption x severity per modality; mean corruption R@1, RR, MMI"


@register_check
class ShiftSeqRecCheck(ShiftCheck):
    """``robustness.shift`` on a recommender: NDCG@10 when every item's image or title shifts.

    Each corruption (image) or perturbation (title) is applied to every catalogue item, the
    items are embedded again through the engine (cached, shared with any check that asks for
    the same variant), and the users are ranked against the shifted catalogue. Metrics are
    named for NDCG@10 (``clean_NDCG@10``, ``NDCG@10/image/<corruption>``, ...). Users are
    the rows: ``max_rows`` caps how many are scored.
    """

    name = "robustness.shift_seqrec"
    aliases = ("robustness.shift",)
    kinds = ("recommender",)
    tasks = ("seqrec",)
    requires = ()
    conditional_metrics = {}
    description = "NDCG@10 when items' images or titles are corrupted; mean corruption NDCG@10, RR"
    higher_is_better = {
        f"{k}/{m}": hib
        for m in ("image", "text")
        for k, hib in (
            ("mean_corruption_NDCG@10", True),
            ("relative_robustness", True),
            ("effective_robustness", True),
            ("mmi", False),
        )
    }

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and not self._item_modalities(ctx):
            reason = "the recommender reads no item image or title through an encoder"
        return reason

    @staticmethod
    def _item_modalities(ctx: AuditContext) -> list[str]:
        model = ctx.model
        if getattr(model, "encoder", None) is None:
            return []
        return [m for m in ("image", "text") if m in model.cfg.modalities]  # type: ignore[attr-defined]

    def _rows(self, ctx: AuditContext) -> np.ndarray:
        rows = np.arange(len(ctx.data))
        if self.max_rows is not None and len(rows) > self.max_rows:
            rows = np.sort(ctx.rng("rows").choice(rows, size=self.max_rows, replace=False))
        return rows

    def _setup(self, ctx: AuditContext) -> Any:
        from mmsafe.methods.recommend import user_metrics

        rows = self._rows(ctx)
        users = ctx.data.subset(rows)

        def score(features: Mapping[str, Tensor]) -> np.ndarray:
            with torch.inference_mode():
                logits = ctx.task.logits(features).float().cpu()
            return user_metrics(logits[torch.as_tensor(rows)], users, (10,))["ndcg@10"]

        emb = dict(ctx.outputs.embeddings)
        return rows, emb, score, "NDCG@10", self._item_modalities(ctx), len(ctx.data)

    def _shifted_embeddings(
        self, ctx: AuditContext, m: str, rows: np.ndarray
    ) -> dict[tuple[str, int], Tensor]:
        """Every item's features under every corruption x severity of its modality ``m``."""
        names = self.image_corruptions if m == "image" else self.text_perturbations
        encoder, catalog = ctx.model.encoder, ctx.data.catalog  # type: ignore[attr-defined]
        return {
            (k, s): ctx.engine.embed(
                encoder, catalog, m, variant=corruption_variant(m, k, s, ctx.seed)
            )
            for k in names
            for s in self.severities
        }
