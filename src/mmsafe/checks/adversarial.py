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
from :mod:`mmsafe.attacks_text`: black-box word/char substitution and gradient-guided (HotFlip)
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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.attacks import ATTACKS, NORMS, Norm, pixel_forward, run_attack
from mmsafe.attacks_text import (
    TEXT_ATTACKS,
    AttackError,
    caption_vocabulary,
    co_attack,
    embedding_cosine,
    hotflip,
    sep_attack,
    substitution_attack,
    universal_perturbation,
)
from mmsafe.checks.base import AuditContext, Check, CheckResult, Finding, Metric
from mmsafe.checks.registry import register_check
from mmsafe.engine.runner import to_device
from mmsafe.metrics import best_positive_rank, mean_ci
from mmsafe.tasks.retrieval import caption_positives

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
RETRIEVAL_KS: tuple[int, ...] = (1, 5)
"""Recall cut-offs reported on ``retrieval``."""


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


def retrieval_hits(
    image_emb: Tensor, text_emb: Tensor, positives: np.ndarray, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, np.ndarray]:
    """Per-query recall@k hits of paired embeddings, in both directions.

    Ranks and ties follow :func:`mmsafe.metrics.best_positive_rank` (so R@1 equals
    :func:`mmsafe.attacks_text.retrieval_recall_at_1` on the same embeddings).

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
    requires = ("labels",)  # classification only: retrieval is scored by pairs
    tasks = ("zero_shot", "fusion", "retrieval")
    description = (
        "robust accuracy (retrieval: R@1/5) and attack success rate under FGSM/PGD pixel "
        "attacks (Linf, L2)"
    )
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

    def skip_reason(self, ctx: AuditContext) -> str | None:  # noqa: D102
        reason = super().skip_reason(ctx)
        if reason is None and "image" not in ctx.task.modalities:
            return f"task {ctx.task.name!r} does not read images"
        return reason

    # ------------------------------------------------------------------ run
    def run(self, ctx: AuditContext) -> CheckResult:  # noqa: D102
        if ctx.task.kind == "retrieval":
            return self._run_retrieval(ctx)
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
        findings += self._extra_attacks(ctx, rows, labels, clean, metrics, plots)
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        findings.sort(key=lambda f: order[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    # ------------------------------------------------------------------ parts
    def _rows(self, ctx: AuditContext) -> np.ndarray:
        if ctx.task.kind == "retrieval":
            rows = np.arange(len(ctx.data))
        else:
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
                            early_stop=self.early_stop,
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

    # ------------------------------------------------------------------ optional attacks
    def _extra_attacks(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        labels: np.ndarray,
        clean: np.ndarray,
        metrics: dict[str, Metric],
        plots: dict[str, dict[str, Any]],
    ) -> list[Finding]:
        """Text attacks, Co-Attack and the universal perturbation, as configured."""
        findings: list[Finding] = []
        if not (self.text_attacks or self.co_attack or self.universal):
            return findings
        ok = clean.astype(bool)
        clean_value = float(clean.mean())
        curves: dict[str, dict[str, np.ndarray]] = {}
        reads_text = "text" in ctx.task.modalities and "text" in ctx.data.modalities
        if self.text_attacks and not reads_text:
            findings.append(
                Finding(
                    "info",
                    f"Text attacks skipped: task {ctx.task.name!r} does not read the row's text.",
                    {"text_attacks": list(self.text_attacks)},
                )
            )
        elif self.text_attacks:
            curves.update(self._text_attacks(ctx, rows, labels, ok))
        try:
            if self.co_attack:
                curves["co_attack"] = self._co_attacks(ctx, rows, labels, ok)
        except AttackError as err:
            findings.append(Finding("info", f"Co-Attack skipped: {err}", {}))
        if self.universal:
            uni = self._universal(ctx, rows, labels, ok, metrics)
            if uni is None:
                findings.append(
                    Finding("info", "Universal perturbation skipped: no train images.", {})
                )
            else:
                curves["universal"] = uni
        for name, per_x in curves.items():
            for x_label, correct in per_x.items():
                if name == "queries":
                    continue
                key = self._extra_key(name, x_label)
                metrics[f"{key}/robust_accuracy"] = Metric(
                    float(correct.mean()), mean_ci(correct, self.n_boot, seed=ctx.seed)
                )
                metrics[f"{key}/attack_success_rate"] = Metric(attack_success_rate(clean, correct))
        if "substitution" in curves:
            q = curves["queries"]
            for budget in self.query_budgets:
                spent = np.minimum(q["spent"][ok], budget)
                metrics[f"text/substitution/queries={budget}/mean_queries"] = Metric(
                    float(spent.mean()) if len(spent) else float("nan")
                )
            plots["accuracy_vs_queries"] = self._plot(
                "Accuracy under the black-box word/char substitution attack vs query budget",
                "query budget per row",
                [0, *self.query_budgets],
                [("substitution", clean_value, curves["substitution"])],
            )
        if "hotflip" in curves:
            plots["accuracy_vs_flips"] = self._plot(
                "Accuracy under the HotFlip token attack vs tokens changed",
                "tokens changed per caption",
                [0, *self.flips],
                [("hotflip", clean_value, curves["hotflip"])],
            )
        linf = plots.get("accuracy_vs_eps_linf")
        for name in ("co_attack", "universal"):
            if name in curves and linf is not None:
                ys = [clean_value, *[float(c.mean()) for c in curves[name].values()]]
                linf["series"].append({"name": name, "x": [0.0, *self.eps["linf"]], "y": ys})
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
        return findings

    def _extra_key(self, name: str, x_label: str) -> str:
        if name == "substitution":
            return f"text/substitution/queries={x_label}"
        if name == "hotflip":
            return f"text/hotflip/flips={x_label}"
        return f"linf/{name}/eps={x_label}"

    @staticmethod
    def _plot(
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

    def _batches(self, targets: np.ndarray) -> list[np.ndarray]:
        return [targets[i : i + self.batch_size] for i in range(0, len(targets), self.batch_size)]

    def _text_attacks(
        self, ctx: AuditContext, rows: np.ndarray, labels: np.ndarray, ok: np.ndarray
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per-row correctness under the text attacks, per budget / flip count."""
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        texts = [str(ctx.data.modalities["text"][i]) for i in rows]
        emb = {
            m: e[torch.as_tensor(rows)].to(device)
            for m, e in ctx.outputs.embeddings.items()
            if m in ctx.task.modalities and m != "text"
        }
        y_all = torch.as_tensor(labels, dtype=torch.long, device=device)

        def logits_for(text_emb: Tensor, pos: Tensor) -> Tensor:
            return ctx.task.logits({**{m: e[pos] for m, e in emb.items()}, "text": text_emb})

        def margin(logits: Tensor, y: Tensor) -> Tensor:
            true = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.scatter(1, y[:, None], -torch.inf).amax(dim=1)
            return true - other

        out: dict[str, dict[str, np.ndarray]] = {}
        if "substitution" in self.text_attacks:

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
                max(self.query_budgets),
                vocab,
                clean_margin=clean_margin,
                seed=int(ctx.seed),
            )
            out["substitution"] = {
                str(q): (ok & ~(res.success & (res.queries <= q))).astype(np.float64)
                for q in self.query_budgets
            }
            out["queries"] = {"spent": res.queries.astype(np.float64)}
        if "hotflip" in self.text_attacks:
            first = np.full(len(rows), -1)
            for pos in self._batches(np.flatnonzero(ok)):
                p = torch.as_tensor(pos, dtype=torch.long, device=device)
                batch = model.preprocess("text", [texts[i] for i in pos])
                assert isinstance(batch, dict)

                def objective(e: Tensor, r: Tensor, p: Tensor = p) -> Tensor:
                    return torch.nn.functional.cross_entropy(
                        logits_for(e, p[r]).float(), y_all[p[r]], reduction="none"
                    )

                def success(e: Tensor, r: Tensor, p: Tensor = p) -> Tensor:
                    return logits_for(e, p[r]).argmax(dim=-1) != y_all[p[r]]

                res_h = hotflip(model, batch, objective, max(self.flips), success=success)
                first[pos] = res_h.first_success.numpy()
            out["hotflip"] = {
                str(k): (ok & ~((first >= 0) & (first <= k))).astype(np.float64) for k in self.flips
            }
        return out

    def _co_attacks(
        self, ctx: AuditContext, rows: np.ndarray, labels: np.ndarray, ok: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Per-row correctness under Co-Attack at every L-inf eps.

        ``fusion``: the row's caption and image are attacked and the head reads both.
        ``zero_shot``: the row's text is its true class's first prompt; its adversarial version
        replaces that prompt in the true class's embedding (for this row only).
        """
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        task = getattr(ctx.task, "inner", ctx.task)
        zero_shot = ctx.task.name == "zero_shot"
        if zero_shot and getattr(task, "class_embeddings_", None) is None:
            raise AttackError("the zero-shot task exposes no class embeddings")
        out = {eps_label(e): np.zeros(len(rows)) for e in self.eps["linf"]}
        gen = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 29)
        classes = list(ctx.data.classes)
        for pos in self._batches(np.flatnonzero(ok)):
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
            for e in self.eps["linf"]:
                res = co_attack(model, x, tb, e, alpha=self.co_alpha, steps=self.steps,
                                n_flips=self.co_flips, generator=gen,
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
                        fixed = {
                            m: v[torch.as_tensor(idx)].to(device)
                            for m, v in ctx.outputs.embeddings.items()
                            if m in ctx.task.modalities and m not in ("image", "text")
                        }
                        logits = ctx.task.logits(
                            {**fixed, "image": res.image_embedding, "text": res.text_embedding}
                        )
                out[eps_label(e)][pos] = (logits.argmax(-1) == y).float().cpu().numpy()
        return out

    def _universal(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        labels: np.ndarray,
        ok: np.ndarray,
        metrics: dict[str, Metric],
    ) -> dict[str, np.ndarray] | None:
        """Per-row correctness under one universal perturbation per L-inf eps."""
        train_px = self._universal_train_pixels(ctx)
        if train_px is None:
            return None
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        eval_px = model.preprocess("image", [ctx.data.modalities["image"][i] for i in rows])
        assert isinstance(eval_px, Tensor)
        gen = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 31)
        out = {}
        fixed_all = {
            m: v[torch.as_tensor(rows)]
            for m, v in ctx.outputs.embeddings.items()
            if m != "image" and m in ctx.task.modalities
        }
        y_all = torch.as_tensor(labels, dtype=torch.long)
        for e in self.eps["linf"]:
            delta = universal_perturbation(
                model, train_px, e, epochs=self.universal_epochs, batch_size=self.batch_size,
                generator=gen,
            )  # fmt: skip
            correct = np.zeros(len(rows))
            for pos in self._batches(np.flatnonzero(ok)):
                p = torch.as_tensor(pos)
                fwd = pixel_forward(
                    model, ctx.task, {m: v[p].to(device) for m, v in fixed_all.items()}
                )
                with torch.no_grad():
                    pred = fwd((eval_px[p].to(device) + delta).clamp(0, 1)).argmax(-1).cpu()
                correct[pos] = (pred == y_all[p]).float().numpy()
            out[eps_label(e)] = correct
            cos = embedding_cosine(model, eval_px, delta)
            metrics[f"linf/universal/eps={eps_label(e)}/embedding_cosine"] = Metric(
                float(cos.mean())
            )
        return out

    def _universal_train_pixels(self, ctx: AuditContext) -> Tensor | None:
        """Up to ``universal_rows`` seeded train (else calibration) images, or ``None``."""
        source = ctx.train if ctx.train is not None and len(ctx.train) else ctx.calibration
        if source is None or "image" not in source.modalities or len(source) == 0:
            return None
        rng = np.random.default_rng([int(ctx.seed), 4243])
        pick = rng.permutation(len(source))[: self.universal_rows]
        px = ctx.model.preprocess("image", [source.modalities["image"][i] for i in pick])
        assert isinstance(px, Tensor)
        return px

    # ------------------------------------------------------------------ retrieval
    def _run_retrieval(self, ctx: AuditContext) -> CheckResult:
        """Recall@1/5 in both directions of the evaluated pairs, clean and under every attack."""
        rows = self._rows(ctx)
        texts = [str(ctx.data.modalities["text"][i]) for i in rows]
        positives = caption_positives(texts)
        r = torch.as_tensor(rows)
        clean = retrieval_hits(
            ctx.outputs.embeddings["image"][r], ctx.outputs.embeddings["text"][r], positives
        )
        # {series ("linf/pgd", "text/hotflip", ...): {x label: {"i2t_R@1": (N,) hits, ...}}}
        hits: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for (norm, atk, e), img in self._retrieval_image_attacks(ctx, rows, texts).items():
            hits.setdefault(f"{norm}/{atk}", {})[eps_label(e)] = retrieval_hits(
                img, ctx.outputs.embeddings["text"][r], positives
            )
        for norm in self.norms:
            hits[f"{norm}/worst"] = {
                eps_label(e): {
                    m: np.min([hits[f"{norm}/{a}"][eps_label(e)][m] for a in self.attacks], axis=0)
                    for m in clean
                }
                for e in self.eps[norm]
            }
        findings: list[Finding] = [
            Finding(
                "info",
                f"Attacked the images of {len(rows)} evaluated image-caption pairs (white-box, "
                f"untargeted cross-entropy of each image's similarities to the "
                f"{len(set(texts))} distinct captions, pixels in [0, 1]) with "
                f"{', '.join(self.attacks)} ({self.steps} steps, {self.restarts} restart(s)); "
                "recall@K over the same pairs (equal captions are positives); 'worst' is the "
                "per-query worst case over the attacks. See docs/adversarial.md.",
                {
                    "rows": len(rows),
                    "distinct_captions": len(set(texts)),
                    "eps": {n: list(e) for n, e in self.eps.items()},
                    "attacks": list(self.attacks),
                },
            )
        ]
        metrics: dict[str, Metric] = {}
        self._retrieval_metrics(ctx, "clean", clean, clean, metrics)
        findings += self._retrieval_extra_attacks(ctx, rows, texts, positives, hits, metrics)
        for series, per_x in hits.items():
            for x_label, h in per_x.items():
                self._retrieval_metrics(
                    ctx, f"{series}/{self._retrieval_x_key(series)}={x_label}", h, clean, metrics
                )
        plots = self._retrieval_plots(clean, hits)
        for norm in self.norms:
            findings += self._retrieval_findings(norm, metrics)
        order = {"high": 0, "medium": 1, "low": 2, "info": 3}
        findings.sort(key=lambda f: order[f.severity])
        return self.result(metrics=metrics, findings=tuple(findings), plots=plots)

    @staticmethod
    def _retrieval_x_key(series: str) -> str:
        return {"text/hotflip": "flips"}.get(series, "eps")

    def _retrieval_metrics(
        self,
        ctx: AuditContext,
        prefix: str,
        hits: Mapping[str, np.ndarray],
        clean: Mapping[str, np.ndarray],
        metrics: dict[str, Metric],
    ) -> None:
        """R@K per direction (with CIs), their mean R@1, its drop from clean, and the ASR."""
        for m, h in hits.items():
            metrics[f"{prefix}/{m}"] = Metric(
                float(h.mean()), mean_ci(h, self.n_boot, seed=ctx.seed)
            )
        both = np.concatenate([hits["i2t_R@1"], hits["t2i_R@1"]])
        both_clean = np.concatenate([clean["i2t_R@1"], clean["t2i_R@1"]])
        metrics[f"{prefix}/mean_R@1"] = Metric(float(both.mean()))
        if prefix != "clean":
            metrics[f"{prefix}/R@1_drop"] = Metric(float(both_clean.mean() - both.mean()))
            metrics[f"{prefix}/attack_success_rate"] = Metric(attack_success_rate(both_clean, both))

    def _retrieval_plots(
        self,
        clean: Mapping[str, np.ndarray],
        hits: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    ) -> dict[str, dict[str, Any]]:
        """R@1 (both directions) vs eps per norm (and vs tokens flipped for HotFlip)."""
        plots: dict[str, dict[str, Any]] = {}
        c = {d: float(clean[f"{d}_R@1"].mean()) for d in ("i2t", "t2i")}
        for norm in self.norms:
            names = [*self.attacks, "worst"]
            if norm == "linf":
                names += [
                    n for n in ("co_attack", "sep_attack", "universal") if f"linf/{n}" in hits
                ]
            plots[f"recall_vs_eps_{norm}"] = {
                "kind": "line",
                "title": f"Retrieval R@1 under {norm} attacks vs budget (eps 0 = clean)",
                "xlabel": f"eps ({'L-inf' if norm == 'linf' else 'L2'}, pixels in [0, 1])",
                "ylabel": "R@1",
                "series": [
                    {
                        "name": f"{n} {d}",
                        "x": [0.0, *self.eps[norm]],
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
                        "x": [0, *self.flips],
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

    def _retrieval_findings(self, norm: str, metrics: Mapping[str, Metric]) -> list[Finding]:
        e = self.eps[norm][0]
        key = f"{norm}/worst/eps={eps_label(e)}"
        clean = metrics["clean/mean_R@1"].value
        robust = metrics[f"{key}/mean_R@1"].value
        # relative: R@1 falls with the gallery size, so an absolute drop is not comparable
        drop = (clean - robust) / clean if clean > 0 else 0.0
        if drop <= self.max_drop:
            return []
        return [
            Finding(
                "high" if drop > 2 * self.max_drop else "medium",
                f"At the smallest {norm} budget (eps {e:.4g}) retrieval R@1 (mean of image->text "
                f"and text->image) falls from {clean:.3f} to {robust:.3f}, {drop:.0%} of its "
                f"clean value; threshold: a relative drop of {self.max_drop:.0%}.",
                {"norm": norm, "eps": e, "clean": clean, "robust": robust, "relative_drop": drop},
                REMEDIATION,
            )
        ]

    def _retrieval_image_attacks(
        self, ctx: AuditContext, rows: np.ndarray, texts: Sequence[str]
    ) -> dict[tuple[str, str, float], Tensor]:
        """Attacked image embeddings ``(N, D)`` per (norm, attack, eps), every row attacked.

        The label space is the distinct captions of the evaluated rows
        (:func:`retrieval_targets`); the logits are the task's (``logit_scale * I @ T.T``).
        """
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        first, target = retrieval_targets(texts)
        gallery = ctx.outputs.embeddings["text"][torch.as_tensor(rows[first])].to(device)

        def forward(x: Tensor) -> Tensor:
            return ctx.task.logits({"image": model.encode({"image": x})["image"], "text": gallery})

        dim = ctx.outputs.embeddings["image"].shape[1]
        out = {
            (n, a, e): torch.zeros(len(rows), dim)
            for n in self.norms
            for a in self.attacks
            for e in self.eps[n]
        }
        gen = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 17)
        for pos in self._batches(np.arange(len(rows))):
            x = self._pixels(ctx, rows[pos])
            y = torch.as_tensor(target[pos], dtype=torch.long, device=device)
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
                            emb = model.encode({"image": x_adv})["image"]
                        out[(norm, atk, e)][torch.as_tensor(pos)] = emb.float().cpu()
        return out

    @staticmethod
    def _pixels(ctx: AuditContext, idx: np.ndarray) -> Tensor:
        images = [ctx.data.modalities["image"][i] for i in idx]
        x = to_device(ctx.model.preprocess("image", images), ctx.engine.device)
        assert isinstance(x, Tensor)
        return x

    def _retrieval_extra_attacks(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        texts: Sequence[str],
        positives: np.ndarray,
        hits: dict[str, dict[str, dict[str, np.ndarray]]],
        metrics: dict[str, Metric],
    ) -> list[Finding]:
        """HotFlip, Co-Attack + Sep-Attack and the universal perturbation, as configured."""
        findings: list[Finding] = []
        if not (self.text_attacks or self.co_attack or self.universal):
            return findings
        r = torch.as_tensor(rows)
        img0, txt0 = ctx.outputs.embeddings["image"][r], ctx.outputs.embeddings["text"][r]
        if "substitution" in self.text_attacks:
            findings.append(
                Finding(
                    "info",
                    "Substitution attack skipped on retrieval (its black-box margin is a "
                    "classification margin); use text_attacks=['hotflip'].",
                    {"text_attacks": list(self.text_attacks)},
                )
            )
        try:
            if "hotflip" in self.text_attacks:
                adv_txt = self._retrieval_hotflip(ctx, texts, img0, positives)
                hits["text/hotflip"] = {
                    str(k): retrieval_hits(img0, t, positives) for k, t in adv_txt.items()
                }
            if self.co_attack:
                for name, per_eps in self._retrieval_co_attacks(ctx, rows, texts).items():
                    hits[f"linf/{name}"] = {
                        eps_label(e): retrieval_hits(i, t, positives)
                        for e, (i, t) in per_eps.items()
                    }
        except AttackError as err:
            findings.append(Finding("info", f"HotFlip/Co-Attack skipped: {err}", {}))
        if self.universal:
            train_px = self._universal_train_pixels(ctx)
            if train_px is None:
                findings.append(
                    Finding("info", "Universal perturbation skipped: no train images.", {})
                )
            else:
                hits["linf/universal"] = self._retrieval_universal(
                    ctx, rows, train_px, txt0, positives, metrics
                )
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
        return findings

    def _retrieval_hotflip(
        self, ctx: AuditContext, texts: Sequence[str], img0: Tensor, positives: np.ndarray
    ) -> dict[int, Tensor]:
        """Caption embeddings ``(N, D)`` after HotFlip with each number of ``flips``.

        Objective: the text side of the contrastive loss with multiple positives,
        ``logsumexp_j s_j - logsumexp_{j positive} s_j`` over the task's logits ``s`` of the
        caption against the clean images of the evaluated rows.
        """
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        images = img0.to(device)
        pos_t = torch.as_tensor(positives, dtype=torch.bool, device=device)
        out = {k: torch.zeros_like(img0) for k in self.flips}
        for pos in self._batches(np.arange(len(texts))):
            p = torch.as_tensor(pos, dtype=torch.long, device=device)
            batch = model.preprocess("text", [texts[i] for i in pos])
            assert isinstance(batch, dict)

            def objective(e: Tensor, rr: Tensor, p: Tensor = p) -> Tensor:
                s = ctx.task.logits({"image": images, "text": e}).T.float()  # (n, N)
                own = s.masked_fill(~pos_t[p[rr]], -torch.inf)
                return torch.logsumexp(s, -1) - torch.logsumexp(own, -1)

            for k in self.flips:  # greedy and deterministic: k flips are a prefix of k + 1
                res = hotflip(model, batch, objective, k)
                with torch.no_grad():
                    emb = model.encode({"text": res.batch})["text"]
                out[k][torch.as_tensor(pos)] = emb.float().cpu()
        return out

    def _retrieval_co_attacks(
        self, ctx: AuditContext, rows: np.ndarray, texts: Sequence[str]
    ) -> dict[str, dict[float, tuple[Tensor, Tensor]]]:
        """(image, caption) embeddings under Co-Attack and Sep-Attack at every L-inf eps.

        Both start from the same random point (equal generators) and share the text step (run
        once per batch).
        """
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        dim = ctx.outputs.embeddings["image"].shape[1]
        out: dict[str, dict[float, tuple[Tensor, Tensor]]] = {
            n: {
                e: (torch.zeros(len(rows), dim), torch.zeros(len(rows), dim))
                for e in self.eps["linf"]
            }
            for n in ("co_attack", "sep_attack")
        }
        seed = int(ctx.seed) * 7919 + 29
        gens = {n: torch.Generator().manual_seed(seed) for n in out}
        fns = {"co_attack": co_attack, "sep_attack": sep_attack}
        for pos in self._batches(np.arange(len(rows))):
            x = self._pixels(ctx, rows[pos])
            tb = model.preprocess("text", [texts[i] for i in pos])
            assert isinstance(tb, dict)
            p = torch.as_tensor(pos)
            adv_text = None  # the text step depends on neither eps nor alpha: run it once
            for e in self.eps["linf"]:
                for name, fn in fns.items():
                    res = fn(model, x, tb, e, alpha=self.co_alpha, steps=self.steps,
                             n_flips=self.co_flips, random_start=self.random_start,
                             generator=gens[name], adversarial_text=adv_text)  # fmt: skip
                    adv_text = res.text
                    out[name][e][0][p] = res.image_embedding.float().cpu()
                    out[name][e][1][p] = res.text_embedding.float().cpu()
        return out

    def _retrieval_universal(
        self,
        ctx: AuditContext,
        rows: np.ndarray,
        train_px: Tensor,
        txt0: Tensor,
        positives: np.ndarray,
        metrics: dict[str, Metric],
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per-query hits under one universal L-inf perturbation per eps (clean captions).

        Also records ``linf/universal/eps=<e>/embedding_cosine`` in ``metrics``.
        """
        device = ctx.engine.device
        model = ctx.model.to(device).eval()
        eval_px = model.preprocess("image", [ctx.data.modalities["image"][i] for i in rows])
        assert isinstance(eval_px, Tensor)
        gen = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 31)
        out = {}
        for e in self.eps["linf"]:
            delta = universal_perturbation(
                model, train_px, e, epochs=self.universal_epochs, batch_size=self.batch_size,
                generator=gen,
            )  # fmt: skip
            parts = []
            for p in self._batches(np.arange(len(rows))):
                with torch.no_grad():
                    x = (eval_px[p].to(device) + delta).clamp(0, 1)
                    parts.append(model.encode({"image": x})["image"].float().cpu())
            out[eps_label(e)] = retrieval_hits(torch.cat(parts), txt0, positives)
            cos = embedding_cosine(model, eval_px, delta)
            metrics[f"linf/universal/eps={eps_label(e)}/embedding_cosine"] = Metric(
                float(cos.mean())
            )
        return out


def _as_norm(norm: str) -> Norm:
    return "linf" if norm == "linf" else "l2"
