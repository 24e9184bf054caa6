"""Tasks turn a model's embeddings into predictions.

A task is split in two so that every check can reuse the engine's cached embeddings:

* ``prepare(model, engine, fit_data)`` does the one-off work (embed the class prompts, fit a
  fusion head) and returns nothing;
* ``logits(embeddings)`` is a pure, differentiable map from ``{modality: (N, D)}`` embeddings to
  logits. Checks that perturb one modality re-embed only that modality and call ``logits`` again.

Classification tasks give ``(N, C)`` logits over ``data.classes``; retrieval gives the
``(N_image, N_text)`` similarity matrix.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset
    from mmsafe.models.base import EncoderModel

TaskKind = Literal["classification", "retrieval", "ranking", "generation"]


class Engine(Protocol):
    """What a task asks of the engine (:class:`mmsafe.engine.Engine` is one).

    A protocol, so that tasks do not import the engine module while the engine imports tasks.
    """

    def embed(self, model: EncoderModel, data: Dataset, modalities: Any, **kw: Any) -> Any:
        """Embeddings of ``data``'s rows (cached)."""
        ...

    def embed_values(self, model: EncoderModel, modality: str, values: Any, **kw: Any) -> Any:
        """Embeddings of raw values such as class prompts (cached)."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Count passes that are not forward passes (e.g. training)."""
        ...


class TaskError(ValueError):
    """A task cannot run on this model or data; the message says why and what to do."""


@dataclass
class Outputs:
    """The clean outputs of one task on one dataset, computed once and shared by every check.

    Attributes:
        embeddings: ``{modality: (N, D)}`` L2-normalised embeddings (CPU, float32); for
            ``seqrec``, the catalog items' features ``{modality: (I, D)}``.
        logits: ``(N, C)`` class logits, ``(N, N)`` image-to-text similarities for retrieval,
            or ``(N_users, I)`` item scores for ``seqrec``.
        labels: ``(N,)`` int64 labels, ``-1`` where unlabelled.
        groups: the group column, if any.
        positives: for retrieval, the ``(N, N)`` boolean matrix of matching image-text pairs.
        texts: for ``vqa``, the model's answer to each row (``logits`` is then ``(N, 0)``).
        images: for ``t2i``, the generator's ``(N, 3, S, S)`` image for each row's prompt.
    """

    embeddings: dict[str, Tensor]
    logits: Tensor
    labels: np.ndarray
    groups: list[str] | None = None
    positives: np.ndarray | None = None
    texts: list[str] | None = None
    images: Tensor | None = None

    @property
    def probs(self) -> np.ndarray:
        """Softmax probabilities over the last axis, as float64 numpy.

        Computed in NumPy: for an audit's few thousand rows that takes microseconds, where
        waking torch's thread pool for a small tensor took milliseconds.
        """
        z = self.logits.detach().cpu().double().numpy()
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    @property
    def preds(self) -> np.ndarray:
        """Arg-max predictions (int64)."""
        return self.logits.argmax(dim=-1).numpy().astype(np.int64)


class Task(ABC):
    """Base class: a named way to get predictions from an encoder model."""

    name: ClassVar[str]
    kind: ClassVar[TaskKind]
    modalities: ClassVar[tuple[str, ...]] = ("image", "text")

    @abstractmethod
    def prepare(
        self,
        model: EncoderModel,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """One-off work before outputs can be computed (class prompts, fitting a head).

        Args:
            model: the encoder.
            engine: embeds whatever the task needs (cached).
            classes: the class names of the data to be scored.
            fit_data: rows a task may learn from (the ``train`` split), if any.
        """

    @abstractmethod
    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """Logits from embeddings; pure and differentiable."""

    def params(self) -> dict[str, Any]:
        """The task's configuration, JSON-able (shown in the card and part of the cache key)."""
        return {}

    def state_fingerprint(self) -> str:
        """A hash of what ``prepare`` learned (empty when nothing); part of the cache key."""
        return ""

    def fingerprint(self) -> str:
        """A hash of the name, configuration and prepared state."""
        blob = json.dumps([self.name, self.params(), self.state_fingerprint()], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_data(self, data: Dataset) -> None:
        """Raise :class:`TaskError` when ``data`` lacks what this task needs."""
        missing = [m for m in self.modalities if m not in data.modalities]
        if missing:
            raise TaskError(
                f"Task {self.name!r} needs the modalities {list(self.modalities)}, but the data "
                f"{data.name!r} has {list(data.modality_names)} (missing {missing}). Add the "
                f"missing column(s) to the manifest or pick another --task."
            )
        if self.kind == "classification" and not data.labelled.any():
            raise TaskError(
                f"Task {self.name!r} needs labels, but no row of {data.name!r} has one. Add a "
                f"'label' column, or use --task retrieval."
            )

    def outputs(self, embeddings: dict[str, Tensor], data: Dataset) -> Outputs:
        """Assemble :class:`Outputs` from the embeddings of ``data``."""
        with torch.inference_mode():
            logits = self.logits(embeddings).float().cpu()
        return Outputs(
            embeddings=embeddings,
            logits=logits,
            labels=data.labels.copy(),
            groups=None if data.groups is None else list(data.groups),
        )


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under its ``name``."""
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return sorted(_TASKS)


def create_task(name: str, **kwargs: Any) -> Task:
    """Build a task by name (``zero_shot``, ``retrieval``, ``fusion``)."""
    if name not in _TASKS:
        raise TaskError(f"Unknown task {name!r}. Choose one of: {', '.join(list_tasks())}.")
    return _TASKS[name](**kwargs)


class TemperatureScaledTask(Task):
    """Another task's logits divided by a fitted temperature (calibration hardening).

    Args:
        inner: the prepared task to wrap.
        temperature: ``T > 0``; ``T > 1`` softens overconfident predictions.
    """

    def __init__(self, inner: Task, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.inner = inner
        self.temperature = float(temperature)
        self.name = inner.name  # type: ignore[misc]  # checks select on the task name
        self.kind = inner.kind  # type: ignore[misc]
        self.modalities = inner.modalities  # type: ignore[misc]

    def prepare(
        self,
        model: EncoderModel,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Prepare the wrapped task."""
        self.inner.prepare(model, engine, classes, fit_data)

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """The wrapped logits divided by the temperature."""
        return self.inner.logits(embeddings) / self.temperature

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {**self.inner.params(), "temperature": self.temperature}

    def state_fingerprint(self) -> str:  # noqa: D102
        return self.inner.state_fingerprint()

    def outputs(self, embeddings: dict[str, Tensor], data: Dataset) -> Outputs:  # noqa: D102
        out = self.inner.outputs(embeddings, data)
        out.logits = out.logits / self.temperature
        return out
