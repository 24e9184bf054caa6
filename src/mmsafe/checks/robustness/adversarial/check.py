"""``robustness.adversarial``: accuracy under white-box pixel attacks (FGSM, PGD, APGD-CE).

The image of each evaluated row is attacked in pixel space (``[0, 1]``, before the tower's
normalisation) under an L-inf and/or an L2 budget; the task's logits are recomputed from the
attacked image embedding and the clean embeddings of the other modalities (the caption for
``fusion``; the fixed class prompts for ``zero_shot``). Rows the model already gets wrong are
not attacked: they count as wrong under every attack. Reported (see ``docs/adversarial.md``):

* clean accuracy on the attacked subsample;
* robust accuracy per norm x attack x eps, and the worst case over the attacks per row;
* attack success rate ``ASR = flipped / initially correct`` per norm x attack x eps;
* an accuracy-vs-eps line plot per norm.

Optional, off by default (each costs more than the default audit; see ``docs/adversarial.md``),
from :mod:`mmsafe.methods.attacks.text`: black-box word/char substitution and gradient-guided
(HotFlip)
token attacks on the row's caption (tasks that read it: ``fusion``), with robust accuracy, ASR
and mean queries against the query budget / number of flipped tokens; Co-Attack (text, then
image) per L-inf eps; and a universal feature-space image perturbation trained on the train
split and evaluated on the evaluated rows.

On ``retrieval`` (no labels needed: it is scored by image-caption pairs) the same image attacks
maximise the image side of the contrastive loss (cross-entropy of the image's similarities to the
distinct captions of the evaluated rows, target: its own caption); the report is recall@1/5 in
both directions (image->text ``i2t``, text->image ``t2i``) clean vs attacked, the drop, and
R@1-vs-eps curves. HotFlip, Co-Attack (with its independent Sep-Attack baseline) and the
universal perturbation are available there too.

Layout: this module holds the check (options, validation, registration) and the image attacks
on classification tasks; the opt-in attacks on classification are in
:mod:`mmsafe.checks.robustness.adversarial.extra`, the whole ``retrieval`` path in
:mod:`mmsafe.checks.robustness.adversarial.retrieval`, and the pieces they share (the
:class:`~mmsafe.checks.robustness.adversarial.common.AttackSettings` they all take,
:func:`eps_label`,
:func:`attack_success_rate`) in :mod:`mmsafe.checks.robustness.adversarial.common`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.checks.robustness.adversarial.common import (
    REMEDIATION,
    AttackOutcome,
    AttackSettings,
    attack_success_rate,
    by_severity,
    eps_label,
    pixels,
    select_rows,
    sweep,
    task_embeddings,
)
from mmsafe.checks.robustness.adversarial.extra import extra_attacks
from mmsafe.checks.robustness.adversarial.retrieval import (
    RETRIEVAL_KS,
    retrieval_hits,
    retrieval_targets,
    run_retrieval,
)
from mmsafe.methods.attacks.pixel import ATTACKS, NORMS, pixel_forward
from mmsafe.methods.attacks.text import TEXT_ATTACKS
from mmsafe.metrics import mean_ci

__all__ = [
    "DEFAULT_EPS",
    "REMEDIATION",
    "RETRIEVAL_KS",
    "AdversarialCheck",
    "AttackSettings",
    "attack_success_rate",
    "eps_label",
    "retrieval_hits",
    "retrieval_targets",
]

DEFAULT_EPS: dict[str, tuple[float, ...]] = {
    "linf": (1 / 255, 2 / 255, 4 / 255),
    "l2": (0.1, 0.25, 0.5),
}


@register_check
class AdversarialCheck(Check):
    """Robust accuracy and attack success rate under white-box image attacks.

    On ``retrieval`` the metrics are recall@1/5 (image->text and text->image) of the evaluated
    pairs, clean and attacked; see ``docs/adversarial.md``.

    Args:
        norms: which threat models to run, any of ``linf`` and ``l2``.
        eps: ``{norm: budgets}`` on ``[0, 1]`` pixels; defaults L-inf 1/255, 2/255, 4/255 and
            L2 0.1, 0.25, 0.5.
        attacks: any of ``fgsm``, ``pgd``, ``apgd`` (APGD-CE with ``2 * steps`` iterations).
        steps: PGD iterations (step size ``2.5 * eps / steps``).
        restarts: random restarts of PGD/APGD; the worst case per row is kept.
        random_start: start PGD at a random point of the ball.
        max_rows: attack at most this many labelled rows (``retrieval``: image-caption pairs,
            which are also the gallery; a seeded subsample; ``None``: all).
        batch_size: rows per attacked batch (gradients through the image tower cost memory).
        max_drop: a fall of the worst robust accuracy at the smallest budget below clean
            accuracy by more than this raises a finding (``high`` above twice this); on
            ``retrieval``, the fall of the mean R@1 as a fraction of its clean value.
        n_boot: bootstrap resamples for the CIs.
        early_stop: PGD drops a row from the batch at its first misclassifying iterate (never
            weaker, cheaper). Not used on ``retrieval``, where R@5 and the text->image ranks
            keep falling after a row's R@1 is lost.
        text_attacks: any of ``substitution`` (black-box, query-bounded) and ``hotflip``
            (gradient-guided tokens) on the row's caption; only for tasks that read it
            (``retrieval``: ``hotflip`` only).
        query_budgets: query budgets reported for ``substitution`` (one run at the largest).
        flips: numbers of changed tokens reported for ``hotflip`` (one run at the largest).
        co_attack: also run Co-Attack (text, then image) at every L-inf eps (``retrieval``:
            and its independent Sep-Attack baseline).
        co_alpha: Co-Attack's cross-modal weight.
        co_flips: tokens Co-Attack's text step may change.
        universal: also train one universal L-inf perturbation per eps on the train split and
            report it on the evaluated rows.
        universal_rows: training images for the universal perturbation.
        universal_epochs: passes over them.
    """

    name = "robustness.adversarial"
    pillar = "robustness"
    requires = ("labels", "image")
    tasks = ("zero_shot", "fusion")
    description = "robust accuracy and attack success rate under FGSM/PGD pixel attacks (Linf, L2)"
    higher_is_better = {
        "clean_accuracy": True,
        "robust_accuracy": True,
        "attack_success_rate": False,
        **{f"{d}_R@{k}": True for d in ("i2t", "t2i") for k in RETRIEVAL_KS},
        "mean_R@1": True,
        "R@1_drop": False,
    }

    def __init__(
        self,
        norms: Sequence[str] = NORMS,
        eps: Mapping[str, Sequence[float]] | None = None,
        attacks: Sequence[str] = ("fgsm", "pgd"),
        steps: int = 10,
        restarts: int = 1,
        random_start: bool = True,
        max_rows: int | None = 200,
        batch_size: int = 64,
        max_drop: float = 0.2,
        n_boot: int = 1000,
        early_stop: bool = True,
        text_attacks: Sequence[str] = (),
        query_budgets: Sequence[int] = (10, 50, 200),
        flips: Sequence[int] = (1, 2, 4),
        co_attack: bool = False,
        co_alpha: float = 3.0,
        co_flips: int = 1,
        universal: bool = False,
        universal_rows: int = 256,
        universal_epochs: int = 3,
    ) -> None:
        self.norms = tuple(norms)
        bad = [n for n in self.norms if n not in NORMS]
        if bad or not self.norms:
            raise ValueError(f"norms must be a non-empty subset of {NORMS}, got {list(norms)}")
        given = dict(eps or {})
        unknown = [k for k in given if k not in NORMS]
        if unknown:
            raise ValueError(f"eps given for unknown norm(s) {unknown}; use {', '.join(NORMS)}")
        self.eps = {
            n: tuple(sorted(float(e) for e in given.get(n, DEFAULT_EPS[n]))) for n in self.norms
        }
        if any(not e or min(e) <= 0 for e in self.eps.values()):
            raise ValueError(f"every norm needs at least one positive eps, got {self.eps}")
        self.attacks = tuple(attacks)
        if not self.attacks or any(a not in ATTACKS for a in self.attacks):
            raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {attacks}")
        if steps < 1 or restarts < 1 or batch_size < 1:
            raise ValueError("steps, restarts and batch_size must be >= 1")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.random_start = bool(random_start)
        self.max_rows = max_rows
        self.batch_size = int(batch_size)
        self.max_drop = float(max_drop)
        self.n_boot = int(n_boot)
        self.early_stop = bool(early_stop)
        self.text_attacks = tuple(text_attacks)
        if any(a not in TEXT_ATTACKS for a in self.text_attacks):
            raise ValueError(f"text_attacks must be a subset of {TEXT_ATTACKS}, got {text_attacks}")
        self.query_budgets = tuple(sorted({int(q) for q in query_budgets}))
        self.flips = tuple(sorted({int(k) for k in flips}))
        if not self.query_budgets or min(self.query_budgets) < 1:
            raise ValueError(f"query_budgets must be positive integers, got {query_budgets}")
        if not self.flips or min(self.flips) < 1:
            raise ValueError(f"flips must be positive integers, got {flips}")
        self.co_attack = bool(co_attack)
        self.co_alpha = float(co_alpha)
        self.co_flips = int(co_flips)
        self.universal = bool(universal)
        self.universal_rows = int(universal_rows)
        self.universal_epochs = int(universal_epochs)
        if (self.co_attack or self.universal) and "linf" not in self.norms:
            raise ValueError("co_attack and universal are L-inf attacks: add 'linf' to norms")

    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        s = self.settings()
        # attack steps (forward + backward per row) cannot be cached: counted apart
        with ctx.engine.counting(ctx.model, "attack_iterations"):
            run = run_retrieval if ctx.task.kind == "retrieval" else run_classification
            out = run(ctx, s)
        return self.result(metrics=out.metrics, findings=out.findings, plots=out.plots)

    def settings(self) -> AttackSettings:
        """This check's options as one frozen :class:`AttackSettings` value."""
        return AttackSettings(**{f.name: getattr(self, f.name) for f in fields(AttackSettings)})


