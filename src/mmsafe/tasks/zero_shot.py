"""Zero-shot classification: prompt templates x class names -> class embeddings -> logits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mmsafe.tasks.base import Engine, Task, register_task

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "an image of a {}.")
"""The prompt templates used when the user gives none."""


def build_prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class, class-major.

    Example:
        >>> build_prompts(["cat", "dog"], ["a {}.", "the {}"])
        ['a cat.', 'the cat', 'a dog.', 'the dog']
    """
    return [t.format(c) for c in classes for t in templates]


def class_embeddings(prompt_embeddings: Tensor, n_classes: int) -> Tensor:
    """Average the normalised prompt embeddings of each class and renormalise.

    Args:
        prompt_embeddings: ``(n_classes * n_templates, D)``, class-major as from
            :func:`build_prompts`.
        n_classes: the number of classes.

    Returns:
        ``(n_classes, D)`` unit-norm class embeddings.
    """
    per_class = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1])
    return nn.functional.normalize(nn.functional.normalize(per_class, dim=-1).mean(1), dim=-1)


@register_task
class ZeroShotTask(Task):
    """Classify images by their similarity to embedded class prompts.

    Args:
        templates: prompt templates with one ``{}`` for the class name.
    """

    name = "zero_shot"
    kind = "classification"
    modalities = ("image",)

    def __init__(self, templates: Sequence[str] | None = None) -> None:
        self.templates = tuple(templates or DEFAULT_TEMPLATES)
        self.class_embeddings_: Tensor | None = None
        self.logit_scale_: float = 100.0

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"templates": list(self.templates)}

    def prepare(
        self,
        model: EncoderModel,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Embed every class prompt once with the model's text tower."""
        prompts = build_prompts(classes, self.templates)
        emb = engine.embed_values(model, "text", prompts, desc="class prompts")
        self.class_embeddings_ = class_embeddings(emb, len(classes))
        self.logit_scale_ = float(model.logit_scale)

    def state_fingerprint(self) -> str:  # noqa: D102
        if self.class_embeddings_ is None:
            return ""
        return hashlib.sha256(self.class_embeddings_.numpy().tobytes()).hexdigest()[:16]

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """``logit_scale * image @ class_embeddings.T``."""
        if self.class_embeddings_ is None:
            raise RuntimeError("ZeroShotTask.prepare() must run before logits()")
        image = embeddings["image"]
        return self.logit_scale_ * image @ self.class_embeddings_.to(image.device, image.dtype).T
