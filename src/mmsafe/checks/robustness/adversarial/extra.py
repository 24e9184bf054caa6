"""Opt-in attacks of ``robustness.adversarial`` on classification tasks (``zero_shot``, ``fusion``).

From :mod:`mmsafe.methods.attacks.text`: black-box word/char substitution and gradient-guided
HotFlip
token attacks on the row's caption, Co-Attack (text, then image) per L-inf eps, and a universal
L-inf image perturbation trained on the train split. Each returns per-row correctness curves;
:func:`extra_attacks` turns them into metrics, plots and findings. See ``docs/adversarial.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.checks.base import AuditContext, Finding, Metric
from mmsafe.checks.robustness.adversarial.common import (
    AttackSettings,
    attack_success_rate,
    batches,
    eps_label,
    task_embeddings,
    universal_train_pixels,
)
from mmsafe.methods.attacks.pixel import pixel_forward
from mmsafe.methods.attacks.text import (
    AttackError,
    caption_vocabulary,
    co_attack,
    embedding_cosine,
    hotflip,
    substitution_attack,
    universal_perturbation,
)
from mmsafe.metrics import mean_ci
from mmsafe.models.base import to_device


@dataclass(frozen=True)
class ExtraReport:
    """What the opt-in attacks add to a classification report.

    Attributes:
        findings: skip notes and the "also ran" summary.
        metrics: robust accuracy / ASR per attack and budget (and mean queries, embedding
            cosines), in report order.
        plots: new plots (accuracy vs query budget, vs tokens flipped).
        linf_series: series to append to the ``accuracy_vs_eps_linf`` plot.
    """

    findings: list[Finding]
    metrics: dict[str, Metric]
    plots: dict[str, dict[str, Any]]
    linf_series: list[dict[str, Any]]


def extra_attacks(
    ctx: AuditContext,
    s: AttackSettings,
    rows: np.ndarray,
    labels: np.ndarray,
    clean: np.ndarray,
) -> ExtraReport:
    """Text attacks, Co-Attack and the universal perturbation, as configured in ``s``.

    Args:
        ctx: the audit context (a classification task).
        s: the check's settings.
        rows: the evaluated rows.
        labels: their labels.
        clean: ``(N,)`` clean correctness (1.0 / 0.0); wrong rows are not attacked.

    Returns:
        The findings, metrics, plots and L-inf plot series to add to the report.
    """
    findings: list[Finding] = []
    metrics: dict[str, Metric] = {}
    plots: dict[str, dict[str, Any]] = {}
    linf_series: list[dict[str, Any]] = []
    if not s.any_extra:
        return ExtraReport(findings, metrics, plots, linf_series)
    ok = clean.astype(bool)
    clean_value = float(clean.mean())
    curves: dict[str, dict[str, np.ndarray]] = {}
    reads_text = "text" in ctx.task.modalities and "text" in ctx.data.modalities
    if s.text_attacks and not reads_text:
        findings.append(
            Finding(
                "info",
                f"Text attacks skipped: task {ctx.task.name!r} does not read the row's text.",
                {"text_attacks": list(s.text_attacks)},
            )
        )
    elif s.text_attacks:
        curves.update(text_attack_curves(ctx, s, rows, labels, ok))
    try:
        if s.co_attack:
            curves["co_attack"] = co_attack_curves(ctx, s, rows, labels, ok)
    except AttackError as err:
        findings.append(Finding("info", f"Co-Attack skipped: {err}", {}))
    if s.universal:
        uni = universal_curves(ctx, s, rows, labels, ok)
        if uni is None:
            findings.append(Finding("info", "Universal perturbation skipped: no train images.", {}))
        else:
            curves["universal"], cosines = uni
            metrics.update(cosines)
    for name, per_x in curves.items():
        for x_label, correct in per_x.items():
            if name == "queries":
                continue
            key = _extra_key(name, x_label)
            metrics[f"{key}/robust_accuracy"] = Metric(
                float(correct.mean()), mean_ci(correct, s.n_boot, seed=ctx.seed)
            )
            metrics[f"{key}/attack_success_rate"] = Metric(attack_success_rate(clean, correct))
    if "substitution" in curves:
        q = curves["queries"]
        for budget in s.query_budgets:
            spent = np.minimum(q["spent"][ok], budget)
            metrics[f"text/substitution/queries={budget}/mean_queries"] = Metric(
                float(spent.mean()) if len(spent) else float("nan")
            )
        plots["accuracy_vs_queries"] = _accuracy_plot(
            "Accuracy under the black-box word/char substitution attack vs query budget",
            "query budget per row",
            [0, *s.query_budgets],
            [("substitution", clean_value, curves["substitution"])],
        )
    if "hotflip" in curves:
        plots["accuracy_vs_flips"] = _accuracy_plot(
            "Accuracy under the HotFlip token attack vs tokens changed",
            "tokens changed per caption",
            [0, *s.flips],
            [("hotflip", clean_value, curves["hotflip"])],
        )
    for name in ("co_attack", "universal"):
        if name in curves:
            ys = [clean_value, *[float(c.mean()) for c in curves[name].values()]]
            linf_series.append({"name": name, "x": [0.0, *s.eps["linf"]], "y": ys})
    findings.append(
        Finding(
            "info",
            "Also ran: "
            + ", ".join(k for k in curves if k != "queries")
            + " (co_attack also perturbs the text and universal is one input-agnostic "
            "perturbation, so neither enters 'worst'). See docs/adversarial.md.",
            {"extra_attacks": [k for k in curves if k != "queries"]},
        )
    )
    return ExtraReport(findings, metrics, plots, linf_series)


def _extra_key(name: str, x_label: str) -> str:
    if name == "substitution":
        return f"text/substitution/queries={x_label}"
    if name == "hotflip":
        return f"text/hotflip/flips={x_label}"
    return f"linf/{name}/eps={x_label}"


def _accuracy_plot(
    title: str, xlabel: str, x: list[float], series: list[tuple[str, float, dict]]
) -> dict[str, Any]:
    return {
        "kind": "line",
        "title": title,
        "xlabel": xlabel,
        "ylabel": "accuracy",
        "series": [
            {"name": n, "x": x, "y": [c, *[float(v.mean()) for v in per.values()]]}
            for n, c, per in series
        ],
        "ylim": [0.0, 1.0],
    }


def text_attack_curves(
    ctx: AuditContext, s: AttackSettings, rows: np.ndarray, labels: np.ndarray, ok: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """Per-row correctness under the text attacks, per query budget / flip count.

    Args:
        ctx: the audit context (a task that reads the row's text).
        s: the check's settings (``text_attacks``, ``query_budgets``, ``flips``).
        rows: the evaluated rows.
        labels: their labels.
        ok: ``(N,)`` bool, initially correct (only these are attacked).

    Returns:
        ``{"substitution": {budget: (N,)}, "queries": {"spent": (N,)}, "hotflip": {k: (N,)}}``
        for the configured attacks.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    texts = [str(ctx.data.modalities["text"][i]) for i in rows]
    emb = task_embeddings(ctx, rows, exclude=("text",), device=device)
    y_all = torch.as_tensor(labels, dtype=torch.long, device=device)

    def logits_for(text_emb: Tensor, pos: Tensor) -> Tensor:
        return ctx.task.logits({**{m: e[pos] for m, e in emb.items()}, "text": text_emb})

    def margin(logits: Tensor, y: Tensor) -> Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], -torch.inf).amax(dim=1)
        return true - other

    out: dict[str, dict[str, np.ndarray]] = {}
    if "substitution" in s.text_attacks:

        @torch.no_grad()
        def margin_fn(batch: Any, pos: Any) -> np.ndarray:
            p = torch.as_tensor(list(pos), dtype=torch.long, device=device)
            e = model.encode({"text": model.preprocess("text", list(batch))})["text"]
            return margin(logits_for(e.to(device), p), y_all[p]).float().cpu().numpy()

        clean_logits = ctx.outputs.logits[torch.as_tensor(rows)].to(device)
        clean_margin = margin(clean_logits, y_all).float().cpu().numpy()
        clean_margin[~ok] = -1.0  # wrong rows are not attacked
        vocab = caption_vocabulary(
            [str(t) for t in (ctx.train or ctx.data).modalities.get("text", texts)]
        )
        res = substitution_attack(
            margin_fn,
            texts,
            max(s.query_budgets),
            vocab,
            clean_margin=clean_margin,
            seed=int(ctx.seed),
        )
        out["substitution"] = {
            str(q): (ok & ~(res.success & (res.queries <= q))).astype(np.float64)
            for q in s.query_budgets
        }
        out["queries"] = {"spent": res.queries.astype(np.float64)}
    if "hotflip" in s.text_attacks:
        first = np.full(len(rows), -1)
        for pos in batches(np.flatnonzero(ok), s.batch_size):
            p = torch.as_tensor(pos, dtype=torch.long, device=device)
            batch = model.preprocess("text", [texts[i] for i in pos])
            assert isinstance(batch, dict)

            def objective(e: Tensor, r: Tensor, p: Tensor = p) -> Tensor:
                return torch.nn.functional.cross_entropy(
                    logits_for(e, p[r]).float(), y_all[p[r]], reduction="none"
                )

            def success(e: Tensor, r: Tensor, p: Tensor = p) -> Tensor:
                return logits_for(e, p[r]).argmax(dim=-1) != y_all[p[r]]

            res_h = hotflip(model, batch, objective, max(s.flips), success=success)
            first[pos] = res_h.first_success.numpy()
        out["hotflip"] = {
            str(k): (ok & ~((first >= 0) & (first <= k))).astype(np.float64) for k in s.flips
        }
    return out


