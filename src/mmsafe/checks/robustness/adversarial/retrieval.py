"""``robustness.adversarial`` on ``retrieval``: recall@K of image-caption pairs under attack.

No labels are needed: the evaluated pairs are both the queries and the gallery. The image
attacks maximise the image side of the contrastive loss (cross-entropy of the image's
similarities to the distinct captions of the evaluated rows, target: its own caption); the
report is recall@1/5 in both directions (image->text ``i2t``, text->image ``t2i``) clean vs
attacked, the drop, and R@1-vs-eps curves. HotFlip, Co-Attack (with its independent Sep-Attack
baseline) and the universal perturbation are opt-in. See ``docs/adversarial.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Finding, Metric
from mmsafe.checks.robustness.adversarial.common import (
    REMEDIATION,
    AttackOutcome,
    AttackSettings,
    attack_success_rate,
    batches,
    by_severity,
    eps_label,
    pixels,
    select_rows,
    sweep,
    universal_train_pixels,
)
from mmsafe.methods.attacks.text import (
    AttackError,
    co_attack,
    embedding_cosine,
    hotflip,
    sep_attack,
    universal_perturbation,
)
from mmsafe.metrics import best_positive_rank, mean_ci
from mmsafe.tasks.retrieval import caption_positives

RETRIEVAL_KS: tuple[int, ...] = (1, 5)
"""Recall cut-offs reported on ``retrieval``."""

Hits = dict[str, dict[str, dict[str, np.ndarray]]]
"""``{series ("linf/pgd", "text/hotflip", ...): {x label: {"i2t_R@1": (N,) hits, ...}}}``."""


def retrieval_hits(
    image_emb: Tensor, text_emb: Tensor, positives: np.ndarray, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, np.ndarray]:
    """Per-query recall@k hits of paired embeddings, in both directions.

    Ranks and ties follow :func:`mmsafe.metrics.best_positive_rank` (so R@1 equals
    :func:`mmsafe.methods.attacks.text.retrieval_recall_at_1` on the same embeddings).

    Args:
        image_emb: ``(N, D)`` unit-norm image embeddings (queries for ``i2t``, gallery for
            ``t2i``).
        text_emb: ``(N, D)`` unit-norm caption embeddings; row ``i`` is the caption of image ``i``.
        positives: ``(N, N)`` bool, image ``i`` matches caption ``j``.
        ks: cut-offs.

    Returns:
        ``{"i2t_R@k": (N,), ..., "t2i_R@k": (N,), ...}``: 1.0 where the query's best positive
        ranks in the top ``k``.

    Example:
        >>> e = torch.eye(3)
        >>> h = retrieval_hits(e, e[[0, 2, 1]], np.eye(3, dtype=bool), ks=(1,))
        >>> h["i2t_R@1"].tolist(), h["t2i_R@1"].tolist()
        ([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    """
    sim = (image_emb.float() @ text_emb.float().T).cpu().numpy()
    pos = np.asarray(positives, dtype=bool)
    out: dict[str, np.ndarray] = {}
    for direction, s, p in (("i2t", sim, pos), ("t2i", sim.T, pos.T)):
        rank = best_positive_rank(s, p)
        for k in ks:
            out[f"{direction}_R@{k}"] = (rank < k).astype(np.float64)
    return out


def retrieval_targets(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct captions of some rows, as the label space of the image-side retrieval attack.

    Returns:
        ``(first, target)``: ``first[c]`` is the first row carrying distinct caption ``c``
        (captions sorted), ``target[i]`` the index of row ``i``'s caption among them. The image of
        row ``i`` is attacked with the cross-entropy of its similarities to the captions
        ``first`` against the label ``target[i]``: equal captions are one class, not rivals.

    Example:
        >>> first, target = retrieval_targets(["b", "a", "b"])
        >>> first.tolist(), target.tolist()
        ([1, 0], [1, 0, 1])
    """
    arr = np.asarray([str(t) for t in texts], dtype=str)
    _, first, target = np.unique(arr, return_index=True, return_inverse=True)
    return first.astype(np.int64), target.reshape(-1).astype(np.int64)


def run_retrieval(ctx: AuditContext, s: AttackSettings) -> AttackOutcome:
    """Recall@1/5 in both directions of the evaluated pairs, clean and under every attack.

    Args:
        ctx: the audit context (a ``retrieval`` task).
        s: the check's settings.

    Returns:
        The metrics, findings (most severe first) and plots of the report.
    """
    rows = select_rows(ctx, s.max_rows)
    texts = [str(ctx.data.modalities["text"][i]) for i in rows]
    positives = caption_positives(texts)
    r = torch.as_tensor(rows)
    clean = retrieval_hits(
        ctx.outputs.embeddings["image"][r], ctx.outputs.embeddings["text"][r], positives
    )
    hits: Hits = {}
    for (norm, atk, e), img in retrieval_image_attacks(ctx, s, rows, texts).items():
        hits.setdefault(f"{norm}/{atk}", {})[eps_label(e)] = retrieval_hits(
            img, ctx.outputs.embeddings["text"][r], positives
        )
    for norm in s.norms:
        hits[f"{norm}/worst"] = {
            eps_label(e): {
                m: np.min([hits[f"{norm}/{a}"][eps_label(e)][m] for a in s.attacks], axis=0)
                for m in clean
            }
            for e in s.eps[norm]
        }
    findings: list[Finding] = [
        Finding(
            "info",
            f"Attacked the images of {len(rows)} evaluated image-caption pairs (white-box, "
            f"untargeted cross-entropy of each image's similarities to the "
            f"{len(set(texts))} distinct captions, pixels in [0, 1]) with "
            f"{', '.join(s.attacks)} ({s.steps} steps, {s.restarts} restart(s)); "
            "recall@K over the same pairs (equal captions are positives); 'worst' is the "
            "per-query worst case over the attacks. See docs/adversarial.md.",
            {
                "rows": len(rows),
                "distinct_captions": len(set(texts)),
                "eps": {n: list(e) for n, e in s.eps.items()},
                "attacks": list(s.attacks),
            },
        )
    ]
    metrics = _recall_metrics(ctx, s, "clean", clean, clean)
    extra_findings, extra_hits, extra_metrics = _extra_attacks(ctx, s, rows, texts, positives)
    findings += extra_findings
    hits.update(extra_hits)
    metrics.update(extra_metrics)
    for series, per_x in hits.items():
        for x_label, h in per_x.items():
            prefix = f"{series}/{_x_key(series)}={x_label}"
            metrics.update(_recall_metrics(ctx, s, prefix, h, clean))
    plots = _recall_plots(s, clean, hits)
    for norm in s.norms:
        findings += _drop_findings(s, norm, metrics)
    return AttackOutcome(metrics=metrics, findings=by_severity(findings), plots=plots)


def _x_key(series: str) -> str:
    return {"text/hotflip": "flips"}.get(series, "eps")


def _recall_metrics(
    ctx: AuditContext,
    s: AttackSettings,
    prefix: str,
    hits: Mapping[str, np.ndarray],
    clean: Mapping[str, np.ndarray],
) -> dict[str, Metric]:
    """R@K per direction (with CIs), their mean R@1, its drop from clean, and the ASR."""
    metrics: dict[str, Metric] = {}
    for m, h in hits.items():
        metrics[f"{prefix}/{m}"] = Metric(float(h.mean()), mean_ci(h, s.n_boot, seed=ctx.seed))
    both = np.concatenate([hits["i2t_R@1"], hits["t2i_R@1"]])
    both_clean = np.concatenate([clean["i2t_R@1"], clean["t2i_R@1"]])
    metrics[f"{prefix}/mean_R@1"] = Metric(float(both.mean()))
    if prefix != "clean":
        metrics[f"{prefix}/R@1_drop"] = Metric(float(both_clean.mean() - both.mean()))
        metrics[f"{prefix}/attack_success_rate"] = Metric(attack_success_rate(both_clean, both))
    return metrics


def _recall_plots(
    s: AttackSettings, clean: Mapping[str, np.ndarray], hits: Hits
) -> dict[str, dict[str, Any]]:
    """R@1 (both directions) vs eps per norm (and vs tokens flipped for HotFlip)."""
    plots: dict[str, dict[str, Any]] = {}
    c = {d: float(clean[f"{d}_R@1"].mean()) for d in ("i2t", "t2i")}
    for norm in s.norms:
        names = [*s.attacks, "worst"]
        if norm == "linf":
            names += [n for n in ("co_attack", "sep_attack", "universal") if f"linf/{n}" in hits]
        plots[f"recall_vs_eps_{norm}"] = {
            "kind": "line",
            "title": f"Retrieval R@1 under {norm} attacks vs budget (eps 0 = clean)",
            "xlabel": f"eps ({'L-inf' if norm == 'linf' else 'L2'}, pixels in [0, 1])",
            "ylabel": "R@1",
            "series": [
                {
                    "name": f"{n} {d}",
                    "x": [0.0, *s.eps[norm]],
                    "y": [
                        c[d],
                        *[float(h[f"{d}_R@1"].mean()) for h in hits[f"{norm}/{n}"].values()],
                    ],
                }
                for n in names
                for d in ("i2t", "t2i")
            ],
            "ylim": [0.0, 1.0],
        }
    if "text/hotflip" in hits:
        plots["recall_vs_flips"] = {
            "kind": "line",
            "title": "Retrieval R@1 under the HotFlip caption attack vs tokens changed",
            "xlabel": "tokens changed per caption",
            "ylabel": "R@1",
            "series": [
                {
                    "name": f"hotflip {d}",
                    "x": [0, *s.flips],
                    "y": [
                        c[d],
                        *[float(h[f"{d}_R@1"].mean()) for h in hits["text/hotflip"].values()],
                    ],
                }
                for d in ("i2t", "t2i")
            ],
            "ylim": [0.0, 1.0],
        }
    return plots


def _drop_findings(s: AttackSettings, norm: str, metrics: Mapping[str, Metric]) -> list[Finding]:
    e = s.eps[norm][0]
    key = f"{norm}/worst/eps={eps_label(e)}"
    clean = metrics["clean/mean_R@1"].value
    robust = metrics[f"{key}/mean_R@1"].value
    # relative: R@1 falls with the gallery size, so an absolute drop is not comparable
    drop = (clean - robust) / clean if clean > 0 else 0.0
    if drop <= s.max_drop:
        return []
    return [
        Finding(
            "high" if drop > 2 * s.max_drop else "medium",
            f"At the smallest {norm} budget (eps {e:.4g}) retrieval R@1 (mean of image->text "
            f"and text->image) falls from {clean:.3f} to {robust:.3f}, {drop:.0%} of its "
            f"clean value; threshold: a relative drop of {s.max_drop:.0%}.",
            {"norm": norm, "eps": e, "clean": clean, "robust": robust, "relative_drop": drop},
            REMEDIATION,
        )
    ]


def retrieval_image_attacks(
    ctx: AuditContext, s: AttackSettings, rows: np.ndarray, texts: Sequence[str]
) -> dict[tuple[str, str, float], Tensor]:
    """Attacked image embeddings ``(N, D)`` per (norm, attack, eps), every row attacked.

    The label space is the distinct captions of the evaluated rows
    (:func:`retrieval_targets`); the logits are the task's (``logit_scale * I @ T.T``).

    Args:
        ctx: the audit context (a ``retrieval`` task).
        s: the check's settings.
        rows: the evaluated rows.
        texts: their captions.

    Returns:
        ``{(norm, attack, eps): (N, D) attacked image embeddings}`` on the CPU.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    first, target = retrieval_targets(texts)
    gallery = ctx.outputs.embeddings["text"][torch.as_tensor(rows[first])].to(device)

    def forward(x: Tensor) -> Tensor:
        return ctx.task.logits({"image": model.encode({"image": x})["image"], "text": gallery})

    dim = ctx.outputs.embeddings["image"].shape[1]
    out = {
        (n, a, e): torch.zeros(len(rows), dim) for n in s.norms for a in s.attacks for e in s.eps[n]
    }
    gen = ctx.torch_generator("random-starts")
    for pos in batches(np.arange(len(rows)), s.batch_size):
        x = pixels(ctx, rows[pos])
        y = torch.as_tensor(target[pos], dtype=torch.long, device=device)
        for key, x_adv in sweep(s, forward, x, y, gen):
            with torch.no_grad():
                emb = model.encode({"image": x_adv})["image"]
            out[key][torch.as_tensor(pos)] = emb.float().cpu()
    return out


def _extra_attacks(
    ctx: AuditContext,
    s: AttackSettings,
    rows: np.ndarray,
    texts: Sequence[str],
    positives: np.ndarray,
) -> tuple[list[Finding], Hits, dict[str, Metric]]:
    """HotFlip, Co-Attack + Sep-Attack and the universal perturbation, as configured."""
    findings: list[Finding] = []
    hits: Hits = {}
    metrics: dict[str, Metric] = {}
    if not s.any_extra:
        return findings, hits, metrics
    r = torch.as_tensor(rows)
    img0, txt0 = ctx.outputs.embeddings["image"][r], ctx.outputs.embeddings["text"][r]
    if "substitution" in s.text_attacks:
        findings.append(
            Finding(
                "info",
                "Substitution attack skipped on retrieval (its black-box margin is a "
                "classification margin); use text_attacks=['hotflip'].",
                {"text_attacks": list(s.text_attacks)},
            )
        )
    try:
        if "hotflip" in s.text_attacks:
            adv_txt = retrieval_hotflip(ctx, s, texts, img0, positives)
            hits["text/hotflip"] = {
                str(k): retrieval_hits(img0, t, positives) for k, t in adv_txt.items()
            }
        if s.co_attack:
            for name, per_eps in retrieval_co_attacks(ctx, s, rows, texts).items():
                hits[f"linf/{name}"] = {
                    eps_label(e): retrieval_hits(i, t, positives) for e, (i, t) in per_eps.items()
                }
    except AttackError as err:
        findings.append(Finding("info", f"HotFlip/Co-Attack skipped: {err}", {}))
    if s.universal:
        train_px = universal_train_pixels(ctx, s.universal_rows)
        if train_px is None:
            findings.append(Finding("info", "Universal perturbation skipped: no train images.", {}))
        else:
            hits["linf/universal"], cosines = retrieval_universal(
                ctx, s, rows, train_px, txt0, positives
            )
            metrics.update(cosines)
    ran = [
        k
        for k in ("text/hotflip", "linf/co_attack", "linf/sep_attack", "linf/universal")
        if k in hits
    ]
    findings.append(
        Finding(
            "info",
            "Also ran: "
            + (", ".join(k.split("/")[1] for k in ran) or "nothing")
            + " (they do not enter 'worst'; sep_attack is Co-Attack's independent baseline: "
            "the same caption attack and an image pushed away from its clean embedding "
            "only). See docs/adversarial.md.",
            {"extra_attacks": [k.split("/")[1] for k in ran]},
        )
    )
    return findings, hits, metrics


def retrieval_hotflip(
    ctx: AuditContext,
    s: AttackSettings,
    texts: Sequence[str],
    img0: Tensor,
    positives: np.ndarray,
) -> dict[int, Tensor]:
    """Caption embeddings ``(N, D)`` after HotFlip with each number of ``flips``.

    Objective: the text side of the contrastive loss with multiple positives,
    ``logsumexp_j s_j - logsumexp_{j positive} s_j`` over the task's logits ``s`` of the
    caption against the clean images of the evaluated rows.

    Args:
        ctx: the audit context (a ``retrieval`` task).
        s: the check's settings (``flips``, ``batch_size``).
        texts: the captions of the evaluated rows.
        img0: ``(N, D)`` their clean image embeddings.
        positives: ``(N, N)`` bool, image ``i`` matches caption ``j``.

    Returns:
        ``{flips: (N, D) attacked caption embeddings}`` on the CPU.

    Raises:
        AttackError: the model has no reachable token embedding.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    images = img0.to(device)
    pos_t = torch.as_tensor(positives, dtype=torch.bool, device=device)
    out = {k: torch.zeros_like(img0) for k in s.flips}
    for pos in batches(np.arange(len(texts)), s.batch_size):
        p = torch.as_tensor(pos, dtype=torch.long, device=device)
        batch = model.preprocess("text", [texts[i] for i in pos])
        assert isinstance(batch, dict)

        def objective(e: Tensor, rr: Tensor, p: Tensor = p) -> Tensor:
            sim = ctx.task.logits({"image": images, "text": e}).T.float()  # (n, N)
            own = sim.masked_fill(~pos_t[p[rr]], -torch.inf)
            return torch.logsumexp(sim, -1) - torch.logsumexp(own, -1)

        for k in s.flips:  # greedy and deterministic: k flips are a prefix of k + 1
            res = hotflip(model, batch, objective, k)
            with torch.no_grad():
                emb = model.encode({"text": res.batch})["text"]
            out[k][torch.as_tensor(pos)] = emb.float().cpu()
    return out


def retrieval_co_attacks(
    ctx: AuditContext, s: AttackSettings, rows: np.ndarray, texts: Sequence[str]
) -> dict[str, dict[float, tuple[Tensor, Tensor]]]:
    """(image, caption) embeddings under Co-Attack and Sep-Attack at every L-inf eps.

    Both start from the same random point (equal generators) and share the text step (run
    once per batch).

    Args:
        ctx: the audit context (a ``retrieval`` task).
        s: the check's settings (``eps["linf"]``, ``co_alpha``, ``co_flips``, ``steps``).
        rows: the evaluated rows.
        texts: their captions.

    Returns:
        ``{"co_attack" | "sep_attack": {eps: ((N, D) image, (N, D) caption embeddings)}}``.

    Raises:
        AttackError: the model has no reachable token embedding.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    dim = ctx.outputs.embeddings["image"].shape[1]
    out: dict[str, dict[float, tuple[Tensor, Tensor]]] = {
        n: {e: (torch.zeros(len(rows), dim), torch.zeros(len(rows), dim)) for e in s.eps["linf"]}
        for n in ("co_attack", "sep_attack")
    }
    gens = {n: ctx.torch_generator("co-attack") for n in out}  # the same starts for both
    fns = {"co_attack": co_attack, "sep_attack": sep_attack}
    for pos in batches(np.arange(len(rows)), s.batch_size):
        x = pixels(ctx, rows[pos])
        tb = model.preprocess("text", [texts[i] for i in pos])
        assert isinstance(tb, dict)
        p = torch.as_tensor(pos)
        adv_text = None  # the text step depends on neither eps nor alpha: run it once
        for e in s.eps["linf"]:
            for name, fn in fns.items():
                res = fn(model, x, tb, e, alpha=s.co_alpha, steps=s.steps,
                         n_flips=s.co_flips, random_start=s.random_start,
                         generator=gens[name], adversarial_text=adv_text)  # fmt: skip
                adv_text = res.text
                out[name][e][0][p] = res.image_embedding.float().cpu()
                out[name][e][1][p] = res.text_embedding.float().cpu()
    return out


def retrieval_universal(
    ctx: AuditContext,
    s: AttackSettings,
    rows: np.ndarray,
    train_px: Tensor,
    txt0: Tensor,
    positives: np.ndarray,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Metric]]:
    """Per-query hits under one universal L-inf perturbation per eps (clean captions).

    Args:
        ctx: the audit context (a ``retrieval`` task).
        s: the check's settings (``eps["linf"]``, ``universal_epochs``, ``batch_size``).
        rows: the evaluated rows.
        train_px: the training pixels of the perturbation.
        txt0: ``(N, D)`` clean caption embeddings of the evaluated rows.
        positives: ``(N, N)`` bool, image ``i`` matches caption ``j``.

    Returns:
        ``({eps label: hits}, {"linf/universal/eps=<e>/embedding_cosine": Metric})``.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    eval_px = model.preprocess("image", [ctx.data.modalities["image"][i] for i in rows])
    assert isinstance(eval_px, Tensor)
    gen = ctx.torch_generator("universal")
    out = {}
    cosines: dict[str, Metric] = {}
    for e in s.eps["linf"]:
        delta = universal_perturbation(
            model, train_px, e, epochs=s.universal_epochs, batch_size=s.batch_size,
            generator=gen,
        )  # fmt: skip
        parts = []
        for p in batches(np.arange(len(rows)), s.batch_size):
            with torch.no_grad():
                x = (eval_px[p].to(device) + delta).clamp(0, 1)
                parts.append(model.encode({"image": x})["image"].float().cpu())
        out[eps_label(e)] = retrieval_hits(torch.cat(parts), txt0, positives)
        cos = embedding_cosine(model, eval_px, delta)
        cosines[f"linf/universal/eps={eps_label(e)}/embedding_cosine"] = Metric(float(cos.mean()))
    return out, cosines
