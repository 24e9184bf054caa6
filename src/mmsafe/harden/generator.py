"""What the text-to-image hardeners share: a tiny-diffusion in, a tiny-diffusion out.

:class:`TinyDiffusionHardener` checks the task (``t2i``) and the model, keeps the hardened model
in ``model_``, hands it to the after-audit and saves it (safetensors + config.json) under
``<out>/model``; load it back with ``--model tiny-diffusion:<out>/model``. A subclass sets
``name``, ``description``, ``checks`` and ``verb``, implements :meth:`fit` and
:meth:`summary`, lists what is wrong with its options in :meth:`problems` and may extend
:meth:`validate` with what it needs of the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmsafe.harden.base import Hardened, Hardener, HardenError
from mmsafe.models.tiny_diffusion import TinyDiffusion, save_tiny_diffusion

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["TinyDiffusionHardener"]


class TinyDiffusionHardener(Hardener):
    """Base of the hardeners that change a tiny-diffusion's weights (see the module docstring).

    Attributes:
        model_: the hardened copy of the model (``None`` before :meth:`fit`).
    """

    tasks = ("t2i",)
    default_task = "t2i"
    artifact = "model"
    verb: ClassVar[str] = "changes"
    """What the hardener does to the model, for the error message ("fine-tunes", "retrains")."""

    model_: TinyDiffusion | None = None

    def problems(self) -> list[str]:
        """What is wrong with the options (empty when they suit)."""
        return []

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:
        """Raise :class:`HardenError` unless the task, the model and the options suit."""
        cmd = f"`mmsafe harden {self.name}`"
        if task.name not in self.tasks:
            raise HardenError(f"{cmd} needs --task t2i, not {task.name!r}.")
        if not isinstance(model, TinyDiffusion):
            raise HardenError(
                f"{cmd} {self.verb} a tiny-diffusion (a generator whose weights it can train "
                f"and save), but {getattr(model, 'name', type(model).__name__)!r} is a "
                f"{type(model).__name__}. Pass --model tiny-diffusion (or tiny-diffusion:<dir>)."
            )
        problems = self.problems()
        if problems:
            raise HardenError(f"{cmd}: {'; '.join(problems)}.")

    def _fitted(self) -> TinyDiffusion:
        if self.model_ is None:
            raise RuntimeError(f"{type(self).__name__}.fit() must run first.")
        return self.model_

    def transform(self, model: EncoderModel, task: Task) -> Hardened:
        """The hardened model, on the same task."""
        return Hardened(self._fitted(), task)  # type: ignore[arg-type]

    def save(self, path: Path) -> Path:
        """Write the hardened model (safetensors + config.json) to the folder ``path``."""
        save_tiny_diffusion(self._fitted(), path)
        return Path(path)
