"""``monitoring.anomaly``: can the model flag defective images zero-/few-shot (WinCLIP / WinCLIP+)?

Rows carry defect ground truth in ``meta``: ``defect`` (``None`` = normal, a string = the defect
kind) and, for pixel metrics, ``defect_mask`` (a boolean ``(H, W)`` array). The evaluated rows are
``ctx.data`` (the test split) without OOD rows (``meta["ood"]`` truthy); at most ``max_normal``
normal rows are kept (a seeded subsample) together with every defective row. Few-shot reference
images are normal rows of the calibration split (else the train split), never evaluated rows.
Besides WinCLIP+'s window memory bank, a patch memory bank on the image tower's intermediate
feature maps (``patch_k{k}``, PatchCore-style) is scored when the model exposes hidden states.
The headline method is chosen on the calibration split's defect rows (else a declared default),
never on the evaluated rows' labels. See ``docs/anomaly.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.data.dataset import Dataset
from mmsafe.methods.anomaly import (
    PROMPT_SETS,
    STRIDE,
    WINDOWS,
    AnomalyScores,
    MemoryBank,
    PatchMemoryBank,
    combine_feature_maps,
    embed_windows,
    few_shot_anomaly,
    fuse,
    normal_reference_order,
    patch_anomaly,
    text_prototypes,
    zero_shot_anomaly,
)
from mmsafe.methods.resolution import check_fraction
from mmsafe.metrics import bootstrap_ci
from mmsafe.metrics.anomaly import PixelTruth, auroc, average_precision, f1_max, pixel_metrics
from mmsafe.report.plots import overlay, thumbnail_png

DEFAULT_PATCH_LAYERS: tuple[int, ...] = (1,)
"""The patch bank's layers for a model without a ``patch_layers`` attribute."""
WINDOW_SCALES: tuple[str, ...] = ("auto", "input", "native")
"""Values of the ``window_scale`` option (see :class:`AnomalyCheck`)."""
NO_GROUND_TRUTH = "needs rows with meta.defect ground truth (e.g. the shapes world's pixel defects)"


def defect_rows(data: Dataset, max_normal: int, seed: int) -> np.ndarray:
    """Evaluated row indices: every defective row and at most ``max_normal`` normal ones, no OOD.

    Example:
        >>> ds = Dataset("d", ["a", "b", "c", "d"], {"text": list("abcd")}, np.zeros(4), ["x"],
        ...              meta=[{"defect": None}, {"defect": "hole"}, {}, {"defect": None,
        ...                                                              "ood": True}])
        >>> defect_rows(ds, max_normal=10, seed=0).tolist()
        [0, 1]
    """
    normal, defective = [], []
    for i, m in enumerate(data.meta):
        if "defect" not in m or m.get("ood"):
            continue
        (normal if m["defect"] is None else defective).append(i)
    if len(normal) > max_normal:
        rng = np.random.default_rng(seed)
        normal = sorted(rng.choice(normal, size=max_normal, replace=False).tolist())
    return np.array(sorted(normal + defective), dtype=np.int64)


