"""The check contract: what a check declares, what it receives, and what it returns.

A check is a class with class attributes that say what it means (``name``, ``pillar``,
``requires``, ``tasks``, ``higher_is_better``) and one verb, ``run(ctx) -> CheckResult``. The
result is a frozen dataclass that serialises to JSON with :func:`dataclasses.asdict`; the card, the
HTML report and the CI gates read nothing else.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

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
    "generative",
)
TARGET_KINDS: tuple[str, ...] = ("encoder", "recommender", "vlm", "generator")
"""The kinds of model a check can declare (``Check.kinds``); new kinds add entries."""
MODALITIES: tuple[str, ...] = ("image", "text")
"""Modality names a check may list in ``requires``: the data and the task must both have them."""
SEVERITY_RANK: dict[str, int] = {"high": 0, "medium": 1, "low": 2, "info": 3}


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
        limits: where the check did not use every row as it is, and how: a reference bank
            capped and sampled, a fit on a sample, or data held whole in memory
            (``{what: how}``; shown in the card so a reader knows what a figure rests on).
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
    limits: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``card.json`` entry of this check: nothing that varies run to run."""
        out = {
            "status": self.status,
            "reason": self.reason or None,
            "pillar": self.pillar,
            "metrics": _metrics_dict(self.metrics),
            "findings": json_safe([asdict(f) for f in self.findings]),
            "plots": json_safe({k: dict(v) for k, v in self.plots.items()}),
        }
        if self.limits:
            out["limits"] = dict(self.limits)
        return out

    def timings_dict(self) -> dict[str, Any]:
        """What varies run to run: ``seconds`` and the timing metrics, findings and plots."""
        return {
            "seconds": round(self.seconds, 4),
            "metrics": _metrics_dict(self.timings),
            "findings": json_safe([asdict(f) for f in self.timing_findings]),
            "plots": json_safe({k: dict(v) for k, v in self.timing_plots.items()}),
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
            limits=d.get("limits", {}),
        )


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None``, as JSON needs.

    Evidence and plot series may hold an undefined number (a ratio over an empty group, a
    correlation of constant values); the card writes it as ``null`` instead of failing the run.

    Example:
        >>> json_safe({"x": [1.0, float("nan")], "y": (float("inf"), "a")})
        {'x': [1.0, None], 'y': [None, 'a']}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _metrics_dict(metrics: Mapping[str, Metric]) -> dict[str, Any]:
    return {k: m.to_dict() for k, m in metrics.items()}


def _metrics_from(d: Mapping[str, Mapping[str, Any]]) -> dict[str, Metric]:
    def metric(m: Mapping[str, Any]) -> Metric:
        v = math.nan if m["value"] is None else m["value"]
        ci = m.get("ci")
        lohi = None if ci is None else tuple(math.nan if c is None else c for c in ci)
        return Metric(v, lohi)  # type: ignore[arg-type]

    return {k: metric(m) for k, m in d.items()}


