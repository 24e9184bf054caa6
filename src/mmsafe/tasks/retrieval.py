"""Image-text retrieval: the similarity matrix between every image and every caption."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from mmsafe.tasks.base import Engine, Outputs, Task, register_task

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel


def caption_positives(texts: Sequence[str]) -> np.ndarray:
    """``(N, N)`` boolean matrix: image ``i`` matches caption ``j`` when the captions are equal.

    Rows of a dataset often share a caption word for word; counting only the diagonal would
    punish a model for ranking an identical caption first.

    Example:
        >>> caption_positives(["a", "b", "a"]).astype(int).tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    _, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return inverse[:, None] == inverse[None, :]


@register_task
class RetrievalTask(Task):
    """Rank captions for each image (and images for each caption) by cosine similarity."""

    name = "retrieval"
    kind = "retrieval"

    def __init__(self) -> None:
        self.logit_scale_: float = 100.0

    def prepare(
        self,
        model: EncoderModel,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Record the model's logit scale; nothing else to learn."""
        self.logit_scale_ = float(model.logit_scale)

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """``logit_scale * image @ text.T``, shape ``(N_image, N_text)``."""
        return self.logit_scale_ * embeddings["image"] @ embeddings["text"].T

    def outputs(self, embeddings: dict[str, Tensor], data: Dataset) -> Outputs:  # noqa: D102
        out = super().outputs(embeddings, data)
        out.positives = caption_positives(data.modalities["text"])
        return out