# ---------------------------------------------------------------------- classification
def run_classification(ctx: AuditContext, s: AttackSettings) -> AttackOutcome:
    """Robust accuracy and ASR of the labelled rows under every (norm, attack, eps).

    Args:
        ctx: the audit context (``zero_shot`` or ``fusion``).
        s: the check's settings.

    Returns:
        The metrics, findings (most severe first) and plots of the report.
    """
    rows = select_rows(ctx, s.max_rows)
    labels = ctx.outputs.labels[rows]
    clean = (ctx.outputs.preds[rows] == labels).astype(np.float64)
    clean_value = float(clean.mean())
    adv = image_attacks(ctx, s, rows, labels, clean.astype(bool))  # {(norm, atk, eps): (N,)}

    metrics: dict[str, Metric] = {
        "clean_accuracy": Metric(clean_value, mean_ci(clean, s.n_boot, seed=ctx.seed))
    }
    plots: dict[str, dict[str, Any]] = {}
    findings: list[Finding] = [
        Finding(
            "info",
            f"Attacked the images of {int(clean.sum())} correctly classified of {len(rows)} "
            f"evaluated rows (white-box, untargeted cross-entropy, pixels in [0, 1]) with "
            f"{', '.join(s.attacks)} ({s.steps} steps, {s.restarts} restart(s)); "
            f"'worst' is the per-row worst case over the attacks. See docs/adversarial.md.",
            {
                "rows": len(rows),
                "attacked": int(clean.sum()),
                "eps": {n: list(e) for n, e in s.eps.items()},
                "attacks": list(s.attacks),
            },
        )
    ]
    for norm in s.norms:
        series = []
        for atk in (*s.attacks, "worst"):
            ys = [clean_value]
            for e in s.eps[norm]:
                if atk == "worst":
                    correct = np.min([adv[(norm, a, e)] for a in s.attacks], axis=0)
                else:
                    correct = adv[(norm, atk, e)]
                key = f"{norm}/{atk}/eps={eps_label(e)}"
                metrics[f"{key}/robust_accuracy"] = Metric(
                    float(correct.mean()), mean_ci(correct, s.n_boot, seed=ctx.seed)
                )
                metrics[f"{key}/attack_success_rate"] = Metric(attack_success_rate(clean, correct))
                ys.append(float(correct.mean()))
            series.append({"name": atk, "x": [0.0, *s.eps[norm]], "y": ys})
        plots[f"accuracy_vs_eps_{norm}"] = {
            "kind": "line",
            "title": f"Accuracy under {norm} attacks vs budget (eps 0 = clean)",
            "xlabel": f"eps ({'L-inf' if norm == 'linf' else 'L2'}, pixels in [0, 1])",
            "ylabel": "accuracy",
            "series": series,
            "ylim": [0.0, 1.0],
        }
        findings += _drop_findings(s, norm, metrics, clean_value)
    extra = extra_attacks(ctx, s, rows, labels, clean)
    metrics.update(extra.metrics)
    if "accuracy_vs_eps_linf" in plots:
        plots["accuracy_vs_eps_linf"]["series"].extend(extra.linf_series)
    plots.update(extra.plots)
    findings += extra.findings
    return AttackOutcome(metrics=metrics, findings=by_severity(findings), plots=plots)


