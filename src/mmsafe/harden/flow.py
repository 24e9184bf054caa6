"""Harden, then re-audit: fit a hardener on the calibration split and show the before/after delta.

Each function audits the model as it is, fits the hardener on the ``calibration`` rows (never on
the evaluated ``test`` rows), audits the hardened model on the same rows, and writes
``before/``, ``after/`` and the fitted hardener under ``out``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsafe.audit import AuditResult, evaluation_splits, run_audit
from mmsafe.data.dataset import Dataset
from mmsafe.engine.cache import atomic_write_json
from mmsafe.engine.runner import Engine
from mmsafe.models.base import EncoderModel
from mmsafe.report.compare import Delta, compare_cards
from mmsafe.tasks.base import Task, TaskError, TemperatureScaledTask, create_task


class HardenError(ValueError):
    """The data or task cannot be hardened this way; the message says what to do."""


@dataclass
class HardenResult:
    """What a hardening run produced.

    Attributes:
        before: the audit of the model as it was (``None`` when the hardener adds an output
            rather than changing one, as a conformal predictor does).
        after: the audit of the hardened model (same rows, same checks).
        artifact: the file the fitted hardener was saved to.
        summary: headline numbers of the hardener (e.g. the fitted temperature).
    """

    before: AuditResult | None
    after: AuditResult
    artifact: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def deltas(self) -> list[Delta]:
        """Every metric both cards share, with its change (empty without a ``before``)."""
        return [] if self.before is None else compare_cards(self.before.card, self.after.card)


def _calibration_outputs(
    model: EncoderModel, data: Dataset, task: Task, engine: Engine
) -> tuple[Any, Dataset]:
    evaluated, calibration, train = evaluation_splits(data)
    if calibration is None or not calibration.labelled.any():
        raise HardenError(
            f"Hardening fits on held-out labelled rows, but {data.name!r} has no labelled "
            "'calibration' split. Add a 'split' column with some 'calibration' rows."
        )
    task.prepare(model, engine, evaluated.classes, fit_data=train)
    if task.kind != "classification":
        raise TaskError(f"Hardening needs a classification task, not {task.name!r}.")
    return engine.outputs(model, task, calibration), calibration


def harden_temperature(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "zero_shot",
    out: str | Path,
    engine: Engine | None = None,
    checks: str | Sequence[str] = "performance,calibration",
    seed: int = 0,
) -> HardenResult:
    """Temperature scaling fitted on the calibration split, with ECE before/after."""
    from mmsafe.harden.calibration import TemperatureScaler

    engine = engine or Engine(progress=False)
    task = create_task(task) if isinstance(task, str) else task
    out = Path(out)
    cal, _ = _calibration_outputs(model, data, task, engine)
    keep = cal.labels >= 0
    scaler = TemperatureScaler().fit(cal.logits[keep], cal.labels[keep])
    artifact = out / "temperature.json"
    scaler.save(artifact)
    before = run_audit(model, data, task=task, checks=checks, out=out / "before", engine=engine)
    scaled = TemperatureScaledTask(task, scaler.temperature_)
    after = run_audit(model, data, task=scaled, checks=checks, out=out / "after", engine=engine)
    return HardenResult(
        before,
        after,
        artifact,
        {"temperature": float(scaler.temperature_)},
    )


def harden_conformal(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "zero_shot",
    out: str | Path,
    engine: Engine | None = None,
    confidence_level: float = 0.9,
    score: str = "aps",
    mondrian: str | None = None,
    seed: int = 0,
) -> HardenResult:
    """A conformal predictor fitted on the calibration split and exported with the model.

    The exported JSON holds the fitted thresholds and the model, data and task fingerprints it
    is valid for; :class:`mmsafe.methods.conformal.ConformalPredictor` loads it and returns
    prediction
    sets at inference.
    """
    from mmsafe.methods.conformal import ConformalPredictor

    engine = engine or Engine(progress=False)
    task = create_task(task) if isinstance(task, str) else task
    out = Path(out)
    cal, calibration = _calibration_outputs(model, data, task, engine)
    keep = cal.labels >= 0
    groups = None if calibration.groups is None else np.asarray(calibration.groups)[keep]
    predictor = ConformalPredictor(
        confidence_level=confidence_level, score=score, mondrian=mondrian, seed=seed
    ).fit(cal.probs[keep], cal.labels[keep], groups=groups)
    artifact = out / "conformal.json"
    predictor.save(artifact)
    atomic_write_json(
        out / "conformal.meta.json",
        {
            "model": model.fingerprint(),
            "task": task.fingerprint(),
            "data": data.fingerprint(),
            "classes": list(calibration.classes),
            "confidence_level": confidence_level,
            "score": score,
            "mondrian": mondrian,
        },
    )
    options = {
        "monitoring.conformal": {
            "confidence_level": confidence_level,
            "scores": (score,),
            "mondrian": mondrian,
        }
    }
    result = run_audit(
        model,
        data,
        task=task,
        checks="monitoring.conformal",
        out=out / "after",
        engine=engine,
        options=options,
    )
    return HardenResult(None, result, artifact, {"confidence_level": confidence_level})


def _privacy_summary(report: Any) -> dict[str, Any]:
    """The headline of a DP report (:class:`~mmsafe.harden.dp.DPReport` or DP-CLIP's)."""
    return {k: getattr(report, k) for k in ("epsilon", "delta", "noise_multiplier", "steps")}


def _fusion_task(task: str | Task) -> Task:
    task = create_task(task) if isinstance(task, str) else task
    if task.name != "fusion":
        raise HardenError(
            f"This hardener trains a fusion head, so it needs --task fusion, not {task.name!r}."
        )
    return task


def _train_split(data: Dataset, what: str) -> Dataset:
    _, _, train = evaluation_splits(data)
    if train is None or len(train) == 0:
        raise HardenError(
            f"{what} trains on the 'train' rows, but {data.name!r} has none. Add a 'split' "
            "column with some 'train' rows."
        )
    return train


def robust_sweep_point(
    model: EncoderModel,
    data: Dataset,
    task: Task,
    engine: Engine,
    *,
    eps: float,
    steps: int = 10,
    max_rows: int | None = 200,
    fit_data: Dataset | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """``(clean, robust)`` accuracy of ``model`` under PGD L-inf ``eps`` on ``data``'s rows.

    ``data`` is evaluated as a whole (pass the calibration split to choose a hyper-parameter
    without touching the audited test rows); ``task`` is re-prepared on the model, fitting what
    it learns (a fusion head) on ``fit_data``.
    """
    from mmsafe.checks.base import AuditContext
    from mmsafe.checks.robustness.adversarial.check import AdversarialCheck, eps_label

    task.prepare(model, engine, data.classes, fit_data=fit_data)
    ctx = AuditContext(
        model=model,
        task=task,
        data=data,
        outputs=engine.outputs(model, task, data),
        engine=engine,
        seed=seed,
    )
    check = AdversarialCheck(
        norms=("linf",),
        eps={"linf": [eps]},
        attacks=("pgd",),
        steps=steps,
        max_rows=max_rows,
        n_boot=100,
    )
    metrics = check.run(ctx).metrics
    return (
        metrics["clean_accuracy"].value,
        metrics[f"linf/pgd/eps={eps_label(eps)}/robust_accuracy"].value,
    )


def choose_alpha(sweep: Sequence[Mapping[str, float]], max_clean_drop: float) -> float:
    """The WiSE-FT ``alpha`` with the best robust accuracy among those that keep clean accuracy.

    A point qualifies when its clean accuracy is at most ``max_clean_drop`` below that of
    ``alpha = 0`` (the original model, which always qualifies). Ties go to the smaller alpha.

    Example:
        >>> sweep = [{"alpha": 0.0, "clean": 0.70, "robust": 0.20},
        ...          {"alpha": 0.5, "clean": 0.69, "robust": 0.26},
        ...          {"alpha": 1.0, "clean": 0.60, "robust": 0.30}]
        >>> choose_alpha(sweep, 0.02), choose_alpha(sweep, 0.2)
        (0.5, 1.0)
    """
    base = next(p for p in sweep if p["alpha"] == 0.0)["clean"]
    ok = [p for p in sweep if p["clean"] >= base - max_clean_drop - 1e-12]
    best = max(ok, key=lambda p: (p["robust"], -p["alpha"]))
    return float(best["alpha"])


def harden_adversarial(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "zero_shot",
    out: str | Path,
    engine: Engine | None = None,
    eps: float = 4 / 255,
    eval_eps: float = 2 / 255,
    steps: int = 3,
    epochs: int = 10,
    lr: float = 1e-4,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    max_clean_drop: float = 0.02,
    eval_steps: int = 10,
    max_rows: int | None = 200,
    free: int = 0,
    seed: int = 0,
) -> HardenResult:
    """FARE adversarial fine-tuning of the image tower, a WiSE-FT sweep, and a re-audit.

    1. FARE (:func:`mmsafe.harden.robust.fare_finetune`) fine-tunes the image tower on the
       ``train`` images (no labels) against PGD L-inf ``eps`` (or, with ``free = m``, with
       free adversarial training: ``m`` replays per batch, no separate attack passes).
    2. WiSE-FT interpolates original and fine-tuned weights for every ``alpha``; clean and
       PGD-``eval_eps`` robust accuracy of each are measured on the ``calibration`` rows, and
       :func:`choose_alpha` keeps the most robust one whose clean accuracy falls by at most
       ``max_clean_drop``.
    3. The chosen model is saved (safetensors; load it with ``--model tiny-clip:<out>/model``)
       and audited with ``performance`` and ``robustness.adversarial`` at ``eval_eps`` before
       and after, on the same test rows.
    """
    from mmsafe.checks.robustness.adversarial.check import DEFAULT_EPS
    from mmsafe.harden.robust import fare_finetune, wise_ft

    engine = engine or Engine(progress=False)
    task = create_task(task) if isinstance(task, str) else task
    out = Path(out)
    if not hasattr(model, "save_pretrained"):
        raise HardenError(
            f"{model.name} cannot be saved after fine-tuning; adversarial hardening supports "
            "tiny-clip models for now."
        )
    if 0.0 not in alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise HardenError(f"alphas must lie in [0, 1] and include 0, got {list(alphas)}")
    train = _train_split(data, "Adversarial fine-tuning")
    _, calibration, _ = evaluation_splits(data)
    if calibration is None or not calibration.labelled.any():
        raise HardenError(
            f"The WiSE-FT sweep is scored on held-out labelled rows, but {data.name!r} has no "
            "labelled 'calibration' split. Add a 'split' column with some 'calibration' rows."
        )
    try:
        fare = fare_finetune(
            model,
            train.modalities["image"],
            eps=eps,
            steps=steps,
            epochs=epochs,
            lr=lr,
            seed=seed,
            free=free,
        )
    except ValueError as exc:
        raise HardenError(f"FARE cannot fine-tune {model.name}: {exc}") from None
    sweep: list[dict[str, float]] = []
    candidates: dict[float, EncoderModel] = {}
    for alpha in sorted({float(a) for a in alphas}):
        candidate = model if alpha == 0.0 else wise_ft(model, fare, alpha)
        clean, robust = robust_sweep_point(
            candidate,
            calibration,
            task,
            engine,
            eps=eval_eps,
            steps=eval_steps,
            max_rows=max_rows,
            fit_data=train,
            seed=seed,
        )
        sweep.append({"alpha": alpha, "clean": clean, "robust": robust})
        candidates[alpha] = candidate
    alpha = choose_alpha(sweep, max_clean_drop)
    hardened = candidates[alpha]
    artifact = hardened.save_pretrained(out / "model")  # type: ignore[attr-defined]
    atomic_write_json(
        out / "wise_ft_sweep.json",
        {
            "split": "calibration",
            "eval_eps": eval_eps,
            "train_eps": eps,
            "chosen_alpha": alpha,
            "max_clean_drop": max_clean_drop,
            "sweep": sweep,
        },
    )
    eps_list = sorted({eval_eps, *DEFAULT_EPS["linf"]})
    options = {
        "robustness.adversarial": {
            "norms": ("linf",),
            "eps": {"linf": eps_list},
            "attacks": ("pgd",),
            "steps": eval_steps,
            "max_rows": max_rows,
        }
    }
    checks = "performance,robustness.adversarial"
    audit = {"task": task, "checks": checks, "engine": engine, "options": options, "seed": seed}
    before = run_audit(model, data, out=out / "before", **audit)
    after = run_audit(hardened, data, out=out / "after", **audit)
    return HardenResult(
        before,
        after,
        artifact,
        {"alpha": alpha, **{f"alpha={p['alpha']:g}/robust": p["robust"] for p in sweep}},
    )


def harden_dp(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "fusion",
    out: str | Path,
    engine: Engine | None = None,
    target_epsilon: float = 8.0,
    delta: float | None = None,
    max_grad_norm: float = 1.0,
    epochs: int = 30,
    checks: str | Sequence[str] = "performance,calibration,controllability.privacy",
    seed: int = 0,
) -> HardenResult:
    """Retrain the fusion head with DP-SGD (opacus) and re-audit utility and privacy.

    The head is trained on the ``train`` rows' embeddings by
    :func:`mmsafe.harden.dp.dp_fit_fusion_head` (example-level (epsilon, delta)-DP for those
    rows; the encoders stay as they are). It is saved with its privacy report, and the audit
    (by default performance, calibration and membership inference) runs before and after.
    """
    from mmsafe.harden.dp import dp_fit_fusion_head
    from mmsafe.tasks.fusion import FusionTask, PrefitFusionTask

    engine = engine or Engine(progress=False)
    task = _fusion_task(task)
    assert isinstance(task, FusionTask)
    out = Path(out)
    train = _train_split(data, "DP-SGD")
    evaluated, _, _ = evaluation_splits(data)
    if not train.labelled.any():
        raise HardenError(f"DP-SGD needs labelled 'train' rows, and {data.name!r} has none.")
    before = run_audit(model, data, task=task, checks=checks, out=out / "before", engine=engine)
    embeddings = engine.embed(model, train, task.modalities, desc="DP-SGD train rows")
    head, report = dp_fit_fusion_head(
        embeddings,
        torch.as_tensor(train.labels),
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        epochs=epochs,
        seed=seed,
        mode=task.mode,
        hidden=task.hidden,
        num_classes=len(evaluated.classes),
        classes=tuple(evaluated.classes),
    )
    artifact = head.save(out / "head", extra={"dp": report.to_dict()})
    dp_task = PrefitFusionTask(head, label=f"dp-sgd eps={report.epsilon:.3g}")
    after = run_audit(model, data, task=dp_task, checks=checks, out=out / "after", engine=engine)
    return HardenResult(
        before,
        after,
        artifact,
        _privacy_summary(report),
    )


def harden_unlearn(
    model: EncoderModel,
    data: Dataset,
    *,
    forget: str | Path | Sequence[str],
    task: str | Task = "fusion",
    out: str | Path,
    engine: Engine | None = None,
    method: str = "multidelete",
    checks: str | Sequence[str] = "performance",
    seed: int = 0,
) -> HardenResult:
    """Make the fusion head forget training rows, check it against retraining, and re-audit.

    ``forget`` is a file of row ids (one per line; see
    :func:`mmsafe.harden.unlearn.read_forget_ids`) or a list of ids; every id must be a
    labelled ``train`` row. The head the audit fitted is unlearned with ``method``
    (``multidelete`` or ``gradient_ascent``) and compared with a head retrained without those
    rows (:func:`mmsafe.harden.unlearn.unlearn_fusion`); ``unlearn.json`` holds that comparison.
    """
    from mmsafe.harden.unlearn import METHODS, read_forget_ids, unlearn_fusion
    from mmsafe.models.heads import FusionHead
    from mmsafe.tasks.fusion import FusionTask, PrefitFusionTask

    if method not in METHODS:
        raise HardenError(f"Unknown unlearning method {method!r}; use one of {', '.join(METHODS)}.")
    engine = engine or Engine(progress=False)
    task = _fusion_task(task)
    assert isinstance(task, FusionTask)
    out = Path(out)
    ids = read_forget_ids(forget, data) if isinstance(forget, str | Path) else list(forget)
    before = run_audit(model, data, task=task, checks=checks, out=out / "before", engine=engine)
    report = unlearn_fusion(
        model, data, ids, method=method, head=task.head_, engine=engine, out=out / "head", seed=seed
    )
    assert report.artifact is not None
    head = FusionHead.load(report.artifact)
    unlearned = PrefitFusionTask(head, label=f"unlearned ({method}, {len(ids)} rows)")
    after = run_audit(model, data, task=unlearned, checks=checks, out=out / "after", engine=engine)
    return HardenResult(
        before,
        after,
        Path(report.artifact),
        {
            "forget_rows": report.n_forget,
            "forget_auc/original": report.original.forget_auc,
            "forget_auc/unlearned": report.unlearned.forget_auc,
            "forget_auc/retrained": report.retrained.forget_auc,
            "test_accuracy/retrained": report.retrained.test_accuracy,
            "speedup_vs_retraining": report.time_ratio,
        },
    )


def harden_fairness(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "fusion",
    out: str | Path,
    engine: Engine | None = None,
    methods: Sequence[str] = ("pre", "in", "post"),
    constraints: str = "equalized_odds",
    positive_class: str | None = None,
    seed: int = 0,
) -> HardenResult:
    """Fairness mitigation of the fusion head (pre / in / post), with a before/after table.

    :func:`mmsafe.harden.fairness.mitigate_fairness` trains the unmitigated head and one head
    (or threshold set) per method and measures each on the test rows; the table is saved as
    ``fairness_mitigation.json`` and added to the card of an audit (``performance`` and
    ``controllability.fairness``) of the unmitigated fusion head, as the plot
    ``mitigation`` of the fairness check.
    """
    from mmsafe.harden.fairness import TABLE_METRICS, mitigate_fairness
    from mmsafe.report.card import validate_card
    from mmsafe.report.html import write_html

    engine = engine or Engine(progress=False)
    task = _fusion_task(task)
    out = Path(out)
    try:
        report = mitigate_fairness(
            model,
            data,
            methods,
            engine=engine,
            seed=seed,
            constraints=constraints,  # type: ignore[arg-type]
            positive_class=positive_class,
        )
    except ValueError as exc:
        raise HardenError(str(exc)) from None
    artifact = atomic_write_json(out / "fairness_mitigation.json", report.to_dict())
    checks = "performance,controllability.fairness"
    audit = run_audit(model, data, task=task, checks=checks, out=out / "after", engine=engine)
    card = audit.card
    fairness = card["checks"].get("controllability.fairness")
    if fairness is not None and fairness.get("status") == "ok":
        table = report.table()
        fairness["plots"]["mitigation"] = {
            "kind": "table",
            "title": f"Mitigation on the test rows (post thresholds class "
            f"{report.positive_class!r}, {report.constraints})",
            "columns": ["method", *(m.replace("_", " ") for m in TABLE_METRICS)],
            "rows": [[r["method"], *(r[m] for m in TABLE_METRICS)] for r in table],
        }
        validate_card(card)
        atomic_write_json(out / "after" / "card.json", card)
        write_html(card, out / "after" / "index.html")
    summary = {
        f"{r.method}/{m}": getattr(r, m)
        for r in report.rows
        for m in ("accuracy", "equalized_odds_difference")
    }
    return HardenResult(None, audit, artifact, summary)


def harden_dp_contrastive(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "zero_shot",
    out: str | Path,
    engine: Engine | None = None,
    split: str = "train",
    target_epsilon: float = 8.0,
    delta: float | None = None,
    max_grad_norm: float = 1.0,
    epochs: int = 5,
    lr: float = 0.05,
    checks: str | Sequence[str] = "performance,controllability.privacy",
    seed: int = 0,
) -> HardenResult:
    """DP-CLIP contrastive fine-tuning of tiny-clip on ``split``'s pairs, then a re-audit.

    See :func:`mmsafe.harden.dp_clip.dp_contrastive_finetune` for the mechanism and for what its
    accounting proves and assumes (the report's ``accounting_assumption``, saved beside the
    model as ``dp_clip.json``). Zero-shot accuracy before/after is measured on the labelled
    ``calibration`` rows; the model is saved under ``out/model`` (``--model tiny-clip:<dir>``).
    """
    from mmsafe.harden.dp_clip import dp_contrastive_finetune
    from mmsafe.models.tiny_clip import TinyClip

    engine = engine or Engine(progress=False)
    task = create_task(task) if isinstance(task, str) else task
    out = Path(out)
    if not isinstance(model, TinyClip):
        raise HardenError(
            f"DP-CLIP fine-tuning supports tiny-clip models for now, not {model.name}."
        )
    if not data.has_split(split):
        raise HardenError(f"--split {split!r}: {data.name!r} has no such rows.")
    private = data.split(split)
    _, calibration, _ = evaluation_splits(data)
    evaluated = calibration if calibration is not None and calibration.labelled.any() else None
    before = run_audit(model, data, task=task, checks=checks, out=out / "before", engine=engine)
    hardened, report = dp_contrastive_finetune(
        model,
        private.modalities["image"],
        [str(t) for t in private.modalities["text"]],
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        epochs=epochs,
        lr=lr,
        seed=seed,
        eval_images=None if evaluated is None else evaluated.modalities["image"],
        eval_labels=None if evaluated is None else evaluated.labels,
        classes=None if evaluated is None else evaluated.classes,
    )
    artifact = hardened.save_pretrained(out / "model")
    atomic_write_json(out / "model" / "dp_clip.json", report.to_dict())
    after = run_audit(hardened, data, task=task, checks=checks, out=out / "after", engine=engine)
    return HardenResult(
        before,
        after,
        artifact,
        _privacy_summary(report),
    )
