"""tiny-diffusion: a small caption-conditioned rectified-flow generator trained on shapes-gen.

**Process.** Rectified flow (flow matching on straight paths): ``x_t = (1 - t) x0 + t z``
between data ``x0`` (pixels scaled to ``[-1, 1]``, ``t = 0``) and Gaussian noise ``z``
(``t = 1``). The network predicts the clean image ``x0_hat`` (x-prediction, as in Li & He
2025's "JiT": in pixel space it learns far faster than noise or velocity prediction here) and
the velocity is ``v = (x_t - x0_hat) / t``; the loss is the mean squared error of ``x0_hat``
with logit-normal times shifted toward noise (``t_mean``), where the caption decides the layout.
Sampling integrates ``dx/dt = v`` from ``t = 1`` to ``0`` with ``steps`` Euler steps and
classifier-free guidance ``v = v("") + g (v(prompt) - v(""))`` (captions are dropped to ``""``
in training with probability ``p_uncond``).

**Regeneration.** :meth:`TinyDiffusion.regenerate` (SDEdit) noises images to ``t = strength``
with the seeds' noise (:meth:`~TinyDiffusion.add_noise`) and runs the same Euler sampler from
there, ``max(1, round(strength * steps))`` steps; at ``strength = 1`` it is :meth:`generate`.

**Inversion.** :meth:`TinyDiffusion.invert` runs the same Euler grid backwards (``0 -> 1``),
each step using the velocity at the step's end time evaluated at its start point (DDIM
inversion); it is deterministic. It is *cycle-consistent*, ``generate(invert(x)) ~ x``, but it
does not give back ``z`` itself: a trained model maps most of ``z`` to the same image (the
caption fixes almost everything in this world), so the image holds little of ``z`` and no
inversion can recover it. Measured numbers are in ``tests/test_tiny_diffusion.py``.

**Network.** A small UNet on 2x2 patches (pixel-unshuffle: a 32 px image is a 16x16 grid of 12
channels), levels 16 -> 8 -> 4 with ``channels`` widths, one residual block per level and
side, skip connections. The caption enters four ways: FiLM in every block (time embedding +
pooled caption), cross-attention to its tokens at every level, a *canvas* at every level (a
feature map linear in the conditioning vector: "on the left" paints the left cells, while the
convolutions stay translation-equivariant, so a shape learned at one place is drawn at every
place) and a final caption-dependent 3x3 colour transform of the output (the network draws a
shape once and the caption colours it). The text encoder is word-level (tiny-vlm's
:class:`~mmsafe.models.tiny_vlm.WordVocab` over the world's captions; unknown words are
``<unk>``): embeddings, one pre-norm transformer block, mean pooling.

**Why this size.** 2x2 patches cut the convolution cost four-fold against 32 px convolutions
while keeping every pixel (output at the full 32 px, so a memorised duplicate comes back
pixel for pixel). Widths ``(32, 64)`` give 2.3 M weights (1 M of them the 16x16 canvas) and a
step of 32 images costs about 0.2 CPU seconds on one core. The quick schedule (2000 steps,
the tests') trains in about 7 minutes on one core of the dev machine, the full one (4000) in
about 13 minutes on one core, under 10 on two.

**Measured** (quick schedule on ``shapes-gen:n_images=2000``, judged by the reference attribute
CNN, 100% accurate on held-out real images; 16 colour x position prompts per shape): the shape
asked for is drawn on 96% of samples (94% for squares, whose non-red versions are rare in the
planted world; 81-94% for the star), colour and position on ~100%; the four planted duplicates
come back from their captions (nearest/second-nearest training image distance 0.3-0.4, against
0.76-1.0 for ordinary captions).

**Guidance.** The default is ``guidance=1`` (plain conditional sampling): prompt following is
the same as at 2, and classifier-free guidance 2 doubles the colour bias of prompts that name
no colour (mean TVD from uniform 0.15 -> 0.31 on the control world).

Trained weights are cached as ``model.safetensors`` + ``config.json`` under
``<cache>/models/tiny-diffusion-<hash>/``, keyed on the architecture, the training schedule,
the seed and the training data's fingerprint; ``tiny-diffusion:<dir>`` loads a saved one.

Example:
    >>> cfg = TinyDiffusionConfig(vocab=WordVocab.build(["a red circle"]).tokens, channels=(8, 16))
    >>> model = TinyDiffusion(cfg)
    >>> images = model.generate(["a red circle", "a red star"], seeds=[0, 1], steps=2)
    >>> tuple(images.shape), bool(images.min() >= 0), bool(images.max() <= 1)
    ((2, 3, 32, 32), True, True)
    >>> sorted(model.capabilities())
    ['add_noise', 'invert', 'predict', 'regenerate']
    >>> model.regenerate(images, ["a red circle", "a red star"], 0.5, seeds=[0, 1], steps=2).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsafe.data.dataset import Dataset
from mmsafe.models.base import ModelError, register_model
from mmsafe.models.generator import ImageGenerator
from mmsafe.models.tiny_clip import _Block, cache_root
from mmsafe.models.tiny_vlm import BOS, PAD, WordVocab

FORMAT = "mmsafe.tiny-diffusion/1"
T_MIN = 0.05
"""x-prediction's velocity ``(x_t - x0_hat) / t`` divides by at least this time."""


