"""The protocol of generative vision-language models (the ``vlm`` target kind).

A :class:`VisionLanguageModel` answers a prompt about an image::

    pixels = model.preprocess_images(images)           # (B, 3, S, S) float in [0, 1]
    texts = model.generate(pixels, prompts, max_new_tokens=16, seeds=[0, 1, ...])
    ll = model.log_likelihood(pixels, prompts, targets)  # (B,), differentiable in pixels

* ``generate`` draws each row from a generator seeded by that row's seed, so batching (or the
  batch a row lands in) never changes an answer. ``temperature=0`` is greedy decoding.
* ``log_likelihood`` is the teacher-forced sum of ``log p(target token | image, prompt, earlier
  target tokens)`` over the target's tokens (end-of-text included), for white-box attacks: its
  gradient with respect to the pixels drives visual jailbreaks.
* Normalisation happens inside the model, so attacks and corruptions work in pixel space with
  budgets like ``16/255``, as for encoders.

Optional capabilities (methods an adapter overrides, listed by :meth:`capabilities`):
``vocabulary`` (the words or tokens a suffix search may write) and ``suffix_gradients`` (the
gradient of the loss with respect to a one-hot suffix, for GCG-style search).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.models.base import images_to_tensor, module_fingerprint

VLM_OPTIONAL_METHODS: tuple[str, ...] = ("vocabulary", "suffix_gradients")
"""Methods of :class:`VisionLanguageModel` an adapter may implement (its capabilities)."""


class VisionLanguageModel(nn.Module, ABC):
    """A generative vision-language model: image + prompt -> text.

    Subclasses set ``name`` and implement :meth:`generate`, :meth:`log_likelihood`,
    :meth:`config` and the ``input_size`` property.
    """

    kind: ClassVar[str] = "vlm"
    name: str = "vlm"
    modalities: tuple[str, ...] = ("image", "text")

    @property
    @abstractmethod
    def input_size(self) -> int:
        """The side of the square pixel tensor :meth:`preprocess_images` produces."""

    def preprocess_images(self, images: Sequence[np.ndarray]) -> Tensor:
        """uint8 ``(H, W, 3)`` images -> float pixels ``(B, 3, S, S)`` in ``[0, 1]`` (CPU)."""
        return images_to_tensor(images, self.input_size)

    @abstractmethod
    def generate(
        self,
        pixels: Tensor,
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        seeds: Sequence[int] | None = None,
        temperature: float = 0.0,
    ) -> list[str]:
        """One answer per row; row ``i`` samples from a generator seeded by ``seeds[i]``."""

    @abstractmethod
    def log_likelihood(
        self, pixels: Tensor, prompts: Sequence[str], targets: Sequence[str]
    ) -> Tensor:
        """``(B,)`` teacher-forced ``sum log p(target | image, prompt)``, end-of-text included.

        Differentiable with respect to ``pixels`` when gradients are enabled.
        """

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-able description: enough to rebuild the architecture and to show in a card."""

    def vocabulary(self) -> list[str]:
        """The tokens a suffix search may write (index = token id); optional."""
        raise NotImplementedError(f"{type(self).__name__} does not list its vocabulary")

    def suffix_gradients(
        self, pixels: Tensor, prompts: Sequence[str], suffix: Tensor, targets: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """``(loss (B,), grad (k, V))`` for suffix token ids ``suffix`` (k,) after every prompt.

        ``loss[b]`` is row ``b``'s ``-log_likelihood`` with the suffix; ``grad`` is the gradient
        of ``loss.mean()`` with respect to the suffix's one-hot tokens over :meth:`vocabulary`.
        Optional.
        """
        raise NotImplementedError(f"{type(self).__name__} has no suffix gradients")

    def capabilities(self) -> frozenset[str]:
        """The optional methods this adapter implements."""
        return frozenset(
            n
            for n in VLM_OPTIONAL_METHODS
            if getattr(type(self), n) is not getattr(VisionLanguageModel, n)
        )

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (CPU when there are none)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def fingerprint(self) -> str:
        """A hash of the config and every weight; the engine keys cached answers on it."""
        return module_fingerprint(self, self.config())

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint (call after changing weights, e.g. in a hardener)."""
        object.__setattr__(self, "_fingerprint_cache", None)


def row_generators(seeds: Sequence[int] | None, n: int, device: torch.device) -> list[Any]:
    """One ``torch.Generator`` per row, seeded by its seed (row ``i`` gets ``i`` by default).

    Example:
        >>> g = row_generators([7, 7], 2, torch.device("cpu"))
        >>> torch.rand(1, generator=g[0]).item() == torch.rand(1, generator=g[1]).item()
        True
    """
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"generate: {len(seeds)} seeds for {n} rows; pass one seed per row")
    out = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        out.append(g)
    return out
