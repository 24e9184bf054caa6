"""Fusion classification: frozen encoders, a head trained over several modalities' embeddings."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mmsafe.tasks.base import Engine, Task, TaskError, register_task

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel
    from mmsafe.models.heads import FusionHead


@register_task
class FusionTask(Task):
    """Predict the label from image and text together with a head fitted on the train split.

    Args:
        mode: ``concat`` (concatenated embeddings) or ``gated`` (learned per-sample gate).
        hidden: hidden width of an MLP head; ``None`` for a linear head.
        epochs: training epochs of the head.
        seed: seed of the head's initialisation and batch order.
    """

    name = "fusion"
    kind = "classification"

    def __init__(
        self,
        mode: Literal["concat", "gated"] = "concat",
        hidden: int | None = None,
        epochs: int = 30,
        seed: int = 0,
    ) -> None:
        self.mode = mode
        self.hidden = hidden
        self.epochs = epochs
        self.seed = seed
        self.head_: FusionHead | None = None

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"mode": self.mode, "hidden": self.hidden, "epochs": self.epochs, "seed": self.seed}

    def prepare(
        self,
        model: EncoderModel,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Embed the labelled training rows (cached) and fit the fusion head on them."""
        from mmsafe.models.heads import fit_fusion_head

        if fit_data is None or not fit_data.labelled.any():
            raise TaskError(
                "Task 'fusion' trains a head and needs labelled rows with split 'train'. Add a "
                "'split' column with some 'train' rows, or use --task zero_shot."
            )
        self.check_data(fit_data)
        emb = engine.embed(model, fit_data, self.modalities, desc="fusion train rows")
        labels = torch.as_tensor(fit_data.labels)
        self.head_ = fit_fusion_head(
            emb,
            labels,
            num_classes=len(classes),
            mode=self.mode,
            hidden=self.hidden,
            epochs=self.epochs,
            seed=self.seed,
        )
        self.head_.eval()
        # the head's training: rows x epochs, counted apart from the encoder's forward passes
        engine.count("training_passes", int(fit_data.labelled.sum()) * self.epochs)

    def state_fingerprint(self) -> str:  # noqa: D102
        if self.head_ is None:
            return ""
        h = hashlib.sha256()
        for k, v in sorted(self.head_.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """The head's logits over the classes."""
        if self.head_ is None:
            raise RuntimeError("FusionTask.prepare() must run before logits()")
        head = self.head_.to(next(iter(embeddings.values())).device)
        return head({m: embeddings[m] for m in self.modalities})


class PrefitFusionTask(FusionTask):
    """The fusion task with a head fitted elsewhere (DP-SGD, unlearning): ``prepare`` keeps it.

    Checks select on the task name, so this is still ``fusion``; its fingerprint is the head's
    weights, so cached outputs never mix with another head's.

    Args:
        head: the fitted :class:`~mmsafe.models.heads.FusionHead`.
        label: what fitted the head (e.g. ``"dp-sgd"``), recorded in the task's parameters.
    """

    def __init__(self, head: FusionHead, label: str = "prefit") -> None:
        super().__init__(mode=head.cfg.mode, hidden=head.cfg.hidden)  # type: ignore[arg-type]
        self.head_ = head.eval()
        self.label = label

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {**super().params(), "head": self.label}

    def prepare(
        self,
        model: EncoderModel,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Check that the head fits the classes; nothing is trained."""
        assert self.head_ is not None
        if self.head_.cfg.num_classes != len(classes):
            raise TaskError(
                f"The {self.label} head predicts {self.head_.cfg.num_classes} classes, but the "
                f"data has {len(classes)}. Fit the head on data with the same classes."
            )


def fusion_head_of(task: Any) -> Any:
    """The :class:`~mmsafe.models.heads.FusionHead` of a (possibly wrapped) fusion task."""
    while task is not None:
        head = getattr(task, "head_", None)
        if head is not None:
            return head
        task = getattr(task, "inner", None)
    return None
