"""``monitoring.conformal``: split-conformal prediction sets and their coverage.

Fits a :class:`~mmsafe.methods.conformal.ConformalPredictor` per conformity score on the labelled
rows
of the ``calibration`` split (or on a seeded random part of the evaluated rows with
``holdout``) and measures, on the labelled evaluated rows, how often the sets contain the true
label (coverage), how large they are, and whether coverage holds per class and per group.
With images, it also re-evaluates the clean-calibrated sets under the image corruptions of
``robustness.shift``: coverage under each shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.engine.variants import corruption_variant
from mmsafe.methods.conformal import (
    SCORES,
    ConformalPredictor,
    coverage_under_shift,
    set_coverage,
    set_sizes,
)
from mmsafe.methods.perturb import IMAGE_CORRUPTIONS
from mmsafe.metrics import grouped_mean_ci, mean_ci

HEADLINE = "aps"
SHIFTS: tuple[str, ...] = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")
"""Default corruptions for coverage under shift (one per ImageNet-C family)."""


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into (calibration, evaluation) index arrays.

    Example:
        >>> cal, ev = holdout_split(10, 0.5, seed=0)
        >>> len(cal), len(ev), sorted(np.r_[cal, ev].tolist()) == list(range(10))
        (5, 5, True)
    """
    perm = np.random.default_rng(int(seed)).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[:k]), np.sort(perm[k:])


def coverage_tolerance(level: float, n_eval: int, n_cal: int, z: float = 2.0) -> float:
    """``z`` binomial standard errors of a coverage estimate, test and calibration noise both.

    The coverage measured on ``n_eval`` rows varies as ``level (1 - level) / n_eval`` around
    the coverage of the fitted threshold, which itself varies about ``level (1 - level) /
    n_cal`` over calibration draws (its Beta law).

    Example:
        >>> round(coverage_tolerance(0.9, 100, 100), 4)
        0.0849
    """
    if n_eval <= 0:
        return math.inf
    var = level * (1.0 - level) * (1.0 / n_eval + (1.0 / n_cal if n_cal > 0 else 0.0))
    return z * math.sqrt(var)