def image_attacks(
    ctx: AuditContext, s: AttackSettings, rows: np.ndarray, labels: np.ndarray, correct: np.ndarray
) -> dict[tuple[str, str, float], np.ndarray]:
    """Per-row correctness under every (norm, attack, eps); wrong rows stay wrong.

    Args:
        ctx: the audit context (a classification task).
        s: the check's settings.
        rows: the evaluated rows.
        labels: their labels.
        correct: ``(N,)`` bool, initially correct (only these are attacked).

    Returns:
        ``{(norm, attack, eps): (N,) correctness}``.
    """
    device = ctx.engine.device
    model = ctx.model.to(device).eval()
    out = {(n, a, e): np.zeros(len(rows)) for n in s.norms for a in s.attacks for e in s.eps[n]}
    targets = np.flatnonzero(correct)  # positions in ``rows``
    gen = ctx.torch_generator("random-starts")
    for start in range(0, len(targets), s.batch_size):
        pos = targets[start : start + s.batch_size]
        idx = rows[pos]
        x = pixels(ctx, idx)
        y = torch.as_tensor(labels[pos], dtype=torch.long, device=device)
        forward = pixel_forward(model, ctx.task, task_embeddings(ctx, idx, device=device))
        for key, x_adv in sweep(s, forward, x, y, gen, early_stop=s.early_stop):
            with torch.no_grad():
                pred = forward(x_adv).argmax(dim=-1)
            out[key][pos] = (pred == y).float().cpu().numpy()
    return out


