"""Text-to-image generation: a generator draws one image for each row's prompt.

The rows carry a ``text`` (the prompt) and, where there is one, the ``image`` it describes (a
training or reference image, for quality and memorisation checks). The task's outputs are the
generator's images (:attr:`Outputs.images`), drawn once through the engine (cached) and shared by
every check. Row ``i`` is drawn with :func:`row_seed` of its id, so a row keeps its image across
runs, splits and batch sizes, while two rows with the same prompt still get different images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmsafe.tasks.base import Engine, Outputs, Task, TaskError, register_task

if TYPE_CHECKING:
    from mmsafe.data.dataset import Dataset


def row_seed(row_id: Any) -> int:
    """The generation seed of a row: a stable 31-bit hash of its id.

    Example:
        >>> row_seed("train-0") == row_seed("train-0") != row_seed("train-1")
        True
    """
    return int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=4).digest(), "big") >> 1


@register_task
class TextToImageTask(Task):
    """A ``generator`` target draws an image for each row's prompt."""

    name = "t2i"
    kind = "generation"
    modalities = ()

    def __init__(self, steps: int | None = None, guidance: float | None = None) -> None:
        self.steps = None if steps is None else int(steps)
        self.guidance = None if guidance is None else float(guidance)
        self.model_: Any = None
        self.engine_: Any = None

    def check_data(self, data: Dataset) -> None:  # noqa: D102
        if "text" not in data.modalities:
            raise TaskError(
                f"Task 't2i' needs a prompt ('text') per row, but {data.name!r} has none: pass "
                "--data shapes-gen or a manifest with a text column."
            )

    def prepare(
        self,
        model: Any,
        engine: Engine,
        classes: Sequence[str],
        fit_data: Dataset | None = None,
    ) -> None:
        """Keep the model and the engine."""
        kind = getattr(model, "kind", "encoder")
        if kind != "generator":
            name = getattr(model, "name", type(model).__name__)
            raise TaskError(
                f"Task 't2i' needs a text-to-image generator, not the {kind} {name!r}: "
                "pass --model tiny-diffusion (or diffusers:<folder>)."
            )
        self.model_, self.engine_ = model, engine

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"steps": self.steps, "guidance": self.guidance}

    def logits(self, embeddings: Mapping[str, Tensor]) -> Tensor:
        """No logits: a generative task's outputs are images."""
        return torch.zeros(0, 0)

    def draw(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """The generator's images for (prompt, seed) pairs through the engine (cached)."""
        if self.model_ is None:
            raise TaskError("t2i: call prepare() first")
        return self.engine_.generate_images(
            self.model_, list(prompts), seeds=seeds, steps=self.steps, guidance=self.guidance
        )

    def _replay_seeds(self, prompts: Sequence[str], data: Dataset) -> list[int]:
        """A replaying generator (``images:``): the k-th row of a prompt gets its k-th image."""
        missing = [i for i, p in enumerate(prompts) if self.model_.count(p) == 0]
        if missing:
            shown = ", ".join(f"{data.ids[i]!r} ({prompts[i][:40]!r})" for i in missing[:3])
            raise TaskError(
                f"{len(missing)} of {len(prompts)} rows of {data.name!r} have a prompt with no "
                f"image in {self.model_.name}, e.g. rows {shown}. Add their images to that "
                "manifest, or pass --data with only the prompts it holds."
            )
        seen: dict[str, int] = {}
        seeds = []
        for p in prompts:
            seeds.append(seen.get(p, 0))
            seen[p] = seeds[-1] + 1
        return seeds

    def outputs(self, embeddings: dict[str, Tensor], data: Dataset) -> Outputs:
        """Draw one image per row of ``data``."""
        self.check_data(data)
        prompts = [str(t) for t in data.modalities["text"]]
        if getattr(self.model_, "replay", False):
            seeds = self._replay_seeds(prompts, data)
        else:
            seeds = [row_seed(i) for i in data.ids]
        images = self.draw(prompts, seeds)
        return Outputs(
            embeddings={},
            logits=torch.zeros(len(data), 0),
            labels=data.labels.copy(),
            groups=None if data.groups is None else list(data.groups),
            images=images,
        )
