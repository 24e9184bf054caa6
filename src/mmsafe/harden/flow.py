"""Harden, then re-audit: the one flow every hardener goes through.

:func:`harden` audits the model as it is, fits the hardener (on the ``calibration`` or
``train`` rows, never on the evaluated ``test`` rows), saves what it learned, audits the
hardened model on the same rows with the same checks, and returns both audits and their delta.
Under ``out`` it writes ``before/``, ``after/`` and the hardener's artefact::

    from mmsafe.harden.calibration import TemperatureHardener
    result = harden(TemperatureHardener(), model, data, out="hardened")
    result.summary, [d.metric for d in result.deltas]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmsafe.audit import evaluation_splits, run_audit
from mmsafe.data.dataset import Dataset
from mmsafe.engine.cache import atomic_write_json
from mmsafe.engine.runner import Engine
from mmsafe.harden.base import Hardener, HardenError, HardenResult
from mmsafe.models.base import EncoderModel
from mmsafe.tasks.base import Task, create_task

__all__ = ["HardenError", "HardenResult", "calibration_outputs", "harden", "prepare"]


def harden(
    hardener: Hardener,
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task | None = None,
    out: str | Path,
    engine: Engine | None = None,
    seed: int = 0,
    checks: str | Sequence[str] | None = None,
) -> HardenResult:
    """Audit before, fit, transform, audit after: the delta a hardener makes.

    Args:
        hardener: An unfitted hardener (see :mod:`mmsafe.harden.base`); it is fitted here.
        model: The model as deployed.
        data: Labelled data with the splits the hardener ``needs``.
        task: A task or its name (default: the hardener's ``default_task``).
        out: Folder for ``before/``, ``after/`` and the artefact.
        engine: Batching, device and cache (default: a CPU engine without progress bars).
        seed: Seeds the fit and both audits.
        checks: The audited checks (default: the hardener's ``checks``).

    Returns:
        A :class:`~mmsafe.harden.base.HardenResult`.

    Raises:
        HardenError: The task, data or options do not suit the hardener (checked before any
            audit runs).
    """
    engine = engine or Engine(progress=False)
    task = create_task(task or hardener.default_task) if not isinstance(task, Task) else task
    out = Path(out)
    hardener.validate(model, task, data)
    audit: dict[str, Any] = {
        "checks": hardener.checks if checks is None else checks,
        "engine": engine,
        "seed": seed,
        "options": hardener.audit_options(),
    }
    before = None
    if hardener.audits_before:
        before = run_audit(model, data, task=task, out=out / "before", **audit)
    hardener.fit(model, task, data, engine, seed=seed)
    artifact = hardener.save(out / hardener.artifact)
    hardened = hardener.transform(model, task)
    after = run_audit(hardened.model, data, task=hardened.task, out=out / "after", **audit)
    annotated = hardener.annotate(after.card)
    if annotated:
        from mmsafe.report.card import validate_card

        validate_card(after.card)
        atomic_write_json(out / "after" / "card.json", after.card)
    if annotated or before is not None:  # the after page shows the delta against before
        from mmsafe.report.html import write_html

        write_html(after.card, out / "after" / "index.html", baseline=before and before.card)
    return HardenResult(before, after, artifact, hardener.summary())


def prepare(model: EncoderModel, data: Dataset, task: Task, engine: Engine) -> Dataset:
    """Prepare ``task`` as an audit of ``data`` does (fitting a head on the ``train`` rows).

    Returns:
        The evaluated rows (the ``test`` split, or every row).
    """
    evaluated, _, train = evaluation_splits(data)
    task.prepare(model, engine, evaluated.classes, fit_data=train)
    return evaluated


def calibration_outputs(
    model: EncoderModel, data: Dataset, task: Task, engine: Engine
) -> tuple[Any, Dataset]:
    """``(outputs, rows)`` of the labelled ``calibration`` rows under the prepared ``task``.

    Raises:
        HardenError: ``data`` has no labelled calibration rows.
    """
    _, calibration, _ = evaluation_splits(data)
    if calibration is None or not calibration.labelled.any():
        raise HardenError(
            f"Hardening fits on held-out labelled rows, but {data.name!r} has no labelled "
            "'calibration' split. Add a 'split' column with some 'calibration' rows."
        )
    prepare(model, data, task, engine)
    return engine.outputs(model, task, calibration), calibration
