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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.attacks import ATTACKS, NORMS, Norm, pixel_forward, run_attack
from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.engine.runner import to_device
from mmsafe.metrics import mean_ci

DEFAULT_EPS: dict[str, tuple[float, ...]] = {
    "linf": (1 / 255, 2 / 255, 4 / 255),
    "l2": (0.1, 0.25, 0.5),
}
REMEDIATION = (
    "Adversarially fine-tune the image tower (e.g. TeCoA or FARE-style robust fine-tuning of "
    "CLIP), or ensemble with a robust encoder; never let untrusted pixels drive a high-stakes "
    "decision alone. Re-run with more steps/restarts (or attacks=['apgd']) before trusting a "
    "high robust accuracy: weak attacks overestimate robustness."
)


def eps_label(eps: float) -> str:
    """A short, stable label for a budget, used in metric names.

    Example:
        >>> eps_label(2 / 255), eps_label(0.25)
        ('0.007843', '0.25')
    """
    return f"{eps:.4g}"


def attack_success_rate(clean_correct: np.ndarray, adv_correct: np.ndarray) -> float:
    """``ASR = flipped / initially correct`` (NaN when no row was initially correct).

    Example:
        >>> attack_success_rate(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0]))
        0.6666666666666666
    """
    c = np.asarray(clean_correct, dtype=bool)
    a = np.asarray(adv_correct, dtype=bool)
    n = int(c.sum())
    return float((c & ~a).sum() / n) if n else float("nan")


