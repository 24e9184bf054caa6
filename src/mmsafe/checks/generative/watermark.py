"""``generative.watermark``: do watermarks on the generator's images survive common edits?

Post-hoc watermarks of ``invisible-watermark`` (dwtDct, dwtDctSvd and, opt-in because it is
slow on a CPU, RivaGAN) mark the generated images, and a Tree-Ring-style key (Wen et al., 2023)
is written into the Fourier transform of the initial noise and read back by deterministic
inversion (generators with ``invert``). Each is scored clean and under JPEG, resize, crop,
rotation, noise, blur and brightness at graded strengths: bit accuracy, TPR at 1% FPR against
unmarked images, AUROC (with CIs).

Sizes: invisible-watermark refuses images under 256 x 256 pixels, so small generations are
upscaled (bicubic) to 256 before embedding, and the transforms apply to that delivered, marked
image; Tree-Ring works at the generator's own size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.generative.watermark import TRANSFORMS, watermark_table
from mmsafe.tasks.t2i import row_seed

DEFAULT_METHODS: tuple[str, ...] = ("dwtDct", "dwtDctSvd", "treeRing")


@register_check
class GenerativeWatermarkCheck(Check):
    """Bit accuracy, TPR@1%FPR and AUROC of watermarks, clean and under graded transforms."""

    name = "generative.watermark"
    pillar = "generative"
    kinds = ("generator",)
    tasks = ("t2i",)
    description = "watermark detection (post-hoc and Tree-Ring) under graded image transforms"
    higher_is_better = {"bit_acc": True, "tpr": True, "auroc": True}
    conditional_metrics = {"treeRing/*": "capability:invert"}

    def __init__(
        self,
        methods: Sequence[str] = DEFAULT_METHODS,
        transforms: Mapping[str, Sequence[float]] | None = None,
        max_rows: int = 24,
        min_tpr: float = 0.99,
        n_boot: int = 200,
    ) -> None:
        self.methods, self.max_rows = tuple(methods), int(max_rows)
        self.transforms = dict(TRANSFORMS if transforms is None else transforms)
        self.min_tpr, self.n_boot = float(min_tpr), int(n_boot)

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        images = ctx.outputs.images
        assert images is not None
        rows = np.arange(len(images))
        if len(rows) > self.max_rows:
            rows = np.sort(ctx.rng("rows").choice(len(rows), self.max_rows, replace=False))
        methods = [m for m in self.methods
                   if m != "treeRing" or "invert" in ctx.model.capabilities()]  # fmt: skip
        table = watermark_table(
            images[rows], methods=methods, generator=ctx.model,
            prompts=[str(ctx.data.modalities["text"][i]) for i in rows],
            seeds=[row_seed(ctx.data.ids[i]) for i in rows], transforms=self.transforms,
            n_boot=self.n_boot, seed=ctx.seed,
        )  # fmt: skip
        metrics: dict[str, Metric] = {}
        cells: dict[str, dict[str, float]] = {}
        for r in table:
            cond = "clean" if r.transform == "none" else f"{r.transform}={r.strength:g}"
            base = f"{r.method}/{cond}"
            if not math.isnan(r.bit_acc):
                metrics[f"{base}/bit_acc"] = Metric(r.bit_acc, tuple(r.bit_acc_ci))
            metrics[f"{base}/tpr"] = Metric(r.tpr, tuple(r.tpr_ci))
            metrics[f"{base}/auroc"] = Metric(r.auroc, tuple(r.auroc_ci))
            cells.setdefault(r.method, {})[cond] = r.tpr
        conds = list(dict.fromkeys(c for m in cells.values() for c in m))
        findings = []
        for m, by in cells.items():
            clean = by.get("clean", float("nan"))
            if clean < self.min_tpr:
                findings.append(Finding(
                    "medium", f"{m} finds only {clean:.0%} of clean marked images at 1% FPR.",
                    {"method": m, "tpr": clean}, "Prefer a more reliable watermark (see table).",
                ))  # fmt: skip
            broken = [c for c in conds if c != "clean" and by.get(c, 1.0) < 0.5]
            if broken:
                findings.append(Finding(
                    "low",
                    f"{m} is lost (TPR < 50% at 1% FPR) under {len(broken)} of "
                    f"{len(conds) - 1} transforms, e.g. {', '.join(broken[:3])}.",
                    {"method": m, "broken": broken},
                    "Do not rely on this watermark alone for provenance; pair it with a "
                    "detector (generative.provenance).",
                ))  # fmt: skip
        plots: dict[str, Any] = {
            "tpr": {"kind": "heatmap", "title": "TPR at 1% FPR, per transform",
                    "rows": list(cells), "columns": conds, "vlim": [0.0, 1.0],
                    "values": [[cells[m].get(c) for c in conds] for m in cells]},
        }  # fmt: skip
        up = next((r for r in table if r.upscaled), None)
        limits = {
            "images": f"{len(rows)} generations, as many unmarked",
            "size": "post-hoc marks: upscaled to 256 px before embedding (the library's minimum); "
            "transforms act on the delivered marked image"
            if up
            else "embedded at the delivered size",
            "regeneration": "not run (needs a denoise-from-t method in the generator protocol)",
        }
        if "treeRing" not in methods and "treeRing" in self.methods:
            limits["treeRing"] = "skipped: the generator cannot invert images"
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, limits=limits)
