"""``mmsafe harden memorization``: mitigate training-data memorisation by retraining.

The mitigations are :func:`mmsafe.methods.generative.memorization.mitigate_training_set`:
``dedupe`` drops byte-identical copies from the ``train`` split, ``randomise`` adds random
words to every training caption (Somepalli et al., 2023). The generator is then retrained from
scratch with its own architecture, vocabulary and schedule
(:func:`~mmsafe.models.tiny_diffusion.retrain_tiny_diffusion`), and the re-audit's
``generative.memorization`` gives the replication rate before and after;
``generative.quality`` shows what the mitigation costs. Load a saved model back with
``--model tiny-diffusion:<out>/model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmsafe.harden.base import HardenError, register_hardener
from mmsafe.harden.generator import TinyDiffusionHardener
from mmsafe.methods.generative.memorization import MITIGATIONS, mitigate_training_set
from mmsafe.models.tiny_diffusion import TinyDiffusion, retrain_tiny_diffusion

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.engine.runner import Engine
    from mmsafe.models.base import EncoderModel
    from mmsafe.tasks.base import Task

__all__ = ["MemorizationHardener"]


@register_hardener
class MemorizationHardener(TinyDiffusionHardener):
    """``mmsafe harden memorization``: dedupe or randomise the captions, then retrain.

    Args:
        strategy: ``dedupe`` (drop byte-identical training images) or ``randomise`` (random
            words added to each training caption).
        words: Random words added per caption (``randomise``).
        steps: Training steps of the retrained model (0: the model's own schedule).

    Attributes:
        model_: the retrained model.
        rows_: ``{"before", "after"}`` training rows.
    """

    name = "memorization"
    description = "Dedupe or randomise the training captions, retrain, re-audit memorisation."
    checks = "generative.memorization,generative.quality"
    verb = "retrains"

    def __init__(self, *, strategy: str = "dedupe", words: int = 2, steps: int = 0) -> None:
        self.strategy = strategy
        self.words = words
        self.steps = steps
        self.model_: TinyDiffusion | None = None
        self.rows_: dict[str, int] = {}

    def problems(self) -> list[str]:  # noqa: D102
        out = []
        if self.strategy not in MITIGATIONS:
            out.append(f"strategy must be one of {', '.join(MITIGATIONS)}, not {self.strategy!r}")
        out += ["words must be >= 1"] if self.words < 1 else []
        out += ["steps must be >= 0"] if self.steps < 0 else []
        return out

    def validate(self, model: EncoderModel, task: Task, data: Dataset) -> None:
        """Raise :class:`HardenError` unless the model, task, options and data suit."""
        super().validate(model, task, data)
        if not {"image", "text"} <= set(data.modalities) or not self._train_rows(data):
            raise HardenError(
                f"`mmsafe harden {self.name}` retrains on the captioned images of the 'train' "
                f"split, but {data.name!r} has none. Pass data with image and text columns and "
                "a 'split' column with 'train' rows."
            )

    @staticmethod
    def _train_rows(data: Dataset) -> list[int]:
        return [i for i, s in enumerate(data.splits or []) if s == "train"]

    def fit(  # noqa: D102
        self, model: EncoderModel, task: Task, data: Dataset, engine: Engine, *, seed: int = 0
    ) -> MemorizationHardener:
        self.validate(model, task, data)
        assert isinstance(model, TinyDiffusion)
        rows = self._train_rows(data)
        images = [data.modalities["image"][i] for i in rows]
        vocabulary = [w for w in model.vocab.tokens if not w.startswith("<")]
        keep, captions = mitigate_training_set(
            images, [str(data.modalities["text"][i]) for i in rows], self.strategy,
            vocabulary=vocabulary, words=self.words, seed=seed,
        )  # fmt: skip
        tuned = retrain_tiny_diffusion(model, [images[k] for k in keep], captions,
                                       steps=self.steps or None, seed=seed)  # fmt: skip
        tuned.training_info[self.name] = {**self.get_params(), "seed": seed}
        self.model_ = tuned
        self.rows_ = {"before": len(rows), "after": len(keep)}
        return self

    def summary(self) -> dict[str, Any]:
        """The strategy, the training rows before and after, and the training time."""
        info = self._fitted().training_info
        return {
            "strategy": self.strategy,
            "rows_before": self.rows_["before"],
            "rows_after": self.rows_["after"],
            "train_seconds": info["train_seconds"],
        }
