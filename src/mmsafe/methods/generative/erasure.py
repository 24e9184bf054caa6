"""Concept erasure: ESD fine-tuning of a generator's denoiser (Gandikota et al., 2023).

**ESD.** "Erasing Concepts from Diffusion Models" fine-tunes the denoiser so that, prompted
with the concept ``c``, it predicts what the *frozen* model predicts with negative guidance
away from ``c``::

    target(x_t) = v*(x_t, "") - eta * (v*(x_t, c) - v*(x_t, ""))
    loss        = || v(x_t, c) - target(x_t) ||^2

where ``v*`` is the frozen model, ``v`` the one trained and ``x_t`` a noised image of the
concept. The paper writes it for the noise prediction ``eps``; every prediction here (noise,
velocity, clean image) is an affine function of the score at a fixed ``x_t`` and ``t``, so the
same target holds for the velocity a flow model predicts (:meth:`ImageGenerator.predict`).

**Differences from the paper, stated.**

* ``x_t`` is a frozen-model image of the concept (drawn once) noised to a uniform time, not a
  partial sample of the model being trained; this is the common re-implementation and costs
  one generation instead of one per step.
* An optional *preservation* term (``preserve > 0``) keeps the prediction for other prompts at
  the frozen model's (as in Kumari et al., 2023, "Ablating Concepts"): ESD alone also damages
  neighbouring concepts, which the re-audit's fidelity would then report.

Example:
    >>> import torch
    >>> u, c = torch.zeros(1, 3), torch.ones(1, 3)
    >>> esd_target(u, c, eta=1.0).tolist()
    [[-1.0, -1.0, -1.0]]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["concept_prompts", "erase_concept", "esd_target"]


def esd_target(v_uncond: Tensor, v_concept: Tensor, eta: float = 1.0) -> Tensor:
    """The frozen model's prediction guided away from the concept: ``u - eta (c - u)``."""
    return v_uncond - eta * (v_concept - v_uncond)


def _weighted_mse(pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
    """Mean squared error weighted by ``t^2`` per row.

    A velocity error times ``t`` is the error of the clean image it implies, so no time
    dominates through the ``1 / t`` of the velocity.
    """
    w = (t.to(pred.device) ** 2)[:, None, None, None]
    return (w * (pred - target) ** 2).mean() / w.mean()


def concept_prompts(
    captions: Iterable[str], concept: str, *, holdout: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Split captions into those naming ``concept`` (a whole word) and the others.

    Captions holding a ``holdout`` phrase (paraphrases kept for the re-audit) are in neither.

    Example:
        >>> concept_prompts(["a star", "a red star", "a circle", "a pentagram"], "star",
        ...                 holdout=["pentagram"])
        (['a star', 'a red star'], ['a circle'])
    """
    named, other = [], []
    for text in dict.fromkeys(str(c) for c in captions):
        if any(h in text for h in holdout):
            continue
        (named if concept in text.replace(",", " ").split() else other).append(text)
    return named, other


def erase_concept(
    model: Any,
    concept: Sequence[str],
    keep: Sequence[str],
    *,
    parameters: Callable[[Any], Iterable[torch.nn.Parameter]] | None = None,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-4,
    eta: float = 1.0,
    preserve: float = 1.0,
    n_images: int = 64,
    t_min: float = 0.05,
    generate: Callable[[Any, list[str], list[int]], Tensor] | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Any, list[float]]:
    """ESD-fine-tune a copy of ``model`` to stop drawing ``concept``; the original is untouched.

    Args:
        model: an :class:`~mmsafe.models.generator.ImageGenerator` with ``predict`` and
            ``add_noise`` (see its ``capabilities()``).
        concept: prompts that name the concept (the model is trained on these).
        keep: prompts whose predictions stay at the frozen model's (``preserve`` term).
        parameters: which weights of the copy to train (default: all of them).
        steps: optimiser steps.
        batch_size: concept (and keep) images per step.
        lr: Adam learning rate.
        eta: negative-guidance strength of the target.
        preserve: weight of the preservation term (0: plain ESD).
        n_images: frozen-model images drawn per prompt family (the ``x_0`` that get noised).
        t_min: times are uniform in ``[t_min, 1]``.
        generate: ``(model, prompts, seeds) -> images`` (default ``model.generate``); pass the
            engine's cached call.
        seed: seeds the images, times, noise and batches.
        progress: called with ``(step, loss)`` every step.

    Returns:
        ``(erased copy, mean loss per tenth of the schedule)``.
    """
    if not {"predict", "add_noise"} <= set(model.capabilities()):
        raise ValueError("erase_concept needs a generator with predict() and add_noise()")
    if not concept:
        raise ValueError("erase_concept needs at least one prompt naming the concept")
    if steps < 1 or batch_size < 1 or n_images < 1:
        raise ValueError("steps, batch_size and n_images must be >= 1")
    draw = generate or (lambda m, p, s: m.generate(p, seeds=s))
    rng = np.random.default_rng([seed, 0xE5D])
    gen = torch.Generator().manual_seed(seed)

    def images(prompts: Sequence[str], base: int) -> tuple[Tensor, list[str]]:
        chosen = [prompts[i] for i in rng.integers(len(prompts), size=n_images)]
        seeds = [base + i for i in range(n_images)]
        return draw(model, chosen, seeds).detach().cpu(), chosen

    x_c, p_c = images(concept, 700_000)
    x_k, p_k = images(keep, 800_000) if keep and preserve > 0 else (None, [])
    frozen = model
    tuned = copy.deepcopy(model)
    params = list(parameters(tuned) if parameters else tuned.parameters())
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)

    def noised(x0: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        idx = torch.randint(len(x0), (batch_size,), generator=gen).tolist()
        t = t_min + (1 - t_min) * torch.rand(batch_size, generator=gen)
        z = torch.randn((batch_size, *x0.shape[1:]), generator=gen)
        return frozen.add_noise(x0[idx], z, t), t, idx

    losses: list[float] = []
    for step in range(steps):
        x_t, t, idx = noised(x_c)
        prompts = [p_c[i] for i in idx]
        with torch.no_grad():
            target = esd_target(
                frozen.predict(x_t, t, [""] * batch_size), frozen.predict(x_t, t, prompts), eta
            )
        loss = _weighted_mse(tuned.predict(x_t, t, prompts), target, t)
        if x_k is not None:
            x_t, t, idx = noised(x_k)
            prompts = [p_k[i] for i in idx]
            with torch.no_grad():
                target = frozen.predict(x_t, t, prompts)
            loss = loss + preserve * _weighted_mse(tuned.predict(x_t, t, prompts), target, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    for p in tuned.parameters():
        p.requires_grad_(False)
    tuned.invalidate_fingerprint()  # new weights: the engine must not serve the old images
    tenth = max(steps // 10, 1)
    return tuned.eval(), [float(np.mean(losses[i : i + tenth])) for i in range(0, steps, tenth)]
