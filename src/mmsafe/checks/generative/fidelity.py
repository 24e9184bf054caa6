"""``generative.fidelity``: does the generator draw what the prompt asks for?

TIFA/DSG-style attribute questions (Hu et al., 2023; Cho et al., 2024): each evaluated row's
prompt is split into the attributes it asks for (shape, colour where the caption names one,
position), the attribute judge answers each question on the row's generated image, and the
check reports the accuracy per attribute (Wilson CIs), all attributes at once, and the TIFA
score, with the judge's own accuracy on real images beside them and a judge-corrected figure.

With ``encoder`` (any encoder target spec, e.g. ``lit-mini`` or ``hf:<folder>``), it also
reports CLIPScore (Hessel et al., 2021: ``100 * max(cos, 0)`` between the generated image's and
the prompt's embeddings) with a bootstrap CI; the encoder is trained or loaded once and embeds
through the engine (cached).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.generative.judges import (
    encoder_target,
    gallery,
    is_shapes_gen,
    judge_for,
    to_uint8,
)
from mmsafe.checks.registry import register_check
from mmsafe.methods.generative.fidelity import attribute_following, clip_score_summary
from mmsafe.methods.hallucination import wilson_interval


@register_check
class GenerativeFidelityCheck(Check):
    """Attribute-level prompt following (judged) and CLIPScore (with an encoder)."""

    name = "generative.fidelity"
    pillar = "generative"
    kinds = ("generator",)
    tasks = ("t2i",)
    description = "TIFA-style attribute questions answered by a judge, and CLIPScore"
    higher_is_better = {"accuracy": True, "tifa": True, "clip_score": True, "corrected": True,
                        "judge_accuracy": True}  # fmt: skip

    def __init__(
        self,
        encoder: str | None = None,
        min_shape_accuracy: float = 0.8,
        max_rows: int = 600,
        n_boot: int = 500,
    ) -> None:
        self.encoder, self.min_shape_accuracy = encoder, float(min_shape_accuracy)
        self.max_rows, self.n_boot = int(max_rows), int(n_boot)

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and not is_shapes_gen(ctx.data) and self.encoder is None:
            reason = (
                "needs the shapes-gen world's attribute judge, or an encoder for CLIPScore "
                "(option encoder=<model spec>)"
            )
        return reason

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        images = ctx.outputs.images
        assert images is not None
        rows = np.arange(len(images))
        if len(rows) > self.max_rows:
            rows = np.sort(ctx.rng("rows").choice(len(rows), self.max_rows, replace=False))
        images = images[rows]
        prompts = [ctx.data.modalities["text"][i] for i in rows]
        metrics: dict[str, Metric] = {}
        findings: list[Finding] = []
        plots: dict[str, Any] = {}
        limits = {"rows": f"{len(rows)} evaluated prompts, one image each"}
        if is_shapes_gen(ctx.data):
            self._attributes(ctx, images, rows, prompts, metrics, findings, plots, limits)
        if self.encoder is not None:
            enc = encoder_target(ctx, self.encoder)
            img = ctx.engine.embed_values(enc, "image", to_uint8(images), desc="generated images")
            txt = ctx.engine.embed_values(enc, "text", prompts, desc="prompts")
            s = clip_score_summary(img, txt, n_boot=self.n_boot, seed=ctx.seed)
            metrics["clip_score"] = Metric(s["clip_score"], tuple(s["ci"]))
            limits["clip_score"] = f"encoder {self.encoder}"
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)

    def _attributes(self, ctx, images, rows, prompts, metrics, findings, plots, limits) -> None:
        judge = judge_for(ctx)
        meta = [ctx.data.meta[i] for i in rows]
        requested = [
            {"shape": m["shape"], "position": m["position"],
             **({"colour": m["colour"]} if m.get("caption_has_colour", True) else {})}
            for m in meta
        ]  # fmt: skip
        names = judge.names(images)
        predicted = [{k: names[k][i] for k in names} for i in range(len(rows))]
        r = attribute_following(requested, predicted, judge_accuracy=judge.accuracy,
                                n_values={k: len(v) for k, v in judge.classes.items()},
                                n_boot=self.n_boot, seed=ctx.seed)  # fmt: skip
        for k, a in r["attributes"].items():
            metrics[f"{k}/accuracy"] = Metric(a["accuracy"], tuple(a["ci"]))
            metrics[f"{k}/judge_accuracy"] = Metric(judge.accuracy[k])
            if a["corrected"] is not None:
                metrics[f"{k}/corrected"] = Metric(a["corrected"], tuple(a["corrected_ci"]))
        metrics["all/accuracy"] = Metric(r["all_accuracy"], tuple(r["all_ci"]))
        metrics["tifa"] = Metric(r["tifa"], tuple(r["tifa_ci"]))
        for s in sorted({q["shape"] for q in requested}):  # per shape: erasure's specificity
            hits = [p["shape"] == s for q, p in zip(requested, predicted, strict=True)
                    if q["shape"] == s]  # fmt: skip
            metrics[f"by_shape/{s}/accuracy"] = Metric(
                float(np.mean(hits)), wilson_interval(int(sum(hits)), len(hits))
            )
        shape = r["attributes"]["shape"]["accuracy"]
        if shape < self.min_shape_accuracy:
            findings.append(Finding(
                "high",
                f"The generator draws the shape asked for on {shape:.0%} of prompts "
                f"(goal {self.min_shape_accuracy:.0%}; judge accuracy "
                f"{judge.accuracy['shape']:.0%}).",
                {"shape/accuracy": shape}, "Train longer or raise the guidance scale.",
            ))  # fmt: skip
        wrong = [i for i, (q, p) in enumerate(zip(requested, predicted, strict=True))
                 if any(p[k] != v for k, v in q.items())]  # fmt: skip
        plots["attributes"] = {
            "kind": "bar", "title": "Attribute accuracy (judged)",
            "labels": list(r["attributes"]) + ["all"],
            "values": [a["accuracy"] for a in r["attributes"].values()] + [r["all_accuracy"]],
            "ylim": [0.0, 1.0],
        }  # fmt: skip
        shown = wrong[:8] or list(range(min(8, len(rows))))
        plots["misses"] = gallery(
            images[shown],
            [f"{prompts[i]} -> {predicted[i]['colour']} {predicted[i]['shape']} "
             f"{predicted[i]['position']}" for i in shown],
            "Prompts the judge says were not followed" if wrong else "Generations",
        )  # fmt: skip
        limits["judge"] = ", ".join(f"{k} {v:.3f}" for k, v in judge.accuracy.items())
