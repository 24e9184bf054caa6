"""The check contract: what a check declares, what it receives, and what it returns.

A check is a class with class attributes that say what it means (``name``, ``pillar``,
``requires``, ``tasks``, ``higher_is_better``) and one verb, ``run(ctx) -> CheckResult``. The
result is a frozen dataclass that serialises to JSON with :func:`dataclasses.asdict`; the card, the
HTML report and the CI gates read nothing else.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Outputs, Task

Status = Literal["ok", "skipped", "failed"]
Severity = Literal["info", "low", "medium", "high"]
PILLARS: tuple[str, ...] = (
    "performance",
    "robustness",
    "alignment",
    "monitoring",
    "controllability",
    "efficiency",
)


@dataclass(frozen=True)
class Metric:
    """A metric value with an optional bootstrap 95% confidence interval.

    Example:
        >>> Metric(0.5, (0.4, 0.6)).to_dict()
        {'value': 0.5, 'ci': [0.4, 0.6]}
    """

    value: float
    ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"value": float, "ci": [lo, hi] | null}``; NaN becomes ``null``."""
        return {
            "value": _finite(self.value),
            "ci": None if self.ci is None else [_finite(self.ci[0]), _finite(self.ci[1])],
        }


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Finding:
    """Something a person should act on.

    Attributes:
        severity: ``info``, ``low``, ``medium`` or ``high``.
        message: one sentence saying what was found.
        evidence: the numbers behind it (JSON-able).
        remediation: what to do about it.
    """

    severity: Severity
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    remediation: str = ""


@dataclass(frozen=True)
class CheckResult:
    """What every check returns.

    Attributes:
        name: the check's registered name.
        pillar: its pillar (``performance``, ``robustness``, ``monitoring``, ...).
        status: ``ok``, ``skipped`` (with ``reason``) or ``failed`` (with ``reason``).
        reason: why it was skipped or failed; empty when ok.
        metrics: ``{metric name: Metric}``.
        findings: what a person should act on, most severe first.
        plots: ``{plot name: plot spec}``; a spec is a JSON-able dict with a ``kind`` key that
            :mod:`mmsafe.report.plots` knows how to draw.
        seconds: wall time of ``run``.
        timings: metrics measured on the clock or the machine (latency, throughput, seconds per
            epoch, peak memory); they vary run to run, so the card keeps them apart (in its
            ``timings`` section) and ``--fail-on`` never reads them.
        timing_findings: findings derived from ``timings`` (e.g. unstable latency).
        timing_plots: plots of ``timings``.
    """

    name: str
    pillar: str
    status: Status = "ok"
    reason: str = ""
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()
    plots: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    timings: Mapping[str, Metric] = field(default_factory=dict)
    timing_findings: tuple[Finding, ...] = ()
    timing_plots: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``card.json`` entry of this check: nothing that varies run to run."""
        return {
            "status": self.status,
            "reason": self.reason or None,
            "pillar": self.pillar,
            "metrics": _metrics_dict(self.metrics),
            "findings": [asdict(f) for f in self.findings],
            "plots": {k: dict(v) for k, v in self.plots.items()},
        }

    def timings_dict(self) -> dict[str, Any]:
        """What varies run to run: ``seconds`` and the timing metrics, findings and plots."""
        return {
            "seconds": round(self.seconds, 4),
            "metrics": _metrics_dict(self.timings),
            "findings": [asdict(f) for f in self.timing_findings],
            "plots": {k: dict(v) for k, v in self.timing_plots.items()},
        }

    @classmethod
    def from_dict(
        cls, name: str, d: Mapping[str, Any], timings: Mapping[str, Any] | None = None
    ) -> CheckResult:
        """Rebuild a result from :meth:`to_dict` and :meth:`timings_dict` (to resume an audit)."""
        t = timings or {}
        return cls(
            name=name,
            pillar=d.get("pillar", ""),
            status=d["status"],
            reason=d.get("reason") or "",
            metrics=_metrics_from(d.get("metrics", {})),
            findings=tuple(Finding(**f) for f in d.get("findings", [])),
            plots=d.get("plots", {}),
            seconds=t.get("seconds", 0.0),
            timings=_metrics_from(t.get("metrics", {})),
            timing_findings=tuple(Finding(**f) for f in t.get("findings", [])),
            timing_plots=t.get("plots", {}),
        )


def _metrics_dict(metrics: Mapping[str, Metric]) -> dict[str, Any]:
    return {k: m.to_dict() for k, m in metrics.items()}


def _metrics_from(d: Mapping[str, Mapping[str, Any]]) -> dict[str, Metric]:
    def metric(m: Mapping[str, Any]) -> Metric:
        v = math.nan if m["value"] is None else m["value"]
        ci = m.get("ci")
        lohi = None if ci is None else tuple(math.nan if c is None else c for c in ci)
        return Metric(v, lohi)  # type: ignore[arg-type]

    return {k: metric(m) for k, m in d.items()}


@dataclass
class AuditContext:
    """Everything a check may read.

    Attributes:
        model: the encoder under audit.
        task: the prepared task (call ``task.logits(embeddings)`` on perturbed embeddings).
        data: the rows under evaluation (the ``test`` split when there is one).
        outputs: the clean outputs of ``task`` on ``data``, computed once by the engine.
        engine: batches, device, cache; use it to embed perturbed variants.
        seed: the audit's seed; checks derive their randomness from it.
        calibration: the ``calibration`` split, when the data has one.
        train: the ``train`` split, when the data has one.
        options: per-check options from the user, ``{check name: {option: value}}``.
    """

    model: EncoderModel
    task: Task
    data: Dataset
    outputs: Outputs
    engine: Engine
    seed: int = 0
    calibration: Dataset | None = None
    train: Dataset | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


class Check(ABC):
    """Base class of every check.

    Class attributes:
        name: registered name, ``<pillar>.<what>`` or a short core name.
        pillar: one of :data:`PILLARS`.
        requires: what the data must have: any of ``labels`` (for classification tasks;
            retrieval is scored by pairs), ``groups``, ``calibration``, ``train``.
        tasks: the task names the check makes sense for.
        higher_is_better: ``{metric: bool}`` for the metrics it reports.
        description: one line for ``mmsafe list-checks``.
    """

    name: ClassVar[str]
    pillar: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    tasks: ClassVar[tuple[str, ...]] = ("zero_shot", "fusion", "retrieval")
    higher_is_better: ClassVar[Mapping[str, bool]] = {}
    description: ClassVar[str] = ""

    def skip_reason(self, ctx: AuditContext) -> str | None:
        """Why this check cannot run in ``ctx``, or ``None`` when it can."""
        if ctx.task.name not in self.tasks:
            return f"not applicable to task {ctx.task.name!r} (runs on: {', '.join(self.tasks)})"
        for need in self.requires:
            labels_missing = ctx.task.kind == "classification" and not ctx.data.labelled.any()
            if need == "labels" and labels_missing:
                return "needs labels"
            if need == "groups" and ctx.data.groups is None:
                return "needs a 'group' column"
            if need == "calibration" and ctx.calibration is None:
                return "needs a 'calibration' split"
            if need == "train" and ctx.train is None:
                return "needs a 'train' split"
        return None

    @abstractmethod
    def run(self, ctx: AuditContext) -> CheckResult:
        """Run the check and return its result."""

    def result(self, **kwargs: Any) -> CheckResult:
        """A :class:`CheckResult` carrying this check's name and pillar."""
        return CheckResult(name=self.name, pillar=self.pillar, **kwargs)
