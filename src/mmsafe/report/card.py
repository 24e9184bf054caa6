"""The AuditCard: versioned JSON of everything an audit found, plus its JSON Schema.

Layout (stable; extend, don't break)::

    {"schema_version": "2.1", "model": {...}, "data": {...}, "task": {...}, "seed": ...,
     "checks": {"<check name>": {"status": "ok" | "skipped" | "failed", "reason": ...,
                                 "metrics": {"<metric>": {"value": float, "ci": [lo, hi] | null}},
                                 "findings": [{"severity", "message", "evidence", "remediation"}],
                                 "plots": {...}}},
     "gates": [...],
     "timings": {"created": ..., "total_seconds": ..., "seconds": {"<check>": s}, "reused": [...],
                 "checks": {"<check>": {"metrics": {...}, "findings": [...], "plots": {...}}}},
     "environment": {"mmsafe", "python", "platform", "torch", "numpy", "device", ...}}

Everything that varies from run to run is in ``timings`` (the clock: creation time, seconds per
check, and what checks measure on the clock or the machine, such as latency, with the findings
and plots derived from it), ``environment`` (the machine) or ``engine`` (pass accounting: the
rows encoded depend on what the cache already held). The rest is a function of the
model, data, task, options and seed: two runs with the same seed write the same bytes there.
``--fail-on`` and verdicts read ``checks`` only.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsafe import __version__

if TYPE_CHECKING:
    from mmsafe.checks.base import CheckResult
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

SCHEMA_VERSION = "2.1"
RUN_SECTIONS: tuple[str, ...] = ("timings", "environment", "engine")
"""Top-level card sections that vary from run to run (and never feed a gate or a verdict)."""


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = card_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def card_schema() -> dict[str, Any]:
    """The JSON Schema that every ``card.json`` validates against."""
    text = resources.files("mmsafe.report").joinpath("card.schema.json").read_text("utf-8")
    return json.loads(text)


def environment_info(device: str) -> dict[str, Any]:
    """Versions and hardware: everything machine-specific about a run."""
    import numpy
    import torch

    return {
        "mmsafe": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def data_info(data: Dataset, evaluated: Dataset, fingerprint: str | None = None) -> dict[str, Any]:
    """The data section: name, source, fingerprint, sizes, classes and skipped rows."""
    splits: dict[str, int] = {}
    for s in data.splits or []:
        splits[s] = splits.get(s, 0) + 1
    return {
        "name": data.name,
        "source": data.source,
        "fingerprint": fingerprint or data.fingerprint(),
        "n_rows": len(data),
        "n_evaluated": len(evaluated),
        "evaluated_split": evaluated.name,
        "splits": splits,
        "modalities": list(data.modality_names),
        "classes": list(data.classes),
        "skipped": {
            "count": len(data.skipped),
            "rows": [
                {"row": s.row, "id": s.id, "field": s.field, "reason": s.reason}
                for s in data.skipped
            ],
        },
    }


def model_info(model: EncoderModel) -> dict[str, Any]:
    """The model section: name, fingerprint, config and parameter count."""
    return {
        "name": model.name,
        "fingerprint": model.fingerprint(),
        "config": model.config(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def build_card(
    *,
    model: EncoderModel,
    data: Dataset,
    evaluated: Dataset,
    task: Task,
    results: Mapping[str, CheckResult],
    seed: int,
    device: str,
    gates: list[dict[str, Any]] | None = None,
    data_fingerprint: str | None = None,
    total_seconds: float = 0.0,
    reused: Sequence[str] = (),
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the card dict (validate it with :func:`validate_card`).

    ``total_seconds`` is the audit's wall time and ``reused`` the checks taken from an
    interrupted run; both go to the ``timings`` section with each result's timings. ``engine``
    is the engine's pass accounting (:meth:`mmsafe.engine.Engine.accounting`).
    """
    card = {
        "schema_version": SCHEMA_VERSION,
        "model": model_info(model),
        "data": data_info(data, evaluated, data_fingerprint),
        "task": {"name": task.name, "kind": task.kind, "params": task.params()},
        "seed": seed,
        "checks": {name: r.to_dict() for name, r in results.items()},
        "gates": gates or [],
        "timings": timings_info(results, total_seconds, reused),
        "environment": environment_info(device),
    }
    if engine is not None:
        card["engine"] = dict(engine)
    return card


def timings_info(
    results: Mapping[str, CheckResult], total_seconds: float = 0.0, reused: Sequence[str] = ()
) -> dict[str, Any]:
    """The ``timings`` section: when, how long, and what each check measured on the clock.

    Only checks with timing metrics, findings or plots appear under ``checks``.
    """
    per_check = {}
    for name, r in results.items():
        t = r.timings_dict()
        if t["metrics"] or t["findings"] or t["plots"]:
            per_check[name] = {k: t[k] for k in ("metrics", "findings", "plots")}
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_seconds": round(total_seconds, 4),
        "seconds": {name: round(r.seconds, 4) for name, r in results.items()},
        "reused": list(reused),
        "checks": per_check,
    }


def without_run_sections(card: Mapping[str, Any]) -> dict[str, Any]:
    """The card without the sections that vary run to run (:data:`RUN_SECTIONS`).

    Two audits with the same model, data, task, options and seed give equal results here.

    Example:
        >>> without_run_sections({"seed": 0, "timings": {}, "environment": {}})
        {'seed': 0}
    """
    return {k: v for k, v in card.items() if k not in RUN_SECTIONS}


def validate_card(card: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``card`` breaks the schema."""
    _validator().validate(dict(card))


def load_card(path: str | Path) -> dict[str, Any]:
    """Read a ``card.json``."""
    return json.loads(Path(path).read_text("utf-8"))
