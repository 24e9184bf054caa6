"""``controllability.privacy``: can an attacker tell training rows from held-out ones?

Members are the labelled rows of the ``train`` split. Non-members are the labelled held-out rows
(``calibration`` and the evaluated ``test`` rows). Unlabelled and OOD rows are left out of both.
Each threshold attack of :mod:`mmsafe.methods.privacy` scores every row:

- loss, confidence and entropy, on the task's logits;
- cosine, the CLIP image-caption similarity;
- contrast, the own caption's softmax among the non-members' captions;
- opt-in LiRA with shadow models: shadow fusion heads on frozen embeddings (``lira_shadows``,
  fusion tasks), or shadow tiny-clips trained from scratch against the encoder itself
  (``encoder_shadows``, ``lira_encoder_online`` / ``lira_encoder_offline``).

The check reports each attack's AUC (bootstrap CI), best balanced accuracy, and TPR at 0.1% and
1% FPR. A memorisation report lists the training rows that score above almost every non-member
and the training rows that are exact copies or near-duplicates of each other. See
``docs/privacy.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.data.dataset import Dataset
from mmsafe.methods.privacy import (
    AttackResult,
    attack_metrics,
    auc_bootstrap_ci,
    caption_logit_scores,
    confidence_scores,
    content_groups,
    content_ids,
    contrast_scores,
    cosine_scores,
    entropy_scores,
    lira_scores,
    logit_confidence,
    loss_scores,
    membership_auc,
    near_duplicate_counts,
    nonmember_percentile,
    roc_points,
)
from mmsafe.models.base import EncoderModel
from mmsafe.tasks.fusion import fusion_head_of

FPRS = (0.001, 0.01)
"""The low false-positive rates at which TPR is reported."""
MEMORISATION_ATTACK = "cosine"
"""The attack whose per-row percentile ranks training rows in the memorisation report: label-
free, and a property of the encoder itself (not of a task head)."""


def _fpr_name(a: float) -> str:
    return f"tpr@{a * 100:g}%fpr"


@dataclass(frozen=True)
class MembershipScores:
    """Per-row attack scores over members and non-members.

    Attributes:
        ids: row ids (members first, then non-members).
        is_member: ``(N,)`` booleans.
        scores: ``{attack: (N,) scores}``; higher = more member-like.
        members: the member rows, as a dataset (for the memorisation report).
        embeddings: ``{"image", "text"}`` embeddings of the members (when both exist).
        encoder_shadows: the shadow statistics behind the encoder LiRA attacks, when run.
    """

    ids: list[str]
    is_member: np.ndarray
    scores: dict[str, np.ndarray]
    members: Dataset
    embeddings: dict[str, np.ndarray]
    encoder_shadows: EncoderShadows | None = None


@dataclass(frozen=True)
class EncoderShadows:
    """Per-pair LiRA statistics of a target encoder and of shadow tiny-clips.

    Attributes:
        target: ``(N,)`` the target's statistic on every pool row.
        shadow: ``(K, N)`` each shadow's statistic on every pool row.
        inside: ``(K, N)`` booleans, row ``n`` in shadow ``k``'s training set.
        size: the shadows' tiny-clip size.
        steps: training steps of each shadow.
        seconds: wall time of training and scoring all ``K`` shadows.
        statistic: ``"logit"`` or ``"cosine"`` (see :func:`pair_statistic`).
    """

    target: np.ndarray
    shadow: np.ndarray
    inside: np.ndarray
    size: str
    steps: int
    seconds: float
    statistic: str


def membership_scores(
    ctx: AuditContext,
    lira_shadows: int = 0,
    lira_online: bool = True,
    encoder_shadows: int = 0,
    encoder_shadow_size: str | None = "xs",
    encoder_shadow_quick: bool | None = True,
) -> MembershipScores:
    """Every attack's score for every labelled member and non-member row of ``ctx``.

    Args:
        ctx: the audit context (needs a ``train`` split and labelled held-out rows).
        lira_shadows: with a fusion task and ``> 0``, also the ``lira`` attack with this many
            shadow heads (see :func:`lira_fusion_scores`).
        lira_online: LiRA's online (IN and OUT) or offline (OUT only) test.
        encoder_shadows: with a tiny-clip on image-text data and ``> 0``, also the
            ``lira_encoder_online`` and ``lira_encoder_offline`` attacks with this many shadow
            tiny-clips (see :func:`encoder_shadow_statistics`).
        encoder_shadow_size: the shadows' tiny-clip size (None = the target's).
        encoder_shadow_quick: train the shadows with the quick schedule (True), the full one
            (False), or the target's recorded recipe (None: ``training_info["hyperparameters"]``,
            else quick).

    Raises:
        ValueError: when ``ctx`` has no train split or no labelled held-out row.
    """
    if ctx.train is None:
        raise ValueError("membership inference needs a 'train' split")
    held = [d for d in (ctx.calibration, ctx.data) if d is not None]
    members = ctx.train.subset(ctx.train.labelled)
    parts = [members] + [d.subset(d.labelled) for d in held if d.labelled.any()]
    if len(parts) < 2:
        raise ValueError("membership inference needs labelled held-out rows")
    engine, model, task = ctx.engine, ctx.model, ctx.task
    outs = [engine.outputs(model, task, d) for d in parts]
    logits = np.concatenate([o.logits.double().numpy() for o in outs])
    labels = np.concatenate([d.labels for d in parts])
    is_member = np.zeros(len(labels), dtype=bool)
    is_member[: len(members)] = True
    scores = {
        "loss": loss_scores(logits, labels),
        "confidence": confidence_scores(logits),
        "entropy": entropy_scores(logits),
    }
    emb: dict[str, np.ndarray] = {}
    if {"image", "text"} <= set(ctx.data.modality_names):
        per = [engine.embed(model, d, ("image", "text")) for d in parts]
        img = torch.cat([p["image"] for p in per]).double().numpy()
        txt = torch.cat([p["text"] for p in per]).double().numpy()
        scores["cosine"] = cosine_scores(img, txt)
        scale = float(getattr(model, "logit_scale", 1.0 / 0.07))
        scores["contrast"] = contrast_scores(img, txt, ~is_member, temperature=scale)
        emb = {"image": img[is_member], "text": txt[is_member]}
    shadows = None
    if encoder_shadows > 0 and emb and "train_shadow" in model.capabilities():
        pool = _pool(parts)
        shadows = encoder_shadow_statistics(
            model,
            pool,
            encoder_shadows,
            size=encoder_shadow_size,
            quick=encoder_shadow_quick,
            seed=ctx.seed_for("encoder-shadows"),
            engine=engine,
            target_embeddings=(img, txt),
        )
        for name, online in (("lira_encoder_online", True), ("lira_encoder_offline", False)):
            scores[name] = lira_scores(
                shadows.target, shadows.shadow, shadows.inside, online=online
            )
    head = fusion_head_of(task)
    if lira_shadows > 0 and head is not None:
        task_emb = {m: torch.cat([o.embeddings[m] for o in outs]) for m in head.modalities}
        items = None
        if {"image", "text"} <= set(ctx.data.modality_names):
            items = content_ids(
                [v for d in parts for v in d.modalities["image"]],
                [str(t) for d in parts for t in d.modalities["text"]],
            )
        scores["lira"] = lira_fusion_scores(
            head,
            task_emb,
            labels,
            lira_shadows,
            seed=ctx.seed_for("fusion-shadows"),
            online=lira_online,
            items=items,
        )
    ids = [i for d in parts for i in d.ids]
    return MembershipScores(ids, is_member, scores, members, emb, shadows)


def _pool(parts: Sequence[Dataset]) -> Dataset:
    """The image-text rows of ``parts`` as one dataset, every row in split ``train``."""
    n = sum(len(d) for d in parts)
    return Dataset(
        name="lira-pool",
        ids=[i for d in parts for i in d.ids],
        modalities={m: [v for d in parts for v in d.modalities[m]] for m in ("image", "text")},
        labels=np.concatenate([d.labels for d in parts]),
        classes=list(parts[0].classes),
        splits=["train"] * n,
    )


def pair_statistic(
    image_emb: np.ndarray, text_emb: np.ndarray, temperature: float, statistic: str = "logit"
) -> np.ndarray:
    """LiRA's per-pair statistic of an image-text model.

    * ``"logit"`` (default): :func:`~mmsafe.methods.privacy.caption_logit_scores`, the logit of the
      own caption's softmax probability among every row's caption at the model's temperature;
      the CLIP analogue of LiRA's ``log(p_y / (1 - p_y))``.
    * ``"cosine"``: the raw scaled cosine ``τ cos(x_i, t_i)``.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(N, D)`` text embeddings.
        temperature: the model's logit scale ``τ``.
        statistic: ``"logit"`` or ``"cosine"``.
    """
    if statistic == "logit":
        return caption_logit_scores(image_emb, text_emb, temperature=temperature)
    if statistic == "cosine":
        return temperature * cosine_scores(image_emb, text_emb)
    raise ValueError(f"statistic must be 'logit' or 'cosine', got {statistic!r}")


def encoder_shadow_statistics(
    model: EncoderModel,
    pool: Dataset,
    n_shadows: int,
    *,
    size: str | None = "xs",
    quick: bool | None = True,
    train: Any = None,
    statistic: str = "logit",
    seed: int = 0,
    engine: Any = None,
    target_embeddings: tuple[np.ndarray, np.ndarray] | None = None,
) -> EncoderShadows:
    """Shadow tiny-clips for LiRA against the encoder itself (Carlini et al. 2022, §12b).

    The population is ``pool`` (the scored members and non-members). Membership is drawn per
    *item*: exact copies (same image bytes and caption, :func:`~mmsafe.methods.privacy.content_ids`)
    are IN or OUT together, and every item is IN for exactly ``n_shadows // 2`` shadows, chosen
    at random. Drawing per row instead would put a duplicated item's other copies into almost
    every "OUT" shadow, so its OUT Gaussian would be an IN one and LiRA would miss exactly the
    rows that are memorised most. Shadow ``k`` is a fresh tiny-clip
    trained from scratch, in process and uncached, by the built-in trainer
    (:func:`~mmsafe.models.tiny_clip.train_tiny_clip`) on its IN rows. Each model, the target
    and every shadow, is then scored on every pool row with :func:`pair_statistic` at its own
    temperature. Feed the result to :func:`~mmsafe.methods.privacy.lira_scores`.

    Args:
        model: the target encoder (its ``logit_scale`` sets the target's temperature).
        pool: the population: image-text rows (members and non-members of the target).
        n_shadows: shadow models (``>= 2``). Each is one full tiny-clip training: about 13 s
            for ``xs`` with the quick schedule on one CPU thread.
        size: the shadows' tiny-clip size; None = the target's (``model.cfg.size``).
        quick: the quick (200 steps) or full (900 steps) schedule of
            :meth:`~mmsafe.models.tiny_clip.TrainConfig.preset`; ignored when ``train`` is
            given.
        train: a :class:`~mmsafe.models.tiny_clip.TrainConfig` for the shadows.
        statistic: ``"logit"`` or ``"cosine"`` (see :func:`pair_statistic`).
        seed: seeds the IN/OUT draw and each shadow's initialisation and training.
        engine: embeds the pool with each shadow (a fresh :class:`~mmsafe.engine.Engine` when
            None); shadow embeddings are never cached.
        target_embeddings: the target's ``(image, text)`` embeddings of ``pool``, when already
            computed.

    Raises:
        ValueError: fewer than 2 shadows.
    """
    import time

    if n_shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {n_shadows}")
    if engine is None:
        from mmsafe.engine import Engine

        engine = Engine(progress=False, seed=seed)

    def embed(m: EncoderModel) -> tuple[np.ndarray, np.ndarray]:
        return tuple(  # type: ignore[return-value]
            engine.embed_values(m, k, pool.modalities[k]).double().numpy()
            for k in ("image", "text")
        )

    def stat(m: EncoderModel, e: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        scale = float(getattr(m, "logit_scale", 1.0 / 0.07))
        return pair_statistic(e[0], e[1], scale, statistic)

    n = len(pool)
    items = content_ids(pool.modalities["image"], [str(t) for t in pool.modalities["text"]])
    split_seed, shadow_seeds = spawn_seeds(seed, n_shadows)
    inside = half_split(items, n_shadows, np.random.default_rng(split_seed))
    target = stat(model, target_embeddings if target_embeddings is not None else embed(model))
    stats = np.empty((n_shadows, n))
    start = time.perf_counter()
    shadow: Any = None
    for k in range(n_shadows):
        half = pool.subset(inside[k], name=f"lira-shadow-{k}")
        shadow = model.train_shadow(
            half, seed=shadow_seeds[k], quick=quick, size=size, recipe=train
        )
        hp = getattr(shadow, "training_info", {}).get("hyperparameters", {})
        engine.count("training_passes", int(hp.get("steps", 0)) * int(hp.get("batch_size", 0)))
        stats[k] = stat(shadow, embed(shadow))
    info = getattr(shadow, "training_info", {}).get("hyperparameters", {})
    cfg = getattr(shadow, "cfg", None)
    return EncoderShadows(
        target=target,
        shadow=stats,
        inside=inside,
        size=str(getattr(cfg, "size", "")),
        steps=int(info.get("steps", 0)),
        seconds=time.perf_counter() - start,
        statistic=statistic,
    )


def spawn_seeds(seed: int, n: int) -> tuple[int, list[int]]:
    """Independent seeds from one: ``(seed of the IN/OUT draw, [seed of shadow k])``.

    Example:
        >>> a, b = spawn_seeds(0, 3)
        >>> len(b), len({a, *b})
        (3, 4)
    """
    split, *shadows = np.random.SeedSequence(int(seed)).spawn(n + 1)
    return int(split.generate_state(1)[0]), [int(s.generate_state(1)[0]) for s in shadows]


def half_split(items: np.ndarray, n_shadows: int, rng: np.random.Generator) -> np.ndarray:
    """``(K, N)`` IN/OUT draws: every item IN for exactly half of the ``K`` shadows.

    ``items[n]`` names row ``n``'s item; copies of one item go in or out together, or a
    duplicated row would sit in almost every "OUT" shadow through its copies.

    Example:
        >>> inside = half_split(np.array([0, 1, 1, 2]), 4, np.random.default_rng(0))
        >>> inside.sum(axis=0).tolist(), bool((inside[:, 1] == inside[:, 2]).all())
        ([2, 2, 2, 2], True)
    """
    order = np.argsort(rng.random((n_shadows, int(items.max()) + 1)), axis=0)
    return (order < n_shadows // 2)[:, items]


def lira_fusion_scores(
    head: Any,
    embeddings: dict[str, torch.Tensor],
    labels: np.ndarray,
    n_shadows: int,
    seed: int = 0,
    online: bool = True,
    items: np.ndarray | None = None,
) -> np.ndarray:
    """LiRA against a fusion head, with shadow heads trained on the same frozen embeddings.

    The population is every row passed in (members and non-members). Every row (or item, with
    ``items``: exact copies together) is IN for exactly half of the ``n_shadows`` shadow heads,
    chosen at random, as in Carlini et al.'s code. Each shadow repeats the target head's
    training recipe (its config and ``fit_info``) on its half. The statistic is
    :func:`~mmsafe.methods.privacy.logit_confidence` of the true label. Only the head's membership
    is
    modelled: the encoder, trained on the members too, stays fixed, so whatever it leaks is in
    the embeddings of every shadow alike.

    Args:
        head: the target :class:`~mmsafe.models.heads.FusionHead`.
        embeddings: ``{modality: (N, D)}`` for every row.
        labels: ``(N,)`` class indices.
        n_shadows: shadow heads (``>= 2``; 16 or more for stable per-example Gaussians).
        seed: seeds the IN/OUT draw and the shadows' training.
        online: LiRA's online (IN and OUT Gaussians) or offline (OUT only) test.
        items: ``(N,)`` item index of each row (e.g. :func:`~mmsafe.methods.privacy.content_ids`);
            default: every row its own item.

    Returns:
        ``(N,)`` LiRA scores (higher = more member-like).
    """
    from mmsafe.models.heads import HeadTrainConfig, fit_fusion_head

    if n_shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {n_shadows}")
    recipe = HeadTrainConfig.of(head)
    n = len(labels)
    items = np.arange(n) if items is None else np.asarray(items)
    split_seed, shadow_seeds = spawn_seeds(seed, n_shadows)
    inside = half_split(items, n_shadows, np.random.default_rng(split_seed))
    y = torch.as_tensor(labels, dtype=torch.int64)
    stats = np.empty((n_shadows, n))
    for k in range(n_shadows):
        keep = torch.as_tensor(inside[k])
        shadow = fit_fusion_head(  # the target head's own recipe, on the shadow's half
            {m: e[keep] for m, e in embeddings.items()}, y[keep], recipe, seed=shadow_seeds[k]
        )
        with torch.inference_mode():
            stats[k] = logit_confidence(shadow(embeddings).double().numpy(), labels)
    with torch.inference_mode():
        target = logit_confidence(head(embeddings).double().numpy(), labels)
    return lira_scores(target, stats, inside, online=online)


@register_check
class PrivacyCheck(Check):
    """Membership inference (loss, confidence, entropy, CLIP cosine) and a memorisation report.

    Args:
        n_boot: bootstrap resamples for the AUC CIs.
        outlier_level: a training row whose score beats this share of non-members (under the
            cosine attack, else the strongest one) is a membership outlier.
        near_duplicate_threshold: cosine similarity, in both image and text embedding, at or
            above which two training rows are near-duplicates.
        max_auc: an attack AUC whose CI lies above this raises a ``medium`` finding.
        n_examples: rows in the memorisation tables.
        lira_shadows: shadow heads for LiRA on a fusion task (0 = off; each costs one head
            training on the frozen embeddings).
        lira_online: LiRA's online (IN and OUT) or offline (OUT only) test.
        encoder_shadows: shadow tiny-clips for LiRA against the encoder itself, reported as
            ``lira_encoder_online`` and ``lira_encoder_offline`` (0 = off; each shadow is one
            tiny-clip training from scratch, about 13 s for a quick ``xs`` on one CPU thread).
            Runs when the model is a tiny-clip and the data has image-caption pairs.
        encoder_shadow_size: the shadows' tiny-clip size (None = the audited model's).
        encoder_shadow_quick: train the shadows with the quick (200 steps) schedule (True),
            the full one (900 steps, False), or the audited model's recorded recipe (None:
            its ``training_info["hyperparameters"]``, else quick).
    """

    name = "controllability.privacy"
    pillar = "controllability"
    requires = ("labels", "train")
    tasks = ("zero_shot", "fusion")
    description = (
        "membership inference (loss/confidence/entropy/CLIP cosine): AUC, TPR at low FPR; "
        "memorised and duplicated training rows"
    )
    higher_is_better = {
        "auc": False,
        "balanced_accuracy": False,
        **{_fpr_name(a): False for a in FPRS},
        "outlier_rate": False,
        "duplicated_rows": False,
    }

    def __init__(
        self,
        n_boot: int = 1000,
        outlier_level: float = 0.99,
        near_duplicate_threshold: float = 0.999,
        max_auc: float = 0.6,
        n_examples: int = 10,
        lira_shadows: int = 0,
        lira_online: bool = True,
        encoder_shadows: int = 0,
        encoder_shadow_size: str | None = "xs",
        encoder_shadow_quick: bool | None = True,
    ) -> None:
        if not 0.0 < outlier_level < 1.0:
            raise ValueError(f"outlier_level must be in (0, 1), got {outlier_level}")
        self.n_boot = n_boot
        self.outlier_level = outlier_level
        self.near_duplicate_threshold = near_duplicate_threshold
        self.max_auc = max_auc
        self.n_examples = n_examples
        if encoder_shadows < 0 or encoder_shadows == 1:
            raise ValueError(f"encoder_shadows must be 0 (off) or >= 2, got {encoder_shadows}")
        self.lira_shadows = lira_shadows
        self.lira_online = lira_online
        self.encoder_shadows = encoder_shadows
        self.encoder_shadow_size = encoder_shadow_size
        self.encoder_shadow_quick = encoder_shadow_quick

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and ctx.train is not None and not ctx.train.labelled.any():
            return "needs labelled rows in the 'train' split"
        return reason

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        ms = membership_scores(
            ctx,
            self.lira_shadows,
            self.lira_online,
            self.encoder_shadows,
            self.encoder_shadow_size,
            self.encoder_shadow_quick,
        )
        mem = ms.is_member
        results = {a: attack_metrics(s, mem, FPRS) for a, s in ms.scores.items()}
        metrics: dict[str, Metric] = {}
        for a, r in results.items():
            s = ms.scores[a]
            ci = auc_bootstrap_ci(s, mem, n_boot=self.n_boot, seed=ctx.seed)
            metrics[f"{a}/auc"] = Metric(r.auc, ci)
            metrics[f"{a}/balanced_accuracy"] = Metric(r.balanced_accuracy)
            for f, t in r.tpr_at_fpr.items():
                metrics[f"{a}/{_fpr_name(f)}"] = Metric(t)
        strongest = max(results, key=lambda a: results[a].auc)
        metrics["auc"] = metrics[f"{strongest}/auc"]
        metrics["balanced_accuracy"] = Metric(max(r.balanced_accuracy for r in results.values()))
        for f in FPRS:
            metrics[_fpr_name(f)] = Metric(max(r.tpr_at_fpr[f] for r in results.values()))

        findings = self._attack_findings(results, metrics, strongest)
        timings: dict[str, Metric] = {}
        if self.lira_shadows > 0 and "lira" not in ms.scores:
            findings.append(
                Finding(
                    "info",
                    "LiRA skipped: shadow models are trained only for a fusion head on frozen "
                    f"embeddings, and task {ctx.task.name!r} has none.",
                )
            )
        if self.encoder_shadows > 0:
            findings.append(_encoder_lira_finding(ctx, ms, results))
            if ms.encoder_shadows is not None:  # wall time varies run to run: a timing
                timings["encoder_lira/seconds"] = Metric(ms.encoder_shadows.seconds)
        mem_metrics, mem_findings, mem_plots = self._memorisation(ms, results, strongest)
        metrics.update(mem_metrics)
        findings += mem_findings
        plots = {"roc": _roc_plot(ms, results), **mem_plots}
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots, timings=timings)

    def _attack_findings(
        self, results: dict[str, AttackResult], metrics: dict[str, Metric], strongest: str
    ) -> list[Finding]:
        r = results[strongest]
        out = [
            Finding(
                "info",
                f"Members: {r.n_members} labelled train rows; non-members: {r.n_non_members} "
                "labelled held-out rows (calibration + test). Attack AUCs: "
                + ", ".join(f"{a} {x.auc:.3f}" for a, x in results.items())
                + ". Balanced accuracy uses the best threshold on these same rows (optimistic). "
                "A distribution shift between the splits also separates them, so a high AUC "
                "is an upper bound on what membership alone reveals.",
                {a: {"auc": x.auc, "n_members": x.n_members} for a, x in results.items()},
            )
        ]
        low = [f for f in FPRS if not r.resolvable[f]]
        if low:
            out.append(
                Finding(
                    "info",
                    f"Only {r.n_non_members} non-members: an FPR of "
                    + ", ".join(f"{f:.1%}" for f in low)
                    + f" cannot be resolved (the smallest non-zero FPR is "
                    f"{1 / r.n_non_members:.2%}); TPR there is the TPR at FPR 0, a conservative "
                    "lower bound.",
                    {"n_non_members": r.n_non_members, "unresolved_fprs": low},
                )
            )
        auc = metrics["auc"]
        if auc.ci is not None and auc.ci[0] > self.max_auc:
            out.append(
                Finding(
                    "medium",
                    f"Membership is inferable: the {strongest} attack separates training rows "
                    f"from held-out rows with AUC {auc.value:.3f} (95% CI [{auc.ci[0]:.3f}, "
                    f"{auc.ci[1]:.3f}]) and TPR {r.tpr_at_fpr[0.01]:.1%} at 1% FPR.",
                    {"attack": strongest, "auc": auc.value, "tpr_at_1pct_fpr": r.tpr_at_fpr[0.01]},
                    "Train with more data or regularisation (weight decay, augmentation, early "
                    "stopping), deduplicate the training set, or train with differential "
                    "privacy (DP-CLIP, methods reference §11a); re-audit afterwards.",
                )
            )
        return out

    def _memorisation(
        self, ms: MembershipScores, results: dict[str, AttackResult], strongest: str
    ) -> tuple[dict[str, Metric], list[Finding], dict[str, dict[str, Any]]]:
        mem = ms.is_member
        attack = MEMORISATION_ATTACK if MEMORISATION_ATTACK in ms.scores else strongest
        s = ms.scores[attack]
        pct = nonmember_percentile(s[mem], s[~mem])
        members = ms.members
        images = members.modalities.get("image")
        texts = members.modalities.get("text")
        copies = (
            content_groups(images, texts)
            if images is not None
            else np.ones(len(members), dtype=np.int64)
        )
        near = (
            near_duplicate_counts(
                [ms.embeddings["image"], ms.embeddings["text"]], self.near_duplicate_threshold
            )
            if ms.embeddings
            else np.zeros(len(members), dtype=np.int64)
        )
        outlier = pct >= self.outlier_level
        dup = copies > 1
        metrics = {
            "outlier_rate": Metric(float(outlier.mean())),
            "duplicated_rows": Metric(float(dup.sum())),
            "near_duplicate_rows": Metric(float((near > 0).sum())),
        }
        findings: list[Finding] = []
        if dup.any() and (~dup).any():
            dup_auc = membership_auc(pct, dup)
            metrics["duplicate_percentile"] = Metric(float(pct[dup].mean()))
            metrics["unique_percentile"] = Metric(float(pct[~dup].mean()))
            metrics["duplicate_rank_auc"] = Metric(dup_auc)
            n_groups = int(round(float((1.0 / copies[dup]).sum())))  # each group once
            findings.append(
                Finding(
                    "medium",
                    f"{int(dup.sum())} training rows are exact copies of another training row "
                    f"({n_groups} distinct items, up to {int(copies.max())} copies each). "
                    f"Under the {attack} attack they beat {pct[dup].mean():.1%} of non-members "
                    f"on average vs {pct[~dup].mean():.1%} for unique rows (AUC "
                    f"{dup_auc:.3f} for ranking copies above unique rows).",
                    {
                        "duplicated_rows": int(dup.sum()),
                        "max_copies": int(copies.max()),
                        "attack": attack,
                        "duplicate_percentile": float(pct[dup].mean()),
                        "unique_percentile": float(pct[~dup].mean()),
                    },
                    "Deduplicate the training data (exact and near-duplicates): repeated items "
                    "are the ones a model memorises and an attacker recovers first.",
                )
            )
        extra_near = (near > 0) & ~dup
        if extra_near.any():
            findings.append(
                Finding(
                    "low",
                    f"{int(extra_near.sum())} training rows have a near-duplicate (cosine >= "
                    f"{self.near_duplicate_threshold:g} in image and text embedding) that is "
                    "not an exact copy.",
                    {"rows": int(extra_near.sum())},
                    "Review these near-duplicates and deduplicate where they are the same item.",
                )
            )
        findings.append(
            Finding(
                "info",
                f"{int(outlier.sum())} of {len(pct)} training rows score above "
                f"{self.outlier_level:.0%} of non-members under the {attack} attack "
                f"(expected about {1 - self.outlier_level:.0%} without memorisation or shift).",
                {"outliers": int(outlier.sum()), "attack": attack},
            )
        )
        plots = {
            "memorisation": self._table(
                "Training rows most exposed to membership inference",
                np.argsort(-pct, kind="stable")[: self.n_examples],
                members,
                pct,
                copies,
                near,
                attack,
                ms.scores[attack][mem],
            )
        }
        if dup.any():
            idx = np.flatnonzero(dup)
            idx = idx[np.argsort(-pct[idx], kind="stable")][: self.n_examples]
            plots["duplicates"] = self._table(
                "Duplicated training rows", idx, members, pct, copies, near, attack, s[mem]
            )
        return metrics, findings, plots

    def _table(
        self,
        title: str,
        idx: Sequence[int],
        members: Dataset,
        pct: np.ndarray,
        copies: np.ndarray,
        near: np.ndarray,
        attack: str,
        score: np.ndarray,
    ) -> dict[str, Any]:
        texts = members.modalities.get("text")
        cols = ["id", *(["text"] if texts is not None else []), f"{attack} score"]
        cols += ["non-member percentile", "copies", "near-duplicates"]
        rows = [
            [
                members.ids[i],
                *([str(texts[i])] if texts is not None else []),
                float(score[i]),
                float(pct[i]),
                int(copies[i]),
                int(near[i]),
            ]
            for i in idx
        ]
        return {"kind": "table", "title": title, "columns": cols, "rows": rows}


_STATISTIC_WORDS = {
    "logit": "the logit of the own caption's softmax among all scored captions",
    "cosine": "the scaled image-caption cosine",
}


def _encoder_lira_finding(
    ctx: AuditContext, ms: MembershipScores, results: dict[str, AttackResult]
) -> Finding:
    es = ms.encoder_shadows
    if es is None:
        return Finding(
            "info",
            "Encoder LiRA skipped: shadow encoders are tiny-clips trained by the built-in "
            f"trainer, so it needs a tiny-clip and image-caption pairs; {ctx.model.name!r} on "
            f"{ctx.data.name!r} is not that.",
        )
    k, n = es.shadow.shape
    target_size = getattr(getattr(ctx.model, "cfg", None), "size", None)
    target_steps = getattr(ctx.model, "training_info", {}).get("steps")
    on, off = results["lira_encoder_online"], results["lira_encoder_offline"]
    base = results.get("cosine")
    mismatch = []
    if target_size is not None and target_size != es.size:
        mismatch.append(f"size {target_size}")
    if target_steps is not None and int(target_steps) != es.steps:
        mismatch.append(f"{target_steps} steps")
    return Finding(
        "info",
        f"Encoder LiRA: {k} shadow tiny-clip-{es.size} ({es.steps} steps each), each trained "
        f"from scratch on a random half of the {n} scored rows (every item IN for {k // 2}). "
        "Statistic: "
        + _STATISTIC_WORDS.get(es.statistic, es.statistic)
        + f". AUC online {on.auc:.3f} (TPR@1% FPR "
        f"{on.tpr_at_fpr[0.01]:.3f}), offline {off.auc:.3f} (TPR@1% FPR "
        f"{off.tpr_at_fpr[0.01]:.3f})"
        + (f", vs cosine {base.auc:.3f}" if base is not None else "")
        + ". "
        + (
            f"The target differs from the shadows ({', '.join(mismatch)}), which weakens LiRA. "
            if mismatch
            else ""
        )
        + f"With {k} shadows the per-row Gaussians are rough; Carlini et al. use 64+.",
        {
            "n_shadows": k,
            "shadow_size": es.size,
            "shadow_steps": es.steps,
            "statistic": es.statistic,
            "auc_online": on.auc,
            "auc_offline": off.auc,
        },
    )


def _roc_plot(ms: MembershipScores, results: dict[str, AttackResult]) -> dict[str, Any]:
    series = []
    grid = np.linspace(0.0, 1.0, 51)
    for a in results:
        f, t, _ = roc_points(ms.scores[a], ms.is_member)
        y = [float(t[f <= g + 1e-12].max()) for g in grid]
        series.append({"name": f"{a} (AUC {results[a].auc:.3f})", "x": grid.tolist(), "y": y})
    return {
        "kind": "line",
        "title": "Membership inference ROC",
        "xlabel": "false-positive rate (non-members flagged)",
        "ylabel": "true-positive rate (members found)",
        "ylim": [0.0, 1.0],
        "series": series,
    }
