"""Harden, then re-audit: fit a hardener on the calibration split and show the before/after delta.

Each function audits the model as it is, fits the hardener on the ``calibration`` rows (never on
the evaluated ``test`` rows), audits the hardened model on the same rows, and writes
``before/``, ``after/`` and the fitted hardener under ``out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
        deltas: every metric both cards share, with its change.
        artifact: the file the fitted hardener was saved to.
        summary: headline numbers of the hardener (e.g. the fitted temperature).
    """

    before: AuditResult | None
    after: AuditResult
    deltas: list[Delta]
    artifact: Path
    summary: dict[str, Any] = field(default_factory=dict)


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
        compare_cards(before.card, after.card),
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
    is valid for; :class:`mmsafe.conformal.ConformalPredictor` loads it and returns prediction
    sets at inference.
    """
    from mmsafe.conformal import ConformalPredictor

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
    return HardenResult(None, result, [], artifact, {"confidence_level": confidence_level})