@dataclass(frozen=True)
class TinyDiffusionConfig:
    """The architecture and default sampler of a tiny-diffusion.

    Attributes:
        vocab: the word vocabulary (tiny-vlm's specials first).
        image_size: side of the generated images in pixels (a multiple of ``4 * patch``).
        patch: pixels per side folded into channels before the UNet.
        channels: UNet widths at the patch grid and at its half (the quarter keeps the second).
        text_width: width of the word embeddings and the text transformer.
        text_layers: text transformer blocks.
        heads: attention heads (text encoder and cross-attention).
        max_text: words per caption read (with ``<bos>``); longer captions are cut.
        cond_width: width of the FiLM conditioning vector.
        steps: default Euler steps of the sampler.
        guidance: default classifier-free guidance scale (1 = plain conditional).
    """

    vocab: tuple[str, ...]
    image_size: int = 32
    patch: int = 2
    channels: tuple[int, int] = (32, 64)
    text_width: int = 64
    text_layers: int = 1
    heads: int = 4
    max_text: int = 16
    cond_width: int = 128
    steps: int = 20
    guidance: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        d = dataclasses.asdict(self)
        return {**d, "vocab": list(self.vocab), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TinyDiffusionConfig:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if k in ("vocab", "channels") else v for k, v in d.items() if k in names}
        )


