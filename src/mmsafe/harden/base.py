"""The hardener contract, its registry, and what a hardening run returns.

A hardener is sklearn-style: ``__init__`` only stores keyword options (they become the flags of
``mmsafe harden <name>``), :meth:`Hardener.fit` learns state whose attribute names end in
``_``, :meth:`Hardener.transform` returns the hardened model and task, :meth:`Hardener.summary`
its headline numbers and :meth:`Hardener.save` writes the fitted artefact (atomically). The one
flow that audits before, fits, transforms and audits after is :func:`mmsafe.harden.flow.harden`.

Example:
    >>> "calibration" in list_hardeners() and "dp" in list_hardeners()
    True
    >>> get_hardener("calibration").artifact
    'temperature.json'
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing import Self

    from mmsafe.audit import AuditResult
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.report.compare import Delta
    from mmsafe.tasks.base import Task

__all__ = [
    "HardenError",
    "HardenResult",
    "Hardened",
    "Hardener",
    "get_hardener",
    "list_hardeners",
    "register_hardener",
]


class HardenError(ValueError):
    """The data, task or options cannot be hardened this way; the message says what to do."""


@dataclass(frozen=True)
class Hardened:
    """What :meth:`Hardener.transform` returns: the model and task the after-audit uses."""

    model: EncoderModel
    task: Task


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
        from mmsafe.report.compare import compare_cards

        return [] if self.before is None else compare_cards(self.before.card, self.after.card)


class Hardener(ABC):
    """Base class of every hardener (see the module docstring for the contract).

    Class attributes say what it is and needs; :meth:`validate` checks the needs before any
    audit runs, so a bad dataset or task fails fast with a :class:`HardenError`.

    Attributes:
        name: The ``mmsafe harden`` subcommand.
        description: One line for ``mmsafe harden --help``.
        needs: Splits that must have labelled rows (``"train"``, ``"calibration"``).
        tasks: Task names it accepts (empty: any classification task).
        default_task: The task used when none is given.
        checks: The checks audited before and after.
        artifact: Name of what :meth:`save` writes under the output folder.
        audits_before: ``False`` when there is nothing to compare against (the hardener adds
            an output, as a conformal predictor does): only the after-audit runs.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    tasks: ClassVar[tuple[str, ...]] = ()
    default_task: ClassVar[str] = "zero_shot"
    checks: ClassVar[str] = "performance"
    artifact: ClassVar[str] = ""
    audits_before: ClassVar[bool] = True

    @classmethod
    def options(cls) -> dict[str, inspect.Parameter]:
        """The keyword options of ``__init__`` (the CLI flags), by name."""
        params = inspect.signature(cls.__init__).parameters
        return {n: p for n, p in params.items() if n != "self" and p.kind is p.KEYWORD_ONLY}

    def get_params(self) -> dict[str, Any]:
        """The options this hardener was built with."""
        return {n: getattr(self, n) for n in self.options()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:
        """Raise :class:`HardenError` if ``task`` or ``data`` lacks what this hardener needs."""
        if self.tasks and task.name not in self.tasks:
            raise HardenError(
                f"`mmsafe harden {self.name}` needs --task {' or '.join(self.tasks)}, "
                f"not {task.name!r}."
            )
        if not self.tasks and task.kind != "classification":
            raise HardenError(
                f"`mmsafe harden {self.name}` needs a classification task, not {task.name!r}."
            )
        for split in self.needs:
            rows = data.split(split) if data.has_split(split) else None
            if rows is None or not rows.labelled.any():
                raise HardenError(
                    f"`mmsafe harden {self.name}` fits on labelled {split!r} rows, but "
                    f"{data.name!r} has no labelled {split!r} split. Add a 'split' column "
                    f"with some {split!r} rows."
                )

    @abstractmethod
    def fit(
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> Self:
        """Learn the hardener's state (attributes ending in ``_``) and return ``self``."""

    @abstractmethod
    def transform(self, model: EncoderModel, task: Task) -> Hardened:
        """The hardened model and task (the originals are never modified)."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Headline numbers of the fitted hardener (printed by the CLI)."""

    @abstractmethod
    def save(self, path: Path) -> Path:
        """Write the fitted artefact to ``path`` (atomically); return what was written."""

    def audit_options(self) -> dict[str, dict[str, Any]]:
        """Check options of the before/after audits (none by default)."""
        return {}

    def annotate(self, card: dict[str, Any]) -> bool:
        """Add to the after-audit's card in place; ``True`` if it changed (nothing by default)."""
        return False


_HARDENERS: dict[str, type[Hardener]] = {}
BUILTIN: dict[str, str] = {
    "calibration": "mmsafe.harden.calibration",
    "conformal": "mmsafe.harden.conformal",
    "adversarial": "mmsafe.harden.robust",
    "dp": "mmsafe.harden.dp",
    "dp-clip": "mmsafe.harden.dp_clip",
    "unlearn": "mmsafe.harden.unlearn",
    "unlearn-rec": "mmsafe.harden.unlearn_rec",
    "fairness": "mmsafe.harden.fairness",
    "denoise": "mmsafe.harden.denoise",
    "safety-tune": "mmsafe.harden.safety_tune",
    "dpo": "mmsafe.harden.dpo",
    "adversarial-vlm": "mmsafe.harden.adversarial_vlm",
    "erase-concept": "mmsafe.harden.erase_concept",
    "memorization": "mmsafe.harden.memorization",
}
"""Built-in hardeners and the module that registers each (imported on first use)."""


def register_hardener(cls: type[Hardener]) -> type[Hardener]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered.")
    if cls.name in _HARDENERS and _HARDENERS[cls.name] is not cls:
        raise ValueError(f"hardener name {cls.name!r} registered twice")
    _HARDENERS[cls.name] = cls
    return cls


def list_hardeners() -> list[str]:
    """Hardener names: the built-ins, then any others registered."""
    return [*BUILTIN, *sorted(set(_HARDENERS) - set(BUILTIN))]


def get_hardener(name: str) -> type[Hardener]:
    """The hardener class registered under ``name`` (importing a built-in's module).

    Raises:
        HardenError: no hardener has that name.
    """
    if name not in _HARDENERS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _HARDENERS:
        raise HardenError(f"Unknown hardener {name!r}; use one of {', '.join(list_hardeners())}.")
    return _HARDENERS[name]
