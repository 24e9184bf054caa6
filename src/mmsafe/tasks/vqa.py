"""Visual question answering: a generative vision-language model answers each row's prompt.

The rows carry an ``image`` and a ``text`` (the prompt); a reference answer, when there is
one, lives in ``meta["answer"]``. The task's outputs are the model's greedy answers
(:attr:`Outputs.texts`), generated once through the engine (cached) and shared by every
check; it has no embeddings and no logits (``(N, 0)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmsafe.tasks.base import Engine, Outputs, Task, TaskError, register_task

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset


@register_task
class VQATask(Task):
    """A ``vlm`` target answers each row's prompt about its image."""

    name = "vqa"
    kind = "generation"
    modalities = ()

    def __init__(self, max_new_tokens: int = 24) -> None:
        self.max_new_tokens = int(max_new_tokens)
        self.model_: Any = None
        self.engine_: Any = None

    def check_data(self, data: Dataset) -> None:  # noqa: D102
        missing = [m for m in ("image", "text") if m not in data.modalities]
        if missing:
            raise TaskError(
                f"Task 'vqa' needs an image and a prompt ('text') per row, but {data.name!r} "
                f"lacks {missing}: pass --data shapes-vqa or a manifest with image and text "
                "columns."
            )

    def prepare(
        self,
        model: Any,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Keep the model and the engine."""
        if getattr(model, "kind", "encoder") != "vlm":
            raise TaskError(
                f"Task 'vqa' needs a vision-language model, not the "
                f"{getattr(model, 'kind', 'encoder')} {model.name!r}: pass --model tiny-vlm "
                "(or hf-vlm:<folder>)."
            )
        self.model_, self.engine_ = model, engine

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"decoding": "greedy", "max_new_tokens": self.max_new_tokens}

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """No logits: a generative task's outputs are texts."""
        return torch.zeros(0, 0)

    def answer(self, images: Any, prompts: Sequence[str]) -> list[str]:
        """The model's greedy answers through the engine (cached)."""
        if self.model_ is None:
            raise TaskError("vqa: call prepare() first")
        return self.engine_.generate(
            self.model_, images, prompts, max_new_tokens=self.max_new_tokens
        )

    def outputs(self, embeddings: dict[str, Tensor], data: Dataset) -> Outputs:
        """Answer every row of ``data``."""
        self.check_data(data)
        texts = self.answer(data.modalities["image"], list(data.modalities["text"]))
        return Outputs(
            embeddings={},
            logits=torch.zeros(len(data), 0),
            labels=data.labels.copy(),
            groups=None if data.groups is None else list(data.groups),
            texts=texts,
        )