@register_check
class ConformalCheck(Check):
    """Coverage, set size and singleton rate of split-conformal sets, per score, class and group.

    Args:
        confidence_level: target coverage ``1 - alpha``.
        scores: conformity scores to evaluate, among ``lac``, ``aps``, ``raps``.
        mondrian: ``None``, ``"class"`` or ``"group"`` (per-stratum thresholds).
        holdout: when the data has no labelled ``calibration`` split, calibrate on this fraction
            of the labelled evaluated rows (seeded by the audit seed) and evaluate on the rest;
            ``None`` skips the check instead.
        randomized: randomized APS/RAPS (near-exact coverage; sets may be empty).
        k_reg: RAPS rank allowance.
        lam: RAPS penalty.
        n_boot: bootstrap resamples for the CIs.
        tolerance_se: a class or group is flagged when its coverage falls below the target by
            more than this many binomial standard errors.
        shifts: image corruptions of ``robustness.shift`` (:mod:`mmsafe.methods.perturb`) under
        which
            the headline score's sets, calibrated on clean rows, are re-evaluated
            (``shift/<corruption>/coverage``, ``.../mean_set_size``); empty: none.
        shift_severity: the corruptions' severity (1-5).
    """

    name = "monitoring.conformal"
    pillar = "monitoring"
    requires = ("labels",)
    tasks = ("zero_shot", "fusion")
    description = "split-conformal sets (LAC/APS/RAPS): coverage, set size, per class and group"
    higher_is_better = {
        "coverage": True,
        "mean_set_size": False,
        **{f"{s}/coverage": True for s in SCORES},
        **{f"{s}/mean_set_size": False for s in SCORES},
        **{f"{s}/singleton_rate": True for s in SCORES},
    }

    def __init__(
        self,
        confidence_level: float = 0.9,
        scores: Sequence[str] = SCORES,
        mondrian: str | None = None,
        holdout: float | None = None,
        randomized: bool = False,
        k_reg: int = 1,
        lam: float = 0.01,
        n_boot: int = 1000,
        tolerance_se: float = 2.0,
        shifts: Sequence[str] = SHIFTS,
        shift_severity: int = 3,
    ) -> None:
        self.confidence_level = confidence_level
        self.scores = tuple([scores] if isinstance(scores, str) else scores)
        self.mondrian = mondrian
        self.holdout = holdout
        self.randomized = randomized
        self.k_reg = k_reg
        self.lam = lam
        self.n_boot = n_boot
        self.tolerance_se = tolerance_se
        self.shifts = tuple([shifts] if isinstance(shifts, str) else shifts)
        self.shift_severity = int(shift_severity)
        unknown = [k for k in self.shifts if k not in IMAGE_CORRUPTIONS]
        if unknown:
            raise ValueError(
                f"Unknown corruption(s) {unknown}; choose from {list(IMAGE_CORRUPTIONS)}."
            )
        bad = [s for s in self.scores if s not in SCORES]
        if bad or not self.scores:
            raise ValueError(f"`scores` must be a non-empty subset of {SCORES}, got {scores!r}.")
        if mondrian not in (None, "class", "group"):
            raise ValueError(f"`mondrian` must be None, 'class' or 'group', got {mondrian!r}.")
        if holdout is not None and not 0.0 < holdout < 1.0:
            raise ValueError(f"`holdout` must be in (0, 1) or None, got {holdout!r}.")

    @property
    def headline(self) -> str:
        """The score behind the plain ``coverage`` and ``mean_set_size`` metrics."""
        return HEADLINE if HEADLINE in self.scores else self.scores[0]

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        has_cal = ctx.calibration is not None and bool(ctx.calibration.labelled.any())
        if not has_cal and self.holdout is None:
            return (
                "needs a 'calibration' split (with labels); or set the option holdout=0.5 to "
                "calibrate on half of the evaluated rows"
            )
        if self.mondrian == "group" and ctx.data.groups is None:
            return "mondrian='group' needs a 'group' column"
        return None

    # ------------------------------------------------------------------ data
    def _split(self, ctx: AuditContext) -> dict[str, Any]:
        """Calibration and evaluation arrays (labelled rows only), and where they came from."""
        out = ctx.outputs
        probs, labels = out.probs, out.labels
        groups = None if ctx.data.groups is None else np.asarray(ctx.data.groups, dtype=str)
        labelled = labels >= 0
        unlabelled_probs = probs[~labelled]
        if ctx.calibration is not None and ctx.calibration.labelled.any():
            cal = ctx.engine.outputs(ctx.model, ctx.task, ctx.calibration)
            keep = cal.labels >= 0
            cal_groups = (
                None
                if ctx.calibration.groups is None
                else np.asarray(ctx.calibration.groups, dtype=str)[keep]
            )
            source = "calibration split"
            cal_probs, cal_labels = cal.probs[keep], cal.labels[keep]
            ev = np.flatnonzero(labelled)
        else:
            idx = np.flatnonzero(labelled)
            c, e = holdout_split(idx.size, float(self.holdout), ctx.seed_for("holdout"))  # type: ignore[arg-type]
            cal_idx, ev = idx[c], idx[e]
            source = f"holdout ({self.holdout:g} of the labelled evaluated rows)"
            cal_probs, cal_labels = probs[cal_idx], labels[cal_idx]
            cal_groups = None if groups is None else groups[cal_idx]
        return {
            "source": source,
            "cal_probs": cal_probs,
            "cal_labels": cal_labels,
            "cal_groups": cal_groups,
            "rows": ev,
            "probs": probs[ev],
            "labels": labels[ev],
            "groups": None if groups is None else groups[ev],
            "unlabelled_probs": unlabelled_probs,
        }

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        d = self._split(ctx)
        level = float(self.confidence_level)
        classes = list(ctx.data.classes)
        labels, groups = d["labels"], d["groups"]
        n_eval, n_cal = int(labels.size), int(d["cal_labels"].size)
        if n_eval == 0 or n_cal == 0:
            return self.result(
                status="skipped",
                reason=f"no labelled rows to {'evaluate' if n_eval == 0 else 'calibrate'} on",
            )
        group_names = [] if groups is None else sorted(set(groups.tolist()))
        group_idx = None if groups is None else np.searchsorted(group_names, groups)
        metrics: dict[str, Metric] = {}
        strata: dict[str, dict[str, dict[str, Any]]] = {}
        predictors: dict[str, ConformalPredictor] = {}
        seed = ctx.seed
        for score in self.scores:
            cp = ConformalPredictor(
                level,
                score=score,
                mondrian=self.mondrian,
                randomized=self.randomized,
                k_reg=self.k_reg,
                lam=self.lam,
                seed=seed,
            ).fit(d["cal_probs"], d["cal_labels"], groups=d["cal_groups"])
            predictors[score] = cp
            sets = cp.predict_set(d["probs"], groups=groups)
            covered = set_coverage(sets, labels).astype(np.float64)
            sizes = set_sizes(sets).astype(np.float64)
            single = (sizes == 1).astype(np.float64)
            cov_ci, class_ci = grouped_mean_ci(
                covered, labels, len(classes), self.n_boot, seed=seed
            )
            metrics[f"{score}/coverage"] = Metric(float(covered.mean()), cov_ci)
            metrics[f"{score}/mean_set_size"] = Metric(
                float(sizes.mean()), mean_ci(sizes, self.n_boot, seed=seed)
            )
            metrics[f"{score}/singleton_rate"] = Metric(
                float(single.mean()), mean_ci(single, self.n_boot, seed=seed)
            )
            metrics[f"{score}/empty_set_rate"] = Metric(float((sizes == 0).mean()))
            metrics[f"{score}/qhat"] = Metric(cp.qhat_)
            if d["unlabelled_probs"].shape[0]:
                u_sets = cp.predict_set(d["unlabelled_probs"], groups=self._unlabelled_groups(ctx))
                metrics[f"{score}/mean_set_size/unlabelled"] = Metric(
                    float(set_sizes(u_sets).mean())
                )
            per: dict[str, dict[str, Any]] = {}
            cal_counts_class = np.bincount(d["cal_labels"], minlength=len(classes))
            for c, name in enumerate(classes):
                rows = labels == c
                if not rows.any():
                    continue
                key = f"class={name}"
                metrics[f"{score}/coverage/{key}"] = Metric(
                    float(covered[rows].mean()), class_ci[c]
                )
                n_cal_s = int(cal_counts_class[c]) if self.mondrian == "class" else n_cal
                per[key] = {
                    "coverage": float(covered[rows].mean()),
                    "n": int(rows.sum()),
                    "n_cal": n_cal_s,
                }
            if group_idx is not None:
                _, group_ci = grouped_mean_ci(
                    covered, group_idx, len(group_names), self.n_boot, seed=seed
                )
                cal_groups = d["cal_groups"]
                for k, name in enumerate(group_names):
                    rows = group_idx == k
                    key = f"group={name}"
                    metrics[f"{score}/coverage/{key}"] = Metric(
                        float(covered[rows].mean()), group_ci[k]
                    )
                    n_cal_s = (
                        int((cal_groups == name).sum())
                        if self.mondrian == "group" and cal_groups is not None
                        else n_cal
                    )
                    per[key] = {
                        "coverage": float(covered[rows].mean()),
                        "n": int(rows.sum()),
                        "n_cal": n_cal_s,
                    }
            strata[score] = per
        head = self.headline
        metrics["coverage"] = metrics[f"{head}/coverage"]
        metrics["mean_set_size"] = metrics[f"{head}/mean_set_size"]
        metrics["target_coverage"] = Metric(level)
        metrics["n_calibration"] = Metric(float(n_cal))
        findings = list(self._findings(d, metrics, strata, predictors, n_eval, n_cal, ctx))
        shifted = self._coverage_under_shift(ctx, predictors[head], d)
        for name, v in shifted.items():
            metrics[f"shift/{name}/coverage"] = Metric(v["coverage"])
            metrics[f"shift/{name}/mean_set_size"] = Metric(v["mean_set_size"])
        worst = min(shifted.items(), key=lambda kv: kv[1]["coverage"], default=None)
        if worst is not None and worst[1]["coverage"] < level - coverage_tolerance(
            level, n_eval, n_cal, self.tolerance_se
        ):
            findings.append(
                Finding(
                    "medium",
                    f"Under the {worst[0]} corruption (severity {self.shift_severity}) "
                    f"{head.upper()} sets calibrated on clean rows cover only "
                    f"{worst[1]['coverage']:.3f} < target {level:g}: the guarantee does not "
                    "survive this shift.",
                    {k: v["coverage"] for k, v in shifted.items()},
                    "Calibrate on data that looks like deployment, or widen the sets "
                    "(a higher confidence level) where such shifts are expected.",
                )
            )
        per_head = strata[head]
        plots = {
            "coverage_per_stratum": {
                "kind": "bar",
                "title": f"{head.upper()} coverage per class and group (target {level:g})",
                "labels": list(per_head),
                "values": [v["coverage"] for v in per_head.values()],
                "reference": level,
                "reference_label": "target",
                "ylim": [0.0, 1.0],
                "ylabel": "coverage",
            },
            "set_size_per_score": {
                "kind": "bar",
                "title": "Mean prediction-set size per score",
                "labels": list(self.scores),
                "values": [metrics[f"{s}/mean_set_size"].value for s in self.scores],
                "ylabel": "labels per set",
            },
        }
        if shifted:
            plots["coverage_under_shift"] = {
                "kind": "bar",
                "title": f"{head.upper()} coverage under image corruptions "
                f"(severity {self.shift_severity})",
                "labels": ["clean", *shifted],
                "values": [metrics["coverage"].value, *(v["coverage"] for v in shifted.values())],
                "reference": level,
                "reference_label": "target",
                "ylim": [0.0, 1.0],
                "ylabel": "coverage",
            }
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    def _coverage_under_shift(
        self, ctx: AuditContext, predictor: ConformalPredictor, d: dict[str, Any]
    ) -> dict[str, dict[str, float]]:
        """Coverage of clean-calibrated sets on corrupted images of the evaluated rows."""
        if not self.shifts or "image" not in ctx.data.modalities:
            return {}
        rows = d["rows"]
        emb = {m: e[torch.as_tensor(rows)] for m, e in ctx.outputs.embeddings.items()}
        shifted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.shifts:
            # the variant robustness.shift uses for this cell: a cache hit when it ran first
            variant = corruption_variant("image", name, self.shift_severity, ctx.seed)
            image = ctx.engine.embed(ctx.model, ctx.data, "image", variant=variant, rows=rows)
            with torch.inference_mode():
                logits = ctx.task.logits({**emb, "image": image}).double()
            shifted[name] = (torch.softmax(logits, dim=-1).numpy(), d["labels"])
        groups = None if d["groups"] is None else {k: d["groups"] for k in shifted}
        return coverage_under_shift(predictor, shifted, groups)

    def _unlabelled_groups(self, ctx: AuditContext) -> list[str] | None:
        if self.mondrian != "group" or ctx.data.groups is None:
            return None
        keep = ctx.outputs.labels < 0
        return [str(g) for g, k in zip(ctx.data.groups, keep, strict=True) if k]

    def _findings(
        self,
        d: dict[str, Any],
        metrics: dict[str, Metric],
        strata: dict[str, dict[str, dict[str, Any]]],
        predictors: dict[str, ConformalPredictor],
        n_eval: int,
        n_cal: int,
        ctx: AuditContext,
    ) -> tuple[Finding, ...]:
        level, z = float(self.confidence_level), float(self.tolerance_se)
        findings: list[Finding] = []
        for score in self.scores:
            cov = metrics[f"{score}/coverage"].value
            tol = coverage_tolerance(level, n_eval, n_cal, z)
            if cov < level - tol:
                findings.append(
                    Finding(
                        "high",
                        f"{score.upper()} sets cover the true label on {cov:.3f} of the evaluated "
                        f"rows, below the {level:g} target by more than {z:g} standard errors "
                        f"({tol:.3f}): the calibration and evaluated rows are probably not "
                        "exchangeable (a distribution shift).",
                        {
                            "score": score,
                            "coverage": cov,
                            "target": level,
                            "tolerance": tol,
                            "n_eval": n_eval,
                            "n_calibration": n_cal,
                        },
                        "Calibrate on rows drawn from the deployment distribution, and monitor "
                        "coverage in production.",
                    )
                )
        head = self.headline
        for key, v in strata[head].items():
            tol = coverage_tolerance(level, v["n"], v["n_cal"], z)
            if v["coverage"] < level - tol:
                kind = key.split("=", 1)[0]
                findings.append(
                    Finding(
                        "medium",
                        f"{head.upper()} coverage for {key} is {v['coverage']:.3f} on {v['n']} "
                        f"rows, below the {level:g} target by more than {z:g} standard errors "
                        f"({tol:.3f}).",
                        {
                            "score": head,
                            "stratum": key,
                            "coverage": v["coverage"],
                            "target": level,
                            "tolerance": tol,
                            "n": v["n"],
                            "n_calibration": v["n_cal"],
                            **{f"{s}/coverage": strata[s][key]["coverage"] for s in self.scores},
                        },
                        f"Use mondrian='{kind}' to calibrate one threshold per {kind} "
                        f"(guaranteed coverage within each {kind}), or collect more calibration "
                        f"data for this {kind}.",
                    )
                )
        fallback = predictors[head].fallback_
        if fallback:
            findings.append(
                Finding(
                    "low",
                    f"{len(fallback)} {self.mondrian} stratum/strata had too few calibration rows "
                    "for their own threshold and use the marginal one (marginal guarantee only): "
                    + ", ".join(str(f) for f in fallback),
                    {"fallback": [str(f) for f in fallback]},
                    "Add calibration rows for these strata.",
                )
            )
        n_unlab = int(d["unlabelled_probs"].shape[0])
        if n_unlab:
            ood = sum(bool(m.get("ood")) for m in ctx.data.meta)
            extra = f" ({ood} marked out-of-distribution)" if ood else ""
            findings.append(
                Finding(
                    "info",
                    f"{n_unlab} evaluated rows carry no label{extra} and are left out of coverage; "
                    "the conformal guarantee does not extend to them. Their mean "
                    f"{head.upper()} set size is "
                    f"{metrics[f'{head}/mean_set_size/unlabelled'].value:.2f}.",
                    {"excluded_rows": n_unlab, "ood_rows": ood},
                )
            )
        findings.append(
            Finding(
                "info",
                f"Calibrated on {n_cal} labelled rows from the {d['source']}; evaluated on "
                f"{n_eval} labelled rows.",
                {"n_calibration": n_cal, "n_eval": n_eval, "source": d["source"]},
            )
        )
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        return tuple(sorted(findings, key=lambda f: order[f.severity]))
