"""Sequential recommendation: score every catalogue item as each user's next interaction.

The rows are users (a ``sequence`` column of item positions, oldest first) and the label is
each user's held-out next item; ``data.catalog`` holds the items. The task's "embeddings" are
the items' features (``{modality: (I, D)}``, from the recommender's encoder through the
engine, cached), and ``logits(features)`` is the ``(N_users, I)`` score matrix: pure and
differentiable in the features, so a check can perturb items (drop an image, corrupt a title,
attack one item's pixels) and score again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.tasks.base import Engine, Outputs, Task, TaskError, register_task

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset


def is_rec_data(data: Dataset) -> bool:
    """Whether ``data`` is recommendation data: users with sequences, and a catalog."""
    return data.catalog is not None and "sequence" in data.modalities


@register_task
class SeqRecTask(Task):
    """Full ranking of the catalogue for each user's next item (a ``recommender`` target)."""

    name = "seqrec"
    kind = "ranking"
    modalities = ()

    def __init__(self, batch_size: int = 512) -> None:
        self.batch_size = int(batch_size)
        self.model_: Any = None
        self.engine_: Engine | None = None
        self.histories_: list[np.ndarray] = []

    def check_data(self, data: Dataset) -> None:  # noqa: D102
        if not is_rec_data(data):
            raise TaskError(
                f"Task 'seqrec' needs recommendation data (users with item sequences and an "
                f"item catalog), but {data.name!r} is not: pass --data shapes-rec, "
                "iisan:<folder> or mmrec:<folder>."
            )

    def prepare(
        self,
        model: Any,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Keep the recommender and the engine (the model trained when it was loaded)."""
        if getattr(model, "kind", "encoder") != "recommender":
            raise TaskError(
                f"Task 'seqrec' needs a recommender model, not the {model.kind} {model.name!r}: "
                "pass --model mm-sasrec (or mm-sasrec:<encoder>, sasrec-id)."
            )
        self.model_, self.engine_ = model, engine

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"protocol": "leave-one-out, full ranking over every item"}

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """``(N_users, I)`` scores of every item for the evaluated users' histories.

        ``embeddings`` are the items' features (as in :attr:`Outputs.embeddings`); the result
        is differentiable in them when gradients are enabled.
        """
        model = self.model_
        if model is None:
            raise TaskError("seqrec: call prepare() and outputs() before logits()")
        from mmsafe.models.seqrec import pad_histories

        model.eval()
        table = model.item_table(embeddings)
        out = []
        for s in range(0, len(self.histories_), self.batch_size):
            padded = pad_histories(self.histories_[s : s + self.batch_size], model.cfg.max_len)
            out.append(model.user_states(padded, table) @ table.T)
        return torch.cat(out) if out else table.new_zeros(0, table.shape[0])

    def outputs(self, embeddings: dict[str, Tensor], data: Dataset) -> Outputs:
        """Score ``data``'s users; ``embeddings`` of the outputs are the items' features."""
        self.check_data(data)
        assert data.catalog is not None and self.engine_ is not None
        self.histories_ = [np.asarray(s, dtype=np.int64) for s in data.modalities["sequence"]]
        features = self.model_.item_features(self.engine_, data.catalog)
        with torch.inference_mode():
            logits = self.logits(features).float().cpu()
        return Outputs(
            embeddings=features,
            logits=logits,
            labels=data.labels.copy(),
            groups=None if data.groups is None else list(data.groups),
        )
