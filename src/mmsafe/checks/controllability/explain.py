"""``controllability.explain``: which modality, and which pixels, a prediction rests on.

* **Fusion tasks**: exact Shapley values over the modalities (every coalition evaluated, absent
  modalities replaced by the mean train embedding or zeros) of the model's probability of the
  target class (the predicted class by default). Reported: each modality's share of the mean
  absolute Shapley value, overall (bootstrap CI) and per class, and, with two modalities, the
  DIME disentanglement of each row's probability into two unimodal contributions and a
  multimodal interaction on the cross-paired grid of rows (the interaction share).
* **Image pixels** (zero-shot and fusion tasks): Integrated Gradients (captum) of the target
  probability w.r.t. the input pixels on at most ``ig_rows`` rows, and its faithfulness as the
  area under the deletion curve (most-attributed pixels replaced by the baseline first) next to
  random deletion orders: a lower AUC than random says the attributions point at pixels the
  model uses. Grad-CAM (captum ``LayerGradCam`` on the image tower's last conv stage, upsampled)
  gets the same deletion curve; towers without a conv feature map (ViT) are noted, not failed.
* **Text tokens** (fusion tasks with text): Integrated Gradients at the token-embedding layer
  (captum ``LayerIntegratedGradients``; baseline = zero or pad embedding for every real token)
  on at most ``text_rows`` rows, per-token attribution summed over the embedding dimension and
  over the bytes/pieces of each word; the top words per class, the completeness error and a
  token deletion AUC against random orders. Models without a reachable token-embedding layer
  are noted, not failed.

Rows are capped at ``max_rows`` (a seeded random subset). See ``docs/explain.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.methods.explain import (
    ExplainError,
    Output,
    coalition_values,
    cross_grid,
    curve_auc,
    deletion_curve,
    dime_decompose,
    grad_cam,
    image_cam_layer,
    integrated_gradients,
    modality_shares,
    random_saliency,
    random_token_saliency,
    shapley_values,
    text_baseline_ids,
    text_embedding_layer,
    text_integrated_gradients,
    token_deletion_curve,
    token_words,
    upsample_map,
    word_attributions,
)
from mmsafe.metrics import mean_ci
from mmsafe.metrics.bootstrap import share_ci

Target = Literal["pred", "true"]
NullMode = Literal["mean", "zeros"]
REMEDIATION = (
    "Compare with robustness.modality (swap/drop costs); if the dominant modality leaks the "
    "label (e.g. captions that name the class), fix the data or retrain the head with modality "
    "dropout (mmsafe.models.heads.fit_fusion_head(modality_dropout=0.3)), and re-audit."
)


def share_cis(
    phi: np.ndarray, n_boot: int, seed: int, level: float = 0.95
) -> list[tuple[float, float]]:
    """Bootstrap CIs of :func:`~mmsafe.methods.explain.modality_shares` of ``(N, M)`` Shapleys.

    Example:
        >>> phi = np.tile([[1.0, 3.0]], (10, 1))
        >>> share_cis(phi, n_boot=50, seed=0)
        [(0.25, 0.25), (0.75, 0.75)]
    """
    return share_ci(np.abs(np.asarray(phi, dtype=float)), n_boot, level, seed)


def _none(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


@register_check
class ExplainCheck(Check):
    """Modality Shapley values and DIME interaction (fusion); pixel IG and its faithfulness.

    Args:
        target: explain the ``pred`` (predicted) or ``true`` class of each row.
        null: what an absent modality becomes: ``mean`` (train-split mean embedding, the fusion
            head's own missing-modality value) or ``zeros``.
        output: the value function: ``prob`` (softmax probability) or ``logit``.
        max_rows: rows explained (a seeded random subset when there are more).
        dominance_threshold: a modality whose Shapley share reaches this is reported.
        ig_rows: rows given Integrated Gradients (0 switches the pixel part off).
        ig_steps: IG integration steps.
        ig_baseline: ``zeros`` (black image) or ``mean`` (per-channel mean pixel of the rows);
            deleted pixels take the same value.
        deletion_steps: points of the deletion curve, minus one.
        random_orders: random deletion orders averaged for the reference curve.
        gallery: attribution overlays shown (0 for none).
        gradcam: also Grad-CAM on the image tower (on the ``ig_rows`` rows).
        text_rows: rows given text-token Integrated Gradients (fusion with text; 0: off).
        text_steps: text IG integration steps.
        text_baseline: ``pad`` (the pad token's embedding; falls back to ``zeros`` when the
            model's pad token is unusable) or ``zeros`` (zero token embedding), for every real
            token; special tokens (BOS/EOS) are kept. Deleted tokens take it.
        top_words: words listed per class.
        text_examples: highlighted example texts shown (0 for none).
        n_boot: bootstrap resamples for the CIs.
    """

    name = "controllability.explain"
    conditional_metrics = {
        "dime/*": "multimodal",
        "shapley*": "multimodal",
        "value/*": "multimodal",
        "text_ig/*": "reads:text",
    }
    pillar = "controllability"
    tasks = ("zero_shot", "fusion")
    description = "modality Shapley shares, DIME interaction share, pixel IG + deletion AUC"
    higher_is_better = {
        "dime/interaction_share": False,
        "ig/deletion_auc": False,
        "ig/deletion_auc_random": False,
        "ig/deletion_gap": True,
        "ig/completeness_error": False,
        "gradcam/deletion_auc": False,
        "gradcam/deletion_auc_random_blocks": False,
        "gradcam/deletion_gap": True,
        "text_ig/deletion_auc": False,
        "text_ig/deletion_auc_random": False,
        "text_ig/deletion_gap": True,
        "text_ig/completeness_error": False,
    }

    def __init__(
        self,
        target: Target = "pred",
        null: NullMode = "mean",
        output: Output = "prob",
        max_rows: int = 200,
        dominance_threshold: float = 0.8,
        ig_rows: int = 16,
        ig_steps: int = 32,
        ig_baseline: Literal["zeros", "mean"] = "zeros",
        deletion_steps: int = 20,
        random_orders: int = 3,
        gallery: int = 8,
        gradcam: bool = True,
        text_rows: int = 32,
        text_steps: int = 16,
        text_baseline: Literal["zeros", "pad"] = "pad",
        top_words: int = 5,
        text_examples: int = 4,
        n_boot: int = 500,
    ) -> None:
        if target not in ("pred", "true"):
            raise ValueError(f"target must be 'pred' or 'true', got {target!r}")
        if null not in ("mean", "zeros"):
            raise ValueError(f"null must be 'mean' or 'zeros', got {null!r}")
        if output not in ("prob", "logit"):
            raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
        if ig_baseline not in ("zeros", "mean"):
            raise ValueError(f"ig_baseline must be 'zeros' or 'mean', got {ig_baseline!r}")
        if text_baseline not in ("zeros", "pad"):
            raise ValueError(f"text_baseline must be 'zeros' or 'pad', got {text_baseline!r}")
        if max_rows < 2 or ig_rows < 0 or ig_steps < 1 or deletion_steps < 1:
            raise ValueError("need max_rows >= 2, ig_rows >= 0, ig_steps >= 1, deletion_steps >= 1")
        if text_rows < 0 or text_steps < 1 or top_words < 1:
            raise ValueError("need text_rows >= 0, text_steps >= 1, top_words >= 1")
        self.target = target
        self.null = null
        self.output = output
        self.max_rows = max_rows
        self.dominance_threshold = dominance_threshold
        self.ig_rows = ig_rows
        self.ig_steps = ig_steps
        self.ig_baseline = ig_baseline
        self.deletion_steps = deletion_steps
        self.random_orders = random_orders
        self.gallery = gallery
        self.gradcam = gradcam
        self.text_rows = text_rows
        self.text_steps = text_steps
        self.text_baseline = text_baseline
        self.top_words = top_words
        self.text_examples = text_examples
        self.n_boot = n_boot

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        if self.target == "true" and not ctx.data.labelled.any():
            return "target='true' needs labels"
        if ctx.task.name == "zero_shot" and (
            "image" not in ctx.data.modalities or not self.ig_rows
        ):
            return "zero-shot explanations are pixel attributions: need images and ig_rows > 0"
        return None

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        labels = ctx.outputs.labels
        preds = ctx.outputs.preds
        pool = np.flatnonzero(labels >= 0) if self.target == "true" else np.arange(len(labels))
        rng = ctx.rng("rows")
        if len(pool) > self.max_rows:
            pool = np.sort(rng.choice(pool, self.max_rows, replace=False))
        target = (labels if self.target == "true" else preds)[pool]
        metrics: dict[str, Metric] = {"rows": Metric(float(len(pool)))}
        findings: list[Finding] = []
        plots: dict[str, dict[str, Any]] = {}
        if ctx.task.name == "fusion" and len(ctx.task.modalities) >= 2:
            self._modalities(ctx, pool, target, metrics, findings, plots)
        # integrated gradients and deletion curves differentiate through the encoder: their
        # forward/backward passes cannot be cached, so the engine counts them apart
        with ctx.engine.counting(ctx.model, "gradient_passes"):
            if (
                "image" in ctx.data.modalities
                and "image" in ctx.outputs.embeddings
                and self.ig_rows
            ):
                self._pixels(
                    ctx, pool[: self.ig_rows], target[: self.ig_rows], metrics, findings, plots
                )
            if "text" in ctx.task.modalities and "text" in ctx.data.modalities and self.text_rows:
                self._text(
                    ctx, pool[: self.text_rows], target[: self.text_rows], metrics, findings, plots
                )
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        findings.sort(key=lambda f: order[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    # ------------------------------------------------------------------ modalities
    def _null(self, ctx: AuditContext, m: str, x: Tensor) -> Tensor:
        if self.null == "zeros":
            return torch.zeros(x.shape[1], dtype=x.dtype)
        if ctx.train is not None and m in ctx.train.modalities:
            ref = ctx.engine.embed(ctx.model, ctx.train, [m], desc="explain null embeddings")[m]
        else:
            ref = ctx.outputs.embeddings[m]
        return ref.float().mean(dim=0).to(x.dtype)

    def _modalities(
        self,
        ctx: AuditContext,
        pool: np.ndarray,
        target: np.ndarray,
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> None:
        mods = list(ctx.task.modalities)
        idx = torch.as_tensor(pool)
        emb = {m: ctx.outputs.embeddings[m][idx] for m in mods}
        null = {m: self._null(ctx, m, emb[m]) for m in mods}
        values = coalition_values(ctx.task.logits, emb, null, target, mods, self.output)
        phi = shapley_values(values, len(mods))
        v = values.double().numpy()
        eff = np.abs(phi.sum(axis=1) - (v[:, -1] - v[:, 0]))
        metrics["shapley/efficiency_error"] = Metric(float(eff.max()))
        metrics["value/all"] = Metric(float(v[:, -1].mean()))
        metrics["value/none"] = Metric(float(v[:, 0].mean()))
        shares = modality_shares(phi)
        cis = share_cis(phi, self.n_boot, ctx.seed)
        for j, m in enumerate(mods):
            metrics[f"shapley_share/{m}"] = Metric(float(shares[j]), cis[j])
            metrics[f"shapley_mean/{m}"] = Metric(
                float(phi[:, j].mean()), mean_ci(phi[:, j], self.n_boot, seed=ctx.seed)
            )
        classes = list(ctx.data.classes)
        per_class: list[list[float | None]] = []
        shown: list[str] = []
        for c, cname in enumerate(classes):
            rows = target == c
            if not rows.any():
                continue
            s = modality_shares(phi[rows])
            shown.append(f"{cname} (n={int(rows.sum())})")
            per_class.append([_none(float(x)) for x in s])
            for j, m in enumerate(mods):
                metrics[f"shapley_share/{cname}/{m}"] = Metric(float(s[j]))
        plots["modality_shares"] = {
            "kind": "bar",
            "title": "Share of the mean |Shapley value| of each modality "
            f"({self.output} of the {self.target} class)",
            "labels": mods,
            "values": [_none(float(s)) for s in shares],
            "reference": self.dominance_threshold,
            "reference_label": "dominance threshold",
            "ylim": [0.0, 1.0],
        }
        plots["modality_shares_per_class"] = {
            "kind": "heatmap",
            "title": "Modality Shapley share per class",
            "rows": shown,
            "columns": mods,
            "values": per_class,
            "vlim": [0.0, 1.0],
        }
        txt = ", ".join(f"{m} {shares[j]:.0%}" for j, m in enumerate(mods))
        findings.append(
            Finding(
                "info",
                f"Exact modality Shapley values on {len(pool)} rows ({self.output} of the "
                f"{self.target} class; absent modality = {self._null_text(ctx)}): {txt}.",
                {"rows": len(pool), "shares": dict(zip(mods, map(float, shares), strict=True))},
            )
        )
        for j, m in enumerate(mods):
            if shares[j] >= self.dominance_threshold:
                findings.append(
                    Finding(
                        "low",
                        f"Decisions rest on {m}: it takes {shares[j]:.0%} of the mean absolute "
                        f"Shapley value over {len(pool)} rows.",
                        {"modality": m, "share": float(shares[j]), "ci": list(cis[j])},
                        REMEDIATION,
                    )
                )
        if len(mods) == 2:
            self._dime(ctx, mods, emb, target, metrics, findings, plots)

    def _null_text(self, ctx: AuditContext) -> str:
        if self.null == "zeros":
            return "zeros"
        return "mean embedding of the " + ("train split" if ctx.train is not None else "rows")

    def _dime(
        self,
        ctx: AuditContext,
        mods: list[str],
        emb: Mapping[str, Tensor],
        target: np.ndarray,
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> None:
        a, b = mods
        grid = cross_grid(ctx.task.logits, (a, emb[a]), (b, emb[b]), self.output)
        parts = dime_decompose(grid, target)
        mag = {
            a: float(np.abs(parts["uni_a"]).mean()),
            b: float(np.abs(parts["uni_b"]).mean()),
            "interaction": float(np.abs(parts["interaction"]).mean()),
        }
        total = sum(mag.values())
        share = {k: (x / total if total > 0 else math.nan) for k, x in mag.items()}
        metrics["dime/interaction_share"] = Metric(share["interaction"])
        metrics["dime/interaction_mean"] = Metric(
            float(parts["interaction"].mean()),
            mean_ci(parts["interaction"], self.n_boot, seed=ctx.seed),
        )
        for m in mods:
            metrics[f"dime/unimodal_share/{m}"] = Metric(share[m])
        plots["dime_shares"] = {
            "kind": "bar",
            "title": "DIME: mean |unimodal contribution| and |interaction| (shares)",
            "labels": [f"{a} (UC)", f"{b} (UC)", "interaction (MI)"],
            "values": [_none(share[a]), _none(share[b]), _none(share["interaction"])],
            "ylim": [0.0, 1.0],
        }
        findings.append(
            Finding(
                "info",
                f"DIME disentanglement on the {len(target)}x{len(target)} cross-paired grid: "
                f"the {a}x{b} interaction takes {share['interaction']:.0%} of the mean absolute "
                f"contribution ({a} {share[a]:.0%}, {b} {share[b]:.0%}).",
                {"shares": share, "magnitudes": mag},
            )
        )

    # ------------------------------------------------------------------ pixels
    def _pixels(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        target: np.ndarray,
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> None:
        model, task = ctx.model, ctx.task
        device = model.device
        images = [np.asarray(ctx.data.modalities["image"][i]) for i in rows]
        px = model.preprocess("image", images)
        assert isinstance(px, Tensor)
        px = px.to(device)
        others = [m for m in task.modalities if m != "image"]
        extra = tuple(ctx.outputs.embeddings[m][torch.as_tensor(rows)].to(device) for m in others)
        output = self.output

        def forward(x: Tensor, *rest: Tensor) -> Tensor:
            e = {
                "image": model.encode({"image": x})["image"],
                **dict(zip(others, rest, strict=True)),
            }
            logits = task.logits(e).float()
            return torch.softmax(logits, dim=-1) if output == "prob" else logits

        if self.ig_baseline == "zeros":
            base = torch.zeros_like(px)
        else:
            base = px.mean(dim=(0, 2, 3), keepdim=True).expand_as(px).contiguous()
        tgt = torch.as_tensor(target)
        attr, delta = integrated_gradients(forward, px, tgt, base, self.ig_steps, extra)
        with torch.inference_mode():
            idx = tgt.reshape(-1, 1).to(device)
            fx = forward(px, *extra).gather(1, idx)[:, 0].cpu().double().numpy()
            fb = forward(base, *extra).gather(1, idx)[:, 0].cpu().double().numpy()
        gap = np.abs(fx - fb)
        completeness = float(np.abs(delta.cpu().double().numpy()).mean() / max(gap.mean(), 1e-12))
        sal = attr.sum(dim=1)  # (B, H, W) signed, channels summed
        steps = self.deletion_steps
        ig_curve = deletion_curve(forward, px, sal, tgt, base, steps, extra)
        rnd_curves = [
            deletion_curve(
                forward,
                px,
                random_saliency(tuple(sal.shape), ctx.seed_for(f"pixel-random-{k}")).to(device),
                tgt,
                base,
                steps,
                extra,
            )
            for k in range(max(self.random_orders, 1))
        ]
        rnd_curve = np.mean(rnd_curves, axis=0)
        auc, auc_rnd = curve_auc(ig_curve), curve_auc(rnd_curve)
        diff = auc_rnd - auc
        metrics["ig/rows"] = Metric(float(len(rows)))
        metrics["ig/deletion_auc"] = Metric(
            float(auc.mean()), mean_ci(auc, self.n_boot, seed=ctx.seed)
        )
        metrics["ig/deletion_auc_random"] = Metric(
            float(auc_rnd.mean()), mean_ci(auc_rnd, self.n_boot, seed=ctx.seed)
        )
        metrics["ig/deletion_gap"] = Metric(
            float(diff.mean()), mean_ci(diff, self.n_boot, seed=ctx.seed)
        )
        metrics["ig/completeness_error"] = Metric(completeness)
        xs = [k / steps for k in range(steps + 1)]
        plots["deletion_curve"] = {
            "kind": "line",
            "title": "Deletion curve: target score as pixels are removed (lower area = faithful)",
            "xlabel": "fraction of pixels deleted",
            "ylabel": f"{output} of the {self.target} class",
            "series": [
                {"name": "IG order", "x": xs, "y": [float(y) for y in ig_curve.mean(axis=0)]},
                {"name": "random order", "x": xs, "y": [float(y) for y in rnd_curve.mean(axis=0)]},
            ],
        }
        lo_ci = metrics["ig/deletion_gap"].ci
        faithful = lo_ci is not None and lo_ci[0] > 0
        findings.append(
            Finding(
                "info" if faithful else "low",
                f"Integrated Gradients on {len(rows)} images ({self.ig_steps} steps, "
                f"{self.ig_baseline} baseline): deletion AUC {auc.mean():.3f} vs "
                f"{auc_rnd.mean():.3f} for random orders; completeness error "
                f"{completeness:.1%}."
                + ("" if faithful else " The attributions are not shown to beat random order."),
                {"deletion_auc": float(auc.mean()), "random_auc": float(auc_rnd.mean())},
                "" if faithful else "Read the attribution maps with care (or raise ig_steps).",
            )
        )
        cam = (
            self._gradcam(ctx, forward, px, tgt, base, extra, rnd_curve, metrics, findings, plots)
            if self.gradcam
            else None
        )
        if self.gallery:
            self._gallery(ctx, rows, images, sal, target, auc, plots)
            if cam is not None:
                self._gallery(
                    ctx,
                    rows,
                    images,
                    cam[0],
                    target,
                    cam[1],
                    plots,
                    key="gradcam_maps",
                    title="Grad-CAM on the last conv stage (red = regions that raise the score)",
                )

    def _gallery(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        images: list[np.ndarray],
        sal: Tensor,
        target: np.ndarray,
        auc: np.ndarray,
        plots: dict[str, dict[str, Any]],
        key: str = "attribution_maps",
        title: str = "Integrated Gradients (red = pixels that raise the class score)",
    ) -> None:
        from mmsafe.report.plots import overlay, thumbnail_png

        maps = sal.clamp(min=0).cpu().double().numpy()
        shown = [k for k in np.argsort(auc, kind="stable") if images[k].ndim in (2, 3)]
        shown = shown[: self.gallery]
        if not shown:
            return
        hi = float(np.quantile(maps[shown], 0.99)) or 1.0
        classes = list(ctx.data.classes)
        plots[key] = {
            "kind": "images",
            "title": title,
            "items": [
                {
                    "png": thumbnail_png(overlay(images[k][..., :3], maps[k], 0.0, hi)),
                    "caption": f"{ctx.data.ids[rows[k]]} · {classes[int(target[k])]} · "
                    f"deletion AUC {auc[k]:.3f}",
                }
                for k in shown
            ],
        }

    # ------------------------------------------------------------------ Grad-CAM
    def _gradcam(
        self,
        ctx: AuditContext,
        forward: Any,
        px: Tensor,
        tgt: Tensor,
        base: Tensor,
        extra: tuple[Tensor, ...],
        rnd_curve: np.ndarray,
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> tuple[Tensor, np.ndarray] | None:
        try:
            layer = image_cam_layer(ctx.model)
        except ExplainError as err:
            findings.append(Finding("info", f"Grad-CAM skipped: {err}", {}))
            return None
        grid = grad_cam(forward, layer, px, tgt, extra, upsample=False)
        size = tuple(px.shape[-2:])
        cam = upsample_map(grid, size)
        # ties (the ReLU's zeros) are broken in a random order, not top-left first
        seed = ctx.seed_for("cam-ties")
        cam_order = cam + 1e-6 * cam.amax().clamp_min(1e-12) * random_saliency(
            tuple(cam.shape), seed
        ).to(cam.device)
        steps = self.deletion_steps
        curve = deletion_curve(forward, px, cam_order, tgt, base, steps, extra)
        # the fair reference for a coarse map: random orders of the same grid cells, upsampled
        blocks = np.mean(
            [
                deletion_curve(
                    forward,
                    px,
                    upsample_map(
                        random_saliency(tuple(grid.shape), ctx.seed_for(f"cam-cells-{k}")), size
                    ).to(px.device),
                    tgt,
                    base,
                    steps,
                    extra,
                )
                for k in range(max(self.random_orders, 1))
            ],
            axis=0,
        )
        auc, auc_rnd, auc_blk = curve_auc(curve), curve_auc(rnd_curve), curve_auc(blocks)
        diff = auc_rnd - auc
        metrics["gradcam/deletion_auc"] = Metric(
            float(auc.mean()), mean_ci(auc, self.n_boot, seed=ctx.seed)
        )
        metrics["gradcam/deletion_auc_random_blocks"] = Metric(
            float(auc_blk.mean()), mean_ci(auc_blk, self.n_boot, seed=ctx.seed)
        )
        metrics["gradcam/deletion_gap"] = Metric(
            float(diff.mean()), mean_ci(diff, self.n_boot, seed=ctx.seed)
        )
        plots["deletion_curve"]["series"].append(
            {
                "name": "Grad-CAM order",
                "x": [k / steps for k in range(steps + 1)],
                "y": [float(y) for y in curve.mean(axis=0)],
            }
        )
        ci = metrics["gradcam/deletion_gap"].ci
        faithful = ci is not None and ci[0] > 0
        ig_auc = metrics["ig/deletion_auc"].value
        findings.append(
            Finding(
                "info" if faithful else "low",
                f"Grad-CAM on {len(px)} images ({grid.shape[-2]}x{grid.shape[-1]} map): "
                f"deletion AUC {auc.mean():.3f} vs {ig_auc:.3f} for IG, {auc_rnd.mean():.3f} "
                f"for random pixel orders and {auc_blk.mean():.3f} for random orders of its "
                "grid cells" + ("." if faithful else "; not shown to beat random pixel order."),
                {
                    "deletion_auc": float(auc.mean()),
                    "ig_auc": ig_auc,
                    "random_auc": float(auc_rnd.mean()),
                    "random_blocks_auc": float(auc_blk.mean()),
                },
                "" if faithful else "Prefer the IG maps (lower deletion AUC) over Grad-CAM here.",
            )
        )
        return cam, auc

    # ------------------------------------------------------------------ text tokens
    def _text(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        target: np.ndarray,
        metrics: dict[str, Metric],
        findings: list[Finding],
        plots: dict[str, dict[str, Any]],
    ) -> None:
        model, task = ctx.model, ctx.task
        try:
            layer = text_embedding_layer(model)
            batch = model.preprocess("text", [ctx.data.modalities["text"][i] for i in rows])
            if not isinstance(batch, dict) or "input_ids" not in batch:
                raise ExplainError(f"{model.name}: text batches carry no input_ids")
            ids = batch["input_ids"].to(model.device)
            mask = batch["attention_mask"].to(model.device)
            kind = self.text_baseline
            try:
                base = text_baseline_ids(model, ids, mask, kind)
            except ExplainError:
                if kind != "pad":
                    raise
                kind = "zeros"
                base = text_baseline_ids(model, ids, mask, kind)
        except ExplainError as err:
            findings.append(Finding("info", f"Text Integrated Gradients skipped: {err}", {}))
            return
        others = [m for m in task.modalities if m != "text"]
        extra = tuple(
            ctx.outputs.embeddings[m][torch.as_tensor(rows)].to(model.device) for m in others
        )
        output = self.output

        def forward(x: Tensor, m: Tensor, *rest: Tensor) -> Tensor:
            text = model.encode({"text": {"input_ids": x, "attention_mask": m}})["text"]
            logits = task.logits({"text": text, **dict(zip(others, rest, strict=True))}).float()
            return torch.softmax(logits, dim=-1) if output == "prob" else logits

        tgt = torch.as_tensor(target)
        attr, delta = text_integrated_gradients(
            forward, layer, ids, mask, base, tgt, self.text_steps, extra
        )
        steps = self.deletion_steps
        curves = [token_deletion_curve(forward, layer, ids, mask, base, attr, tgt, steps, extra)]
        rnd = [
            token_deletion_curve(
                forward,
                layer,
                ids,
                mask,
                base,
                random_token_saliency(ids, ctx.seed_for(f"token-random-{k}")),
                tgt,
                steps,
                extra,
            )
            for k in range(max(self.random_orders, 1))
        ]
        curve, rnd_curve = curves[0], np.mean(rnd, axis=0)
        fx, fb = curve[:, 0], curve[:, -1]  # nothing deleted / everything deleted = baseline
        gap = np.abs(fx - fb)
        total = attr.sum(dim=1).double().cpu().numpy()
        own = np.abs(total - (fx - fb))
        metrics["text_ig/rows"] = Metric(float(len(rows)))
        metrics["text_ig/completeness_error"] = Metric(float(own.mean() / max(gap.mean(), 1e-12)))
        metrics["text_ig/convergence_delta"] = Metric(float(delta.abs().mean()))
        auc, auc_rnd = curve_auc(curve), curve_auc(rnd_curve)
        diff = auc_rnd - auc
        metrics["text_ig/deletion_auc"] = Metric(
            float(auc.mean()), mean_ci(auc, self.n_boot, seed=ctx.seed)
        )
        metrics["text_ig/deletion_auc_random"] = Metric(
            float(auc_rnd.mean()), mean_ci(auc_rnd, self.n_boot, seed=ctx.seed)
        )
        metrics["text_ig/deletion_gap"] = Metric(
            float(diff.mean()), mean_ci(diff, self.n_boot, seed=ctx.seed)
        )
        words = token_words(model, ids, base)
        per_row = [word_attributions(attr[i], words[i]) for i in range(len(rows))]
        top = top_words_per_class(per_row, target, len(ctx.data.classes), self.top_words)
        classes = list(ctx.data.classes)
        hits = [
            bool(ws) and _norm(max(ws, key=lambda t: t[1])[0]) in _class_words(classes[c])
            for ws, c in zip(per_row, target, strict=True)
        ]
        metrics["text_ig/class_word_top_rate"] = Metric(float(np.mean(hits)))
        xs = [k / steps for k in range(steps + 1)]
        plots["text_deletion_curve"] = {
            "kind": "line",
            "title": "Token deletion curve (lower area = faithful)",
            "xlabel": "fraction of tokens deleted",
            "ylabel": f"{output} of the {self.target} class",
            "series": [
                {"name": "text IG order", "x": xs, "y": [float(y) for y in curve.mean(axis=0)]},
                {"name": "random order", "x": xs, "y": [float(y) for y in rnd_curve.mean(axis=0)]},
            ],
        }
        plots["text_top_words"] = {
            "kind": "table",
            "title": "Top attributed words per class (mean text IG per row)",
            "columns": ["class", "rows", "top words"],
            "rows": [
                [classes[c], n, ", ".join(f"{w} {v:+.3f}" for w, v in ws)]
                for c, (n, ws) in sorted(top.items())
            ],
        }
        if self.text_examples:
            shown = np.argsort(auc, kind="stable")[: self.text_examples]
            plots["text_attributions"] = {
                "kind": "tokens",
                "title": "Text Integrated Gradients (red raises the class score, blue lowers it)",
                "items": [
                    {
                        "caption": f"{ctx.data.ids[rows[k]]} · {classes[int(target[k])]}",
                        "tokens": [w for w, _ in per_row[k]],
                        "scores": [v for _, v in per_row[k]],
                    }
                    for k in shown
                ],
            }
        ci = metrics["text_ig/deletion_gap"].ci
        faithful = ci is not None and ci[0] > 0
        comp = metrics["text_ig/completeness_error"].value
        findings.append(
            Finding(
                "info" if faithful else "low",
                f"Text Integrated Gradients on {len(rows)} texts ({self.text_steps} steps, "
                f"{kind} embedding baseline): token deletion AUC {auc.mean():.3f} "
                f"vs {auc_rnd.mean():.3f} for random orders; completeness error {comp:.1%}; "
                f"the top word names the class in {np.mean(hits):.0%} of rows."
                + ("" if faithful else " The attributions are not shown to beat random order."),
                {
                    "top_words": {
                        classes[c]: [[w, v] for w, v in ws] for c, (_, ws) in top.items()
                    },
                    "deletion_auc": float(auc.mean()),
                    "random_auc": float(auc_rnd.mean()),
                },
                "" if faithful else "Read the word attributions with care (or raise text_steps).",
            )
        )


def _norm(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}").lower()


def _class_words(name: str) -> set[str]:
    return {_norm(w) for w in str(name).replace("_", " ").split()}


def top_words_per_class(
    rows: list[list[tuple[str, float]]], target: np.ndarray, n_classes: int, k: int
) -> dict[int, tuple[int, list[tuple[str, float]]]]:
    """The ``k`` words with the highest mean attribution per row, for each target class.

    A word's score for class ``c`` is the sum of its attributions over the rows of class ``c``
    (words lowercased, punctuation stripped) divided by the number of those rows.

    Returns:
        ``{class: (n_rows, [(word, score), ...])}`` for the classes that have rows.

    Example:
        >>> rows = [[("A", 1.0), ("cat", 2.0)], [("a", 0.5), ("dog", -1.0)]]
        >>> top_words_per_class(rows, np.array([0, 0]), 2, 2)
        {0: (2, [('cat', 1.0), ('a', 0.75)])}
    """
    out: dict[int, tuple[int, list[tuple[str, float]]]] = {}
    tgt = np.asarray(target)
    for c in range(n_classes):
        idx = np.flatnonzero(tgt == c)
        if not len(idx):
            continue
        score: dict[str, float] = {}
        for i in idx:
            for w, v in rows[i]:
                key = _norm(w)
                if key:
                    score[key] = score.get(key, 0.0) + v
        best = sorted(score.items(), key=lambda t: (-t[1], t[0]))[:k]
        out[c] = (len(idx), [(w, v / len(idx)) for w, v in best])
    return out