def co_attack_curves(
    ctx: AuditContext, s: AttackSettings, rows: np.ndarray, labels: np.ndarray, ok: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-row correctness under Co-Attack at every L-inf eps.

    ``fusion``: the row's caption and image are attacked and the head reads both.
    ``zero_shot``: the row's text is its true class's first prompt; its adversarial version
    replaces that prompt in the true class's embedding (for this row only).

    Args:
        ctx: the audit context.
        s: the check's settings (``eps["linf"]``, ``co_alpha``, ``co_flips``, ``steps``).
        rows: the evaluated rows.
        labels: their labels.
        ok: ``(N,)`` bool, initially correct (only these are attacked).

    Returns:
        ``{eps label: (N,) correctness}``.

    Raises:
        AttackError: the model or task cannot be attacked this way.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    task = getattr(ctx.task, "inner", ctx.task)
    zero_shot = ctx.task.name == "zero_shot"
    if zero_shot and getattr(task, "class_embeddings_", None) is None:
        raise AttackError("the zero-shot task exposes no class embeddings")
    out = {eps_label(e): np.zeros(len(rows)) for e in s.eps["linf"]}
    gen = ctx.torch_generator("co-attack")
    classes = list(ctx.data.classes)
    for pos in batches(np.flatnonzero(ok), s.batch_size):
        idx = rows[pos]
        x = to_device(
            model.preprocess("image", [ctx.data.modalities["image"][i] for i in idx]), device
        )
        assert isinstance(x, Tensor)
        y = torch.as_tensor(labels[pos], dtype=torch.long, device=device)
        if zero_shot:
            templates = list(task.templates)
            texts = [templates[0].format(classes[int(c)]) for c in labels[pos]]
            rest = [t.format(classes[int(c)]) for c in labels[pos] for t in templates[1:]]
            with torch.no_grad():
                other = (
                    model.encode({"text": model.preprocess("text", rest)})["text"]
                    .view(len(pos), len(templates) - 1, -1)
                    .sum(1)
                    if rest and len(templates) > 1
                    else torch.zeros(len(pos), model.embed_dim, device=device)
                )
        else:
            texts = [str(ctx.data.modalities["text"][i]) for i in idx]
        tb = model.preprocess("text", texts)
        assert isinstance(tb, dict)
        adv_text = None  # the text step does not depend on eps: run it once
        for e in s.eps["linf"]:
            res = co_attack(model, x, tb, e, alpha=s.co_alpha, steps=s.steps,
                            n_flips=s.co_flips, generator=gen,
                            adversarial_text=adv_text)  # fmt: skip
            adv_text = res.text
            with torch.no_grad():
                if zero_shot:
                    cls_adv = torch.nn.functional.normalize(
                        other.to(device) + res.text_embedding, dim=-1
                    )
                    cls = task.class_embeddings_.to(device)
                    logits = res.image_embedding @ cls.T
                    logits[torch.arange(len(pos)), y] = (res.image_embedding * cls_adv).sum(-1)
                else:
                    fixed = task_embeddings(ctx, idx, exclude=("image", "text"), device=device)
                    logits = ctx.task.logits(
                        {**fixed, "image": res.image_embedding, "text": res.text_embedding}
                    )
            out[eps_label(e)][pos] = (logits.argmax(-1) == y).float().cpu().numpy()
    return out


def universal_curves(
    ctx: AuditContext, s: AttackSettings, rows: np.ndarray, labels: np.ndarray, ok: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, Metric]] | None:
    """Per-row correctness under one universal perturbation per L-inf eps.

    Args:
        ctx: the audit context.
        s: the check's settings (``eps["linf"]``, ``universal_rows``, ``universal_epochs``).
        rows: the evaluated rows.
        labels: their labels.
        ok: ``(N,)`` bool, initially correct (only these are evaluated; the rest stay wrong).

    Returns:
        ``({eps label: (N,) correctness}, {"linf/universal/eps=<e>/embedding_cosine": ...})``,
        or ``None`` when there are no train (or calibration) images to train it on.
    """
    train_px = universal_train_pixels(ctx, s.universal_rows)
    if train_px is None:
        return None
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    eval_px = model.preprocess("image", [ctx.data.modalities["image"][i] for i in rows])
    assert isinstance(eval_px, Tensor)
    gen = ctx.torch_generator("universal")
    out = {}
    cosines: dict[str, Metric] = {}
    fixed_all = task_embeddings(ctx, rows)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    for e in s.eps["linf"]:
        delta = universal_perturbation(
            model, train_px, e, epochs=s.universal_epochs, batch_size=s.batch_size,
            generator=gen,
        )  # fmt: skip
        correct = np.zeros(len(rows))
        for pos in batches(np.flatnonzero(ok), s.batch_size):
            p = torch.as_tensor(pos)
            fwd = pixel_forward(model, ctx.task, {m: v[p].to(device) for m, v in fixed_all.items()})
            with torch.no_grad():
                pred = fwd((eval_px[p].to(device) + delta).clamp(0, 1)).argmax(-1).cpu()
            correct[pos] = (pred == y_all[p]).float().numpy()
        out[eps_label(e)] = correct
        cos = embedding_cosine(model, eval_px, delta)
        cosines[f"linf/universal/eps={eps_label(e)}/embedding_cosine"] = Metric(float(cos.mean()))
    return out, cosines
