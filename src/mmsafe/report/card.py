"""The AuditCard: versioned JSON of everything an audit found, plus its JSON Schema.

Layout (stable; extend, don't break)::

    {"schema_version": ..., "model": {...}, "data": {...}, "environment": {...}, "seed": ...,
     "checks": {"<check name>": {"status": "ok" | "skipped" | "failed", "reason": ...,
                                 "metrics": {"<metric>": {"value": float, "ci": [lo, hi] | null}},
                                 "findings": [{"severity", "message", "evidence", "remediation"}],
                                 "plots": {...}}}}
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from collections.abc import Mapping
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

SCHEMA_VERSION = "1.0"


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
    """Versions and hardware that affect results."""
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
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the card dict (validate it with :func:`validate_card`).

    ``engine`` is the engine's pass accounting (:meth:`mmsafe.engine.Engine.accounting`).
    """
    card = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_info(model),
        "data": data_info(data, evaluated, data_fingerprint),
        "task": {"name": task.name, "kind": task.kind, "params": task.params()},
        "environment": environment_info(device),
        "seed": seed,
        "checks": {name: r.to_dict() for name, r in results.items()},
        "gates": gates or [],
    }
    if engine is not None:
        card["engine"] = dict(engine)
    return card


def validate_card(card: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``card`` breaks the schema."""
    _validator().validate(dict(card))


def load_card(path: str | Path) -> dict[str, Any]:
    """Read a ``card.json``."""
    return json.loads(Path(path).read_text("utf-8"))
