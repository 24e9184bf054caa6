"""``generative.quality``: how close are the generations to real images, as a distribution?

The evaluated rows' generated images (one per prompt) against the real images of the same rows,
in a feature space injected into torchmetrics-equal formulas (no Inception download):

* FID and KID (Heusel et al., 2017; Bińkowski et al., 2018), equal to torchmetrics' on the same
  features; CMMD (Jayasumana et al., 2024) where an encoder gives CLIP-like embeddings;
* precision, recall (Kynkäänniemi et al., 2019), density and coverage (Naeem et al., 2020);
* bootstrap CIs, the real-vs-real floor (calibration against evaluated real images: what a
  perfect generator would score at this sample size), and the figures at N/8 ... N, since FID
  is biased upwards at small N.

Features: ``encoder`` (any encoder target spec, e.g. ``lit-mini``: its image embeddings, and
CMMD) or, on shapes-gen, the attribute judge's pooled CNN features (a classifier's features,
as Inception's are).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.generative.judges import (
    encoder_target,
    is_shapes_gen,
    judge_for,
    to_uint8,
)
from mmsafe.checks.registry import register_check
from mmsafe.methods.generative.attributes import images_to_unit
from mmsafe.methods.generative.quality import (
    quality_bootstrap,
    quality_metrics,
    quality_vs_sample_size,
)

METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")


@register_check
class GenerativeQualityCheck(Check):
    """FID, KID, CMMD, precision/recall and density/coverage with CIs and a real-data floor."""

    name = "generative.quality"
    pillar = "generative"
    kinds = ("generator",)
    tasks = ("t2i",)
    description = "FID, KID, CMMD, precision/recall against real images, with a real-data floor"
    higher_is_better = {"fid": False, "kid": False, "cmmd": False, "precision": True,
                        "recall": True, "density": True, "coverage": True}  # fmt: skip

    def __init__(self, encoder: str | None = None, max_rows: int = 1000, n_boot: int = 100) -> None:
        self.encoder, self.max_rows, self.n_boot = encoder, int(max_rows), int(n_boot)

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and "image" not in ctx.data.modalities:
            reason = "needs real images beside the prompts (an image column)"
        if reason is None and self.encoder is None and not is_shapes_gen(ctx.data):
            reason = "needs a feature extractor: pass option encoder=<encoder model spec>"
        return reason

    def _features(self, ctx: AuditContext, images: torch.Tensor | list[np.ndarray]) -> np.ndarray:
        if self.encoder is not None:
            enc = encoder_target(ctx, self.encoder)
            values = to_uint8(images) if isinstance(images, torch.Tensor) else list(images)
            return ctx.engine.embed_values(enc, "image", values, desc="quality features").numpy()
        judge = judge_for(ctx)
        return judge.features(images_to_unit(images))

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        fake_images = ctx.outputs.images
        assert fake_images is not None
        rows = np.arange(len(fake_images))
        if len(rows) > self.max_rows:
            rows = np.sort(ctx.rng("rows").choice(len(rows), self.max_rows, replace=False))
        real = self._features(ctx, [ctx.data.modalities["image"][i] for i in rows])
        fake = self._features(ctx, fake_images[rows])
        names = list(METRICS) + (["cmmd"] if self.encoder is not None else [])
        values = quality_metrics(real, fake, metrics=names, seed=ctx.seed)
        cis = quality_bootstrap(real, fake, metrics=[m for m in names if m != "kid"],
                                n_boot=self.n_boot, seed=ctx.seed)  # fmt: skip
        metrics = {m: Metric(float(values[m]), cis.get(m)) for m in names}
        limits = {
            "features": f"encoder {self.encoder}"
            if self.encoder
            else "the attribute judge's "
            "pooled CNN features (FD_judge, not Inception's: compare within mmsafe only)",
            "rows": f"{len(rows)} generated against {len(rows)} real images",
        }
        if ctx.calibration is not None and "image" in ctx.calibration.modalities:
            n = min(len(ctx.calibration), len(rows))
            floor = self._features(ctx, list(ctx.calibration.modalities["image"][:n]))
            base = quality_metrics(floor, real[:n], metrics=["fid", "kid"], seed=ctx.seed)
            metrics["floor/fid"] = Metric(float(base["fid"]))
            metrics["floor/kid"] = Metric(float(base["kid"]))
            limits["floor"] = f"real vs real: {n} calibration against {n} evaluated images"
        curve = quality_vs_sample_size(real, fake, metrics=["fid", "kid"], seed=ctx.seed)
        plots: dict[str, Any] = {
            "fid_vs_n": {"kind": "line", "title": "FID against sample size (biased at small n)",
                         "series": [{"name": "fid", "x": [r["n"] for r in curve],
                                     "y": [r["fid"] for r in curve]}],
                         "xlabel": "images per set", "ylabel": "FID"},
            "pr": {"kind": "bar", "title": "Precision, recall, density, coverage",
                   "labels": ["precision", "recall", "density", "coverage"],
                   "values": [float(values[m]) for m in
                              ("precision", "recall", "density", "coverage")]},
        }  # fmt: skip
        findings = []
        if values["recall"] < 0.5:
            findings.append(Finding(
                "medium",
                f"Recall {values['recall']:.2f}: the generations cover only part of the real "
                "images' variety (mode collapse or prompts not followed).",
                {"recall": float(values["recall"]), "precision": float(values["precision"])},
                "Train longer, lower the guidance scale, or check generative.fidelity.",
            ))  # fmt: skip
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)