# --------------------------------------------------------------------------- network
def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of times ``t`` ``(B,)`` in ``[0, 1]``: ``(B, dim)``.

    Example:
        >>> timestep_embedding(torch.tensor([0.0, 1.0]), 8).shape
        torch.Size([2, 8])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, FiLM-modulated by the conditioning vector."""

    def __init__(self, c_in: int, c_out: int, cond: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(cond, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class _CrossAttention(nn.Module):
    """Each cell of a feature map attends to the caption's tokens (residual, zero-initialised)."""

    def __init__(self, channels: int, text_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_width, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, tokens: Tensor, keep: Tensor) -> Tensor:
        """``x + attention(x, tokens)`` for ``x`` ``(B, C, H, W)``, tokens ``(B, L, W)``."""
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))
        q = q.view(b, h * w, self.heads, -1).transpose(1, 2)
        k, v = self.kv(tokens).view(b, tokens.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        out = self.out(a.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class _Canvas(nn.Module):
    """A feature map painted by the conditioning vector: ``(B, C, g, g)``, linear in it.

    Where a word puts things ("on the left") is then a first-order function of the caption.
    """

    def __init__(self, cond: int, channels: int, grid: int, std: float = 0.1) -> None:
        super().__init__()
        self.channels, self.grid = channels, grid
        self.paint = nn.Linear(cond, channels * grid * grid)
        nn.init.normal_(self.paint.weight, std=std)
        nn.init.zeros_(self.paint.bias)

    def forward(self, cond: Tensor) -> Tensor:
        """The painted map of ``cond`` ``(B, cond)``."""
        return self.paint(cond).view(len(cond), self.channels, self.grid, self.grid)


class TextEncoder(nn.Module):
    """Word embeddings + pre-norm transformer blocks: ``(tokens (B, L, W), pooled (B, W))``."""

    def __init__(self, cfg: TinyDiffusionConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(len(cfg.vocab), cfg.text_width)
        nn.init.normal_(self.token.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(cfg.max_text, cfg.text_width) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(cfg.text_width, cfg.heads) for _ in range(cfg.text_layers)
        )
        self.ln = nn.LayerNorm(cfg.text_width)

    def forward(self, ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Token states and their mean over real tokens, of ``ids`` with ``keep``."""
        x = self.token(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln(x)
        w = keep.float().unsqueeze(-1)
        return x, (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class FlowUNet(nn.Module):
    """The denoiser: ``(x_t (B, 3, S, S), t (B,), tokens, pooled, keep) -> x0_hat (B, 3, S, S)``."""

    def __init__(self, cfg: TinyDiffusionConfig) -> None:
        super().__init__()
        c0, c1 = cfg.channels
        p, cw = cfg.patch, cfg.cond_width
        g = cfg.image_size // p
        self.patch = p
        self.time = nn.Sequential(nn.Linear(cw, cw), nn.SiLU(), nn.Linear(cw, cw))
        self.text = nn.Sequential(nn.Linear(cfg.text_width, cw), nn.SiLU(), nn.Linear(cw, cw))
        self.stem = nn.Conv2d(3 * p * p, c0, 3, padding=1)
        self.canvas0 = _Canvas(cw, c0, g)
        self.down0 = _ResBlock(c0, c0, cw)
        self.attn0 = _CrossAttention(c0, cfg.text_width, cfg.heads)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.canvas1 = _Canvas(cw, c1, g // 2)
        self.down1 = _ResBlock(c1, c1, cw)
        self.attn1 = _CrossAttention(c1, cfg.text_width, cfg.heads)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.canvas_mid = _Canvas(cw, c1, g // 4)
        self.mid = _ResBlock(c1, c1, cw)
        self.attn_mid = _CrossAttention(c1, cfg.text_width, cfg.heads)
        self.up1 = _ResBlock(2 * c1, c1, cw)
        self.up0 = _ResBlock(c1 + c0, c0, cw)
        self.norm_out = nn.GroupNorm(_groups(c0), c0)
        self.head = nn.Conv2d(c0, 3 * p * p, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.recolour = nn.Linear(cw, 12)
        nn.init.zeros_(self.recolour.weight)
        nn.init.zeros_(self.recolour.bias)

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, pooled: Tensor, keep: Tensor) -> Tensor:
        """The clean-image estimate: FiLM by ``t`` and ``pooled``, cross-attending tokens."""
        cond = self.time(timestep_embedding(t, self.time[0].in_features)) + self.text(pooled)
        cond = F.silu(cond)
        h0 = self.stem(F.pixel_unshuffle(x, self.patch)) + self.canvas0(cond)
        h0 = self.attn0(self.down0(h0, cond), tokens, keep)
        h1 = self.attn1(self.down1(self.pool0(h0) + self.canvas1(cond), cond), tokens, keep)
        m = self.attn_mid(self.mid(self.pool1(h1) + self.canvas_mid(cond), cond), tokens, keep)
        u1 = self.up1(torch.cat([F.interpolate(m, scale_factor=2.0), h1], dim=1), cond)
        u0 = self.up0(torch.cat([F.interpolate(u1, scale_factor=2.0), h0], dim=1), cond)
        y = F.pixel_shuffle(self.head(F.silu(self.norm_out(u0))), self.patch)
        r = self.recolour(cond)  # a colour transform of the whole image, from the caption
        mix = torch.eye(3, device=y.device) + r[:, :9].view(-1, 3, 3)
        return torch.einsum("bij,bjhw->bihw", mix, y) + r[:, 9:, None, None]


# --------------------------------------------------------------------------- the generator
class TinyDiffusion(ImageGenerator):
    """A caption-conditioned rectified-flow UNet (see the module docstring)."""

    def __init__(self, cfg: TinyDiffusionConfig, name: str = "tiny-diffusion") -> None:
        super().__init__()
        if cfg.image_size % (4 * cfg.patch):
            raise ModelError(
                f"tiny-diffusion: image_size={cfg.image_size} must be a multiple of "
                f"{4 * cfg.patch} (4 x patch)"
            )
        self.cfg, self.name = cfg, name
        self.vocab = WordVocab(cfg.vocab)
        self.text_encoder = TextEncoder(cfg)
        self.unet = FlowUNet(cfg)
        self.training_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ protocol
    @property
    def image_size(self) -> int:  # noqa: D102
        return self.cfg.image_size

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {"family": "tiny-diffusion", **self.cfg.to_dict()}

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """``(B, 3, S, S)`` standard Gaussian noise, row ``i`` from ``seeds[i]`` alone (on CPU)."""
        s = self.cfg.image_size
        rows = [
            torch.randn(3, s, s, generator=torch.Generator().manual_seed(int(seed)))
            for seed in seeds
        ]
        return torch.stack(rows) if rows else torch.zeros(0, 3, s, s)

    def token_ids(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(ids, keep)`` ``(B, max_text)``: ``<bos>`` + words, right-padded to ``max_text``.

        The padding is fixed, so a row's encoding never depends on the batch it is in.
        """
        n = self.cfg.max_text
        ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            row = [BOS, *self.vocab.encode(p)][:n]
            ids[i, : len(row)] = torch.tensor(row)
        return ids.to(self.device), (ids != PAD).to(self.device)

    def denoise(self, x_t: Tensor, t: Tensor, ids: Tensor, keep: Tensor) -> Tensor:
        """The network's clean-image estimate ``x0_hat`` at ``x_t`` (model space), times ``t``."""
        tokens, pooled = self.text_encoder(ids, keep)
        return self.unet(x_t, t, tokens, pooled, keep)

    def velocity(self, x_t: Tensor, t: Tensor, ids: Tensor, keep: Tensor) -> Tensor:
        """The velocity ``(x_t - x0_hat) / t`` (``t`` at least :data:`T_MIN`)."""
        x0_hat = self.denoise(x_t, t, ids, keep)
        return (x_t - x0_hat) / t.clamp_min(T_MIN)[:, None, None, None]

    def predict(self, x_t: Tensor, t: Tensor, prompts: Sequence[str]) -> Tensor:
        """The velocity ``z - x0`` predicted at ``x_t`` (model space, see :meth:`add_noise`)."""
        ids, keep = self.token_ids(prompts)
        x_t = x_t.to(self.device, torch.float32)
        return self.velocity(x_t, _times(t, len(x_t), x_t.device), ids, keep)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``(1 - t) * (2 x0 - 1) + t * noise``: images in ``[0, 1]`` to model-space ``x_t``."""
        x0 = x0.to(self.device, torch.float32) * 2 - 1
        tt = _times(t, len(x0), x0.device)[:, None, None, None]
        return (1 - tt) * x0 + tt * noise.to(x0.device, torch.float32)

    def _guided(self, x: Tensor, t: float, cond: tuple[Tensor, Tensor], guidance: float) -> Tensor:
        ids, keep = cond
        tt = torch.full((len(x),), t, device=x.device)
        if guidance == 1.0:
            return self.velocity(x, tt, ids, keep)
        b = len(x)
        empty_ids, empty_keep = self.token_ids([""] * b)
        v = self.velocity(
            torch.cat([x, x]), torch.cat([tt, tt]),
            torch.cat([ids, empty_ids]), torch.cat([keep, empty_keep]),
        )  # fmt: skip
        v_c, v_u = v[:b], v[b:]
        return v_u + guidance * (v_c - v_u)

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        noise: Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Euler-integrate the flow from ``t = 1`` (the seeds' noise) to ``t = 0``: ``[0, 1]``."""
        n = len(prompts)
        if noise is None:
            seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
            if len(seeds) != n:
                raise ValueError(f"generate: {len(seeds)} seeds for {n} prompts; one per prompt")
            noise = self.initial_noise(seeds)
        if len(noise) != n:
            raise ValueError(f"generate: noise for {len(noise)} rows, {n} prompts")
        steps, guidance = self._sampler(steps, guidance)
        x = self._sample(noise.to(self.device, torch.float32), prompts, 1.0, steps, guidance)
        return ((x + 1) / 2).clamp(0, 1)

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
        """SDEdit: noise images to ``t = strength`` with the seeds' noise, Euler back to ``0``.

        ``x_t = add_noise(images, initial_noise(seeds), strength)``, then the sampler of
        :meth:`generate` on the grid ``strength -> 0`` with ``max(1, round(strength * steps))``
        steps (the full run's step length). At ``strength = 1`` this is :meth:`generate` from
        the seeds' noise; rows never depend on their batch.

        Args:
            images: ``(B, 3, S, S)`` float images in ``[0, 1]``.
            prompts: one prompt per image.
            strength: the time the images are noised to, in ``(0, 1]``.
            seeds: one seed per image (default ``0, 1, ...``).
            steps: Euler steps of a full ``1 -> 0`` run (the config's when None).
            guidance: classifier-free guidance scale (the config's when None).

        Returns:
            ``(B, 3, S, S)`` float images in ``[0, 1]``.

        Raises:
            ValueError: a strength outside ``(0, 1]``, images of another shape, or seeds or
                prompts not one per image.
        """
        n, s = len(prompts), self.cfg.image_size
        if not isinstance(images, Tensor) or tuple(images.shape) != (n, 3, s, s):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"regenerate: images must be ({n}, 3, {s}, {s}), got {shape}")
        strength = float(strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"regenerate: strength={strength} must be in (0, 1]")
        seeds = list(range(n)) if seeds is None else [int(x) for x in seeds]
        if len(seeds) != n:
            raise ValueError(f"regenerate: {len(seeds)} seeds for {n} prompts; one per prompt")
        steps, guidance = self._sampler(steps, guidance)
        with torch.no_grad():
            x = self.add_noise(images, self.initial_noise(seeds), strength)
        x = self._sample(x, prompts, strength, max(1, round(strength * steps)), guidance)
        return ((x + 1) / 2).clamp(0, 1)

    def _sample(
        self, x: Tensor, prompts: Sequence[str], start: float, steps: int, guidance: float
    ) -> Tensor:
        """Euler-integrate model-space ``x`` at time ``start`` to ``t = 0`` in ``steps`` steps."""
        grid = torch.linspace(start, 0.0, steps + 1).tolist()
        x = x.to(self.device, torch.float32).clone()
        with torch.no_grad():
            cond = self.token_ids(prompts)
            for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
                x = x + (t_next - t_now) * self._guided(x, t_now, cond, guidance)
        return x

    def invert(self, images: Tensor, prompts: Sequence[str], *, steps: int | None = None) -> Tensor:
        """Euler-integrate the flow backwards (``t = 0 -> 1``), same grid and guidance.

        The step from ``t`` to ``t + dt`` uses the velocity at time ``t + dt`` evaluated at the
        current point (DDIM inversion), the velocity sampling used for that step. Deterministic
        and cycle-consistent (see the module docstring); use ``""`` prompts when the prompt is
        unknown.
        """
        steps, guidance = self._sampler(steps, None)
        grid = torch.linspace(0.0, 1.0, steps + 1).tolist()
        x = images.to(self.device, torch.float32) * 2 - 1
        with torch.no_grad():
            cond = self.token_ids(prompts)
            for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
                x = x + (t_next - t_now) * self._guided(x, t_next, cond, guidance)
        return x

    def _sampler(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        steps = self.cfg.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        return steps, float(self.cfg.guidance if guidance is None else guidance)

    def loss(
        self,
        x0: Tensor,
        ids: Tensor,
        keep: Tensor,
        generator: torch.Generator,
        t_mean: float = 0.5,
    ) -> Tensor:
        """The training loss: mean squared error of ``x0_hat`` at a random time.

        ``x0`` are model-space images; times are logit-normal around ``sigmoid(t_mean)``.
        """
        b = len(x0)
        t = torch.sigmoid(t_mean + torch.randn(b, generator=generator)).to(x0.device)
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        tt = t[:, None, None, None]
        return F.mse_loss(self.denoise((1 - tt) * x0 + tt * z, t, ids, keep), x0)


def _times(t: Tensor | float, n: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(n) if t.dim() == 0 else t.reshape(n)


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TinyDiffusionTrainConfig:
    """How tiny-diffusion trains.

    Attributes:
        steps: optimiser steps.
        batch_size: images per step.
        lr: AdamW peak learning rate (one-cycle: warm-up, then cosine decay).
        weight_decay: AdamW weight decay.
        p_uncond: probability of dropping a caption (classifier-free guidance).
        ema: decay of the weight average kept as the final weights (0: last weights).
        t_mean: times are ``sigmoid(t_mean + N(0, 1))`` (> 0: more weight on noisy images,
            where the caption decides the layout).
    """

    steps: int = 4000
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 0.01
    p_uncond: float = 0.1
    ema: float = 0.995
    t_mean: float = 0.5

    @classmethod
    def preset(cls, quick: bool) -> TinyDiffusionTrainConfig:
        """The default schedule, or a short one for tests (``quick``)."""
        return cls(steps=2000) if quick else cls()


def images_to_model_space(images: Sequence[np.ndarray] | np.ndarray) -> Tensor:
    """``uint8`` ``(N, S, S, 3)`` images to ``(N, 3, S, S)`` floats in ``[-1, 1]``.

    Example:
        >>> images_to_model_space(np.full((1, 2, 2, 3), 255, np.uint8))[0, :, 0, 0].tolist()
        [1.0, 1.0, 1.0]
    """
    arr = np.stack([np.asarray(im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3))
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def fit_flow(
    model: TinyDiffusion,
    images: Sequence[np.ndarray] | np.ndarray,
    captions: Sequence[str],
    train: TinyDiffusionTrainConfig,
    *,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` on (image, caption) pairs; the mean loss per tenth of the schedule.

    Captions are dropped to ``""`` with probability ``train.p_uncond``; the EMA weights (when
    ``train.ema > 0``) replace the model's at the end.
    """
    x_all = images_to_model_space(images).to(model.device)
    ids_all, keep_all = model.token_ids(captions)
    empty_ids, empty_keep = model.token_ids([""])
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 0x7D1F])
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=train.lr, total_steps=max(train.steps, 1), pct_start=0.05
    )
    ema = [p.detach().clone() for p in model.parameters()] if train.ema > 0 else None
    n, bs = len(x_all), train.batch_size
    order, pos = rng.permutation(n), 0
    losses, window, start = [], [], time.perf_counter()
    report = max(train.steps // 10, 1)
    model.train()
    for step in range(train.steps):
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        idx = torch.from_numpy(order[pos : pos + bs])
        pos += bs
        drop = torch.from_numpy(rng.random(len(idx)) < train.p_uncond).to(model.device)
        ids = torch.where(drop[:, None], empty_ids, ids_all[idx])
        keep = torch.where(drop[:, None], empty_keep, keep_all[idx])
        loss = model.loss(x_all[idx], ids, keep, gen, train.t_mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, list(model.parameters()), 1 - train.ema)
        window.append(float(loss.detach()))
        if (step + 1) % report == 0 or step + 1 == train.steps:
            losses.append(float(np.mean(window)))
            window = []
            if progress:
                took = time.perf_counter() - start
                print(
                    f"[tiny-diffusion] step {step + 1}/{train.steps}: loss {losses[-1]:.4f} "
                    f"({took:.0f} s)",
                    flush=True,
                )
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(model.parameters(), ema, strict=True):
                p.copy_(e)
    model.eval()
    model.invalidate_fingerprint()
    return losses


def world_vocab(data: Dataset) -> WordVocab:
    """The vocabulary of a captioned world: every word of its captions (all splits)."""
    return WordVocab.build(data.modalities["text"])


def _check_gen_data(data: Dataset | None, name: str) -> Dataset:
    if data is None:
        from mmsafe.data.worlds.shapes_gen import make_shapes_gen

        return make_shapes_gen()
    if "image" not in data.modalities or "text" not in data.modalities:
        raise ModelError(f"{name} trains on captioned images: pass --data shapes-gen")
    if not data.has_split("train"):
        raise ModelError(f"{name} trains on the train split; the data has none")
    return data


def build_tiny_diffusion(
    *,
    train_data: Dataset | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    name: str = "tiny-diffusion",
) -> TinyDiffusion:
    """Load a trained tiny-diffusion from the cache, or train one on ``train_data``'s train rows.

    Args:
        train_data: a shapes-gen world (the default one when ``None``).
        seed: seeds initialisation and training.
        quick: a short schedule (tests).
        cache_dir: where trained models live.
        progress: print the loss ten times during training.
        device: torch device.
        name: the model's name in the card.
    """
    data = _check_gen_data(train_data, name)
    cfg = TinyDiffusionConfig(
        vocab=world_vocab(data).tokens, image_size=int(data.modalities["image"][0].shape[0])
    )
    train = TinyDiffusionTrainConfig.preset(quick)
    key = hashlib.sha256(json.dumps(
        {"format": FORMAT, "model": cfg.to_dict(), "train": dataclasses.asdict(train), "seed": seed,
         "data": data.fingerprint(), "torch": torch.__version__.split("+")[0]}, sort_keys=True,
    ).encode()).hexdigest()[:16]  # fmt: skip
    folder = cache_root(cache_dir) / "models" / f"tiny-diffusion-{key}"
    if (folder / "config.json").is_file():
        with contextlib.suppress(ModelError, OSError, RuntimeError):
            return load_tiny_diffusion(folder, device=device, name=name)
    rows = [i for i, s in enumerate(data.splits or []) if s == "train"]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyDiffusion(cfg, name=name).to(device)
        losses = fit_flow(
            model,
            [data.modalities["image"][i] for i in rows],
            [data.modalities["text"][i] for i in rows],
            train,
            seed=seed,
            progress=progress,
        )
    model.training_info = {
        "cache_key": key, "seed": seed, "quick": quick,
        "hyperparameters": dataclasses.asdict(train), "train_rows": len(rows),
        "data_fingerprint": data.fingerprint(), "data_source": data.source,
        "loss": [round(x, 5) for x in losses],
        "train_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
    }  # fmt: skip
    save_tiny_diffusion(model, folder)
    return model


def retrain_tiny_diffusion(
    model: TinyDiffusion,
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> TinyDiffusion:
    """A fresh tiny-diffusion of ``model``'s architecture and vocabulary, trained on new data.

    The schedule is the one ``model`` was trained with (its ``training_info``), or the default
    one; ``steps`` overrides its length. ``model`` is not changed.
    """
    hyper = dict(model.training_info.get("hyperparameters") or {})
    known = {f.name for f in dataclasses.fields(TinyDiffusionTrainConfig)}
    train = TinyDiffusionTrainConfig(**{k: v for k, v in hyper.items() if k in known})
    if steps:
        train = dataclasses.replace(train, steps=int(steps))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = TinyDiffusion(model.cfg, name=model.name).to(model.device)
        losses = fit_flow(fresh, images, captions, train, seed=seed, progress=progress)
    fresh.training_info = {
        "retrained_from": model.fingerprint(), "seed": seed,
        "hyperparameters": dataclasses.asdict(train), "train_rows": len(captions),
        "train_seconds": round(time.perf_counter() - start, 1),
        "loss": [round(x, 5) for x in losses],
    }  # fmt: skip
    return fresh.eval()


def save_tiny_diffusion(model: TinyDiffusion, folder: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with the training facts), atomically."""
    from safetensors.torch import save_file

    from mmsafe.engine.cache import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
    doc = {"format": FORMAT, "model": model.cfg.to_dict(), "training": model.training_info}
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    atomic_write(folder / "config.json", lambda p: p.write_text(text, encoding="utf-8"))


def load_tiny_diffusion(
    folder: str | Path, *, device: str = "cpu", name: str | None = None
) -> TinyDiffusion:
    """A saved tiny-diffusion (safetensors; nothing is unpickled).

    Raises:
        ModelError: the folder holds no tiny-diffusion.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        doc = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{folder} holds no tiny-diffusion (config.json unreadable: {exc}); pass a folder "
            "written by save_tiny_diffusion or train one with --model tiny-diffusion"
        ) from None
    if doc.get("format") != FORMAT:
        raise ModelError(f"{folder}/config.json is not a tiny-diffusion ({doc.get('format')!r})")
    cfg = TinyDiffusionConfig.from_dict(doc["model"])
    model = TinyDiffusion(cfg, name=name or f"tiny-diffusion:{folder}")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.training_info = doc.get("training", {})
    model.invalidate_fingerprint()
    return model.to(device).eval()


@register_model("tiny-diffusion", kind="generator")
def tiny_diffusion(**kwargs: Any) -> TinyDiffusion:
    """Caption-conditioned rectified-flow UNet trained on shapes-gen (planted memorisation)."""
    return build_tiny_diffusion(**kwargs)


@register_model(
    "tiny-diffusion:", "a saved tiny-diffusion, e.g. a hardened one: tiny-diffusion:<dir>",
    kind="generator",
)  # fmt: skip
def tiny_diffusion_saved(path: str, device: str = "cpu", **_: Any) -> TinyDiffusion:
    """Load a saved tiny-diffusion folder."""
    return load_tiny_diffusion(path, device=device)