@dataclass(frozen=True)
class AuditContext:
    """Everything a check may read (frozen: a check cannot change what the next one sees).

    Attributes:
        model: the model under audit; its ``kind`` says which protocol it follows.
        task: the prepared task (call ``task.logits(embeddings)`` on perturbed embeddings).
        data: the rows under evaluation (the ``test`` split when there is one).
        outputs: the clean outputs of ``task`` on ``data``, computed once by the engine.
        engine: batches, device, cache; every forward pass goes through it.
        seed: the audit's seed; checks draw from :meth:`rng` / :meth:`torch_generator`.
        calibration: the ``calibration`` split, when the data has one.
        train: the ``train`` split, when the data has one.
        check: the name of the check this context was handed to (set by the audit); it keys
            that check's own random stream.
    """

    model: EncoderModel
    task: Task
    data: Dataset
    outputs: Outputs
    engine: Engine
    seed: int = 0
    calibration: Dataset | None = None
    train: Dataset | None = None
    check: str = ""

    def seed_for(self, purpose: str = "") -> int:
        """A 63-bit seed of its own for (audit seed, check, ``purpose``); stable across runs.

        Example:
            >>> ctx = AuditContext(None, None, None, None, None, seed=3, check="c")  # type: ignore
            >>> ctx.seed_for("a") == ctx.seed_for("a") != ctx.seed_for("b")
            True
        """
        blob = f"{int(self.seed)}\x00{self.check}\x00{purpose}".encode()
        return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1

    def rng(self, purpose: str = "") -> np.random.Generator:
        """The check's NumPy random stream for ``purpose`` (see :meth:`seed_for`)."""
        return np.random.default_rng(self.seed_for(purpose))

    def torch_generator(self, purpose: str = "") -> torch.Generator:
        """The check's CPU torch random stream for ``purpose`` (see :meth:`seed_for`)."""
        return torch.Generator().manual_seed(self.seed_for(purpose))

    def sample(
        self, rows: np.ndarray, cap: int | None, purpose: str, what: str
    ) -> tuple[np.ndarray, dict[str, str]]:
        """At most ``cap`` of ``rows`` (sorted), drawn from the check's stream for ``purpose``.

        For reference banks and fits whose cost grows with the rows (a kNN bank, class
        Gaussians): returns every row and no limit when there are at most ``cap``, else a
        uniform sample without replacement and ``{what: "<cap> of <n> rows, sampled"}`` for the
        card's ``limits``.

        Example:
            >>> ctx = AuditContext(None, None, None, None, None, check="c")  # type: ignore
            >>> rows, limit = ctx.sample(np.arange(10), 4, "bank", "kNN bank")
            >>> len(rows), limit
            (4, {'kNN bank': '4 of 10 rows, sampled uniformly'})
            >>> ctx.sample(np.arange(3), 4, "bank", "kNN bank")[1]
            {}
        """
        rows = np.asarray(rows)
        if cap is None or len(rows) <= cap:
            return rows, {}
        pick = np.sort(self.rng(purpose).choice(len(rows), size=int(cap), replace=False))
        return rows[pick], {what: f"{int(cap)} of {len(rows)} rows, sampled uniformly"}


def condition_holds(
    condition: str,
    task_name: str,
    task_modalities: tuple[str, ...],
    capabilities: Collection[str] | None = None,
) -> bool:
    """Whether a ``conditional_metrics`` condition holds for a task (and a model).

    ``capability:<name>`` holds when the model has that capability (``model.capabilities()``,
    passed as ``capabilities``); it cannot be decided without them.

    Example:
        >>> condition_holds("multimodal", "fusion", ("image", "text"))
        True
        >>> condition_holds("reads:text", "zero_shot", ("image",))
        False
        >>> condition_holds("task:zero_shot", "zero_shot", ("image",))
        True
        >>> condition_holds("capability:hidden_states", "fusion", ("image",), {"hidden_states"})
        True
    """
    kind, _, arg = condition.partition(":")
    if kind == "multimodal":
        return len(task_modalities) >= 2
    if kind == "reads":
        return arg in task_modalities
    if kind == "task":
        return task_name == arg
    if kind == "capability":
        if capabilities is None:
            raise ValueError(f"condition {condition!r} needs the model's capabilities")
        return arg in capabilities
    raise ValueError(f"unknown metric condition {condition!r}")


