"""``images:<manifest>``: a user's own generated images, audited without the generator.

Images made by any system (a hosted API, another toolkit, a model that cannot be loaded here)
are listed in a JSONL or CSV manifest, one generated image per row::

    {"id": "g0", "text": "a red circle on the left", "image": "gen/0.png", "generator": "sd15"}

* ``text``: the prompt the image was made from; ``image``: its file (relative to the manifest);
* ``generator`` (optional): which system made it. A manifest with two or more generators feeds
  ``generative.provenance`` (leave one generator out, and attribution among them).

:class:`GeneratedImages` serves these images through the generator protocol, so the engine,
the ``t2i`` task and the checks treat it as any generator; it *replays* and cannot draw a new
prompt (``replay = True``). Seed ``k`` of a prompt is its ``k``-th image (cyclically), so a
prompt with ``n`` images gives ``n`` distinct draws. The checks that need no access to the
generator run on it (quality, fidelity, bias, provenance, memorisation against the ``train``
rows of ``--data``, and the post-hoc watermarks); safety's prompt search and Tree-Ring skip
with a reason. Images of another size are resized (bilinear, antialiased) to the size of the
first row's image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmsafe.data.dataset import Dataset
from mmsafe.models.base import ModelError, images_to_tensor, register_model
from mmsafe.models.generator import ImageGenerator

DEFAULT_GENERATOR = "generated"
"""The source name of rows without a ``generator`` cell."""


class GeneratedImages(ImageGenerator):
    """A fixed set of (prompt, image) rows as a replaying :class:`ImageGenerator`.

    Args:
        data: the manifest's rows (``text`` and ``image`` modalities).
        image_size: the side images are served at (default: the first image's longer side).

    Example:
        >>> import numpy as np
        >>> rows = Dataset(name="gen.jsonl", ids=["a", "b", "c"], modalities={
        ...     "text": ["a dog", "a dog", "a cat"],
        ...     "image": [np.full((4, 4, 3), v, np.uint8) for v in (0, 255, 128)]},
        ...     labels=np.full(3, -1), classes=[],
        ...     meta=[{"generator": "x"}, {"generator": "x"}, {}])
        >>> gen = GeneratedImages(rows)
        >>> gen.generate(["a dog", "a dog", "a dog"], seeds=[0, 1, 2])[:, 0, 0, 0].tolist()
        [0.0, 1.0, 0.0]
        >>> gen.count("a dog"), gen.count("a bird"), gen.sources()
        (2, 0, ['x', 'x', 'generated'])
    """

    replay = True
    modalities = ("text",)

    def __init__(self, data: Dataset, *, image_size: int | None = None) -> None:
        super().__init__()
        origin = data.source or data.name
        for need in ("text", "image"):
            if need not in data.modalities:
                raise ModelError(
                    f"{origin}: a manifest of generated images needs a {need!r} column "
                    f"({'the prompt' if need == 'text' else 'the image file'} of each row)."
                )
        if len(data) == 0:
            raise ModelError(f"{origin}: the manifest of generated images has no rows.")
        self.data = data
        self.name = f"images:{data.name}"
        self._prompts = [str(t) for t in data.modalities["text"]]
        self._rows: dict[str, list[int]] = {}
        for i, p in enumerate(self._prompts):
            self._rows.setdefault(p, []).append(i)
        first = data.modalities["image"][0]
        self._size = int(image_size or max(first.shape[:2]))

    @property
    def image_size(self) -> int:
        """The side images are served at."""
        return self._size

    def count(self, prompt: str) -> int:
        """How many images the manifest holds for ``prompt``."""
        return len(self._rows.get(str(prompt), ()))

    def prompts(self) -> list[str]:
        """The distinct prompts, in manifest order."""
        return list(self._rows)

    def sources(self) -> list[str]:
        """The generator of each row (``generator`` cell, else :data:`DEFAULT_GENERATOR`)."""
        return [str(m.get("generator") or DEFAULT_GENERATOR) for m in self.data.meta]

    def rows(self, indices: Sequence[int] | None = None) -> Tensor:
        """Rows' images ``(N, 3, S, S)`` in ``[0, 1]`` (all rows when ``indices`` is None)."""
        idx = range(len(self.data)) if indices is None else indices
        column = self.data.modalities["image"]
        return images_to_tensor([column[int(i)] for i in idx], self._size)

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """Not available: the images were made elsewhere, from noise this manifest lacks."""
        raise NotImplementedError(f"{self.name}: a manifest of images has no initial noise")

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        noise: Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Image ``seed mod n`` of each prompt's ``n`` images; a missing prompt is an error.

        ``steps`` and ``guidance`` must be left at None: the images are what they are.

        Raises:
            ModelError: a prompt has no image in the manifest, or a sampler setting was given.
        """
        if noise is not None or steps is not None or guidance is not None:
            raise ModelError(
                f"{self.name}: a manifest of generated images cannot be drawn with other noise, "
                "steps or guidance."
            )
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        picked = []
        for p, s in zip(prompts, seeds, strict=True):
            rows = self._rows.get(str(p))
            if not rows:
                raise ModelError(
                    f"{self.data.source or self.data.name}: no generated image for the prompt "
                    f"{str(p)[:80]!r}. Add a row with this text, or audit only prompts the "
                    "manifest holds."
                )
            picked.append(rows[int(s) % len(rows)])
        return self.rows(picked)

    def config(self) -> dict[str, Any]:
        """The manifest, its content hash and the serving size."""
        return {
            "family": "images",
            "manifest": self.data.source or self.data.name,
            "rows": len(self.data),
            "data_fingerprint": self.data.fingerprint(),
            "image_size": self._size,
        }

    @property
    def device(self) -> torch.device:
        """Always the CPU (nothing to compute)."""
        return torch.device("cpu")


@register_model("images:", "a manifest of generated images (prompt + image rows)", kind="generator")
def load_generated_images(path: str, device: str = "cpu", **_: Any) -> GeneratedImages:
    """``images:<manifest>``: load and validate the manifest (JSONL or CSV)."""
    from mmsafe.data.manifest import load_manifest

    if not path:
        raise ModelError("images: needs a manifest, e.g. --model images:generated.jsonl")
    if not Path(path).is_file():
        raise ModelError(
            f"images:{path}: no such manifest. Give a JSONL or CSV file of prompt (text) and "
            "image rows."
        )
    return GeneratedImages(load_manifest(path))
