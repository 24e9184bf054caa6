"""``mmsafe harden conformal``: export a conformal predictor fitted on the calibration rows.

The science is :class:`mmsafe.methods.conformal.ConformalPredictor`; this hardener fits it on
the calibration split's probabilities, saves its thresholds with the model, data and task
fingerprints they are valid for, and re-audits ``monitoring.conformal`` with its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsafe.engine.cache import atomic_write_json
from mmsafe.harden.base import Hardened, Hardener, HardenError, register_hardener

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.methods.conformal import ConformalPredictor
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["ConformalHardener"]


@register_hardener
class ConformalHardener(Hardener):
    """A :class:`~mmsafe.methods.conformal.ConformalPredictor` exported with the model.

    It adds prediction sets rather than changing an output, so only the after-audit runs.
    :meth:`save` writes the predictor (``conformal.json``; ``ConformalPredictor.load`` reads
    it) and ``conformal.meta.json`` beside it (fingerprints, classes and settings).

    Args:
        confidence_level: Target coverage of the prediction sets.
        score: Non-conformity score: lac, aps or raps.
        mondrian: Per-stratum thresholds: class or group (default: one marginal threshold).

    Attributes:
        predictor_: the fitted predictor.
        meta_: what ``conformal.meta.json`` holds.
    """

    name = "conformal"
    description = "Export a conformal predictor (prediction sets at a confidence level)."
    needs = ("calibration",)
    checks = "monitoring.conformal"
    artifact = "conformal.json"
    audits_before = False

    def __init__(
        self, *, confidence_level: float = 0.9, score: str = "aps", mondrian: str | None = None
    ) -> None:
        self.confidence_level = confidence_level
        self.score = score
        self.mondrian = mondrian
        self.predictor_: ConformalPredictor | None = None
        self.meta_: dict[str, Any] = {}

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:  # noqa: D102
        from mmsafe.methods.conformal import MONDRIAN, SCORES

        if self.score not in SCORES:
            raise HardenError(f"Unknown score {self.score!r}; use one of {', '.join(SCORES)}.")
        if self.mondrian not in MONDRIAN:
            raise HardenError(f"Unknown mondrian {self.mondrian!r}; use class or group.")
        if not 0.0 < self.confidence_level < 1.0:
            raise HardenError(f"confidence_level must be in (0, 1), got {self.confidence_level}.")
        super().validate(model, task, data)

    def audit_options(self) -> dict[str, dict[str, Any]]:  # noqa: D102
        return {
            "monitoring.conformal": {
                "confidence_level": self.confidence_level,
                "scores": (self.score,),
                "mondrian": self.mondrian,
            }
        }

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> ConformalHardener:
        from mmsafe.harden.flow import calibration_outputs
        from mmsafe.methods.conformal import ConformalPredictor

        cal, calibration = calibration_outputs(model, data, task, engine)
        keep = cal.labels >= 0
        groups = None if calibration.groups is None else np.asarray(calibration.groups)[keep]
        self.predictor_ = ConformalPredictor(
            confidence_level=self.confidence_level,
            score=self.score,
            mondrian=self.mondrian,
            seed=seed,
        ).fit(cal.probs[keep], cal.labels[keep], groups=groups)
        self.meta_ = {
            "model": model.fingerprint(),
            "task": task.fingerprint(),
            "data": data.fingerprint(),
            "classes": list(calibration.classes),
            "confidence_level": self.confidence_level,
            "score": self.score,
            "mondrian": self.mondrian,
        }
        return self

    def transform(self, model: EncoderModel, task: Task) -> Hardened:  # noqa: D102
        return Hardened(model, task)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        return {"confidence_level": self.confidence_level}

    def save(self, path: Path) -> Path:  # noqa: D102
        if self.predictor_ is None:
            raise RuntimeError("ConformalHardener.fit() must run first.")
        self.predictor_.save(path)
        atomic_write_json(path.with_name(path.stem + ".meta.json"), self.meta_)
        return path