def _drop_findings(
    s: AttackSettings, norm: str, metrics: Mapping[str, Metric], clean: float
) -> list[Finding]:
    e = s.eps[norm][0]
    robust = metrics[f"{norm}/worst/eps={eps_label(e)}/robust_accuracy"].value
    asr = metrics[f"{norm}/worst/eps={eps_label(e)}/attack_success_rate"].value
    drop = clean - robust
    if drop <= s.max_drop:
        return []
    return [
        Finding(
            "high" if drop > 2 * s.max_drop else "medium",
            f"At the smallest {norm} budget (eps {e:.4g}) accuracy falls from {clean:.3f} to "
            f"{robust:.3f} (attack success rate {asr:.0%}); threshold: a drop of "
            f"{s.max_drop:.2f}.",
            {"norm": norm, "eps": e, "clean": clean, "robust": robust, "asr": asr},
            REMEDIATION,
        )
    ]


@register_check
class AdversarialRetrievalCheck(AdversarialCheck):
    """``robustness.adversarial`` on retrieval: R@1/R@5 both ways, clean vs attacked.

    The same options as :class:`AdversarialCheck`; its own metric names (``clean/i2t_R@1``,
    ``<norm>/<attack>/eps=<e>/i2t_R@1``, ...), since one check keeps one metric schema. The old
    name ``robustness.adversarial`` still selects it on ``--task retrieval``.
    """

    name = "robustness.adversarial_retrieval"
    aliases = ("robustness.adversarial",)
    requires = ("image",)
    tasks = ("retrieval",)
    description = "R@1/R@5 (image-to-text, text-to-image) under FGSM/PGD pixel attacks"