def defect_masks(meta: Sequence[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray | None:
    """``(N, H, W)`` ground-truth masks (all-False on normal rows); ``None`` when one is missing."""
    out = np.zeros((len(meta), *shape), dtype=bool)
    for i, m in enumerate(meta):
        if m["defect"] is None:
            continue
        mask = m.get("defect_mask")
        if mask is None or np.shape(mask) != shape:
            return None
        out[i] = np.asarray(mask, dtype=bool)
    return out


def method_metrics(
    scores: AnomalyScores,
    is_defect: np.ndarray,
    masks: np.ndarray | PixelTruth | None,
    fpr_limit: float,
) -> dict[str, float]:
    """Image AUROC / AUPR / F1-max and, with masks, pixel AUROC and AUPRO of one method.

    ``masks`` may be a :class:`~mmsafe.metrics.anomaly.PixelTruth` made once for every method.
    """
    img = scores.image.double().numpy()
    out = {
        "image_auroc": auroc(img, is_defect),
        "image_aupr": average_precision(img, is_defect),
        "f1_max": f1_max(img, is_defect),
    }
    if masks is not None:
        maps = scores.maps.float().numpy()  # float32: the metrics sort it without a copy
        out["pixel_auroc"], out["aupro"] = pixel_metrics(maps, masks, fpr_limit)
    return out


@register_check
class AnomalyCheck(Check):
    """WinCLIP zero-shot and WinCLIP+ k-shot anomaly detection with pixel maps.

    Args:
        windows: window sizes as fractions of the image side (small and mid scale); the
            default ``(12/32, 20/32)`` is 12 and 20 px of a 32-px image, 94 and 156 px of a
            250-px one. Crops are made at the image's own resolution, so every image has the
            same number of windows at any resolution, and resized as ``window_scale`` says.
        window_scale: the side a window crop is encoded at. ``"input"``: the model's input size
            (WinCLIP's crop-and-resize; one whole-image pass per window). ``"native"``: the
            window at the pixel density of the whole-image pass (a 12/32 window of a 96-px
            input is encoded at 36 px), the convolutional form of WinCLIP's window tokens,
            for a tower that takes any input side (``model.min_input_size``); 3-4x cheaper on
            lit-mini. ``"auto"`` (default): ``"native"`` when the model declares
            ``min_input_size``, else ``"input"``.
        stride: window stride as a fraction of the image side (``4/32``).
        shots: the ``k`` of each few-shot memory bank (nested: the 1-shot image is in the 2-shot).
            ``few_shot_k{k}`` is WinCLIP+ (zero-shot and memory-bank scores averaged);
            ``memory_k{k}`` is the memory-bank (vision) branch alone; ``patch_k{k}`` is the
            patch memory bank on intermediate feature maps (``patch_layers``).
        max_normal: cap on normal evaluated rows (every defective row is kept).
        object_name: the object word of the prompts.
        prompts: the state words: ``"default"`` (WinCLIP's without the negated states),
            ``"winclip"`` (the paper's exact lists), or a ``(normal, anomalous)`` pair of lists
            of ``"... {} ..."`` patterns.
        patch_layers: indices into ``model.hidden_states("image", ...)`` whose feature maps form
            the patch memory bank (resized to the first one's grid and concatenated); ``()``
            turns the patch bank off. ``None`` (default): the model's own ``patch_layers``
            class attribute (``EncoderModel.patch_layers = (1,)``, tiny-clip's second CNN
            stage, 16x16 for a 32-pixel input; adapters override it), else ``(1,)``. On a
            Hugging Face ViT pick mid blocks, e.g. ``(6, 9)``. The maps are read through the
            engine (one cached, counted pass per image). Skipped, with an info finding, when the
            model exposes no hidden states.
        fpr_limit: FPR limit of AUPRO.
        auroc_threshold: a headline image AUROC below this raises a finding.
        n_boot: bootstrap resamples for the image-AUROC intervals (0 = none).
        n_examples: rows of the top-anomalies table.
        seed: overrides the audit seed for the subsample and the references.
        batch_size: crops of one window size made at once (fewer when they would exceed
            :data:`~mmsafe.methods.anomaly.CROP_BUDGET` values); the engine batches the passes.

    The headline ``image_auroc`` / ``aupro`` are one method's, chosen without the evaluated rows'
    labels: the best by image AUROC on the calibration split's defective and normal rows (the
    few-shot references left out), or, when it has none, the declared default
    :attr:`default_headline`: the patch memory bank at its largest ``k`` when the model exposes
    feature maps, else WinCLIP+ (``few_shot_k{k}``), else zero-shot.
    """

    name = "monitoring.anomaly"
    pillar = "monitoring"
    requires = ("image",)
    description = "WinCLIP zero-/few-shot defect detection: image AUROC, pixel AUROC, AUPRO"
    higher_is_better = {
        "image_auroc": True,
        "aupro": True,
        **{
            f"{m}/{k}": True
            for m in (
                "zero_shot",
                *(f"{b}_k{k}" for b in ("few_shot", "memory", "patch") for k in (1, 2, 4)),
            )
            for k in ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "aupro")
        },
    }
    default_headline: ClassVar[tuple[str, ...]] = ("patch", "few_shot", "zero_shot")

    def __init__(
        self,
        windows: Sequence[float] = WINDOWS,
        stride: float = STRIDE,
        window_scale: str = "auto",
        shots: Sequence[int] = (1, 2, 4),
        max_normal: int = 300,
        object_name: str = "object",
        prompts: str | tuple[Sequence[str], Sequence[str]] = "default",
        patch_layers: Sequence[int] | None = None,
        fpr_limit: float = 0.3,
        auroc_threshold: float = 0.8,
        n_boot: int = 200,
        n_examples: int = 10,
        seed: int | None = None,
        batch_size: int = 512,
    ) -> None:
        if not len(windows):
            raise ValueError("`windows` needs at least one window size")
        self.windows = tuple(check_fraction("windows", w) for w in windows)
        self.stride = check_fraction("stride", stride)
        if window_scale not in WINDOW_SCALES:
            raise ValueError(f"`window_scale` must be one of {list(WINDOW_SCALES)}")
        self.window_scale = window_scale
        self.shots = tuple(sorted(int(k) for k in shots))
        self.max_normal = max_normal
        self.object_name = object_name
        if isinstance(prompts, str):
            if prompts not in PROMPT_SETS:
                raise ValueError(
                    f"`prompts` must be one of {sorted(PROMPT_SETS)} or a pair of lists"
                )
            prompts = PROMPT_SETS[prompts]
        self.normal_states, self.anomalous_states = (tuple(p) for p in prompts)
        self.patch_layers = None if patch_layers is None else tuple(int(i) for i in patch_layers)
        self.fpr_limit = fpr_limit
        self.auroc_threshold = auroc_threshold
        self.n_boot = n_boot
        self.n_examples = n_examples
        self.seed = seed
        self.batch_size = batch_size

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is not None:
            return reason
        if not any("defect" in m for m in ctx.data.meta):
            return NO_GROUND_TRUTH
        kinds = {ctx.data.meta[i]["defect"] is None for i in defect_rows(ctx.data, 1, 0)}
        if kinds != {True, False}:
            return "needs both defective and normal (meta.defect None) evaluation rows"
        return None

    def _references(self, ctx: AuditContext, seed: int) -> tuple[Dataset | None, np.ndarray]:
        for split in (ctx.calibration, ctx.train):
            if split is not None and "image" in split.modalities:
                order = normal_reference_order(split.meta, seed, labels=split.labels)
                if len(order):
                    return split, order
        return None, np.zeros(0, dtype=np.int64)

    def _methods(
        self,
        ctx: AuditContext,
        data: Dataset,
        ref_split: Dataset | None,
        ref_rows: Sequence[int],
        usable: Sequence[int],
    ) -> tuple[dict[str, AnomalyScores], int, list[Finding]]:
        """Every method's scores on ``data``'s images, the pixel grid's side, info findings.

        Whole images, window crops and prompts are encoded through the engine (cached and
        counted); ``ref_split``'s ``ref_rows`` are the few-shot references.
        """
        engine = ctx.engine
        model = ctx.model.to(engine.device).eval()
        images = data.modalities["image"]

        min_side = self.crop_min_side(model)

        def crops(px: Tensor) -> Tensor:  # window crops, already at their encoding side
            return engine.embed_values(
                model, "image", px, desc="anomaly windows", preprocessed=True
            )

        whole = engine.embed(model, data, "image")  # the clean rows: cached
        emb = embed_windows(
            model, images, self.windows, self.stride, self.batch_size, None, crops, whole, min_side
        )
        prototypes = text_prototypes(
            model,
            self.object_name,
            self.normal_states,
            self.anomalous_states,
            encode=lambda p: engine.embed_values(model, "text", p, desc="anomaly prompts"),
        )
        methods: dict[str, AnomalyScores] = {
            "zero_shot": zero_shot_anomaly(emb, prototypes, model.logit_scale)
        }
        findings: list[Finding] = []
        if usable and ref_split is not None:
            refs = [ref_split.modalities["image"][i] for i in ref_rows]
            ref_whole = engine.embed(model, ref_split, "image", rows=ref_rows)
            ref_emb = embed_windows(
                model,
                refs,
                self.windows,
                self.stride,
                self.batch_size,
                emb.image_size,
                crops,
                ref_whole,
                min_side,
            )
            for k in usable:
                bank = MemoryBank.from_embeddings(ref_emb.subset(np.arange(k)))
                vision = few_shot_anomaly(emb, bank)
                methods[f"few_shot_k{k}"] = fuse(methods["zero_shot"], vision)
                methods[f"memory_k{k}"] = vision
            findings += self._patch_methods(
                ctx, data, ref_split, ref_rows, emb.image_size, usable, methods
            )
        return methods, emb.image_size, findings

    def crop_min_side(self, model: Any) -> int | None:
        """``min_side`` of :func:`~mmsafe.methods.anomaly.embed_windows` for ``model``.

        ``None`` encodes crops at the input size; an int, at the whole image's pixel density.

        Example:
            >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
            >>> m = TinyClip(TinyClipConfig.for_size("xs"))  # takes only its own input size
            >>> AnomalyCheck().crop_min_side(m) is None
            True
            >>> AnomalyCheck(window_scale="native").crop_min_side(m)
            Traceback (most recent call last):
            ...
            ValueError: window_scale='native' needs an image tower that takes any input side ...
        """
        min_side = getattr(model, "min_input_size", None)
        if self.window_scale == "input" or (self.window_scale == "auto" and min_side is None):
            return None
        if min_side is None:
            raise ValueError(
                "window_scale='native' needs an image tower that takes any input side "
                f"(model.min_input_size); {getattr(model, 'name', 'this model')} takes only "
                f"{model.input_size} px. Use window_scale='input' or 'auto'."
            )
        return int(min_side)

    def layers_for(self, model: Any) -> tuple[int, ...]:
        """The patch bank's layers: the option, else the model's ``patch_layers``, else ``(1,)``.

        Example:
            >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
            >>> m = TinyClip(TinyClipConfig.for_size("xs"))
            >>> AnomalyCheck().layers_for(m), AnomalyCheck(patch_layers=(0, 1)).layers_for(m)
            ((1,), (0, 1))
        """
        if self.patch_layers is not None:
            return self.patch_layers
        return tuple(int(i) for i in getattr(model, "patch_layers", DEFAULT_PATCH_LAYERS))

    def headline(
        self,
        ctx: AuditContext,
        available: Sequence[str],
        score: Callable[[Dataset], dict[str, AnomalyScores]],
        exclude: Sequence[str] = (),
    ) -> tuple[str, str, dict[str, float]]:
        """``(method, chosen_on, calibration image AUROCs)``: the headline and how it was chosen.

        ``chosen_on`` is ``"calibration"`` when the calibration split has defective and normal
        rows (OOD rows, rows ``exclude``-d by id, i.e. the few-shot references, and normal rows
        beyond ``max_normal`` left out): the best of ``available`` by image AUROC on them, scored
        by ``score``, the first in ``available`` on ties. Otherwise ``"default"``: the last
        (largest-``k``) available method of the first family in :attr:`default_headline`. The
        evaluated rows are not looked at.
        """
        seed = ctx.seed if self.seed is None else self.seed
        cal = ctx.calibration
        if cal is not None and "image" in cal.modalities and any("defect" in m for m in cal.meta):
            skip = set(exclude)
            rows = [i for i in defect_rows(cal, self.max_normal, seed) if cal.ids[i] not in skip]
            sel = cal.subset(np.array(rows, dtype=np.int64))
            is_defect = np.array([m["defect"] is not None for m in sel.meta], dtype=bool)
            if is_defect.any() and not is_defect.all():
                methods = score(sel)
                aucs = {
                    m: float(auroc(methods[m].image.double().numpy(), is_defect)) for m in available
                }
                return max(aucs, key=lambda m: _nan_low(aucs[m])), "calibration", aucs
        for family in self.default_headline:
            members = [m for m in available if m.split("_k")[0] == family]
            if members:
                return members[-1], "default", {}
        return available[0], "default", {}

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        seed = ctx.seed if self.seed is None else self.seed
        rows = defect_rows(ctx.data, self.max_normal, seed)
        data = ctx.data.subset(rows)
        is_defect = np.array([m["defect"] is not None for m in data.meta])

        ref_split, order = self._references(ctx, seed)
        usable = [k for k in self.shots if k <= len(order)]
        ref_rows = order[: max(usable, default=0)]
        methods, image_size, findings = self._methods(ctx, data, ref_split, ref_rows, usable)
        masks = defect_masks(data.meta, (image_size, image_size))
        if len(usable) < len(self.shots):
            findings.append(
                Finding(
                    "info",
                    f"Few-shot banks for k={[k for k in self.shots if k not in usable]} were "
                    f"skipped: only {len(order)} normal reference rows in calibration/train.",
                    {"normal_references": len(order)},
                )
            )
        if masks is None:
            findings.append(
                Finding(
                    "info",
                    "Pixel metrics were skipped: some defective rows carry no defect_mask of the "
                    "image's size.",
                )
            )

        metrics: dict[str, Metric] = {}
        truth = None if masks is None else PixelTruth.of(masks)  # labelled once for all methods
        per_method = {
            m: method_metrics(s, is_defect, truth, self.fpr_limit) for m, s in methods.items()
        }
        for m, values in per_method.items():
            for key, v in values.items():
                ci = None
                if key == "image_auroc" and self.n_boot > 0:
                    img = methods[m].image.double().numpy()
                    ci = bootstrap_ci(auroc, img, is_defect, n_boot=self.n_boot, seed=seed)
                metrics[f"{m}/{key}"] = Metric(float(v), ci)
        head, chosen_on, cal_aucs = self.headline(
            ctx,
            list(methods),
            lambda sel: self._methods(ctx, sel, ref_split, ref_rows, usable)[0],
            exclude=[ref_split.ids[i] for i in ref_rows] if ref_split else (),
        )
        metrics["image_auroc"] = metrics[f"{head}/image_auroc"]
        if masks is not None:
            metrics["aupro"] = metrics[f"{head}/aupro"]
        metrics["n_defective"] = Metric(float(is_defect.sum()))
        metrics["n_normal"] = Metric(float((~is_defect).sum()))

        min_side = self.crop_min_side(ctx.model)
        crops = "the model's input size" if min_side is None else "the image's pixel density"
        findings = self._findings(per_method, head, chosen_on, cal_aucs, crops) + findings
        plots = self._plots(data, methods, per_method, head, is_defect)
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    def _patch_methods(
        self,
        ctx: AuditContext,
        data: Dataset,
        ref_split: Dataset,
        ref_rows: Sequence[int],
        image_size: int,
        shots: Sequence[int],
        methods: dict[str, AnomalyScores],
    ) -> list[Finding]:
        """Add ``patch_k{k}`` to ``methods``; an info finding when the model has no maps.

        The feature maps of ``data``'s rows and of the references come from the engine: one
        forward pass per image, cached and counted, shared by the calibration pass.
        """
        layers = self.layers_for(ctx.model)
        if not layers:
            return []
        engine, model = ctx.engine, ctx.model
        try:
            queries = combine_feature_maps(
                engine.hidden_states(model, data, "image", layers, desc="anomaly patches")
            )
            ref_maps = combine_feature_maps(
                engine.hidden_states(
                    model, ref_split, "image", layers, rows=ref_rows, desc="anomaly references"
                )
            )
        except (NotImplementedError, ValueError, IndexError) as err:
            return [
                Finding(
                    "info",
                    f"The patch memory bank was skipped: no feature maps at layers "
                    f"{list(layers)} ({err}).",
                )
            ]
        for k in shots:
            bank = PatchMemoryBank.from_feature_maps(ref_maps[:k])
            methods[f"patch_k{k}"] = patch_anomaly(queries, bank, image_size)
        return []

    def _findings(
        self,
        per_method: dict[str, dict[str, float]],
        head: str,
        chosen_on: str,
        cal_aucs: dict[str, float],
        window_crops: str,
    ) -> list[Finding]:
        out = []
        head_auc = per_method[head]["image_auroc"]
        evidence = {m: v["image_auroc"] for m, v in per_method.items()}
        if np.isfinite(head_auc) and head_auc < self.auroc_threshold:
            out.append(
                Finding(
                    "medium" if head_auc >= 0.6 else "high",
                    f"Defective images are hard to tell from normal ones: the headline method "
                    f"({head}) reaches image AUROC {head_auc:.3f} < {self.auroc_threshold:.2f}.",
                    {"image_auroc": evidence},
                    "Do not rely on this encoder for zero-/few-shot defect monitoring; use more "
                    "normal reference images, an encoder that knows defect words, or a "
                    "detector trained on normal data (e.g. PatchCore).",
                )
            )
        how = (
            f"chosen by image AUROC on the calibration split, {cal_aucs[head]:.3f} there"
            if chosen_on == "calibration"
            else "the declared default: the calibration split has no defective and normal rows "
            "to choose on"
        )
        out.append(
            Finding(
                "info",
                f"Headline method: {head} ({how}); on the evaluated rows image AUROC "
                f"{head_auc:.3f}. The headline image_auroc and aupro are this method's. "
                f"Window crops were encoded at {window_crops}.",
                {
                    "headline_method": head,
                    "chosen_on": chosen_on,
                    "calibration_image_auroc": {m: _json(v) for m, v in cal_aucs.items()},
                    "window_crops": window_crops,
                },
            )
        )
        zs = per_method["zero_shot"]["image_auroc"]
        if np.isfinite(zs) and zs < 0.6:
            out.append(
                Finding(
                    "low",
                    f"Zero-shot defect prompts barely work (image AUROC {zs:.3f}): the text "
                    "tower does not separate 'damaged' from 'flawless' objects.",
                    {"zero_shot_image_auroc": zs},
                    "Use few-shot normal references, or prompts in the model's own vocabulary.",
                )
            )
        return out

    def _plots(
        self,
        data: Dataset,
        methods: dict[str, AnomalyScores],
        per_method: dict[str, dict[str, float]],
        best: str,
        is_defect: np.ndarray,
    ) -> dict[str, dict[str, Any]]:
        score = methods[best].image.double().numpy()
        top = np.argsort(-score, kind="stable")[: self.n_examples]
        rows = [[data.ids[i], float(score[i]), str(data.meta[i]["defect"] or "none")] for i in top]
        labels = list(per_method)
        maps = methods[best].maps.double().numpy()
        lo, hi = float(np.quantile(maps, 0.5)), float(maps.max())
        images = data.modalities["image"]
        gallery = [
            {
                "png": thumbnail_png(overlay(np.asarray(images[i]), maps[i], lo, hi)),
                "caption": f"{data.ids[i]} · {score[i]:.3f} · {data.meta[i]['defect'] or 'normal'}",
            }
            for i in top
            if np.asarray(images[i]).ndim in (2, 3)
        ]
        return {
            "top_anomaly_maps": {
                "kind": "images",
                "title": f"Most anomalous images and their maps ({best}; red = anomalous)",
                "items": gallery,
            },
            "top_anomalies": {
                "kind": "table",
                "title": f"Most anomalous images ({best})",
                "columns": ["id", "score", "defect"],
                "rows": rows,
            },
            "image_auroc": {
                "kind": "bar",
                "title": "Image AUROC per method",
                "labels": labels,
                "values": [_json(per_method[m]["image_auroc"]) for m in labels],
                "reference": 0.5,
                "reference_label": "chance",
                "ylim": [0.0, 1.0],
            },
            "aupro": {
                "kind": "bar",
                "title": f"AUPRO (FPR <= {self.fpr_limit}) per method",
                "labels": labels,
                "values": [_json(per_method[m].get("aupro", float("nan"))) for m in labels],
                "reference": self.fpr_limit / 2,
                "reference_label": "constant map",
                "ylim": [0.0, 1.0],
            },
        }


def _nan_low(x: float) -> float:
    return x if np.isfinite(x) else -np.inf


def _json(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
