"""The protocol of text-to-image generators (the ``generator`` target kind).

A :class:`ImageGenerator` draws one image per (prompt, seed)::

    images = model.generate(["a red circle on the left"], seeds=[0])  # (1, 3, S, S) in [0, 1]

* Row ``i`` starts from :meth:`initial_noise` of ``seeds[i]``, so batching (or the batch a row
  lands in) never changes an image, and the engine can cache images per (prompt, seed).
* ``generate(..., noise=z)`` starts from a given initial noise instead (Tree-Ring-style
  watermarks key it); ``noise`` has the shape :meth:`initial_noise` returns.

Diffusion and flow-matching generators also expose their denoiser (optional methods an adapter
overrides, listed by :meth:`capabilities`):

* ``predict(x_t, t, prompts)``: the network's output (noise for DDPM/DDIM, velocity for flow
  matching) at time ``t`` in ``[0, 1]`` (0 is data), differentiable in the parameters; an
  empty prompt ``""`` is the unconditional branch. Concept erasure (ESD) fine-tunes through it.
* ``add_noise(x0, noise, t)``: the forward process, ``x_t`` from clean images ``x0`` in
  ``[0, 1]`` (the model maps pixels to its own space inside).
* ``invert(images, prompts)``: deterministic inversion (DDIM, or the reverse ODE for flow
  matching) from images back to the initial noise, for Tree-Ring detection.
* ``regenerate(images, prompts, strength, seeds)``: SDEdit (Meng et al., 2022) with the model's
  own sampler: noise images ``(B, 3, S, S)`` in ``[0, 1]`` to time ``t = strength`` in
  ``(0, 1]`` with each seed's :meth:`initial_noise` (row ``i`` depends on ``seeds[i]`` only),
  then denoise from ``t`` to 0 conditioned on the prompt; a regeneration attack on watermarks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmsafe.models.base import module_fingerprint

GENERATOR_OPTIONAL_METHODS: tuple[str, ...] = ("predict", "add_noise", "invert", "regenerate")
"""Methods of :class:`ImageGenerator` an adapter may implement (its capabilities)."""


class ImageGenerator(nn.Module, ABC):
    """A text-to-image generator: prompt + seed -> image.

    Subclasses set ``name`` and implement :meth:`generate`, :meth:`initial_noise`,
    :meth:`config` and the ``image_size`` property.
    """

    kind: ClassVar[str] = "generator"
    replay: ClassVar[bool] = False
    """True for a fixed set of images (``images:<manifest>``): it cannot draw a new prompt."""
    name: str = "generator"
    modalities: tuple[str, ...] = ("text",)

    @property
    @abstractmethod
    def image_size(self) -> int:
        """The side of the square images :meth:`generate` returns."""

    @abstractmethod
    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """The initial noise of each seed, ``(B, ...)``: row ``i`` depends on ``seeds[i]`` only."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        noise: Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """``(B, 3, S, S)`` float images in ``[0, 1]``, one per prompt.

        Args:
            prompts: one prompt per image.
            seeds: one seed per prompt (default ``0, 1, ...``); ignored where ``noise`` is given.
            noise: the initial noise (shape of :meth:`initial_noise`), instead of the seeds'.
            steps: sampler steps (the model's default when None).
            guidance: classifier-free guidance scale (the model's default when None).
        """

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-able description: enough to rebuild the architecture and to show in a card."""

    def predict(self, x_t: Tensor, t: Tensor, prompts: Sequence[str]) -> Tensor:
        """The denoiser's output at ``x_t``, time ``t`` (``(B,)`` in ``[0, 1]``); optional."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its denoiser")

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process: ``x_t`` from images ``x0`` in ``[0, 1]``; optional."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its noise schedule")

    def invert(self, images: Tensor, prompts: Sequence[str], *, steps: int | None = None) -> Tensor:
        """Deterministic inversion of images ``(B, 3, S, S)`` to their initial noise; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot invert images")

    def regenerate(
        self,
        images: Tensor,
        prompts: Sequence[str],
        strength: float,
        seeds: Sequence[int] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Images ``(B, 3, S, S)`` in ``[0, 1]`` noised to ``t = strength``, denoised; optional.

        SDEdit (Meng et al., 2022): the forward process takes each image to time ``strength``
        in ``(0, 1]`` with the :meth:`initial_noise` of its seed (row ``i`` depends on
        ``seeds[i]`` only, never on its batch), then the model's own sampler runs from there
        down to ``t = 0``, conditioned on the prompt. ``strength = 1`` starts from pure noise.

        Args:
            images: ``(B, 3, S, S)`` float images in ``[0, 1]`` at :attr:`image_size`.
            prompts: one prompt per image.
            strength: the time the images are noised to, in ``(0, 1]``.
            seeds: one seed per image (default ``0, 1, ...``).
            steps: sampler steps of a full ``1 -> 0`` run (the model's default when None);
                about ``strength * steps`` of them are taken.
            guidance: classifier-free guidance scale (the model's default when None).

        Returns:
            ``(B, 3, S, S)`` float images in ``[0, 1]``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot regenerate images")

    def capabilities(self) -> frozenset[str]:
        """The optional methods this adapter implements."""
        return frozenset(
            n
            for n in GENERATOR_OPTIONAL_METHODS
            if getattr(type(self), n) is not getattr(ImageGenerator, n)
        )

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (CPU when there are none)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def fingerprint(self) -> str:
        """A hash of the config and every weight; the engine keys cached images on it."""
        return module_fingerprint(self, self.config())

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint (call after changing weights, e.g. in a hardener)."""
        object.__setattr__(self, "_fingerprint_cache", None)