@register_check
class AdversarialCheck(Check):
    """Robust accuracy and attack success rate under white-box image attacks.

    Args:
        norms: which threat models to run, any of ``linf`` and ``l2``.
        eps: ``{norm: budgets}`` on ``[0, 1]`` pixels; defaults L-inf 1/255, 2/255, 4/255 and
            L2 0.1, 0.25, 0.5.
        attacks: any of ``fgsm``, ``pgd``, ``apgd`` (APGD-CE with ``2 * steps`` iterations).
        steps: PGD iterations (step size ``2.5 * eps / steps``).
        restarts: random restarts of PGD/APGD; the worst case per row is kept.
        random_start: start PGD at a random point of the ball.
        max_rows: attack at most this many labelled rows (a seeded subsample; ``None``: all).
        batch_size: rows per attacked batch (gradients through the image tower cost memory).
        max_drop: a fall of the worst robust accuracy at the smallest budget below clean
            accuracy by more than this raises a finding (``high`` above twice this).
        n_boot: bootstrap resamples for the CIs.
    """

    name = "robustness.adversarial"
    pillar = "robustness"
    requires = ("labels",)
    tasks = ("zero_shot", "fusion")
    description = "robust accuracy and attack success rate under FGSM/PGD pixel attacks (Linf, L2)"
    higher_is_better = {
        "clean_accuracy": True,
        "robust_accuracy": True,
        "attack_success_rate": False,
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

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and "image" not in ctx.task.modalities:
            return f"task {ctx.task.name!r} does not read images"
        return reason

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        rows = self._rows(ctx)
        labels = ctx.outputs.labels[rows]
        clean = (ctx.outputs.preds[rows] == labels).astype(np.float64)
        clean_value = float(clean.mean())
        adv = self._attack_all(ctx, rows, labels, clean.astype(bool))  # {(norm, atk, eps): (N,)}

        metrics: dict[str, Metric] = {
            "clean_accuracy": Metric(clean_value, mean_ci(clean, self.n_boot, seed=ctx.seed))
        }
        plots: dict[str, dict[str, Any]] = {}
        findings: list[Finding] = [
            Finding(
                "info",
                f"Attacked the images of {int(clean.sum())} correctly classified of {len(rows)} "
                f"evaluated rows (white-box, untargeted cross-entropy, pixels in [0, 1]) with "
                f"{', '.join(self.attacks)} ({self.steps} steps, {self.restarts} restart(s)); "
                f"'worst' is the per-row worst case over the attacks. See docs/adversarial.md.",
                {
                    "rows": len(rows),
                    "attacked": int(clean.sum()),
                    "eps": {n: list(e) for n, e in self.eps.items()},
                    "attacks": list(self.attacks),
                },
            )
        ]
        for norm in self.norms:
            series = []
            for atk in (*self.attacks, "worst"):
                ys = [clean_value]
                for e in self.eps[norm]:
                    if atk == "worst":
                        correct = np.min([adv[(norm, a, e)] for a in self.attacks], axis=0)
                    else:
                        correct = adv[(norm, atk, e)]
                    key = f"{norm}/{atk}/eps={eps_label(e)}"
                    metrics[f"{key}/robust_accuracy"] = Metric(
                        float(correct.mean()), mean_ci(correct, self.n_boot, seed=ctx.seed)
                    )
                    metrics[f"{key}/attack_success_rate"] = Metric(
                        attack_success_rate(clean, correct)
                    )
                    ys.append(float(correct.mean()))
                series.append({"name": atk, "x": [0.0, *self.eps[norm]], "y": ys})
            plots[f"accuracy_vs_eps_{norm}"] = {
                "kind": "line",
                "title": f"Accuracy under {norm} attacks vs budget (eps 0 = clean)",
                "xlabel": f"eps ({'L-inf' if norm == 'linf' else 'L2'}, pixels in [0, 1])",
                "ylabel": "accuracy",
                "series": series,
                "ylim": [0.0, 1.0],
            }
            findings += self._findings(norm, metrics, clean_value)
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        findings.sort(key=lambda f: order[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    # ------------------------------------------------------------------ parts
    def _rows(self, ctx: AuditContext) -> np.ndarray:
        rows = np.flatnonzero(ctx.outputs.labels >= 0)
        if self.max_rows is not None and len(rows) > self.max_rows:
            rng = np.random.default_rng([int(ctx.seed), 4242])
            rows = np.sort(rng.choice(rows, size=self.max_rows, replace=False))
        return rows

    def _attack_all(
        self, ctx: AuditContext, rows: np.ndarray, labels: np.ndarray, correct: np.ndarray
    ) -> dict[tuple[str, str, float], np.ndarray]:
        """Per-row correctness under every (norm, attack, eps); wrong rows stay wrong."""
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        out = {
            (n, a, e): np.zeros(len(rows))
            for n in self.norms
            for a in self.attacks
            for e in self.eps[n]
        }
        targets = np.flatnonzero(correct)  # positions in ``rows``
        gen = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 17)
        for start in range(0, len(targets), self.batch_size):
            pos = targets[start : start + self.batch_size]
            idx = rows[pos]
            images = [ctx.data.modalities["image"][i] for i in idx]
            x = to_device(model.preprocess("image", images), device)
            assert isinstance(x, Tensor)
            y = torch.as_tensor(labels[pos], dtype=torch.long, device=device)
            fixed = {
                m: e[torch.as_tensor(idx)].to(device)
                for m, e in ctx.outputs.embeddings.items()
                if m != "image" and m in ctx.task.modalities
            }
            forward = pixel_forward(model, ctx.task, fixed)
            for norm in self.norms:
                for atk in self.attacks:
                    for e in self.eps[norm]:
                        x_adv = run_attack(
                            atk,
                            forward,
                            x,
                            y,
                            e,
                            _as_norm(norm),
                            steps=self.steps,
                            restarts=self.restarts,
                            random_start=self.random_start,
                            generator=gen,
                        )
                        with torch.no_grad():
                            pred = forward(x_adv).argmax(dim=-1)
                        out[(norm, atk, e)][pos] = (pred == y).float().cpu().numpy()
        return out

    def _findings(self, norm: str, metrics: Mapping[str, Metric], clean: float) -> list[Finding]:
        e = self.eps[norm][0]
        robust = metrics[f"{norm}/worst/eps={eps_label(e)}/robust_accuracy"].value
        asr = metrics[f"{norm}/worst/eps={eps_label(e)}/attack_success_rate"].value
        drop = clean - robust
        if drop <= self.max_drop:
            return []
        return [
            Finding(
                "high" if drop > 2 * self.max_drop else "medium",
                f"At the smallest {norm} budget (eps {e:.4g}) accuracy falls from {clean:.3f} to "
                f"{robust:.3f} (attack success rate {asr:.0%}); threshold: a drop of "
                f"{self.max_drop:.2f}.",
                {"norm": norm, "eps": e, "clean": clean, "robust": robust, "asr": asr},
                REMEDIATION,
            )
        ]


def _as_norm(norm: str) -> Norm:
    return "linf" if norm == "linf" else "l2"