def expected_metric(
    check: type[Check],
    metric: str,
    task_name: str,
    task_modalities: tuple[str, ...],
    capabilities: Collection[str] | None = None,
) -> bool:
    """Whether ``check`` reports ``metric`` on a task, by its ``conditional_metrics``.

    ``capabilities``: the model's (``model.capabilities()``), needed by a ``capability:``
    condition.

    Example:
        >>> class C(Check):
        ...     name, pillar = "monitoring.c", "monitoring"
        ...     conditional_metrics = {"mcm/*": "task:zero_shot", "rmd/*": "capability:x"}
        ...     def run(self, ctx): ...
        >>> expected_metric(C, "mcm/auroc", "fusion", ("image", "text"))
        False
        >>> expected_metric(C, "msp/auroc", "fusion", ("image", "text"))
        True
        >>> expected_metric(C, "rmd/auroc", "fusion", ("image", "text"), capabilities=())
        False
    """
    import fnmatch

    return all(
        condition_holds(cond, task_name, task_modalities, capabilities)
        for pattern, cond in check.conditional_metrics.items()
        if fnmatch.fnmatchcase(metric, pattern)
    )


class Check(ABC):
    """Base class of every check.

    Class attributes:
        name: registered name, ``<pillar>.<what>``.
        pillar: one of :data:`PILLARS`.
        kinds: the target kinds of model it runs on (:data:`TARGET_KINDS`).
        tasks: the task names the check makes sense for.
        requires: what the data must have: any of ``labels`` (for classification tasks;
            retrieval is scored by pairs), ``groups``, ``calibration``, ``train``, or a modality
            (``image``, ``text``) that both the data and the task must have; ``generation``:
            a generator that draws new prompts (not a manifest of images, ``images:``).
        higher_is_better: ``{metric: bool}`` for the metrics it reports.
        description: one line for ``mmsafe list-checks``.
        aliases: older names that still select it (``--checks``, ``--options``, ``--fail-on``).
        conditional_metrics: ``{metric glob: condition}`` for the metrics reported only when a
            condition on the task holds: ``multimodal`` (it reads two or more modalities of the
            rows), ``reads:<modality>``, ``task:<name>``, ``capability:<name>`` (the model has
            that capability, e.g. ``hidden_states``). Every other metric is reported on every
            task the check declares: one metric schema (see :func:`expected_metric`).
    """

    name: ClassVar[str]
    pillar: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("encoder",)
    tasks: ClassVar[tuple[str, ...]] = ("zero_shot", "fusion", "retrieval")
    requires: ClassVar[tuple[str, ...]] = ()
    higher_is_better: ClassVar[Mapping[str, bool]] = {}
    description: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    conditional_metrics: ClassVar[Mapping[str, str]] = {}

    def skip_reason(self, ctx: AuditContext) -> str | None:
        """Why this check cannot run in ``ctx``, or ``None`` when it can.

        The base reads the declarations (kind, task, ``requires``); a check overrides it only
        for conditions that depend on its options or on the data's content.
        """
        kind = getattr(ctx.model, "kind", "encoder")
        if kind not in self.kinds:
            return f"not applicable to {kind} models (runs on: {', '.join(self.kinds)})"
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
            if need == "generation" and getattr(ctx.model, "replay", False):
                return "needs the generator itself (a manifest of images cannot draw new prompts)"
            if need in MODALITIES and need not in ctx.data.modalities:
                return f"needs the {need} modality"
            if need in MODALITIES and need not in ctx.task.modalities:
                return f"task {ctx.task.name!r} does not read the {need} modality"
        return None

    @abstractmethod
    def run(self, ctx: AuditContext) -> CheckResult:
        """Run the check and return its result."""

    def result(self, **kwargs: Any) -> CheckResult:
        """A :class:`CheckResult` carrying this check's name and pillar, findings by severity.

        Example:
            >>> class C(Check):
            ...     name, pillar = "monitoring.c", "monitoring"
            ...     def run(self, ctx): ...
            >>> r = C().result(findings=(Finding("low", "a"), Finding("high", "b")))
            >>> [f.severity for f in r.findings]
            ['high', 'low']
        """
        findings = kwargs.pop("findings", ())
        ranked = tuple(sorted(findings, key=lambda f: SEVERITY_RANK.get(f.severity, 9)))
        return CheckResult(name=self.name, pillar=self.pillar, findings=ranked, **kwargs)
